"""The teacher baseline stage: the teacher's own greedy answers, latency, tokens/s and usage.

Deterministic (greedy, temperature 0) answers of the teacher to the prompt set. Works with every
teacher, including those that return no log-probabilities (Anthropic, Groq): it needs only text.
The report (`reports/teacher_baseline.json`) is described in docs/PROVIDERS.md.
"""

from __future__ import annotations

import time
from collections import Counter

from omegaconf import DictConfig, OmegaConf

from bitnet_kde.kd.prompts import load_prompts
from bitnet_kde.runinfo import run_info
from bitnet_kde.teachers import SamplingConfig, TeacherFailure, build_teacher


def baseline(cfg: DictConfig) -> dict:
    """Run the teacher baseline described by a `teacher_baseline.yaml` config; return the report."""
    prompts = load_prompts(**OmegaConf.to_container(cfg.prompts, resolve=True))
    sampling = SamplingConfig(max_new_tokens=cfg.max_new_tokens, temperature=0.0, top_k=1)
    teacher = build_teacher(cfg.teacher)
    t0 = time.perf_counter()
    results = teacher.generate([p.prompt for p in prompts], sampling)
    wall = time.perf_counter() - t0
    answers, failures = [], []
    for p, r in zip(prompts, results, strict=True):
        if isinstance(r, TeacherFailure):
            failures.append({"id": p.id, "reason": r.reason, "message": r.message[:500]})
            continue
        answers.append({"id": p.id, "category": p.category, "prompt": p.prompt, "answer": r.text,
                        "completion_tokens": r.completion_tokens, "prompt_tokens": r.prompt_tokens,
                        "latency_s": round(r.latency_s, 4), "finish_reason": r.finish_reason})
    completion = sum(a["completion_tokens"] for a in answers)
    info = run_info()
    return {
        "teacher": teacher.name,
        "created_at": info["created_at"],
        "machine": info["machine"],
        "prompts": {"source": cfg.prompts.source or "shipped", "split": OmegaConf.to_container(cfg.prompts.split),
                    "count": len(prompts)},
        "sampling": {"temperature": 0.0, "max_new_tokens": cfg.max_new_tokens},
        "summary": {
            "answered": len(answers), "failed": len(failures),
            "failures_by_reason": dict(Counter(f["reason"] for f in failures)),
            "wall_seconds": round(wall, 3),
            "completion_tokens": completion,
            "prompt_tokens": sum(a["prompt_tokens"] for a in answers),
            "tokens_per_second": round(completion / wall, 3) if wall > 0 else None,
            "mean_latency_s": round(sum(a["latency_s"] for a in answers) / max(len(answers), 1), 4),
        },
        "answers": answers,
        "failures": failures,
    }
