"""Batch-1 greedy decoding speed: the student in PyTorch and in llama.cpp, and the teacher in llama.cpp.

One run, the same prompts (the shipped prompt set's test split in the student's chat format)
and the same number of new tokens for every runtime (no stop at the end token):

- student, PyTorch packed path: `BitNetLM.generate` on the packed model, as stored (codes
  unpacked at every step) and as eval runs it (unpacked once, fp32 matmuls);
- student GGUF, TQ2_0 and TQ1_0, in llama.cpp (llama-cpp-python);
- teacher GGUF (the embedded SmolLM2-135M, Q4_1) in llama.cpp.

    python scripts/bench_decode.py                       # mini preset, swiglu, random weights
    python scripts/bench_decode.py --ckpt logs/train/runs/<run>/checkpoints/last.ckpt
    python scripts/bench_decode.py --prompts 3 --new-tokens 32 --json reports/bench_decode.json

Decoding speed does not depend on the weights' values, so without `--ckpt` a freshly
initialised `mini` student (with `ffn_act=swiglu`, the activation llama.cpp's bitnet graph
computes) stands in for a trained one.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path

import torch

from bitnet_kde.checkpoint import load_student
from bitnet_kde.eval.runtime import LlamaCppDecoder, timed_decode
from bitnet_kde.export.gguf import export_gguf
from bitnet_kde.model import BitNetConfig, BitNetLM, PackedBitLinear
from bitnet_kde.model.packed import packed_copy
from bitnet_kde.runinfo import describe, run_info
from bitnet_kde.tokenizer import chat_ids, load_student_tokenizer, smollm2_gguf

PROMPT_SET = Path(__file__).resolve().parents[1] / "bitnet_kde" / "kd" / "prompt_sets" / "default.jsonl"


def held_out_prompts(tokenizer, n: int) -> list[list[int]]:
    rows = [json.loads(line) for line in PROMPT_SET.read_text().splitlines()]
    return [chat_ids(tokenizer, r["prompt"]) for r in rows if r["split"] == "test"][:n]


def torch_decoder(model: BitNetLM):
    def decode(prompt: list[int], n_new: int) -> list[int]:
        return model.generate(torch.tensor([prompt]), n_new)[0].tolist()
    return decode


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt", default=None, help="a training checkpoint or export (default: a fresh mini student)")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved measurements per runtime (median reported)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(),
                    help="threads for PyTorch and llama.cpp alike")
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    tokenizer = load_student_tokenizer("smollm2")
    if args.ckpt:
        student = load_student(args.ckpt)
    else:
        torch.manual_seed(0)
        student = BitNetLM(BitNetConfig.from_name("mini", vocab_size=len(tokenizer), ffn_act="swiglu")).eval()
    prompts = held_out_prompts(tokenizer, args.prompts)
    n_new = args.new_tokens

    packed = packed_copy(student)
    eval_form = packed_copy(student)
    for m in eval_form.modules():
        if isinstance(m, PackedBitLinear):
            m.cache_unpacked = True
    unpacked_bytes = packed.weight_bytes()["other"] + sum(4 * m.in_features * m.out_features
                                                          for m in packed.bitlinears())
    runtimes = [("PyTorch, packed (codes unpacked every step)", torch_decoder(packed), packed.weight_bytes()["total"]),
                ("PyTorch, packed, unpacked once (eval's form)", torch_decoder(eval_form), unpacked_bytes)]
    decoders = []
    with tempfile.TemporaryDirectory() as tmp:
        ggufs = []
        for qtype in ("TQ2_0", "TQ1_0"):
            path = Path(tmp) / f"student-{qtype}.gguf"
            export_gguf(student, path, tokenizer_gguf=Path(*smollm2_gguf()), ternary_type=qtype,
                        strict_activation=False)  # speed only: a relu2 checkpoint decodes as fast
            ggufs.append((f"llama.cpp, student GGUF {qtype}", path))
        ggufs.append(("llama.cpp, teacher GGUF (SmolLM2-135M Q4_1)", Path(*smollm2_gguf())))
        for name, path in ggufs:
            decoders.append(LlamaCppDecoder(path, n_threads=args.threads))
            runtimes.append((name, decoders[-1].generate, decoders[-1].weight_bytes))
        # Rounds interleave the runtimes (order reversed every other round) so that load from
        # other processes on a shared machine hits all of them; the median round is reported.
        samples: dict[str, list[dict]] = {name: [] for name, _, _ in runtimes}
        for r in range(args.rounds):
            for name, decode, _ in (runtimes if r % 2 == 0 else runtimes[::-1]):
                samples[name].append(timed_decode(decode, prompts, n_new))
        for d in decoders:
            d.close()
    # ratios are taken within a round (runtimes measured back to back), then the median over rounds
    base, eval_name, teacher = runtimes[0][0], runtimes[1][0], runtimes[-1][0]

    def ratio(name: str, ref: str, key: str = "tokens_per_s") -> float:
        return statistics.median(a[key] / b[key] for a, b in zip(samples[name], samples[ref], strict=True))

    rows = []
    for name, _, weight_bytes in runtimes:
        rows.append({"runtime": name, "tokens_per_s": statistics.median(x["tokens_per_s"] for x in samples[name]),
                     "tokens_per_s_rounds": [round(x["tokens_per_s"], 2) for x in samples[name]],
                     "tokens": samples[name][0]["tokens"], "weight_bytes": weight_bytes,
                     "x_pytorch_packed": ratio(name, base), "x_pytorch_eval_form": ratio(name, eval_name),
                     "x_teacher_llamacpp": ratio(name, teacher),
                     "tokens_per_cpu_s": statistics.median(x["tokens_per_cpu_s"] for x in samples[name]),
                     "cpu_x_pytorch_packed": ratio(name, base, "tokens_per_cpu_s"),
                     "cpu_x_teacher_llamacpp": ratio(name, teacher, "tokens_per_cpu_s")})
    info = run_info()
    print(f"decode, batch 1, greedy: {len(prompts)} prompts x {n_new} new tokens, median of {args.rounds} rounds; "
          f"{describe(info['machine'])}; {args.threads} threads; student {student.cfg.d_model}d x "
          f"{student.cfg.n_layers} layers, vocab {student.cfg.vocab_size}, A{student.activation_bits}; "
          f"load average {os.getloadavg()[0]:.1f}")
    print()
    print("| runtime | tokens/s (median) | per round | x PyTorch packed | x PyTorch unpacked once | "
          "x teacher (llama.cpp) | tokens per CPU-s | x PyTorch packed (CPU) | x teacher (CPU) | weight MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['runtime']} | {r['tokens_per_s']:.1f} | {', '.join(f'{v:.1f}' for v in r['tokens_per_s_rounds'])} | "
              f"{r['x_pytorch_packed']:.2f} | {r['x_pytorch_eval_form']:.2f} | {r['x_teacher_llamacpp']:.2f} | "
              f"{r['tokens_per_cpu_s']:.1f} | {r['cpu_x_pytorch_packed']:.2f} | {r['cpu_x_teacher_llamacpp']:.2f} | "
              f"{r['weight_bytes'] / 2**20:.1f} |")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({**info, "prompts": len(prompts), "new_tokens": n_new,
                                               "threads": args.threads, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
