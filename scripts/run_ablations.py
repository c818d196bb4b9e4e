"""Train and evaluate a set of ablations on the same traces; write its section of docs/RESULTS.md.

    python scripts/run_ablations.py                       # the loss set (four runs) at the default scale
    python scripts/run_ablations.py --only kd,ce_only     # a subset
    python scripts/run_ablations.py --train trainer.max_steps=50 --eval speed.prompts=2
    python scripts/run_ablations.py --set warmstart --budget-seconds 240   # scratch vs warm start
    python scripts/run_ablations.py --sampled --steps 60   # bucket / renormalize / rs / hybrid at
                                                           # equal trace bytes (scripts/sampled_ablation.py)

Sets:
- `loss`: `python train.py experiment=ablation_<name>` (configs/experiment/) for the same steps.
- `warmstart`: (a) the scratch default student, (b) a warm start from the embedded SmolLM2
  (`experiment=warmstart`), (c) the same without SubLN, (d) the full-precision source itself,
  evaluated as it is (no training), (e) (b) with its SubLN norms starting at weight 1 instead
  of calibrated.

Each trained run is followed by `python eval.py ckpt_path=<its last.ckpt>`. The teacher's tokens/s
and weight bytes are measured by the first evaluation and passed to the others, so every
QEI_speed uses the same teacher figure. The table is rebuilt from the eval reports, so
`--table-only` re-renders it; only the chosen set's section of the output file is replaced.

`--budget-seconds B` gives every trained run the same training time: before any run, one
process times a few real training steps of each (same traces, batch and loss, back to back, so
the ratios share the machine's load), and each run gets `trainer.max_steps = B / its step time`
(a warm start also `optim.quant_warmup_steps` = half of it). A step budget, not a clock: the
schedules (LR, warm-up, A8 -> A4 flip) are planned from the run length, and the steps do not
shrink when another process takes the CPU during a run. The machine's load average is recorded
next to each figure.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from bitnet_kde import storage  # noqa: F401  (registers the config resolvers of configs/paths)
from bitnet_kde.losses import DistillationLoss, LossConfig
from bitnet_kde.model import BitNetLM
from bitnet_kde.runinfo import describe
from bitnet_kde.training.warmstart import student_config

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Ablation:
    label: str
    """Row name in the table."""
    train: tuple[str, ...] | None
    """`train.py` overrides; None = nothing to train (the eval overrides name the model)."""
    eval: tuple[str, ...] = ()
    """Extra `eval.py` overrides of this row."""


SETS: dict[str, dict[str, Ablation]] = {
    "loss": {
        "kd": Ablation("(a) KD Top-K + Other, A8→A4 at 90%", ("experiment=ablation_kd",)),
        "ce_only": Ablation("(b) CE only", ("experiment=ablation_ce_only",)),
        "renormalize": Ablation("(c) KD renormalized Top-K (no Other)", ("experiment=ablation_renormalize",)),
        "a8_only": Ablation("(d) KD Top-K + Other, A8 only", ("experiment=ablation_a8_only",)),
    },
    "warmstart": {
        "scratch": Ablation("(a) scratch mini", ("experiment=ablation_kd",)),
        "warmstart": Ablation("(b) warm start, 11 of SmolLM2's 30 blocks, SubLN", ("experiment=warmstart",)),
        "warmstart_no_subln": Ablation("(c) warm start, 11 of SmolLM2's 30 blocks, no SubLN",
                                       ("experiment=warmstart", "model.subln=false")),
        "source": Ablation("(d) the source, full precision (ceiling)", None, ("init_from=teacher",)),
        "warmstart_subln_one": Ablation("(e) as (b), SubLN starting at weight 1",
                                        ("experiment=warmstart", "model.init_subln=one")),
    },
}
TITLES = {"loss": "Loss and activation ablations", "warmstart": "Warm start from a pretrained model"}


def run(cmd: list[str], log_path: Path) -> float:
    """Run a stage, streaming nothing; its output goes to `log_path`. Returns seconds."""
    print("$", shlex.join(cmd), flush=True)
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode:
        sys.exit(f"failed ({proc.returncode}): {shlex.join(cmd)}\nsee {log_path}")
    return time.perf_counter() - t0


def load() -> list[float]:
    """The machine's 1/5/15-minute load averages (what `uptime` prints)."""
    return [round(x, 2) for x in os.getloadavg()]


