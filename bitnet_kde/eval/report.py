"""Outputs of the eval stage besides the JSON report: TensorBoard scalars and a PNG chart."""

from __future__ import annotations

import io
from pathlib import Path

SCALARS = ("kl", "top1_agreement", "perplexity", "json_validity", "exact_match")


def log_tensorboard(report: dict, log_dir: str | Path) -> None:
    """Every metric as `eval/<category>/<metric>` plus the QEI terms as `eval/qei/*`."""
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(log_dir)) as w:
        cats = {"overall": report["metrics"]["overall"], **report["metrics"]["per_category"]}
        for cat, metrics in cats.items():
            for name in SCALARS:
                if metrics.get(name) is not None:
                    w.add_scalar(f"eval/{cat}/{name}", metrics[name], 0)
        for name in ("qei", "qei_speed", "q_student", "q_teacher", "tps_student", "tps_teacher"):
            if report["qei"].get(name) is not None:
                w.add_scalar(f"eval/qei/{name}", report["qei"][name], 0)
        w.add_text("eval/quality_metric", report["qei"]["quality_metric"], 0)


def plot_quality(report: dict) -> bytes:
    """PNG bytes of per-category quality, student vs teacher: top-1 agreement, answers, and KL."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    per = report["metrics"]["per_category"]
    cats = sorted(per)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    x = range(len(cats))
    w = 0.38

    ax = axes[0]
    ax.bar([i - w / 2 for i in x], [per[c]["top1_agreement"] or 0 for c in cats], w, label="student")
    ax.bar([i + w / 2 for i in x], [1.0] * len(cats), w, label="teacher (itself)", alpha=0.35)
    ax.set_title("top-1 agreement with the teacher")
    ax.set_ylim(0, 1.3)  # headroom for the legend above the teacher's bars at 1

    ax = axes[1]
    labels, student, teacher = [], [], []
    for c in cats:
        if "json_validity" in per[c]:
            labels.append(f"{c}\nJSON valid")
            student.append(per[c]["json_validity"])
            teacher.append(per[c]["teacher_json_validity"])
        if "exact_match" in per[c]:
            labels.append(f"{c}\nexact match")
            student.append(per[c]["exact_match"])
            teacher.append(1.0)
    xa = range(len(labels))
    ax.bar([i - w / 2 for i in xa], student, w, label="student")
    ax.bar([i + w / 2 for i in xa], teacher, w, label="teacher", alpha=0.35)
    ax.set_xticks(list(xa), labels)
    ax.set_ylim(0, 1.3)
    ax.set_title("answers (greedy)")
    ax.legend(loc="upper center", ncol=2)

    ax = axes[2]
    ax.bar(list(x), [per[c]["kl"] or 0 for c in cats], 0.6, color="tab:red")
    ax.set_title("KL(teacher || student), nats/token (teacher: 0)")

    for ax in (axes[0], axes[2]):
        ax.set_xticks(list(x), cats, rotation=30)
    axes[0].legend(loc="upper center", ncol=2)
    q = report["qei"]
    fig.suptitle(f"student A{report['student']['activation_bits']} vs {report['teacher']['name'] or 'teacher'}: "
                 f"QEI[{q['quality_metric']}] = {_fmt(q['qei'])}, QEI_speed = {_fmt(q['qei_speed'])}")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.3g}"
