"""Quality gates against hand-computed thresholds, and the pipeline's routing of overrides."""

from __future__ import annotations

import pytest

from bitnet_kde.eval.gates import GateConfigError, check_gates, describe, gate_settings
from bitnet_kde.pipeline import fingerprint, merge, route

OVERALL = {"top1_agreement": 0.42, "kl": 1.5, "json_validity": 0.25, "teacher_json_validity": 0.5,
           "exact_match": 0.1}


def test_gates_pass_and_fail_relative_to_the_teacher():
    r = check_gates(OVERALL, {"top1_agreement": 0.4, "json_validity": 0.5, "kl_max": 2.0, "exact_match": None})
    assert r["passed"] is True
    by = {c["gate"]: c for c in r["checks"]}
    assert set(by) == {"top1_agreement", "json_validity", "kl_max"}  # null: not gated
    assert by["top1_agreement"]["threshold"] == pytest.approx(0.4)  # the teacher agrees with itself: 1
    assert by["json_validity"]["teacher"] == 0.5 and by["json_validity"]["threshold"] == pytest.approx(0.25)
    assert by["kl_max"]["rule"] == "<=" and by["kl_max"]["threshold"] == 2.0

    r = check_gates(OVERALL, {"top1_agreement": 0.43, "json_validity": 0.51, "kl_max": 1.5})
    assert r["passed"] is False
    assert {c["gate"]: c["passed"] for c in r["checks"]} == {"top1_agreement": False, "json_validity": False,
                                                             "kl_max": True}
    assert describe(r) == ("gates failed: top1_agreement 0.42 >= 0.43 FAILED; json_validity 0.25 >= 0.255 FAILED; "
                           "kl_max 1.5 <= 1.5")


def test_unmeasured_metric_fails_its_gate_and_no_gate_is_not_a_pass():
    r = check_gates({"top1_agreement": 0.9, "kl": 0.1}, {"json_validity": 0.1})
    assert r["passed"] is False and "json_validity was not measured" in r["checks"][0]["note"]
    assert check_gates(OVERALL, {"top1_agreement": None}) == {"passed": None, "checks": []}
    assert describe({"passed": None, "checks": []}) == "gates not set"


@pytest.mark.parametrize("gates, match", [({"top1": 0.3}, "gates.top1: unknown gate"),
                                          ({"kl_max": -1}, "must be a number >= 0"),
                                          ({"exact_match": "high"}, "must be a number >= 0")])
def test_bad_gate_settings_are_refused(gates, match):
    with pytest.raises(GateConfigError, match=match):
        gate_settings(gates)


def test_overrides_reach_the_stages_whose_config_has_their_key():
    args = ["storage=s3", "paths.root=/x", "teacher=openai", "+teacher.timeout_s=5", "collection.prompts.limit=8",
            "model=tiny", "trainer.max_steps=5", "experiment=ablation_kd", "pipeline.force=[train]",
            "hydra.verbose=true"]
    assert route(args, "teacher_baseline") == ["storage=s3", "paths.root=/x", "teacher=openai", "+teacher.timeout_s=5"]
    assert route(args, "collect") == [*route(args, "teacher_baseline"), "collection.prompts.limit=8"]
    assert route(args, "train") == [*route(args, "collect"), "model=tiny", "trainer.max_steps=5",
                                    "experiment=ablation_kd"]
    assert route(args, "eval") == route(args, "teacher_baseline")
    assert route(args, "dryrun") == ["storage=s3", "paths.root=/x"]
    assert "experiment=ablation_kd" not in route(args, "train", forward_experiment=False)


def test_merge_keeps_the_last_value_of_a_key_and_fingerprint_sees_order():
    assert merge(["model=tiny", "a.b=1"], ["+a.b=2", "c=3"]) == ["model=tiny", "+a.b=2", "c=3"]
    assert fingerprint(["a=1", "b=2"]) != fingerprint(["b=2", "a=1"])
    assert fingerprint(["a=1"]) == fingerprint(["a=1"]) and len(fingerprint([])) == 16
