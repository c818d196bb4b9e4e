"""7B dry-run: `python dryrun.py` / `make dryrun` -> reports/dryrun_7b.json and a table on stdout.

Builds the student on the meta device for its exact parameter count and an analytic memory plan
(packed and bf16 inference, training per GPU under FSDP), then materializes it directly in packed
ternary form, block by block, and runs a real forward pass at A8 and at A4 (docs/BENCHMARKS.md).

    python dryrun.py                          # the 7b preset, [1, 128] batch, CPU or the GPU
    python dryrun.py model.n_layers=2         # 7b widths, 2 blocks: seconds
    python dryrun.py device=cpu seq_len=64
"""

from __future__ import annotations

import logging
import sys

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from bitnet_kde import cli, records, settings, storage
from bitnet_kde.dryrun import print_report, run_dryrun

log = logging.getLogger("dryrun")


@hydra.main(version_base="1.3", config_path="configs", config_name="dryrun")
def main(cfg: DictConfig) -> None:
    settings.check(cfg, exit_on_error=True)
    storage.setup(cfg, cfg.report_path, exit_on_error=True)
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    report = run_dryrun(OmegaConf.to_container(cfg.model, resolve=True), seq_len=cfg.seq_len,
                        batch_size=cfg.batch_size, seed=cfg.seed, device=cfg.device,
                        plan=OmegaConf.to_container(cfg.plan, resolve=True))
    report["command"] = " ".join(["python dryrun.py", *sys.argv[1:]])
    out = storage.write_json_atomic(cfg.report_path, report)
    records.write(cfg, "dryrun", report, file=out)
    print_report(report)
    log.info("dry-run report -> %s", out)


if __name__ == "__main__":
    cli.run(main, teacher=False)
