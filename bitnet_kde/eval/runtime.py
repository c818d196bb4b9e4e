"""Decoding a GGUF through llama.cpp (llama-cpp-python) for the speed figures.

`LlamaCppDecoder` decodes greedily, batch 1, exactly `n_new` tokens per prompt (no stop at the
end token), the way the PyTorch path is timed (`BitNetLM.generate` without `eos_id`): prompt
evaluated once, then one token per step through llama.cpp's KV cache. `eval.py runtime=llamacpp`
times the exported student (and, by default, the embedded teacher GGUF) with it beside the
PyTorch figures; `scripts/bench_decode.py` builds its decode table on it.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from bitnet_kde.tokenizer import smollm2_gguf


class LlamaCppDecoder:
    """A GGUF model loaded in llama.cpp for greedy batch-1 decoding."""

    def __init__(self, path: str | os.PathLike, *, n_ctx: int = 512, n_threads: int | None = None):
        try:
            from llama_cpp import Llama
        except ImportError:
            raise RuntimeError("the llama.cpp runtime needs llama-cpp-python (pip install llama-cpp-python, "
                               "or the project's server-tests extra)") from None
        import llama_cpp

        if not Path(path).is_file():
            raise FileNotFoundError(f"{path}: no such GGUF file; export one with scripts/export.py --format gguf")
        self._lib = llama_cpp
        self.path = str(path)
        n_threads = n_threads or os.cpu_count()
        # n_threads_batch too: with more batch threads than decode threads the idle ones compete
        # with decoding (measured 2.5x slower decoding at 1 decode thread and 2 batch threads)
        self.llm = Llama(self.path, n_ctx=n_ctx, n_threads=n_threads, n_threads_batch=n_threads, n_batch=n_ctx,
                         verbose=False)
        self._greedy = llama_cpp.llama_sampler_init_greedy()

    @property
    def weight_bytes(self) -> int:
        """Bytes of the model's tensors as llama.cpp holds them."""
        return int(self._lib.llama_model_size(self.llm.model))

    def generate(self, prompt: list[int], n_new: int) -> list[int]:
        """Greedy continuation of `prompt`: exactly `n_new` token ids."""
        self.llm.reset()
        self.llm.eval(prompt)
        out: list[int] = []
        for i in range(n_new):
            out.append(int(self._lib.llama_sampler_sample(self._greedy, self.llm.ctx, -1)))
            if i + 1 < n_new:
                self.llm.eval([out[-1]])
        return out

    def close(self) -> None:
        self._lib.llama_sampler_free(self._greedy)
        self.llm.close()


def timed_decode(decode, prompts: list[list[int]], n_new: int) -> dict:
    """Tokens/s of `decode(prompt, n_new)` over `prompts` after one warm-up call.

    Also tokens per CPU second of this process: with one thread, what an otherwise idle core
    would give, a steadier figure than wall time on a machine other jobs are using.
    """
    if prompts:
        decode(prompts[0], n_new)
    t0, c0 = time.perf_counter(), time.process_time()
    tokens = sum(len(decode(p, n_new)) for p in prompts)
    secs, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"tokens_per_s": tokens / secs if secs > 0 else 0.0, "tokens": tokens, "seconds": secs,
            "tokens_per_cpu_s": tokens / cpu if cpu > 0 else 0.0}


def resolve_gguf(spec: str | None) -> str | None:
    """A GGUF path from a config value: `smollm2` is the embedded teacher GGUF, None stays None."""
    if spec is None:
        return None
    return str(Path(*smollm2_gguf())) if spec == "smollm2" else str(spec)


def llamacpp_speed(runtime, prompts: list[list[int]], n_new: int) -> dict:
    """The `runtime=llamacpp` speed section: the student GGUF and (optionally) the teacher GGUF."""
    if not runtime.get("gguf_path"):
        raise ValueError("runtime=llamacpp needs runtime.gguf_path: the student exported with "
                         "scripts/export.py CKPT OUT.gguf --format gguf")
    out = {}
    for role, spec in (("student", runtime.gguf_path), ("teacher", runtime.get("teacher_gguf"))):
        path = resolve_gguf(spec)
        if path is None:
            continue
        decoder = LlamaCppDecoder(path, n_threads=runtime.get("n_threads"))
        try:
            out[role] = {**timed_decode(decoder.generate, prompts, n_new), "gguf": Path(path).name,
                         "weight_bytes": decoder.weight_bytes}
        finally:
            decoder.close()
    return out
