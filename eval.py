"""Evaluate a trained student against its teacher: `python eval.py [ckpt_path=...] [quality_metric=...]`.

Held-out prompts, teacher-relative quality, speed, weight memory and QEI (docs/EVALUATION.md).
Writes `reports/evaluation.json`, `reports/evaluation.png` and TensorBoard scalars. Quality gates
set under `gates.*` (thresholds relative to the teacher, docs/PIPELINE.md) mark the report passed
or failed.
"""

from __future__ import annotations

import logging

import hydra
from omegaconf import DictConfig

from bitnet_kde import cli, records, settings, storage
from bitnet_kde.eval.evaluate import evaluate
from bitnet_kde.eval.gates import check_gates, describe, gate_settings
from bitnet_kde.eval.report import log_tensorboard, plot_quality

log = logging.getLogger("eval")


@hydra.main(version_base="1.3", config_path="configs", config_name="eval")
def main(cfg: DictConfig) -> float | None:
    settings.check(cfg, exit_on_error=True)
    storage.setup(cfg, cfg.trace_dir, cfg.report_path, cfg.ckpt_path, exit_on_error=True)
    gate_settings(cfg.gates)  # a misspelt gate fails now, not after the evaluation
    report = evaluate(cfg)
    report["gates"] = check_gates(report["metrics"]["overall"], cfg.gates)
    out = storage.write_json_atomic(cfg.report_path, report)
    records.write(cfg, "eval", report, file=out)
    storage.write_bytes_atomic(cfg.chart_path, plot_quality(report))
    log_tensorboard(report, cfg.tensorboard_dir)
    m, q = report["metrics"]["overall"], report["qei"]
    log.info("KL %.4f | top-1 %.3f | ppl %.2f | JSON valid %s | exact match %s", m["kl"], m["top1_agreement"],
             m["perplexity"], m.get("json_validity"), m.get("exact_match"))
    log.info("QEI[%s] = %s, QEI_speed = %s -> %s", q["quality_metric"], q["qei"], q["qei_speed"], out)
    log.info(describe(report["gates"]))
    return q["qei"]


if __name__ == "__main__":
    cli.run(main)
