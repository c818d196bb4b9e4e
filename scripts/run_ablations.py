"""Train and evaluate the four ablations on the same traces and steps; write docs/RESULTS.md.

    python scripts/run_ablations.py                       # all four at the default scale
    python scripts/run_ablations.py --only kd,ce_only     # a subset
    python scripts/run_ablations.py --train trainer.max_steps=50 --eval speed.prompts=2
    python scripts/run_ablations.py --sampled --steps 60   # bucket / renormalize / rs / hybrid at
                                                           # equal trace bytes (scripts/sampled_ablation.py)

Each ablation is `python train.py experiment=ablation_<name>` (configs/experiment/) followed by
`python eval.py ckpt_path=<its last.ckpt>`. The teacher's tokens/s and weight bytes are measured
by the first evaluation and passed to the others, so every QEI_speed uses the same teacher
figure. The table is rebuilt from the eval reports, so `--table-only` re-renders it.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from bitnet_kde.runinfo import describe

ROOT = Path(__file__).resolve().parents[1]

ABLATIONS = {
    "kd": "(a) KD Top-K + Other, A8→A4 at 90%",
    "ce_only": "(b) CE only",
    "renormalize": "(c) KD renormalized Top-K (no Other)",
    "a8_only": "(d) KD Top-K + Other, A8 only",
}


def run(cmd: list[str], log_path: Path) -> float:
    """Run a stage, streaming nothing; its output goes to `log_path`. Returns seconds."""
    print("$", shlex.join(cmd), flush=True)
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode:
        sys.exit(f"failed ({proc.returncode}): {shlex.join(cmd)}\nsee {log_path}")
    return time.perf_counter() - t0


def run_one(name: str, root: Path, train_args: list[str], eval_args: list[str], teacher: dict | None,
            skip_train: bool = False) -> dict:
    run_dir = root / "ablations" / name
    run_dir.mkdir(parents=True, exist_ok=True)
    common = [f"paths.root={root}"]
    report = root / "reports" / "ablations" / f"{name}.json"
    if skip_train:  # evaluate the existing checkpoint again (e.g. on a quieter machine)
        train_s = json.loads(report.read_text())["ablation"]["train_seconds"]
    else:
        train_s = run([sys.executable, "train.py", f"experiment=ablation_{name}", f"hydra.run.dir={run_dir}", *common,
                       *train_args], run_dir / "train.out")
    known = [] if teacher is None else [f"speed.teacher_tokens_per_s={teacher['tps']}",
                                        f"teacher_weight_bytes={teacher['bytes']}"]
    eval_s = run([sys.executable, "eval.py", f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}",
                  f"report_path={report}", f"chart_path={report.with_suffix('.png')}",
                  f"hydra.run.dir={run_dir / 'eval'}", *common, *known, *eval_args], run_dir / "eval.out")
    r = json.loads(report.read_text())
    r["ablation"] = {"name": name, "train_seconds": train_s, "eval_seconds": eval_s,
                     "train_args": train_args, "eval_args": eval_args}
    report.write_text(json.dumps(r, indent=2, ensure_ascii=False))
    return r


def fmt(v, digits=3) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.{digits}f}"
    return str(v)


def table(reports: list[dict], command: str) -> str:
    """docs/RESULTS.md: the overall table, per-category top-1 agreement, and how it was made."""
    first = reports[0]
    lines = [
        "# Ablation results",
        "",
        "Produced by `scripts/run_ablations.py` (do not edit by hand; rerun it). Every row trains",
        "the default student on the same traces for the same steps and is evaluated on the held-out",
        "`test` prompts by `eval.py` (metric definitions: docs/EVALUATION.md).",
        "",
        f"- command: `{command}`",
        f"- date: {datetime.now(timezone.utc).strftime('%Y-%m-%d')}; machine: {describe(first['machine'])}",
        f"- student: {_model(first)}; teacher: {first['teacher']['name']}",
        f"- eval data: trace set `{first['data']['trace_set']}`, {first['data']['rows']} held-out prompts "
        f"({', '.join(f'{k} {v}' for k, v in sorted(first['data']['rows_per_category'].items()))})",
        f"- QEI quality metric: `{first['qei']['quality_metric']}`; teacher tokens/s "
        f"{fmt(first['qei']['tps_teacher'], 1)} (measured once, same machine); teacher weight bytes "
        f"{fmt(first['qei']['m_teacher'])}",
        "",
        "| ablation | eval mode | KL ↓ | top-1 ↑ | ppl ↓ | JSON valid ↑ | exact match ↑ | student tok/s | QEI | "
        "QEI_speed |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in reports:
        m, q = r["metrics"]["overall"], r["qei"]
        lines.append(
            f"| {ABLATIONS[r['ablation']['name']]} | A{r['student']['activation_bits']} | {fmt(m['kl'])} | "
            f"{fmt(m['top1_agreement'])} | {fmt(m['perplexity'], 1)} | "
            f"{fmt(m.get('json_validity'))} (teacher {fmt(m.get('teacher_json_validity'))}) | "
            f"{fmt(m.get('exact_match'))} | {fmt(q['tps_student'], 1)} | {fmt(q['qei'], 2)} | "
            f"{fmt(q['qei_speed'], 1)} |")
    cats = sorted(first["metrics"]["per_category"])
    lines += ["", "Top-1 agreement with the teacher per category:", "",
              "| ablation | " + " | ".join(cats) + " |", "|---|" + "---|" * len(cats)]
    for r in reports:
        per = r["metrics"]["per_category"]
        lines.append(f"| {ABLATIONS[r['ablation']['name']]} | " +
                     " | ".join(fmt(per[c]["top1_agreement"]) for c in cats) + " |")
    lines += ["", "KL(teacher ‖ student) per category (nats/token):", "",
              "| ablation | " + " | ".join(cats) + " |", "|---|" + "---|" * len(cats)]
    for r in reports:
        per = r["metrics"]["per_category"]
        lines.append(f"| {ABLATIONS[r['ablation']['name']]} | " + " | ".join(fmt(per[c]["kl"]) for c in cats) + " |")
    lines.append("")
    return "\n".join(lines)


def _model(r: dict) -> str:
    c = r["student"]["config"]
    return (f"d_model {c['d_model']}, {c['n_layers']} layers, vocab {c['vocab_size']} "
            f"({r['student']['parameters'] / 1e6:.1f}M parameters)")


def main() -> None:
    if "--sampled" in sys.argv[1:]:  # its own measurement and its own section of RESULTS.md
        import runpy

        sys.argv = [sys.argv[0], *(a for a in sys.argv[1:] if a != "--sampled")]
        runpy.run_path(str(ROOT / "scripts" / "sampled_ablation.py"), run_name="__main__")
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", type=Path, default=ROOT, help="paths.root of every run (traces are shared)")
    p.add_argument("--only", default=",".join(ABLATIONS), help="comma-separated subset of " + ", ".join(ABLATIONS))
    p.add_argument("--train", nargs="*", default=[], help="extra Hydra overrides for every train.py run")
    p.add_argument("--eval", nargs="*", default=[], help="extra Hydra overrides for every eval.py run")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "RESULTS.md")
    p.add_argument("--table-only", action="store_true", help="rebuild the table from existing reports")
    p.add_argument("--skip-train", action="store_true", help="re-evaluate the existing checkpoints only")
    args = p.parse_args()
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = set(names) - set(ABLATIONS)
    if unknown:
        sys.exit(f"unknown ablations {sorted(unknown)}; choose from {list(ABLATIONS)}")
    root = args.root.resolve()
    reports, teacher = [], None
    for name in names:
        path = root / "reports" / "ablations" / f"{name}.json"
        if args.table_only:
            reports.append(json.loads(path.read_text()))
            continue
        r = run_one(name, root, args.train, args.eval, teacher, args.skip_train)
        if teacher is None and r["qei"]["tps_teacher"] is not None:
            teacher = {"tps": r["qei"]["tps_teacher"], "bytes": r["qei"]["m_teacher"]}
        reports.append(r)
        print(f"{name}: top-1 {fmt(r['metrics']['overall']['top1_agreement'])}, KL {fmt(r['metrics']['overall']['kl'])}, "
              f"train {r['ablation']['train_seconds']:.0f} s", flush=True)
    cmd = "python scripts/run_ablations.py" + "".join(
        f" {flag} {shlex.join(vals)}" for flag, vals in (("--train", args.train), ("--eval", args.eval)) if vals)
    if args.only != ",".join(ABLATIONS):
        cmd += f" --only {args.only}"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(table(reports, cmd))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
