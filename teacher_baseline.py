"""Teacher baseline: `python teacher_baseline.py [teacher=...]` -> reports/teacher_baseline.json.

Greedy answers of the teacher to the prompt set with measured latency, tokens/s and token usage
(docs/PROVIDERS.md); works with every teacher, including those without log-probabilities.
"""

from __future__ import annotations

import logging

import hydra
from omegaconf import DictConfig

from bitnet_kde import cli, records, settings, storage
from bitnet_kde.eval.teacher_baseline import baseline
from bitnet_kde.teachers import check_credentials

log = logging.getLogger("teacher_baseline")


@hydra.main(version_base="1.3", config_path="configs", config_name="teacher_baseline")
def main(cfg: DictConfig) -> None:
    settings.check(cfg, exit_on_error=True)
    storage.setup(cfg, cfg.report_path, exit_on_error=True)
    check_credentials(cfg.teacher)
    report = baseline(cfg)
    out = storage.write_json_atomic(cfg.report_path, report)
    records.write(cfg, "teacher_baseline", report, file=out)
    s = report["summary"]
    log.info("%s: %d answers, %d failures, %.1f tokens/s -> %s", report["teacher"], s["answered"], s["failed"],
             s["tokens_per_second"] or 0.0, out)


if __name__ == "__main__":
    cli.run(main, accept_old_provider=True)