def step_seconds(ablations: dict[str, Ablation], root: Path, train_args: list[str], steps: int = 3) -> dict:
    """Seconds per training step of each trained ablation: forward, loss, backward and AdamW on the
    same real trace batches, back to back in this process (after one untimed step each)."""
    timed = {}
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        for name, a in ablations.items():
            if a.train is None:
                continue
            cfg = compose("train", overrides=[*a.train, f"paths.root={root}", *train_args])
            data = instantiate(cfg.data)
            data.prepare_data()
            data.setup("fit")
            batches = iter(data.train_dataloader())
            torch.manual_seed(0)
            model = BitNetLM(student_config(OmegaConf.to_container(cfg.model, resolve=True)))
            loss_fn = DistillationLoss(LossConfig(**OmegaConf.to_container(cfg.loss, resolve=True)))
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
            seconds = []
            for i in range(steps + 1):
                batch = next(batches)
                t = time.perf_counter()
                loss_fn(model(batch["input_ids"]), batch)["loss"].backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                if i >= 1:
                    seconds.append(time.perf_counter() - t)
            timed[name] = sum(seconds) / len(seconds)
            print(f"{name}: {timed[name]:.2f} s/step (load {load()})", flush=True)
    return timed


def budget_args(name: str, a: Ablation, budget_s: float, step_s: float) -> list[str]:
    """`trainer.max_steps` for `budget_s` of training, validated (and checkpointed) at the last step, and
    half of it as quantization warm-up for a warm start."""
    steps = max(2, round(budget_s / step_s))
    args = [f"trainer.max_steps={steps}", f"trainer.val_check_interval={steps}"]
    if "experiment=warmstart" in a.train:
        args.append(f"optim.quant_warmup_steps={steps // 2}")
    return args


def run_one(name: str, a: Ablation, root: Path, train_args: list[str], eval_args: list[str], teacher: dict | None,
            skip_train: bool = False, budget: dict | None = None) -> dict:
    run_dir = root / "logs" / "ablations" / name
    run_dir.mkdir(parents=True, exist_ok=True)
    common = [f"paths.root={root}"]
    report = root / "reports" / "ablations" / f"{name}.json"
    loads = {"before_train": load()}
    if skip_train:  # evaluate the existing checkpoint again (e.g. on a quieter machine)
        train_s = json.loads(report.read_text())["ablation"]["train_seconds"]
    elif a.train is None:
        train_s = None
    else:
        train_args = [*train_args, *(budget or {}).get("args", [])]
        train_s = run([sys.executable, "train.py", *a.train, f"hydra.run.dir={run_dir}", *common, *train_args],
                      run_dir / "train.out")
    known = [] if teacher is None else [f"speed.teacher_tokens_per_s={teacher['tps']}",
                                        f"teacher_weight_bytes={teacher['bytes']}"]
    student = [] if a.train is None else [f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}"]
    loads["before_eval"] = load()
    eval_s = run([sys.executable, "eval.py", *student, f"report_path={report}", f"chart_path={report.with_suffix('.png')}",
                  f"hydra.run.dir={run_dir / 'eval'}", *common, *known, *a.eval, *eval_args], run_dir / "eval.out")
    loads["after_eval"] = load()
    r = json.loads(report.read_text())
    r["ablation"] = {"name": name, "train_seconds": train_s, "eval_seconds": eval_s, "train": list(a.train or []),
                     "train_args": train_args, "eval_args": [*a.eval, *eval_args], "load_average": loads,
                     "budget": budget}
    report.write_text(json.dumps(r, indent=2, ensure_ascii=False))
    return r


def fmt(v, digits=3) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.{digits}f}"
    return str(v)


