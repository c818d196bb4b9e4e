"""A synthetic trace source that writes schema-v1 traces from a bigram model, without any
language model or teacher.

It is a stand-in for tests and smoke runs, clearly not a real teacher: a seeded random
bigram model over an abstract vocabulary of `vocab_size` ids. Its next-token distribution
depends only on the current token, is peaked (a few likely successors), and is known
exactly, so the traces carry exact top-K log-probabilities and Other mass. A student that
learns it shows falling KD loss within a few hundred steps, which is what smoke runs need.

Two samplers draw the sequences: "torch" (the default, row by row) and "numpy" (all rows of a
shard at once, built as Arrow arrays), which writes a 40M-token set in minutes for scale tests
(`scripts/make_synthetic_traces.py`). They draw different sequences from the same seed, so the
sampler is part of the trace set's content address (kept out of it for "torch", whose existing
sets keep their ids).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from bitnet_kde import storage
from bitnet_kde.kd.traces import (TRACE_SCHEMA, content_id, manifest_complete, other_from_topk, shard_name,
                                   trace_metadata, write_manifest, write_trace_shard)

CATEGORIES = ("qa", "explain", "json", "list", "code", "math", "rewrite")


class BigramTraceSource:
    """Seeded random bigram traces (see module docstring), a `TraceSource`: call `write(trace_dir)`.

    `provider` / `model` name it in the trace metadata and in its content address; `sampler` is
    "torch" or "numpy" (see module docstring).
    """

    provider = "synthetic"
    model = "bigram"

    def __init__(self, vocab_size: int = 512, k: int = 20, num_sequences: int = 512,
                 prompt_len: tuple[int, int] = (8, 24), completion_len: tuple[int, int] = (32, 160),
                 sharpness: float = 3.0, seed: int = 0, shard_rows: int = 256, sampler: str = "torch"):
        if k > vocab_size:
            raise ValueError(f"k={k} exceeds vocab_size={vocab_size}")
        if sampler not in ("torch", "numpy"):
            raise ValueError(f"sampler={sampler!r}: use 'torch' or 'numpy'")
        self.sampler = sampler
        self.vocab_size, self.k, self.num_sequences = vocab_size, k, num_sequences
        self.prompt_len, self.completion_len = tuple(prompt_len), tuple(completion_len)
        self.sharpness, self.seed, self.shard_rows = sharpness, seed, shard_rows

    @property
    def settings(self) -> dict:
        fast = {"sampler": self.sampler} if self.sampler != "torch" else {}
        return {"vocab_size": self.vocab_size, "k": self.k, "num_sequences": self.num_sequences,
                "prompt_len": list(self.prompt_len), "completion_len": list(self.completion_len),
                "sharpness": self.sharpness, "seed": self.seed, **fast}

    @property
    def trace_set_id(self) -> str:
        """Content address of the trace set: same settings -> same traces -> reuse."""
        blob = json.dumps({"teacher": f"{self.provider}/{self.model}", **self.settings}, sort_keys=True)
        return content_id(blob)

    @property
    def tokenizer_hash(self) -> str:
        """Its ids belong to no real tokenizer: the trace-set id stands in for one in the metadata."""
        return self.trace_set_id

    def is_complete(self, trace_dir: str | Path) -> bool:
        return manifest_complete(trace_dir, self.trace_set_id)

    def piece_table(self) -> None:
        """None: the ids are abstract and stand for no text, so no position is a format position."""
        return None

    def log_probs(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed)
        logits = torch.randn(self.vocab_size, self.vocab_size, generator=g, dtype=torch.float64) * self.sharpness
        return torch.log_softmax(logits, dim=-1)

    def _metadata(self) -> dict[str, str]:
        return trace_metadata(
            teacher_provider=self.provider, teacher_model=self.model, k=self.k,
            sampling={"temperature": 1.0, "seed": self.seed}, logprob_mode="exact",
            tokenizer_name="synthetic-ids", tokenizer_hash=self.tokenizer_hash, vocab_size=self.vocab_size,
        )

    def _row_id(self, prompt: str) -> str:
        return content_id(f"{prompt}|{self.provider}/{self.model}|{self.trace_set_id}", n=24)

    def _finish(self, trace_dir, shards: list) -> list[Path | str]:
        write_manifest(trace_dir, shards, {"trace_set": self.trace_set_id, "teacher": f"{self.provider}/{self.model}",
                                           "settings": self.settings, "failures": {}})
        return shards

    def write(self, trace_dir: str | Path) -> list[Path | str]:
        """Generate all sequences and write shards + manifest into `trace_dir` (folder or storage URL)."""
        if self.sampler == "numpy":
            return self._write_numpy(trace_dir)
        lp_table = self.log_probs()
        top_lp, top_ids = lp_table.topk(self.k, dim=-1)
        other = [other_from_topk(row) for row in top_lp.tolist()]
        g = torch.Generator().manual_seed(self.seed + 1)
        meta = self._metadata()
        rows, shards = [], []
        for i in range(self.num_sequences):
            n_prompt = int(torch.randint(self.prompt_len[0], self.prompt_len[1] + 1, (1,), generator=g))
            n_comp = int(torch.randint(self.completion_len[0], self.completion_len[1] + 1, (1,), generator=g))
            seq = [int(torch.randint(0, self.vocab_size, (1,), generator=g))]
            for _ in range(n_prompt + n_comp - 1):
                seq.append(int(torch.multinomial(lp_table[seq[-1]].exp(), 1, generator=g)))
            prompt = f"synthetic prompt {i}"
            last = len(seq) - 1  # the final position predicts past the sequence: no teacher there
            rows.append({
                "id": self._row_id(prompt),
                "prompt": prompt,
                "category": CATEGORIES[i % len(CATEGORIES)],
                "input_ids": seq,
                "completion_start": n_prompt,
                "topk_ids": [top_ids[t].tolist() if j < last else [] for j, t in enumerate(seq)],
                "topk_logprobs": [top_lp[t].float().tolist() if j < last else [] for j, t in enumerate(seq)],
                "other_logprob": [other[t] if j < last else 0.0 for j, t in enumerate(seq)],
                "kd_valid": [j < last for j in range(len(seq))],
                "teacher_text": " ".join(map(str, seq[n_prompt:])),
            })
            if len(rows) == self.shard_rows or i == self.num_sequences - 1:
                path = storage.join(trace_dir, shard_name(self.trace_set_id, len(shards)))
                shards.append(write_trace_shard(rows, path, meta))
                rows = []
        return self._finish(trace_dir, shards)

    def _write_numpy(self, trace_dir) -> list[Path | str]:
        """The "numpy" sampler: each shard's rows drawn together and assembled as Arrow arrays."""
        lp_table = self.log_probs()
        top_lp, top_ids = (t.numpy() for t in lp_table.topk(self.k, dim=-1))
        top_lp = top_lp.astype(np.float32)
        other = np.array([other_from_topk(row) for row in top_lp.astype(np.float64).tolist()], dtype=np.float32)
        v = self.vocab_size
        # successor v of token t: first index of (t + cdf[t]) >= t + u in one flat sorted array
        cdf = np.cumsum(lp_table.exp().numpy(), axis=1)
        cdf /= cdf[:, -1:]
        flat = (np.arange(v)[:, None] + cdf).ravel()
        rng = np.random.default_rng(self.seed + 1)
        meta, shards = self._metadata(), []
        for first in range(0, self.num_sequences, self.shard_rows):
            n = min(self.shard_rows, self.num_sequences - first)
            n_prompt = rng.integers(self.prompt_len[0], self.prompt_len[1] + 1, n)
            lengths = n_prompt + rng.integers(self.completion_len[0], self.completion_len[1] + 1, n)
            seqs = np.empty((n, int(lengths.max())), dtype=np.int64)
            seqs[:, 0] = rng.integers(0, v, n)
            for j in range(1, seqs.shape[1]):
                cur = seqs[:, j - 1]
                hit = np.searchsorted(flat, cur + rng.random(n) * (1 - 1e-12), side="left")
                seqs[:, j] = np.minimum(hit - cur * v, v - 1)
            keep = np.arange(seqs.shape[1]) < lengths[:, None]
            tokens = seqs[keep]                                   # row-major: rows one after another
            offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
            last = np.zeros(tokens.size, dtype=bool)
            last[offsets[1:] - 1] = True                          # the final position has no teacher
            counts = np.where(last, 0, self.k)
            inner = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
            cand = tokens[~last]
            prompts = [f"synthetic prompt {first + i}" for i in range(n)]
            row_list = lambda values: pa.ListArray.from_arrays(pa.array(offsets), values)  # noqa: E731
            table = pa.table({
                "id": pa.array([self._row_id(p) for p in prompts], pa.string()),
                "prompt": pa.array(prompts, pa.string()),
                "category": pa.array([CATEGORIES[(first + i) % len(CATEGORIES)] for i in range(n)], pa.string()),
                "input_ids": row_list(pa.array(tokens.astype(np.int32))),
                "completion_start": pa.array(n_prompt.astype(np.int32)),
                "topk_ids": row_list(pa.ListArray.from_arrays(pa.array(inner), pa.array(top_ids[cand].ravel().astype(np.int32)))),
                "topk_logprobs": row_list(pa.ListArray.from_arrays(pa.array(inner), pa.array(top_lp[cand].ravel()))),
                "other_logprob": row_list(pa.array(np.where(last, np.float32(0), other[tokens]))),
                "kd_valid": row_list(pa.array(~last)),
                "teacher_text": pa.array([" ".join(map(str, tokens[offsets[i] + n_prompt[i]:offsets[i + 1]]))
                                          for i in range(n)], pa.string()),
            }, schema=TRACE_SCHEMA)
            shards.append(write_trace_shard(table, storage.join(trace_dir, shard_name(self.trace_set_id, len(shards))),
                                            meta))
        return self._finish(trace_dir, shards)
