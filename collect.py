"""Collect KD traces: `python collect.py [teacher=...] [collection.sampling.top_k=...] ...`.

Writes `kd-<set>-*.parquet` shards and `manifest.json` into `trace_dir` (default `data/` under
`paths.root`, which may be a storage URL: `storage=s3`, see docs/STORAGE.md).
Rerunning completes an interrupted collection; a complete set is left as it is.
"""

from __future__ import annotations

import logging

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig

from bitnet_kde import cli, records, settings, storage
from bitnet_kde.teachers import check_credentials

log = logging.getLogger("collect")


@hydra.main(version_base="1.3", config_path="configs", config_name="collect")
def main(cfg: DictConfig) -> None:
    settings.check(cfg, exit_on_error=True)
    storage.setup(cfg, cfg.trace_dir, exit_on_error=True)
    check_credentials(cfg.teacher)  # before the tokenizer, prompts or any model load
    collector = instantiate(cfg.collection)
    if collector.is_complete(cfg.trace_dir):
        log.info("trace set %s is already complete in %s", collector.trace_set_id, cfg.trace_dir)
    else:
        collector.write(cfg.trace_dir)
    manifest = storage.join(cfg.trace_dir, "manifest.json")
    if storage.exists(manifest):
        info = storage.read_json(manifest)
        log.info("%s: %d rows in %d shards; failures: %s", manifest, info["rows"], len(info["shards"]),
                 info["failures"] or "none")
        records.write(cfg, "collect", records.manifest_summary(info), file=manifest)


if __name__ == "__main__":
    cli.run(main)
