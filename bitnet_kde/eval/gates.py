"""Quality gates: pass or fail an evaluation report against thresholds relative to the teacher.

Each gate names a metric of the report's `metrics.overall` and a threshold given relative to the
teacher's own value on the same held-out prompts (docs/PIPELINE.md):

- `top1_agreement: x` passes when the student's top-1 agreement is >= x. The teacher agrees with
  itself, so x is also the ratio to the teacher.
- `exact_match: x` likewise, for exact match with the teacher's greedy answers.
- `json_validity: y` passes when the student's JSON validity is >= y x the teacher's measured rate.
- `kl_max: d` passes when KL(teacher || student) is <= d nats per token (the teacher's is 0).

A gate whose metric was not measured (e.g. no `json` prompts held out) fails: a gate that cannot
be checked must not pass a run. So does a gate relative to a teacher whose own value is 0 (its
threshold would be 0: any student passes).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


class GateConfigError(ValueError):
    """An unknown gate or a threshold that is not a number >= 0."""


@dataclass(frozen=True)
class Gate:
    """How one gate reads the report."""

    metric: str
    """Key of the student's value in `metrics.overall`."""
    teacher: str | float
    """Key of the teacher's value in `metrics.overall`, or the value itself when it is fixed."""
    at_most: bool = False
    """True: the student's value must be <= the threshold (a divergence); else >= it."""


GATES: dict[str, Gate] = {
    "top1_agreement": Gate("top1_agreement", 1.0),
    "exact_match": Gate("exact_match", 1.0),
    "json_validity": Gate("json_validity", "teacher_json_validity"),
    "kl_max": Gate("kl", 0.0, at_most=True),
}


def gate_settings(gates: Mapping | None) -> dict[str, float]:
    """The gates that are set (null = not gated), each checked: a known name and a number >= 0."""
    out = {}
    for name, value in (gates or {}).items():
        if value is None:
            continue
        if name not in GATES:
            raise GateConfigError(f"gates.{name}: unknown gate; use one of {sorted(GATES)}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise GateConfigError(f"gates.{name}={value!r}: must be a number >= 0 (or null: not gated)")
        out[name] = float(value)
    return out


def check_gates(overall: Mapping, gates: Mapping | None) -> dict:
    """`{"passed": bool | None, "checks": [...]}` for the report metrics `overall`.

    `passed` is None when no gate is set; each check holds the student's and teacher's value, the
    relative threshold as given, the absolute threshold it implies, and whether it passed.
    """
    checks = []
    for name, given in gate_settings(gates).items():
        gate = GATES[name]
        teacher = gate.teacher if isinstance(gate.teacher, float) else overall.get(gate.teacher)
        student = overall.get(gate.metric)
        check = {"gate": name, "metric": gate.metric, "student": student, "teacher": teacher, "given": given,
                 "rule": "<=" if gate.at_most else ">="}
        if student is None or teacher is None:
            check.update(threshold=None, passed=False, note=f"{gate.metric} was not measured on the held-out prompts")
        elif not isinstance(gate.teacher, float) and teacher == 0:
            check.update(threshold=None, passed=False,
                         note=f"the teacher's own {gate.teacher} is 0 on the held-out prompts, so a threshold "
                              "relative to it would pass any student: the gate cannot be checked")
        else:
            threshold = given if gate.at_most else given * teacher
            passed = student <= threshold if gate.at_most else student >= threshold
            check.update(threshold=threshold, passed=bool(passed))
        checks.append(check)
    return {"passed": all(c["passed"] for c in checks) if checks else None, "checks": checks}


def describe(result: Mapping) -> str:
    """One line: `gates passed: top1_agreement 0.41 >= 0.30; ...`, `failed: ...` or `not set`."""
    if result.get("passed") is None:
        return "gates not set"
    parts = []
    for c in result["checks"]:
        value = "n/a" if c["student"] is None else f"{c['student']:.4g}"
        limit = "n/a" if c["threshold"] is None else f"{c['threshold']:.4g}"
        parts.append(f"{c['gate']} {value} {c['rule']} {limit}{'' if c['passed'] else ' FAILED'}")
    return f"gates {'passed' if result['passed'] else 'failed'}: " + "; ".join(parts)
