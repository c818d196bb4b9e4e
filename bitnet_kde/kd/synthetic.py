"""A synthetic trace source that writes schema-v1 traces from a bigram model, without any
language model or teacher.

It is a stand-in for tests and smoke runs, clearly not a real teacher: a seeded random
bigram model over an abstract vocabulary of `vocab_size` ids. Its next-token distribution
depends only on the current token, is peaked (a few likely successors), and is known
exactly, so the traces carry exact top-K log-probabilities and Other mass. A student that
learns it shows falling KD loss within a few hundred steps, which is what smoke runs need.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from bitnet_kde import storage
from bitnet_kde.kd.traces import (content_id, manifest_complete, other_from_topk, shard_name, trace_metadata,
                                   write_manifest, write_trace_shard)

CATEGORIES = ("qa", "explain", "json", "list", "code", "math", "rewrite")


class BigramTraceSource:
    """Seeded random bigram traces (see module docstring), a `TraceSource`: call `write(trace_dir)`.

    `provider` / `model` name it in the trace metadata and in its content address.
    """

    provider = "synthetic"
    model = "bigram"

    def __init__(self, vocab_size: int = 512, k: int = 20, num_sequences: int = 512,
                 prompt_len: tuple[int, int] = (8, 24), completion_len: tuple[int, int] = (32, 160),
                 sharpness: float = 3.0, seed: int = 0, shard_rows: int = 256):
        if k > vocab_size:
            raise ValueError(f"k={k} exceeds vocab_size={vocab_size}")
        self.vocab_size, self.k, self.num_sequences = vocab_size, k, num_sequences
        self.prompt_len, self.completion_len = tuple(prompt_len), tuple(completion_len)
        self.sharpness, self.seed, self.shard_rows = sharpness, seed, shard_rows

    @property
    def settings(self) -> dict:
        return {"vocab_size": self.vocab_size, "k": self.k, "num_sequences": self.num_sequences,
                "prompt_len": list(self.prompt_len), "completion_len": list(self.completion_len),
                "sharpness": self.sharpness, "seed": self.seed}

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

    def write(self, trace_dir: str | Path) -> list[Path | str]:
        """Generate all sequences and write shards + manifest into `trace_dir` (folder or storage URL)."""
        lp_table = self.log_probs()
        top_lp, top_ids = lp_table.topk(self.k, dim=-1)
        other = [other_from_topk(row) for row in top_lp.tolist()]
        g = torch.Generator().manual_seed(self.seed + 1)
        meta = trace_metadata(
            teacher_provider=self.provider, teacher_model=self.model, k=self.k,
            sampling={"temperature": 1.0, "seed": self.seed}, logprob_mode="exact",
            tokenizer_name="synthetic-ids", tokenizer_hash=self.tokenizer_hash, vocab_size=self.vocab_size,
        )
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
                "id": content_id(f"{prompt}|{self.provider}/{self.model}|{self.trace_set_id}", n=24),
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
        write_manifest(trace_dir, shards, {"trace_set": self.trace_set_id, "teacher": f"{self.provider}/{self.model}",
                                           "settings": self.settings, "failures": {}})
        return shards
