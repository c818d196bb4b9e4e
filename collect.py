"""Collect KD traces: `python collect.py [teacher=...] [collection.sampling.top_k=...] ...`.

Writes `kd-<set>-*.parquet` shards and `manifest.json` into `trace_dir` (default `data/`).
Rerunning completes an interrupted collection; a complete set is left as it is.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig

from bitnet_kde.env import load_dotenv_file, teacher_from_env

log = logging.getLogger("collect")


@hydra.main(version_base="1.3", config_path="configs", config_name="collect")
def main(cfg: DictConfig) -> None:
    collector = instantiate(cfg.collection)
    if collector.is_complete(cfg.trace_dir):
        log.info("trace set %s is already complete in %s", collector.trace_set_id, cfg.trace_dir)
    else:
        collector.write(cfg.trace_dir)
    manifest = Path(cfg.trace_dir) / "manifest.json"
    if manifest.exists():
        info = json.loads(manifest.read_text())
        log.info("%s: %d rows in %d shards; failures: %s", manifest, info["rows"], len(info["shards"]),
                 info["failures"] or "none")


if __name__ == "__main__":
    load_dotenv_file()
    sys.argv = teacher_from_env(sys.argv, "TEACHER_PROVIDER")
    main()
