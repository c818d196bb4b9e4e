"""The whole chain as one command: teacher baseline -> collect -> train -> eval -> dry-run.

`run_pipeline` runs each stage's own entry point (`teacher_baseline.py`, `collect.py`, ...) as a
child process with the overrides that concern it, and keeps `reports/pipeline_summary.json`
(docs/PIPELINE.md) up to date after every stage: status, wall time, key figures read from the
stage's own outputs, artefact locations.

- **Child processes, not calls.** Every stage is a Hydra application with its own run folder,
  log file and global state (Hydra's singleton, logging set-up, torch threads and allocator,
  RNG seeds); a child gets exactly what `make <stage>` gets (train alone: the allocator
  variables of `configs/train_malloc.env`), its peak memory is its own (the
  dry-run's figure is not the training's), and whatever ends it (a user error's one `error:`
  line and exit status 1, a traceback, a kill) is caught as its exit status and stderr.
- **One set of overrides.** The pipeline's own command-line overrides go to the stages whose
  config has their key (`ROUTES`): `storage`/`paths` to all, `teacher` to the stages with a
  teacher, `collection` to collect and train (the same trace set), everything else of the train
  config to train. Stage-only settings go in `pipeline.overrides.<stage>` lists.
- **Skipping finished work.** A stage whose arguments hash to the fingerprint of its last
  successful run, and whose artefacts still exist, is `reused` instead of run again
  (`pipeline.force` redoes it). Traces are content-addressed besides; a failed or interrupted
  training resumes from its last checkpoint. A failed stage stops the chain; the rerun continues
  there. The summary keeps each stage's latest record, from whichever run made it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq

from bitnet_kde import storage
from bitnet_kde.cli import override_key
from bitnet_kde.env import CONFIG_DIR
from bitnet_kde.eval.gates import describe, gate_settings
from bitnet_kde.kd.traces import arrow_path
from bitnet_kde.runinfo import run_info
from bitnet_kde.training.callbacks import health_path

log = logging.getLogger(__name__)

STAGES = ("teacher_baseline", "collect", "train", "eval", "dryrun")
"""The stages in the order they run; each is the root script `<stage>.py`."""
TEACHER_STAGES = ("teacher_baseline", "collect", "train", "eval")
ROUTES: dict[str, tuple[str, ...]] = {
    "storage": STAGES, "paths": STAGES, "teacher": TEACHER_STAGES, "collection": ("collect", "train"),
    "pipeline": (), "hydra": (), "task_name": (),
}
"""Top-level key of a pipeline override -> the stages it is passed to; any other key is train's."""
FINISHED = ("ok", "reused")
"""The statuses of a stage record whose work is done."""
GATE_EXIT = 2
"""Exit status of `make pipeline GATE=1` when a quality gate failed (a failed stage exits 1)."""


class PipelineError(ValueError):
    """A stage failed (its error is in the summary), or the pipeline's own settings are wrong."""


def route(overrides: Sequence[str], stage: str, *, forward_experiment: bool = True) -> list[str]:
    """The overrides among `overrides` that `stage` takes (see `ROUTES`)."""
    out = []
    for o in overrides:
        root = override_key(o).split(".")[0].split("@")[0]
        if root == "experiment" and not forward_experiment:
            continue
        if stage in ROUTES.get(root, ("train",)):
            out.append(o)
    return out


def merge(*lists: Sequence[str]) -> list[str]:
    """Concatenate override lists; a later override of the same key replaces an earlier one."""
    by_key: dict[str, str] = {}
    for o in (o for lst in lists for o in lst):
        by_key.pop(override_key(o), None)
        by_key[override_key(o)] = o
    return list(by_key.values())


