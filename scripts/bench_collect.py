"""Collection throughput: API teachers (request concurrency) and local teachers.

`api`: `OpenAITeacher.generate` against a real local OpenAI-compatible HTTP server
(tests/fault_server.py) that answers every request after a fixed latency, at several
`max_concurrency` values. With a fixed per-request latency the ideal speed-up at concurrency c
is c (bounded by prompts / c rounding); the target is >= 12x at 16. The server also records the
most requests it saw in flight, which must never exceed the configured concurrency.

    python scripts/bench_collect.py --part api
    python scripts/bench_collect.py --part api --prompts 96 --latency 0.1 --concurrency 1 8 32
    python scripts/bench_collect.py --part all --json reports/bench_collect.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from bitnet_kde.runinfo import run_info

ROOT = Path(__file__).resolve().parents[1]


def _get_json(url: str) -> dict:
    import urllib.request

    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def _post_json(url: str) -> dict:
    import urllib.request

    req = urllib.request.Request(url, data=b"{}", method="POST", headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def bench_api(prompts: int = 48, latency_s: float = 0.2, concurrency: tuple[int, ...] = (1, 4, 16),
              top_k: int = 20, max_new_tokens: int = 32, in_process_server: bool = False) -> dict:
    """Request throughput of OpenAITeacher.generate vs max_concurrency against a local server.

    The server runs in its own process by default, as a real one would (in-process, its handler
    threads would compete with the client for this interpreter's GIL).
    """
    sys.path.insert(0, str(ROOT / "tests"))
    from fault_server import FaultServer, serve_in_subprocess

    from bitnet_kde.teachers.base import SamplingConfig, TeacherSequence
    from bitnet_kde.teachers.openai_api import OpenAITeacher

    sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.0, top_k=top_k)
    texts = [f"benchmark prompt number {i} about teachers" for i in range(prompts)]
    rows = []
    os.environ.setdefault("BENCH_API_KEY", "bench-no-key")
    if in_process_server:
        local = FaultServer(latency_s=latency_s).start()
        url, proc = local.url, None
    else:
        url, proc = serve_in_subprocess(latency_s)
        local = None
    base_url = url + "/v1"
    try:
        # warm-up (imports, first connection) outside the timed runs
        OpenAITeacher(model="bench", provider="bench", base_url=base_url,
                      api_key_env="BENCH_API_KEY").generate(texts[:2], sampling)
        for c in concurrency:
            _post_json(url + "/_reset")
            teacher = OpenAITeacher(model="bench", provider="bench", base_url=base_url,
                                    api_key_env="BENCH_API_KEY", max_concurrency=c, max_retries=0,
                                    timeout_s=30.0)
            t0 = time.perf_counter()
            out = teacher.generate(texts, sampling)
            wall = time.perf_counter() - t0
            ok = [r for r in out if isinstance(r, TeacherSequence)]
            if len(ok) != len(texts):
                raise RuntimeError(f"concurrency {c}: {len(texts) - len(ok)} requests failed: "
                                   f"{[r for r in out if not isinstance(r, TeacherSequence)][:3]}")
            stats = _get_json(url + "/_stats")
            tokens = sum(len(r.tokens) for r in ok)
            rows.append({"concurrency": c, "prompts": len(texts), "wall_s": round(wall, 3),
                         "requests_per_s": round(len(texts) / wall, 2),
                         "completion_tokens_per_s": round(tokens / wall, 1),
                         "mean_latency_s": round(sum(r.latency_s for r in ok) / len(ok), 4),
                         "requests_seen_by_server": stats["requests"],
                         "max_inflight_seen_by_server": stats["max_inflight"]})
    finally:
        if local is not None:
            local.stop()
        if proc is not None:
            proc.terminate()
            proc.join(5)
    base = rows[0]["requests_per_s"] if rows and rows[0]["concurrency"] == 1 else None
    for r in rows:
        r["speedup_vs_c1"] = round(r["requests_per_s"] / base, 2) if base else None
        r["ideal_speedup"] = round(len(texts) / -(-len(texts) // r["concurrency"]), 2)
    return {"part": "api", "server_latency_s": latency_s, "server": "in-process" if in_process_server else
            "separate process", "top_k": top_k, "max_new_tokens": max_new_tokens,
            "rows": rows}


def bench_local(prompts: int = 32, max_new_tokens: int = 64, top_k: int = 20, batch_size: int = 16,
                rounds: int = 2) -> dict:
    """Local teacher: full trace path vs the same model's plain greedy `generate`, same batches.

    raw   = `lm.generate` (KV cache, greedy), nothing recorded;
    trace = `LocalHFTeacher.generate` (per-step logits -> log-softmax -> top-K) + identity
            projection + an atomic Parquet shard write, i.e. everything collection does.
    Both produce the same greedy tokens; rounds alternate the order and the best round counts.
    """
    import tempfile

    import torch

    from bitnet_kde.kd.projection import project_identity
    from bitnet_kde.kd.prompts import load_prompts
    from bitnet_kde.kd.traces import trace_metadata, write_trace_shard
    from bitnet_kde.teachers import SamplingConfig
    from bitnet_kde.teachers.local import LocalHFTeacher

    teacher = LocalHFTeacher.smollm2(batch_size=batch_size)
    texts = [p.prompt for p in load_prompts(split="train", limit=prompts)]
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, top_k=top_k)
    tok = teacher.tokenizer

    def raw() -> int:
        n = 0
        for i in range(0, len(texts), batch_size):
            chats = [teacher.chat_ids(t) for t in texts[i:i + batch_size]]
            ids, mask = teacher._left_pad(chats)
            with torch.inference_mode():
                out = teacher.lm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                          do_sample=False, pad_token_id=tok.pad_token_id)
            for row in out[:, ids.shape[1]:].tolist():
                n += next((j + 1 for j, t in enumerate(row) if t in teacher.eos_ids), len(row))
        return n

    def trace(folder: str) -> int:
        seqs = teacher.generate(texts, sampling)
        rows = []
        for k, (text, seq) in enumerate(zip(texts, seqs)):
            r = project_identity(teacher.chat_ids(text), seq)
            rows.append({"id": str(k), "prompt": text, "category": "bench", "teacher_text": seq.text, **r.__dict__})
        meta = trace_metadata(teacher_provider=teacher.provider, teacher_model=teacher.model, k=top_k, sampling={},
                              logprob_mode="exact", tokenizer_name="smollm2", tokenizer_hash="-", vocab_size=len(tok))
        write_trace_shard(rows, Path(folder) / "bench.parquet", meta)
        return sum(s.completion_tokens for s in seqs)

    best = {"raw": 0.0, "trace": 0.0}
    tokens = {}
    with tempfile.TemporaryDirectory() as folder:
        for i in range(rounds):
            for name in (("raw", "trace") if i % 2 == 0 else ("trace", "raw")):
                t = time.perf_counter()
                n = raw() if name == "raw" else trace(folder)
                best[name] = max(best[name], n / (time.perf_counter() - t))
                tokens[name] = n
    return {"prompts": len(texts), "max_new_tokens": max_new_tokens, "top_k": top_k, "batch_size": batch_size,
            "tokens": tokens, "raw_tokens_per_s": best["raw"], "trace_tokens_per_s": best["trace"],
            "ratio_trace_over_raw": best["trace"] / best["raw"], "threads": torch.get_num_threads()}


def print_local(result: dict) -> None:
    print(f"local teacher (SmolLM2-135M, {result['threads']} threads): {result['prompts']} prompts, batch "
          f"{result['batch_size']}, <= {result['max_new_tokens']} new tokens, top-{result['top_k']}")
    print(f"raw generate: {result['raw_tokens_per_s']:.1f} tok/s; trace path: {result['trace_tokens_per_s']:.1f} "
          f"tok/s; ratio {result['ratio_trace_over_raw']:.3f} (target >= 0.90)")


def print_api(result: dict) -> None:
    print(f"API teacher throughput: OpenAITeacher vs local OpenAI-compatible server "
          f"({result['server']}), {result['server_latency_s'] * 1000:.0f} ms/request, top_k={result['top_k']}, "
          f"{result['rows'][0]['prompts']} prompts")
    print(f"{'concurrency':>11} {'wall s':>8} {'req/s':>8} {'tok/s':>8} {'speed-up':>9} {'ideal':>6} {'max in-flight':>14}")
    for r in result["rows"]:
        print(f"{r['concurrency']:>11} {r['wall_s']:>8.2f} {r['requests_per_s']:>8.2f} "
              f"{r['completion_tokens_per_s']:>8.1f} {r['speedup_vs_c1'] or float('nan'):>8.2f}x "
              f"{r['ideal_speedup']:>5.1f}x {r['max_inflight_seen_by_server']:>14}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["api", "local", "all"], default="all")
    ap.add_argument("--prompts", type=int, default=48)
    ap.add_argument("--latency", type=float, default=0.2, help="server latency per request (s)")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--top-k", type=int, default=20)
    ap.add_argument("--in-process-server", action="store_true",
                    help="run the fake server in this process (shares the GIL with the client)")
    ap.add_argument("--local-prompts", type=int, default=32, help="local part: prompts of the train split")
    ap.add_argument("--batch-size", type=int, default=16, help="local part: prompts per generate call")
    ap.add_argument("--max-new-tokens", type=int, default=64, help="local part: completion length cap")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args(argv)

    results = run_info()
    if args.part in ("api", "all"):
        results["api"] = bench_api(prompts=args.prompts, latency_s=args.latency,
                                   concurrency=tuple(args.concurrency), top_k=args.top_k,
                                   in_process_server=args.in_process_server)
        print_api(results["api"])
    if args.part in ("local", "all"):
        results["local"] = bench_local(prompts=args.local_prompts, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                                       top_k=args.top_k)
        print_local(results["local"])
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
