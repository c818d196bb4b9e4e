"""KD trace collection: teacher + prompt set -> content-addressed Parquet shards.

`TraceCollector` is both the `make collect` engine and the DataModule's `source` (a
`bitnet_kde.kd.traces.TraceSource`): the DataModule asks `is_complete(dir)` and, if not, calls
`write(dir)`, so `python train.py` collects from the configured teacher on first use and reuses
the traces afterwards.

- **Content address.** The trace-set id hashes the teacher identity, the prompt set, the
  student tokenizer, K and the sampling settings; shard names carry it, so a different
  configuration never reuses (or mixes with) another's traces.
- **Chunks and resume.** Prompts are cut into fixed chunks; chunk c becomes shard
  `kd-<set>-<c>.parquet`, written atomically. A rerun after a crash (even `kill -9`) skips the
  chunks whose shard exists and redoes the rest: no duplicates, no gaps. A shard that no longer
  has the sha256 the manifest recorded (damaged or replaced) is collected again; the others stay.
- **Many jobs.** Job `shard_index` of `num_shards` does the chunks with
  `c % num_shards == shard_index`; whichever job finds the set complete writes the manifest.
- **Provider limits.** `sampling.top_k` above the teacher's `max_top_k` is refused before any request.
- **Sampled traces.** `rs` (`SampledTraceConfig`, n > 0) also records N draws per position from a
  local teacher's full distribution (schema v2); API teachers are refused before any request.
- **Failures are counted, never dropped.** Each shard's metadata lists the prompts that failed
  (id, reason, message); the manifest sums them by reason.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
from omegaconf import DictConfig, OmegaConf

from bitnet_kde import storage
from bitnet_kde.kd.projection import ProjectedRow, project_identity, project_strings
from bitnet_kde.kd.prompts import Prompt, load_prompts, prompt_set_hash
from bitnet_kde.kd.traces import (arrow_path, content_id, folder_names, manifest_complete, mismatched_shards, shard_name,
                                   trace_metadata, write_manifest, write_trace_shard)
from bitnet_kde.progress import RateLog, interactive
from bitnet_kde.teachers import (SampledTraceConfig, SamplingConfig, Teacher, TeacherError, TeacherFailure,
                                 TeacherSequence, build_teacher)
from bitnet_kde.tokenizer import chat_ids, load_student_tokenizer, tokenizer_hash

log = logging.getLogger(__name__)

RUNTIME_KEYS = {"batch_size", "device", "max_concurrency", "max_retries", "timeout_s", "api_key_env",
                "max_prompts", "max_total_tokens"}
"""Teacher config keys that change how, not what, is collected (left out of the content address)."""


class TraceCollector:
    """Collect a trace set from `teacher` over `prompts` (see module docstring).

    Args:
        teacher: teacher config (Hydra node with `_target_`) or a built `Teacher`; a config is
            only instantiated when there is something to collect.
        student_tokenizer: `{"model": ..., "gguf_file": ...}` for `transformers.AutoTokenizer`,
            or `"smollm2"` for the embedded SmolLM2 tokenizer.
        prompts: `load_prompts` arguments (`source`, `split`, `categories`, `limit`).
        sampling: `SamplingConfig` fields (`max_new_tokens`, `temperature`, `top_k`, `seed`).
        chunk_size: prompts per shard.
        shard_index / num_shards: this job's share of the chunks.
        progress: show progress: a rich bar in a terminal, else a log line (prompts done/total,
            rate, ETA, tokens) every `log_every_s` seconds, at most once per chunk.
        rs: `SampledTraceConfig` fields (`n`, `beta`, `seed`, `hybrid`); n > 0 records sampled traces.
        log_every_s: seconds between those log lines.
    """

    def __init__(self, teacher, student_tokenizer="smollm2", prompts: dict | None = None,
                 sampling: dict | None = None, chunk_size: int = 64, shard_index: int = 0, num_shards: int = 1,
                 progress: bool = True, rs: dict | None = None, log_every_s: float = 30.0):
        if not 0 <= shard_index < num_shards:
            raise ValueError(f"shard_index={shard_index} must be in [0, num_shards={num_shards})")
        self._teacher_cfg = teacher if not isinstance(teacher, Teacher) else None
        self._teacher = teacher if isinstance(teacher, Teacher) else None
        self._tokenizer_spec = student_tokenizer
        self._tokenizer = None
        self.prompt_args = dict(prompts or {})
        self.sampling = SamplingConfig(**(sampling or {}))
        self.chunk_size, self.shard_index, self.num_shards = chunk_size, shard_index, num_shards
        self.progress, self.log_every_s = progress, log_every_s
        self.rs = SampledTraceConfig(**(rs or {}))
        self._prompts: list[Prompt] | None = None

    # -- identity ---------------------------------------------------------------------------
    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = load_student_tokenizer(self._tokenizer_spec)
        return self._tokenizer

    def piece_table(self) -> list[str]:
        """Text of every student token id (the DataModule derives the format mask from it)."""
        tok = self.tokenizer
        return [tok.decode([i], skip_special_tokens=False, clean_up_tokenization_spaces=False)
                for i in range(len(tok))]

    @property
    def prompts(self) -> list[Prompt]:
        if self._prompts is None:
            self._prompts = load_prompts(**self.prompt_args)
        return self._prompts

    def teacher_identity(self) -> dict:
        """What identifies the teacher: its config minus runtime knobs (or a built teacher's name)."""
        if self._teacher_cfg is None:
            return {"name": self._teacher.name}
        cfg = self._teacher_cfg
        cfg = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
        return {k: storage.redact_urls(v) if isinstance(v, str) else v
                for k, v in sorted(cfg.items()) if k not in RUNTIME_KEYS}

    @functools.cached_property
    def tokenizer_hash(self) -> str:
        return tokenizer_hash(self.tokenizer)

    @functools.cached_property
    def trace_set_id(self) -> str:
        blob = json.dumps({"teacher": self.teacher_identity(), "prompts": prompt_set_hash(self.prompts),
                           "tokenizer": self.tokenizer_hash, "sampling": self.sampling.as_dict(),
                           "chunk_size": self.chunk_size, **self._rs_identity()}, sort_keys=True, default=str)
        return content_id(blob)

    def _rs_identity(self) -> dict:
        """Sampled-trace settings in the content address, only when on (Top-K-only sets keep their ids)."""
        return {"rs": self.rs.as_dict()} if self.rs.n else {}

    def chunk_draws(self, chunk: int) -> SampledTraceConfig:
        """The draw settings of chunk `chunk`: `rs` with the seed derived from `rs.seed` and the chunk
        index, so shards never repeat each other's draws, while `rs` (in the content address) still
        determines them all."""
        return dataclasses.replace(self.rs, seed=self.rs.seed_of(chunk))

    def check_sampled(self, teacher: Teacher) -> None:
        """Refuse sampled traces from a teacher that does not see its whole distribution."""
        if self.rs.n and not teacher.full_distribution:
            raise TeacherError(f"collection.rs.n={self.rs.n}: sampled traces need the teacher's full next-token "
                               f"distribution, and {teacher.name} returns only its top candidates; collect them "
                               "with a local teacher (teacher=local_smollm2, local_hf) or set collection.rs.n=0")
        if self.rs.n and not self.rs.beta > 0:
            raise ValueError(f"collection.rs.beta={self.rs.beta} must be > 0 (proposal q ∝ p^beta)")

    def teacher(self) -> Teacher:
        if self._teacher is None:
            self._teacher = build_teacher(self._teacher_cfg)
        return self._teacher

    # -- layout -----------------------------------------------------------------------------
    def chunks(self) -> list[list[Prompt]]:
        p, n = self.prompts, self.chunk_size
        return [p[i:i + n] for i in range(0, len(p), n)]

    def shard_path(self, trace_dir: str | Path, chunk: int) -> Path | str:
        """Where chunk `chunk` goes: a `Path` in a local folder, a URL on a remote store."""
        return storage.join(trace_dir, shard_name(self.trace_set_id, chunk))

    def is_complete(self, trace_dir: str | Path) -> bool:
        return manifest_complete(trace_dir, self.trace_set_id,
                                 [self.shard_path(trace_dir, c) for c in range(len(self.chunks()))])

    # -- collection -------------------------------------------------------------------------
    def write(self, trace_dir: str | Path) -> list[Path | str]:
        """Collect this job's missing chunks into `trace_dir` (a folder or storage URL); write the
        manifest once all exist."""
        storage.makedirs(trace_dir)
        chunks = self.chunks()
        mine = [c for c in range(len(chunks)) if c % self.num_shards == self.shard_index]
        present = folder_names(trace_dir)
        damaged = mismatched_shards(trace_dir)
        for why in damaged.values():
            log.warning("%s: collecting it again", why)
        todo = [c for c in mine if (name := storage.name_of(self.shard_path(trace_dir, c))) not in present
                or name in damaged]
        log.info("trace set %s: %d chunks, %d for this job, %d to collect", self.trace_set_id, len(chunks),
                 len(mine), len(todo))
        if todo:
            teacher = self.teacher()
            teacher.check_kd()
            self.check_top_k(teacher)
            self.check_sampled(teacher)
            self._collect(teacher, trace_dir, [(c, chunks[c]) for c in todo])
        shards = [self.shard_path(trace_dir, c) for c in range(len(chunks))]
        present = folder_names(trace_dir)
        if all(storage.name_of(s) in present for s in shards):
            failures = [f for s in shards for f in shard_failures(s)]
            write_manifest(trace_dir, shards, {
                "trace_set": self.trace_set_id, "teacher": self.teacher_identity(),
                "sampling": self.sampling.as_dict(), **self._rs_identity(), "prompts": len(self.prompts),
                "failures": dict(Counter(f["reason"] for f in failures)), "failed": failures,
            })
        else:
            log.info("trace set %s: waiting for other jobs' shards", self.trace_set_id)
        return shards

    def check_top_k(self, teacher: Teacher) -> None:
        """Refuse more candidates per position than the provider returns (it would cap them silently)."""
        if self.sampling.top_k > teacher.max_top_k:
            raise ValueError(f"collection.sampling.top_k={self.sampling.top_k} exceeds what teacher provider "
                             f"{teacher.provider!r} returns per position (max_top_k={teacher.max_top_k}); "
                             f"set collection.sampling.top_k to at most {teacher.max_top_k}")

    def _collect(self, teacher: Teacher, trace_dir: str | Path, work: list[tuple[int, list[Prompt]]]) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        identity = teacher.token_ids_match(self.tokenizer)
        meta = trace_metadata(
            teacher_provider=teacher.provider, teacher_model=teacher.model, k=self.sampling.top_k,
            sampling=self.sampling.as_dict(), logprob_mode=teacher.logprob_mode,
            tokenizer_name=str(self._tokenizer_spec), tokenizer_hash=self.tokenizer_hash,
            vocab_size=len(self.tokenizer), extra={"projection": "identity" if identity else "strings",
                                                   **{k: json.dumps(v) for k, v in self._rs_identity().items()}},
        )
        total = sum(len(c) for _, c in work)
        tokens, done, t0 = 0, 0, time.perf_counter()
        columns = [TextColumn("collect {task.description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[tokens]} tokens, {task.fields[rate]:.1f} tok/s"), TimeElapsedColumn()]
        lines = RateLog(log, f"collect {teacher.name}", total, "prompts", self.log_every_s)
        with Progress(*columns, disable=not (self.progress and interactive())) as bar:
            task = bar.add_task(teacher.name, total=total, tokens=0, rate=0.0)
            for chunk, prompts in work:
                results = teacher.generate([p.prompt for p in prompts], self.sampling,
                                           **({"sampled": self.chunk_draws(chunk)} if self.rs.n else {}))
                rows, failures = [], []
                for p, r in zip(prompts, results, strict=True):
                    if isinstance(r, TeacherFailure):
                        failures.append({"id": p.id, "reason": r.reason, "message": r.message[:500]})
                    elif not r.tokens:
                        failures.append({"id": p.id, "reason": "empty_completion", "message": "no tokens"})
                    else:
                        rows.append(self._row(p, r, teacher, identity))
                        tokens += r.completion_tokens
                write_trace_shard(rows, self.shard_path(trace_dir, chunk),
                                  {**meta, "bitnet_kde.failures": json.dumps(failures)})
                done += len(prompts)
                rate = tokens / max(time.perf_counter() - t0, 1e-9)
                bar.update(task, advance=len(prompts), tokens=tokens, rate=rate)
                if self.progress and not interactive():
                    lines.update(done, f"{tokens} tokens, {rate:.1f} tok/s")

    def _row(self, prompt: Prompt, seq: TeacherSequence, teacher: Teacher, identity: bool) -> dict:
        if identity:
            projected = project_identity(teacher.chat_ids(prompt.prompt), seq)
        else:
            projected = self._project_strings(prompt, seq, teacher)
        row_id = content_id(json.dumps([prompt.id, prompt.prompt, teacher.name, self.sampling.as_dict()],
                                       sort_keys=True), n=24)
        return {"id": row_id, "prompt": prompt.prompt, "category": prompt.category,
                "teacher_text": seq.text, **projected.columns()}

    def _project_strings(self, prompt: Prompt, seq: TeacherSequence, teacher: Teacher) -> ProjectedRow:
        # The teacher's end-of-turn token is not text: drop it (local teachers return it), project
        # the text, and end with the student's own end token wherever the teacher stopped by
        # itself (CE teaches stopping; no teacher distribution applies to that position).
        if seq.token_ids and seq.token_ids[-1] in teacher.eos_ids:
            seq = TeacherSequence(prompt=seq.prompt, text=seq.text, tokens=seq.tokens[:-1],
                                  topk_tokens=seq.topk_tokens[:-1], topk_logprobs=seq.topk_logprobs[:-1],
                                  token_ids=seq.token_ids[:-1],
                                  topk_ids=seq.topk_ids[:-1] if seq.topk_ids is not None else None,
                                  finish_reason=seq.finish_reason, prompt_tokens=seq.prompt_tokens,
                                  **{k: getattr(seq, k)[:-1] for k in ("rs_ids", "rs_tokens", "rs_counts", "rs_logq")
                                     if getattr(seq, k) is not None})
        # A local teacher's own tokenizer pins its token boundaries exactly (byte runs such as emoji).
        row = project_strings(chat_ids(self.tokenizer, prompt.prompt), seq, self.tokenizer,
                              teacher_tokenizer=teacher.tokenizer)
        eos = self.tokenizer.eos_token_id
        if seq.finish_reason == "stop" and eos is not None:
            row.input_ids.append(eos)
            row.topk_ids.append([])
            row.topk_logprobs.append([])
            row.other_logprob.append(0.0)
            row.kd_valid.append(False)
            for col in (row.rs_ids, row.rs_counts, row.rs_logq):
                if col is not None:
                    col.append([])
        return row


def shard_failures(path: Path | str) -> list[dict]:
    """The failed prompts recorded in a shard's metadata."""
    src, fs = arrow_path(path)
    meta = pq.read_schema(src, filesystem=fs).metadata or {}
    return json.loads(meta.get(b"bitnet_kde.failures", b"[]"))
