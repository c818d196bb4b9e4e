"""Teacher baseline: `python teacher_baseline.py [teacher=...]` -> reports/teacher_baseline.json.

Deterministic (greedy, temperature 0) answers of the teacher to the prompt set, with measured
latency, tokens/s and token usage. Works with every teacher, including those that return no
log-probabilities (Anthropic, Groq): the baseline needs only text.
"""

from __future__ import annotations

import logging
import sys
import platform
import time
from collections import Counter
from datetime import datetime, timezone

import hydra
from omegaconf import DictConfig, OmegaConf

from bitnet_kde import storage
from bitnet_kde.env import group_from_env, load_dotenv_file, teacher_from_env
from bitnet_kde.kd.prompts import load_prompts
from bitnet_kde.teachers import SamplingConfig, TeacherFailure, build_teacher

log = logging.getLogger("teacher_baseline")


def baseline(cfg: DictConfig) -> dict:
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
    return {
        "teacher": teacher.name,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
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


@hydra.main(version_base="1.3", config_path="configs", config_name="teacher_baseline")
def main(cfg: DictConfig) -> None:
    storage.setup(cfg, cfg.report_path, exit_on_error=True)
    report = baseline(cfg)
    out = storage.write_json_atomic(cfg.report_path, report)
    s = report["summary"]
    log.info("%s: %d answers, %d failures, %.1f tokens/s -> %s", report["teacher"], s["answered"], s["failed"],
             s["tokens_per_second"] or 0.0, out)


if __name__ == "__main__":
    load_dotenv_file()
    sys.argv = group_from_env(teacher_from_env(sys.argv, "PROVIDER"), "STORAGE", "storage")
    main()
