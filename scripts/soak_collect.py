"""Soak: API collection through injected faults and kill -9, checked prompt by prompt.

`collect.py` (the real entry point, `teacher=openai` at a local OpenAI-compatible server) collects
`--prompts` prompts at `--concurrency` requests in flight from tests/fault_server.py, run in its own
process with a seeded `FaultPlan`: per prompt, one draw picks a fault (5xx, 429 with Retry-After,
a dropped connection, a malformed body) that hits either the first attempt only (the client's
retry must recover it) or every attempt (the prompt must end as a counted failure). The collector
is killed with SIGKILL `--kills` times at random points (after a random number of shards, plus a
random delay) and restarted; the last run goes to the end. Then:

- every prompt is exactly one row or one recorded failure (0 lost, 0 duplicated, no overlap);
- the failures by reason equal what the plan's persistent faults must give
  (5xx -> server_error, 429 -> rate_limited, dropped -> connection_error, malformed -> malformed_response);
- the manifest's row and failure counts agree with the shards.

    python scripts/soak_collect.py                       # 1,000 prompts, concurrency 16, 2 kills
    python scripts/soak_collect.py --prompts 60 --chunk-size 10 --kills 1 --json reports/soak.json

Exit status 0 when every check holds.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq

from bitnet_kde.runinfo import run_info

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from fault_server import FaultPlan, serve_in_subprocess


def _stats(url: str) -> dict:
    import urllib.request

    with urllib.request.urlopen(f"{url}/_stats", timeout=10) as r:
        return json.loads(r.read())


def _shards(trace_dir: Path) -> list[Path]:
    return sorted(p for p in trace_dir.glob("kd-*.parquet") if not p.name.startswith("."))


def _collect_cmd(work: Path, prompts_file: Path, url: str, args: argparse.Namespace) -> list[str]:
    return [sys.executable, str(ROOT / "collect.py"), "teacher=openai", f"teacher.base_url={url}/v1",
            "teacher.model=soak", f"teacher.max_concurrency={args.concurrency}",
            f"teacher.max_retries={args.max_retries}", "teacher.timeout_s=30",
            f"collection.prompts.source={prompts_file}", "collection.prompts.split=[train]",
            f"collection.chunk_size={args.chunk_size}", f"collection.sampling.max_new_tokens={args.max_new_tokens}",
            "collection.sampling.top_k=5", "collection.progress=false", f"paths.root={work}"]


def soak(args: argparse.Namespace) -> dict:
    rng = random.Random(args.seed)
    plan = FaultPlan(seed=args.seed, retry_after_s=args.retry_after)
    work = Path(args.work or tempfile.mkdtemp(prefix="soak-"))
    work.mkdir(parents=True, exist_ok=True)
    prompts = {f"soak-{i:05d}": f"soak prompt number {i}" for i in range(args.prompts)}
    prompts_file = work / "prompts.jsonl"
    prompts_file.write_text("".join(json.dumps({"id": i, "prompt": p, "category": "soak", "split": "train"}) + "\n"
                                    for i, p in prompts.items()))
    expected = Counter(r for r in (plan.outcome(p) for p in prompts.values()) if r)
    chunks = -(-args.prompts // args.chunk_size)
    trace_dir = work / "data"
    env = {k: v for k, v in os.environ.items() if k not in ("TEACHER_PROVIDER", "STORAGE", "OPENAI_API_KEY")}
    env.update(PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    url, server = serve_in_subprocess(plan=plan)
    runs, t0 = [], time.perf_counter()
    try:
        for k in range(args.kills + 1):
            last = k == args.kills
            # kill points spread over the run: after a random shard count in the k-th slice, plus a delay
            target = rng.randint(max(1, chunks * k // (args.kills + 1)), max(1, chunks * (k + 1) // (args.kills + 1)))
            delay = rng.uniform(0.0, 0.5)
            t_run = time.perf_counter()
            before = len(_shards(trace_dir)) if trace_dir.exists() else 0
            killed = False
            with open(work / f"run{k}.log", "w") as log:
                proc = subprocess.Popen(_collect_cmd(work, prompts_file, url, args), cwd=work, env=env,
                                        stdout=log, stderr=subprocess.STDOUT)
                while proc.poll() is None:
                    if not last and trace_dir.exists() and len(_shards(trace_dir)) >= target:
                        time.sleep(delay)
                        if proc.poll() is None:
                            proc.send_signal(signal.SIGKILL)
                            killed = True
                        break
                    time.sleep(0.02)
                rc = proc.wait()
            runs.append({"run": k, "killed": killed, "returncode": rc, "shards_before": before,
                         "shards_after": len(_shards(trace_dir)), "seconds": round(time.perf_counter() - t_run, 1)})
            if last and rc != 0:
                raise SystemExit(f"the final collect run failed (rc {rc}); see {work / f'run{k}.log'}")
        stats = _stats(url)
    finally:
        server.terminate()
    wall = time.perf_counter() - t0

    manifest = json.loads((trace_dir / "manifest.json").read_text())
    by_text = {p: i for i, p in prompts.items()}
    row_prompts, shard_rows = [], 0
    for shard in manifest["shards"]:
        table = pq.read_table(trace_dir / shard["file"], columns=["prompt"])
        shard_rows += table.num_rows
        row_prompts += [by_text[p] for p in table.column("prompt").to_pylist()]
    failed = [f["id"] for f in manifest["failed"]]
    rows, fails = Counter(row_prompts), Counter(failed)
    got = Counter(f["reason"] for f in manifest["failed"])
    checks = {
        "every prompt ended": set(rows) | set(fails) == set(prompts),
        "no duplicated row": all(n == 1 for n in rows.values()),
        "no duplicated failure": all(n == 1 for n in fails.values()),
        "no prompt both a row and a failure": not set(rows) & set(fails),
        "failures by reason = injected persistent faults": got == expected,
        "manifest rows = shard rows": manifest["rows"] == shard_rows == sum(s["rows"] for s in manifest["shards"]),
        "manifest failure counts = failure list": manifest["failures"] == dict(got),
        "collector killed as planned": sum(r["killed"] for r in runs) == args.kills,
    }
    return {
        **run_info(),
        "command": "python scripts/soak_collect.py " + " ".join(sys.argv[1:]),
        "settings": {"prompts": args.prompts, "concurrency": args.concurrency, "chunk_size": args.chunk_size,
                     "max_retries": args.max_retries, "max_new_tokens": args.max_new_tokens, "seed": args.seed,
                     "retry_after_s": args.retry_after, "kills": args.kills,
                     "plan": {k: getattr(plan, k) for k in ("server_error", "rate_limited", "dropped", "malformed",
                                                           "persistent")}},
        "runs": runs,
        "wall_s": round(wall, 1),
        "server": {"requests": stats["requests"], "max_inflight": stats["max_inflight"],
                   "fault_answers_by_kind": stats["injected"]},
        "rows": len(rows), "failures": dict(got), "expected_failures": dict(expected),
        "lost": len(set(prompts) - set(rows) - set(fails)),
        "duplicated": sum(n - 1 for n in rows.values()) + sum(n - 1 for n in fails.values()),
        "checks": checks, "ok": all(checks.values()), "work_dir": str(work),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=1000)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--chunk-size", type=int, default=50)
    ap.add_argument("--kills", type=int, default=2)
    ap.add_argument("--max-retries", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--retry-after", type=float, default=0.05, help="seconds the server's Retry-After asks for")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", help="folder for prompts, traces and logs (default: a new temporary folder)")
    ap.add_argument("--json", help="also write the result here")
    args = ap.parse_args(argv)
    result = soak(args)
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