def scrubbed(value):
    """`value` (JSON-like) with `storage.scrub` applied to every string in it."""
    if isinstance(value, str):
        return storage.scrub(value)
    if isinstance(value, Mapping):
        return {k: scrubbed(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [scrubbed(v) for v in value]
    return value


def now() -> str:
    """UTC time to the millisecond: when a stage record was made (it tells two runs apart)."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def fingerprint(args: Sequence[str]) -> str:
    """What identifies a stage's work: its arguments, order kept (later ones win in Hydra)."""
    return hashlib.sha256(json.dumps(list(args)).encode()).hexdigest()[:16]


TRAIN_ENV_FILE = CONFIG_DIR / "train_malloc.env"
"""The allocator variables the training process runs with, `make train`'s as well (Makefile)."""


def train_env() -> dict[str, str]:
    """The `VARIABLE=value` lines of `TRAIN_ENV_FILE` (the lines the Makefile takes)."""
    lines = TRAIN_ENV_FILE.read_text().splitlines()
    return dict(ln.strip().split("=", 1) for ln in lines if re.match(r"[A-Za-z_]+=", ln))


# -- running one stage ------------------------------------------------------------------------
def run_child(cmd: Sequence[str], tail_lines: int = 40, env: Mapping[str, str] | None = None) -> tuple[int, str | None]:
    """Run `cmd` (with the variables `env` added to this process's) with stdout passed through
    (live progress bars stay live) and stderr echoed line by line; returns (exit status, error)
    where error is the child's last `error:` line, else the tail of its stderr when it failed,
    else None."""
    env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
    tail: list[str] = []
    with subprocess.Popen(list(cmd), stderr=subprocess.PIPE, text=True, errors="replace", env=env) as proc:
        for line in proc.stderr:
            sys.stderr.write(line)
            tail = [*tail[-(tail_lines - 1):], line.rstrip("\n")]
    if proc.returncode == 0:
        return 0, None
    errors = [ln for ln in tail if ln.startswith("error: ")]
    error = errors[-1][len("error: "):] if errors else "\n".join(tail) or f"exit {proc.returncode}"
    return proc.returncode, storage.scrub(error)


# -- what each stage produced -----------------------------------------------------------------
def _read(url) -> dict | None:
    return storage.read_json(url) if url and storage.exists(url) else None


def teacher_figures(art: Mapping) -> dict:
    s = (_read(art["report"]) or {}).get("summary", {})
    return {k: s.get(k) for k in ("tokens_per_second", "answered", "failed", "completion_tokens", "wall_seconds")}


def trace_tokens(trace_dir, manifest: Mapping) -> int:
    """Completion tokens (the positions the teacher wrote) over the shards a manifest lists."""
    total = 0
    for entry in manifest.get("shards", []):
        src, fs = arrow_path(storage.join(trace_dir, entry["file"]))
        t = pq.read_table(src, filesystem=fs, columns=["input_ids", "completion_start"])
        total += int(pc.sum(pc.subtract(pc.list_value_length(t["input_ids"]), t["completion_start"])).as_py() or 0)
    return total


def collect_figures(art: Mapping) -> dict:
    m = _read(art["manifest"]) or {}
    return {"trace_set": m.get("trace_set"), "prompts": m.get("prompts"), "traces": m.get("rows"),
            "shards": len(m.get("shards", [])), "tokens": trace_tokens(art["trace_dir"], m) if m else None,
            "failures": m.get("failures")}


def train_figures(art: Mapping) -> dict:
    h = _read(art["health"]) or {}
    flip = h.get("flip") or {}
    return {"step": h.get("step"), "tokens_seen": h.get("tokens_seen"), "train_loss": h.get("train_loss"),
            "val_loss": h.get("val_loss"), "flipped": flip.get("flipped"), "flip_step": flip.get("step"),
            "activation_bits": h.get("activation_bits"), "nonfinite": h.get("nonfinite")}


def eval_figures(art: Mapping) -> dict:
    r = _read(art["report"]) or {}
    m, q = r.get("metrics", {}).get("overall", {}), r.get("qei", {})
    speed = r.get("speed", {})
    return {"kl": m.get("kl"), "top1_agreement": m.get("top1_agreement"), "perplexity": m.get("perplexity"),
            "json_validity": m.get("json_validity"), "teacher_json_validity": m.get("teacher_json_validity"),
            "exact_match": m.get("exact_match"), "qei": q.get("qei"), "qei_speed": q.get("qei_speed"),
            "student_tokens_per_s": speed.get("student", {}).get("tokens_per_s"),
            "teacher_tokens_per_s": speed.get("teacher", {}).get("tokens_per_s"),
            "gates_passed": r.get("gates", {}).get("passed")}


def dryrun_figures(art: Mapping) -> dict:
    r = _read(art["report"]) or {}
    mem = r.get("memory", {})
    return {"d_model": r.get("model", {}).get("d_model"), "n_layers": r.get("model", {}).get("n_layers"),
            "parameters": r.get("parameters", {}).get("total"), "peak_rss_bytes": mem.get("peak_rss"),
            "cuda_max_memory_allocated": mem.get("cuda_max_memory_allocated"),
            "seconds": r.get("total_seconds")}


FIGURES: dict[str, Callable[[Mapping], dict]] = {
    "teacher_baseline": teacher_figures, "collect": collect_figures, "train": train_figures,
    "eval": eval_figures, "dryrun": dryrun_figures,
}
REQUIRED = {"teacher_baseline": ("report",), "collect": ("manifest",), "train": ("checkpoint", "health"),
            "eval": ("report",), "dryrun": ("report",)}
"""The artefacts that must still exist for a finished stage to be reused."""


# -- the chain ----------------------------------------------------------------------------------
class Pipeline:
    """One run of the chain (see the module docstring).

    Args:
        cfg: the composed `configs/pipeline.yaml` (its `pipeline` node and the train config).
        overrides: the pipeline's command-line overrides, routed to the stages.
        scripts_dir: where the stage scripts (`train.py`, ...) are.
    """

    def __init__(self, cfg, overrides: Sequence[str], scripts_dir: str | os.PathLike):
        self.cfg, self.p = cfg, cfg.pipeline
        self.overrides = list(overrides)
        self.scripts_dir = Path(scripts_dir)
        self.stages = list(self.p.stages)
        for key, names, known in (("stages", self.stages, STAGES), ("force", self.p.force, (*STAGES, "all"))):
            unknown = [s for s in names if s not in known]
            if unknown:
                raise PipelineError(f"pipeline.{key}: unknown stage(s) {unknown}; the stages are {list(STAGES)}"
                                    + ("" if key == "force" else " (all five by default; [all] is for pipeline.force)"))
        own = [o for o in [*self.p.overrides.shared, *self.overrides, *self.p.overrides.train]
               if override_key(o) == "paths.checkpoint_dir"]
        if own:
            raise PipelineError(f"{storage.scrub(own[0])}: the pipeline gives train its checkpoint folder itself "
                                "(eval and a resumed training read it from there); set "
                                "pipeline.checkpoint_dir=<folder> instead")
        self.gates = gate_settings(self.p.gates)
        if self.p.gate and not self.gates:
            raise PipelineError("pipeline.gate=true (GATE=1) but no gate is set: set pipeline.gates.<name>, e.g. "
                                "pipeline.gates.top1_agreement=0.3 (docs/PIPELINE.md)")
        if self.p.gate and "eval" not in self.stages:
            raise PipelineError(f"pipeline.gate=true (GATE=1) but pipeline.stages={self.stages} has no eval, the stage "
                                "that checks the gates: add eval (it is reused when its work is done) or drop GATE")
        self.summary_path = self.p.summary_path
        previous = _read(self.summary_path) or {}
        self.previous: dict = previous.get("stages", {})
        # each stage's latest record: this run's where it reaches the stage, else the previous one's
        stages = {s: self.previous.get(s) or {"status": "not_run"} for s in STAGES
                  if s in self.previous or s in self.stages}
        self.summary = {"status": "running", **run_info(), "overrides": [storage.scrub(o) for o in self.overrides],
                        "stages": stages, "gates": None}

    # -- arguments ------------------------------------------------------------------------
    def artefacts(self, stage: str) -> dict:
        """Where `stage` writes what the summary points at."""
        p, paths = self.p, self.cfg.paths
        if stage == "collect":
            return {"trace_dir": str(paths.data_dir), "manifest": str(storage.join(paths.data_dir, "manifest.json"))}
        if stage == "train":
            ckpt = str(storage.join(p.checkpoint_dir, "last.ckpt"))
            return {"checkpoint": ckpt, "health": health_path(ckpt), "checkpoint_dir": str(p.checkpoint_dir),
                    "run_dir": self.run_dir(stage)}
        if stage == "eval":
            return {"report": str(p.reports.eval), "chart": str(p.reports.eval_chart), "run_dir": self.run_dir(stage),
                    "tensorboard": f"{self.run_dir(stage)}/tensorboard"}
        return {"report": str(p.reports[stage]), "run_dir": self.run_dir(stage)}

    def run_dir(self, stage: str) -> str:
        return f"{self.p.stage_dir}/{stage}"

    def args(self, stage: str) -> list[str]:
        """The stage's arguments that identify its work (fingerprinted)."""
        shared = [*self.p.overrides.shared, *self.overrides]
        own = route(shared, stage, forward_experiment=self.p.forward_experiment)
        fixed: list[str] = []
        if stage in ("teacher_baseline", "dryrun"):
            fixed = [f"report_path={self.p.reports[stage]}"]
        elif stage == "eval":
            # the latest training (this run's, else a previous run's), if it finished
            train = self.summary["stages"].get("train") or {}
            ckpt = (train.get("artefacts") or {}).get("checkpoint") if train.get("status") in FINISHED else None
            fixed = [f"report_path={self.p.reports.eval}", f"chart_path={self.p.reports.eval_chart}",
                     *([f"ckpt_path={ckpt}"] if ckpt else []),
                     *(f"gates.{k}={v}" for k, v in self.gates.items())]
        return merge(list(self.p.overrides[stage]), own, fixed)

    def identity(self, stage: str, args: Sequence[str]) -> str:
        """The fingerprint of `stage`'s work: its arguments with credentials scrubbed (they do not
        identify the work); for eval also the training it evaluates, so a training run again
        (`pipeline.force=[train]`) is evaluated again even when its checkpoint path is the same."""
        parts = [storage.scrub(a) for a in args]
        train = self.summary["stages"].get("train") or {}
        if stage == "eval" and train.get("status") in FINISHED:
            parts.append(f"train={train.get('fingerprint')}@{train.get('finished_at')}")
        return fingerprint(parts)

    # -- running ------------------------------------------------------------------------
    def reusable(self, stage: str, fp: str) -> dict | None:
        """The previous record of `stage` if its work is done and may be reused."""
        prev = self.previous.get(stage) or {}
        if stage in self.p.force or "all" in self.p.force:
            return None
        if prev.get("status") not in FINISHED or prev.get("fingerprint") != fp:
            return None
        art = prev.get("artefacts") or {}
        return prev if all(art.get(k) and storage.exists(art[k]) for k in REQUIRED[stage]) else None

    def resume_from(self, stage: str, fp: str) -> str | None:
        """The last checkpoint of a training with the same arguments that failed or was interrupted
        (its record still says `running`): the rerun continues it."""
        prev = self.previous.get(stage) or {}
        ckpt = (prev.get("artefacts") or {}).get("checkpoint")
        if stage == "train" and prev.get("status") in ("failed", "running") and prev.get("fingerprint") == fp and ckpt \
                and storage.exists(ckpt) and not (stage in self.p.force or "all" in self.p.force):
            return ckpt
        return None

    def blocked(self, stage: str, args: Sequence[str]) -> str | None:
        """Why `stage` must not run now, or None. Eval without a checkpoint of its own would take
        the newest `last.ckpt`: that of a training that did not finish, when the latest did not."""
        train = self.summary["stages"].get("train") or {}
        if stage != "eval" or train.get("status") in (*FINISHED, "not_run", None) \
                or any(override_key(a) == "ckpt_path" for a in args):
            return None
        return (f"the latest training did not finish (status {train['status']}), so there is no checkpoint to "
                "evaluate: run train again (pipeline.stages=[train,eval]) or give one with "
                "pipeline.overrides.eval=['ckpt_path=...']")

    def run_stage(self, stage: str) -> dict:
        args = self.args(stage)
        fp = self.identity(stage, args)
        why = self.blocked(stage, args)
        if why:
            return {"status": "failed", "wall_s": 0.0, "exit_code": None, "error": why, "fingerprint": fp,
                    "args": args, "artefacts": self.artefacts(stage), "resumed_from": None,
                    "finished_at": now()}
        prev = self.reusable(stage, fp)
        if prev is not None:
            log.info("[%s] reused: finished earlier with the same arguments (pipeline.force=[%s] redoes it)",
                     stage, stage)
            return {**prev, "status": "reused"}
        resume = self.resume_from(stage, fp)
        # where this run's stage works, not what it does: not fingerprinted
        extra = [f"hydra.run.dir={self.run_dir(stage)}",
                 *([f"paths.checkpoint_dir={self.p.checkpoint_dir}"] if stage == "train" else []),
                 *([f"ckpt_path={resume}"] if resume else [])]
        cmd = [sys.executable, str(self.scripts_dir / f"{stage}.py"), *args, *extra]
        log.info("[%s] %s", stage, storage.scrub(" ".join(cmd[1:])))
        art = self.artefacts(stage)
        # recorded before it starts: a run interrupted now (Ctrl-C, a kill) leaves `running`,
        # which the next run treats like `failed` (a training resumes from its checkpoint)
        self.summary["stages"][stage] = {"status": "running", "started_at": now(), "fingerprint": fp, "args": args,
                                         "artefacts": art, "resumed_from": resume}
        self.write()
        t0 = time.perf_counter()
        code, error = run_child(cmd, env=train_env() if stage == "train" else None)
        wall = round(time.perf_counter() - t0, 2)
        record = {"status": "ok" if code == 0 else "failed", "wall_s": wall, "exit_code": code, "error": error,
                  "fingerprint": fp, "args": args, "artefacts": art, "resumed_from": resume, "finished_at": now()}
        if code == 0:
            record["figures"] = FIGURES[stage](art)
        log.info("[%s] %s in %.1f s%s", stage, record["status"], wall, f": {error}" if error else "")
        return record

    def write(self) -> None:
        """Write the summary with every credential scrubbed: overrides, arguments, errors and
        artefact locations may carry a URL's `user:password@` or a configured secret."""
        self.summary["updated_at"] = run_info()["created_at"]
        storage.write_json_atomic(self.summary_path, scrubbed(self.summary))

    def run(self) -> dict:
        """Run the chain; the summary is written after every stage. Raises `PipelineError` when a
        stage failed (after writing the summary)."""
        for stage in self.stages:
            record = self.run_stage(stage)
            self.summary["stages"][stage] = record
            if stage == "eval" and record["status"] in FINISHED:
                self.summary["gates"] = (_read(record["artefacts"]["report"]) or {}).get("gates")
            if record["status"] == "failed":
                self.summary["status"] = "failed"
                self.summary["failed_stage"] = stage
                self.write()
                raise PipelineError(f"stage {stage} failed: {record['error']} (summary: {self.summary_path}; "
                                    "run the same command again to continue from this stage)")
            self.write()
        gates = self.summary["gates"] or {}
        self.summary["status"] = "gate_failed" if gates.get("passed") is False else "ok"
        self.write()
        log.info("pipeline %s -> %s", self.summary["status"], self.summary_path)
        if gates:
            log.info(describe(gates))
        return self.summary