def table(set_name: str, reports: list[dict], command: str) -> str:
    """One set's section of docs/RESULTS.md: the overall table, per-category top-1 agreement and KL,
    and how it was made."""
    labels = {name: a.label for name, a in SETS[set_name].items()}
    first = reports[0]
    trained = [r for r in reports if r["ablation"].get("train_seconds") is not None]
    budget = next((r["ablation"]["budget"] for r in trained if r["ablation"].get("budget")), None)
    lines = [
        f"## {TITLES[set_name]}",
        "",
        "Produced by `scripts/run_ablations.py` (do not edit by hand; rerun it). Every trained row uses",
        "the same traces and is evaluated on the held-out `test` prompts by `eval.py` (metric definitions:",
        "docs/EVALUATION.md).",
        "",
        f"- command: `{command}`",
        f"- date: {datetime.now(timezone.utc).strftime('%Y-%m-%d')}; machine: {describe(first['machine'])}",
        f"- {_students(reports)}; teacher: {first['teacher']['name']}",
        f"- eval data: trace set `{first['data']['trace_set']}`, {first['data']['rows']} held-out prompts "
        f"({', '.join(f'{k} {v}' for k, v in sorted(first['data']['rows_per_category'].items()))})",
        f"- QEI quality metric: `{first['qei']['quality_metric']}`; teacher tokens/s "
        f"{fmt(first['qei']['tps_teacher'], 1)} (measured once, same machine); teacher weight bytes "
        f"{fmt(first['qei']['m_teacher'])}",
    ]
    if budget:
        lines.append(f"- training budget: {budget['seconds']:g} s of training steps per run, in steps from step "
                     f"times measured back to back before the runs: " + "; ".join(
                         f"{r['ablation']['name']} {r['ablation']['budget']['step_seconds']:.2f} s/step -> "
                         f"{r['ablation']['budget']['steps']} steps" for r in trained))
    lines.append("- load average (1/5/15 min) before each training: " + "; ".join(
        f"{r['ablation']['name']} {r['ablation'].get('load_average', {}).get('before_train', '?')}" for r in reports))
    lines += [
        "",
        "| run | eval mode | KL ↓ | top-1 ↑ | ppl ↓ | JSON valid ↑ | exact match ↑ | student tok/s | weight bytes | "
        "train s | QEI | QEI_speed |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in reports:
        m, q = r["metrics"]["overall"], r["qei"]
        lines.append(
            f"| {labels[r['ablation']['name']]} | {_mode(r)} | {fmt(m['kl'])} | "
            f"{fmt(m['top1_agreement'])} | {fmt(m['perplexity'], 1)} | "
            f"{fmt(m.get('json_validity'))} (teacher {fmt(m.get('teacher_json_validity'))}) | "
            f"{fmt(m.get('exact_match'))} | {fmt(q['tps_student'], 1)} | "
            f"{fmt(float(r['memory']['student_weight_bytes']['total']))} | {fmt(r['ablation'].get('train_seconds'), 0)} | "
            f"{fmt(q['qei'], 2)} | {fmt(q['qei_speed'], 1)} |")
    cats = sorted(first["metrics"]["per_category"])
    lines += ["", "Top-1 agreement with the teacher per category:", "",
              "| run | " + " | ".join(cats) + " |", "|---|" + "---|" * len(cats)]
    for r in reports:
        per = r["metrics"]["per_category"]
        lines.append(f"| {labels[r['ablation']['name']]} | " +
                     " | ".join(fmt(per[c]["top1_agreement"]) for c in cats) + " |")
    lines += ["", "KL(teacher ‖ student) per category (nats/token):", "",
              "| run | " + " | ".join(cats) + " |", "|---|" + "---|" * len(cats)]
    for r in reports:
        per = r["metrics"]["per_category"]
        lines.append(f"| {labels[r['ablation']['name']]} | " + " | ".join(fmt(per[c]["kl"]) for c in cats) + " |")
    return "\n".join(lines)


def _mode(r: dict) -> str:
    s = r["student"]
    if not s["config"].get("quantize", True):
        return "fp32"
    return f"A{s['activation_bits']}"


def _model(r: dict) -> str:
    c = r["student"]["config"]
    return (f"d_model {c['d_model']}, {c['n_layers']} layers, vocab {c['vocab_size']} "
            f"({r['student']['parameters'] / 1e6:.1f}M parameters)")


def _students(reports: list[dict]) -> str:
    """`student: <shape>` when every run trains the same one, else each run's shape."""
    shapes = {r["ablation"]["name"]: _model(r) for r in reports}
    if len(set(shapes.values())) == 1:
        return f"student: {next(iter(shapes.values()))}"
    return "students: " + "; ".join(f"{name} {shape}" for name, shape in shapes.items())


def write_section(out: Path, set_name: str, section: str) -> None:
    """Replace (or append) the set's section of `out`, between its begin/end markers."""
    begin, end = f"<!-- begin {set_name} -->", f"<!-- end {set_name} -->"
    block = f"{begin}\n{section}\n{end}"
    text = out.read_text() if out.exists() else "# Ablation results\n"
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + block
    out.write_text(text.rstrip("\n") + "\n")


def main() -> None:
    if "--sampled" in sys.argv[1:]:  # its own measurement and its own section of RESULTS.md
        import runpy

        sys.argv = [sys.argv[0], *(a for a in sys.argv[1:] if a != "--sampled")]
        runpy.run_path(str(ROOT / "scripts" / "sampled_ablation.py"), run_name="__main__")
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", type=Path, default=ROOT, help="paths.root of every run (traces are shared)")
    p.add_argument("--set", default="loss", choices=sorted(SETS), help="which set of runs")
    p.add_argument("--only", default=None, help="comma-separated subset of the set's runs")
    p.add_argument("--train", nargs="*", default=[], help="extra Hydra overrides for every train.py run")
    p.add_argument("--eval", nargs="*", default=[], help="extra Hydra overrides for every eval.py run")
    p.add_argument("--budget-seconds", type=float, default=None,
                   help="equal training time per run, as steps from measured step times (see above)")
    p.add_argument("--step-seconds", default=None,
                   help="step times measured earlier, e.g. scratch=21.5,warmstart=48.8 (then nothing is timed): "
                        "runs of one budget split over several processes")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "RESULTS.md")
    p.add_argument("--table-only", action="store_true", help="rebuild the table from existing reports")
    p.add_argument("--skip-train", action="store_true", help="re-evaluate the existing checkpoints only")
    args = p.parse_args()
    ablations = SETS[args.set]
    names = [n.strip() for n in (args.only or ",".join(ablations)).split(",") if n.strip()]
    unknown = set(names) - set(ablations)
    if unknown:
        sys.exit(f"unknown runs {sorted(unknown)} in set {args.set!r}; choose from {list(ablations)}")
    root = args.root.resolve()
    budgets: dict[str, dict] = {}
    if args.budget_seconds and not (args.table_only or args.skip_train):
        timed = {k: float(v) for k, v in (kv.split("=") for kv in args.step_seconds.split(","))
                 if k in names} if args.step_seconds else step_seconds({n: ablations[n] for n in names}, root,
                                                                        args.train)
        budgets = {n: {"seconds": args.budget_seconds, "step_seconds": s,
                       "args": budget_args(n, ablations[n], args.budget_seconds, s),
                       "steps": max(2, round(args.budget_seconds / s))} for n, s in timed.items()}
    reports, teacher = [], None
    for name in names:
        path = root / "reports" / "ablations" / f"{name}.json"
        if args.table_only:
            reports.append(json.loads(path.read_text()))
            continue
        r = run_one(name, ablations[name], root, args.train, args.eval, teacher, args.skip_train, budgets.get(name))
        if teacher is None and r["qei"]["tps_teacher"] is not None:
            teacher = {"tps": r["qei"]["tps_teacher"], "bytes": r["qei"]["m_teacher"]}
        reports.append(r)
        print(f"{name}: top-1 {fmt(r['metrics']['overall']['top1_agreement'])}, KL {fmt(r['metrics']['overall']['kl'])}, "
              f"train {fmt(r['ablation']['train_seconds'], 0)} s", flush=True)
    cmd = "python scripts/run_ablations.py" + (f" --set {args.set}" if args.set != "loss" else "") + "".join(
        f" {flag} {shlex.join(vals)}" for flag, vals in (("--train", args.train), ("--eval", args.eval)) if vals)
    if args.budget_seconds:
        cmd += f" --budget-seconds {args.budget_seconds:g}"
    if args.only:
        cmd += f" --only {args.only}"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_section(args.out, args.set, table(args.set, reports, cmd))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
