"""The whole chain: `python pipeline.py [overrides]` / `make pipeline` -> reports/pipeline_summary.json.

Teacher baseline -> collect -> train -> eval -> 7B dry-run, each stage run by its own entry
point with the overrides that concern it; finished stages are reused on a rerun, a failed one
stops the chain (docs/PIPELINE.md).

    python pipeline.py                                  # the defaults of every stage
    python pipeline.py experiment=smoke                 # tiny student, few prompts, reduced dry-run
    python pipeline.py teacher=openai model=tiny trainer.max_steps=100 collection.prompts.limit=64
    python pipeline.py pipeline.force=[train]           # train again even though a checkpoint exists
    python pipeline.py pipeline.gates.top1_agreement=0.3 pipeline.gate=true   # exit 2 on a failed gate
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from bitnet_kde import cli, settings, storage
from bitnet_kde.pipeline import GATE_EXIT, Pipeline

log = logging.getLogger("pipeline")


@hydra.main(version_base="1.3", config_path="configs", config_name="pipeline")
def main(cfg: DictConfig) -> None:
    settings.check(cfg, exit_on_error=True)
    # the summary is written atomically (a temporary file renamed in its folder): that folder is
    # what must be writable, and what the storage line names
    storage.setup(cfg, os.path.dirname(os.fspath(cfg.pipeline.summary_path)) or ".", exit_on_error=True)
    pipeline = Pipeline(cfg, HydraConfig.get().overrides.task, scripts_dir=Path(__file__).resolve().parent)
    summary = pipeline.run()
    if cfg.pipeline.gate and summary["status"] == "gate_failed":
        sys.exit(GATE_EXIT)


if __name__ == "__main__":
    cli.run(main)
