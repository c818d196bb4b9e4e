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
import platform
import sys
import time
from pathlib import Path

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
            "machine": {"python": platform.python_version(), "platform": platform.platform(),
                        "cpus": os.cpu_count()},
            "rows": rows}


def bench_local(**kwargs) -> dict:
    # ------------------------------------------------------------------------------------------
    # PLACEHOLDER: local-teacher collection throughput (scoring / generation tokens/s of the
    # in-process teachers). Not written yet.
    # ------------------------------------------------------------------------------------------
    raise NotImplementedError("bench_local() is a placeholder: the local-teacher benchmark is not written yet")


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
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args(argv)

    results = {}
    if args.part in ("api", "all"):
        results["api"] = bench_api(prompts=args.prompts, latency_s=args.latency,
                                   concurrency=tuple(args.concurrency), top_k=args.top_k,
                                   in_process_server=args.in_process_server)
        print_api(results["api"])
    if args.part in ("local", "all"):
        results["local"] = bench_local()
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
