"""The eval stage: a trained student against its teacher on held-out prompts (docs/EVALUATION.md).

Steps, each reported in `reports/evaluation.json`:

1. **Data.** The teacher's greedy traces of the held-out split (`test` by default: prompts that
   are never collected for training), collected once with the same collector as training and
   reused afterwards (content-addressed, in their own folder).
2. **Token quality** on the teacher's text: KL(teacher || student) over Top-K+Other, top-1
   agreement, student perplexity. The student runs in the activation mode saved in its
   checkpoint (A8 or A4) unless `activation_bits` overrides it. A checkpoint saved before its
   quantization warm-up reached lambda = 1 is refused: blended weights would flatter it. The
   pretrained source of a warm start can be evaluated as is (`init_from=<source>`, full
   precision, no SubLN): the ceiling a warm-started student is measured against.
3. **Answer quality** from greedy, KV-cached student generations: JSON validity on `json`
   prompts (teacher's own rate alongside), exact match with the teacher's greedy answer on
   short-answer prompts.
4. **Efficiency**: tokens/s of student and teacher decoding the same prompts for the same
   number of tokens on this machine, one prompt at a time; weight bytes of the packed student
   and of the teacher as loaded.
5. **QEI** from the quality metric named in the config.
6. **Full vocabulary** (`full_vocab`): with a local teacher sharing the student's tokenizer, the
   exact KL(teacher || student) over the whole vocabulary, teacher-forced on the held-out teacher
   text, beside the bucket KL of the same positions; and the expected calibration error of the
   student's top-1. Other teachers get the calibration figure and a note instead of the KL.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from bitnet_kde.checkpoint import load_student
from bitnet_kde.data.datamodule import TraceDataset, collate_traces
from bitnet_kde.eval.metrics import (
    QUALITY_METRICS,
    CalibrationBins,
    full_vocab_kl,
    TokenTotals,
    group_totals,
    json_valid,
    normalize_answer,
    qei,
    token_sums,
)
from bitnet_kde.eval.runtime import llamacpp_speed
from bitnet_kde.kd.collect import TraceCollector
from bitnet_kde.kd.traces import check_run_match, read_traces, table_metadata
from bitnet_kde.model import BitNetLM, PackedBitLinear
from bitnet_kde.model.packed import packed_copy
from bitnet_kde.runinfo import run_info
from bitnet_kde.teachers.base import SamplingConfig, TeacherFailure
from bitnet_kde.training.warmstart import from_pretrained

log = logging.getLogger(__name__)


class TeacherSpeedError(RuntimeError):
    """The teacher failed a request while its tokens/s were being measured."""


def find_checkpoint(log_dir: str | Path) -> Path:
    """The most recently written `last.ckpt` under `log_dir` (the newest training run)."""
    found = sorted(Path(log_dir).glob("**/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise FileNotFoundError(f"no checkpoints/last.ckpt under {log_dir}: train first (make train) or pass "
                                "ckpt_path=<path of a .ckpt file>")
    return found[-1]


def evaluate(cfg: DictConfig) -> dict:
    """Run the eval stage described by an `eval.yaml` config; return the report (a dict)."""
    check_config(cfg)
    ckpt, student = load_eval_student(cfg)
    data = held_out_traces(cfg, student)
    per_category = token_metrics(student, data.ds, data.categories, int(cfg.batch_size))
    full_vocab = full_vocab_section(student, data, int(cfg.batch_size)) if cfg.get("full_vocab", True) else None
    packed = pack_for_inference(student)
    answers = generate_answers(packed, data, cfg)
    add_answer_metrics(answers, per_category, cfg)
    speed_rows = list(range(min(int(cfg.speed.prompts), len(data.ds))))
    n_new = int(cfg.speed.max_new_tokens)
    student_speed = measure_student_speed(packed, data, speed_rows, n_new)
    teacher_info, teacher_speed = teacher_figures(cfg, data, speed_rows, n_new)
    student_bytes = packed.weight_bytes()
    # runtime=llamacpp: the GGUFs' llama.cpp figures beside the PyTorch ones, and QEI_speed from them
    llamacpp = llamacpp_speed(cfg.runtime, [_prompt_ids(data.ds, i)[0].tolist() for i in speed_rows],
                              n_new) if cfg.runtime.name == "llamacpp" else {}
    qei_tps = (llamacpp.get("student", student_speed)["tokens_per_s"],
               llamacpp.get("teacher", teacher_speed)["tokens_per_s"])
    index = qei_section(cfg, per_category["overall"], student_bytes["total"], teacher_info["weight_bytes"], *qei_tps)
    info = run_info()
    return {
        "created_at": info["created_at"],
        "checkpoint": ckpt,
        "student": {"config": student.cfg.to_dict(), "activation_bits": student.activation_bits,
                    "quant_lambda": student.quant_lambda if student.cfg.quantize else None,
                    "parameters": student.num_parameters()},
        "teacher": teacher_info,
        "data": data_section(cfg, data),
        "machine": info["machine"],
        "metrics": {"overall": per_category["overall"],
                    "per_category": {c: m for c, m in sorted(per_category.items()) if c != "overall"}},
        "speed": {"prompts": len(speed_rows), "new_tokens_per_prompt": n_new, "batch_size": 1,
                  "student": student_speed, "teacher": teacher_speed, "runtime": cfg.runtime.name,
                  **({"llamacpp": llamacpp} if llamacpp else {})},
        "memory": {"student_weight_bytes": student_bytes, "teacher_weight_bytes": teacher_info["weight_bytes"]},
        "qei": index,
        "full_vocab": full_vocab,
        "answers": answers[: int(cfg.report_answers)],
    }


def check_config(cfg: DictConfig) -> None:
    """Refuse an unknown quality metric or non-greedy teacher traces before any work starts."""
    if cfg.quality_metric not in QUALITY_METRICS:
        raise ValueError(f"quality_metric={cfg.quality_metric!r} is not one of {sorted(QUALITY_METRICS)}")
    if cfg.collection.sampling.temperature != 0:
        raise ValueError("eval needs the teacher's greedy answers: collection.sampling.temperature must be 0")


def load_eval_student(cfg: DictConfig) -> tuple[str, BitNetLM]:
    """The checkpoint named by `ckpt_path` (else the newest run's), in its saved or forced A-mode;
    or, with `init_from`, that pretrained source in full precision."""
    source = cfg.get("init_from")
    if source:
        return f"init_from={source} (full precision)", from_pretrained(source, subln=False, quantize=False).eval()
    ckpt = str(cfg.ckpt_path or find_checkpoint(cfg.paths.log_dir))  # a str: may be a storage URL
    student = load_student(ckpt)
    if student.quant_lambda < 1.0:
        raise ValueError(f"{ckpt}: saved at quantization warm-up lambda={student.quant_lambda:.3f}, not fully "
                         "ternary: its figures would flatter it; train past optim.quant_warmup_steps")
    if cfg.activation_bits:
        student.set_activation_bits(int(cfg.activation_bits))
    log.info("student %s (A%d) from %s", student.cfg.d_model, student.activation_bits, ckpt)
    return ckpt, student


@dataclass
class HeldOut:
    """The teacher's greedy traces of the held-out prompts, row-aligned with the dataset."""

    collector: TraceCollector
    """The collector that wrote them: its student tokenizer, trace-set id and teacher."""
    trace_dir: str
    ds: TraceDataset
    categories: list[str]
    prompts: list[str]
    teacher_text: list[str]
    traced_by: str
    """`provider/model` of the teacher, from the trace metadata."""
    projection: str = "identity"
    """How the traces map onto the student tokenizer (`identity`: the teacher's own ids)."""


def held_out_traces(cfg: DictConfig, student: BitNetLM) -> HeldOut:
    """Collect the held-out traces once (content-addressed, reused afterwards) and read them."""
    collector = instantiate(cfg.collection)
    trace_dir = str(cfg.trace_dir)
    if not collector.is_complete(trace_dir):
        collector.write(trace_dir)
    table = read_traces(trace_dir, vocab_size=student.cfg.vocab_size)
    meta = table_metadata(table)
    check_run_match(meta, trace_dir, vocab_size=student.cfg.vocab_size, tokenizer_hash=collector.tokenizer_hash)
    return HeldOut(collector=collector, trace_dir=trace_dir, ds=TraceDataset(table, student.cfg.max_seq_len),
                   categories=table.column("category").to_pylist(), prompts=table.column("prompt").to_pylist(),
                   teacher_text=table.column("teacher_text").to_pylist(),
                   traced_by=f"{meta.get('teacher_provider', '?')}/{meta.get('teacher_model', '?')}",
                   projection=meta.get("projection", "identity"))


def data_section(cfg: DictConfig, data: HeldOut) -> dict:
    return {"trace_set": data.collector.trace_set_id, "trace_dir": data.trace_dir,
            "prompts": OmegaConf.to_container(cfg.collection.prompts, resolve=True),
            "rows": len(data.ds), "rows_per_category": dict(Counter(data.categories)),
            "teacher_greedy_max_new_tokens": int(cfg.collection.sampling.max_new_tokens)}


def token_metrics(student: BitNetLM, ds: TraceDataset, categories: Sequence[str], batch_size: int) -> dict[str, dict]:
    """KL, top-1 agreement and perplexity on the teacher's text of `ds` (row i in `categories[i]`),
    per category and `overall`."""
    rows: list[tuple[str, TokenTotals]] = []
    with torch.no_grad():
        for idx, batch in _batches(ds, batch_size):
            for i, totals in zip(idx, token_sums(student(batch["input_ids"]), batch), strict=True):
                rows.append((categories[i], totals))
    return {c: t.as_metrics() for c, t in group_totals(rows).items()}


FULL_VOCAB_NOTE = ("no full-vocabulary KL: the traces were made by {teacher} through the {projection} projection, and "
                   "only a local teacher sharing the student's tokenizer gives every next-token probability "
                   "(teacher=local_smollm2 with the smollm2 student tokenizer)")


def full_vocab_section(student: BitNetLM, data: HeldOut, batch_size: int) -> dict:
    """Exact full-vocabulary KL(teacher || student) and the bucket KL on the same KD-valid positions
    (teacher-forced on the held-out teacher text), and the ECE of the student's top-1 (all
    teachers). The KL is None, with a note, when the teacher's full distribution is not available."""
    teacher = data.collector.teacher() if data.projection == "identity" else None
    local = teacher is not None and teacher.full_distribution and isinstance(teacher.lm, torch.nn.Module)
    calib = CalibrationBins()
    kl_full = kl_bucket = 0.0
    positions = 0
    with torch.no_grad():
        for _, batch in _batches(data.ds, batch_size):
            logits = student(batch["input_ids"]).float()
            targets = torch.cat([batch["input_ids"][:, 1:], batch["input_ids"][:, :1]], dim=1)
            calib.add(logits, targets, batch["loss_mask"])
            if local:
                kd_mask = batch["loss_mask"] & batch["kd_valid"]
                # Right padding cannot reach earlier positions of a causal model: no attention mask needed.
                t_logits = teacher.lm(input_ids=batch["input_ids"].to(teacher.lm.device)).logits.float().cpu()
                if t_logits.shape[-1] != logits.shape[-1]:
                    raise ValueError(f"teacher {data.traced_by} has {t_logits.shape[-1]} logits, the student "
                                     f"{logits.shape[-1]}: identity traces need one vocabulary; set eval "
                                     "full_vocab=false or retrain with data.vocab_size equal to the teacher's")
                kl_full += float(full_vocab_kl(logits, t_logits, kd_mask).sum())
                kl_bucket += sum(t.kl for t in token_sums(logits, batch))
                positions += int(kd_mask.sum())
    out = {"ece_top1": calib.ece(), "reliability": calib.curve(), "kl_full_vocab": None, "kl_bucket": None}
    if local:
        out.update(kl_full_vocab=kl_full / max(positions, 1), kl_bucket=kl_bucket / max(positions, 1),
                   kd_positions=positions)
    else:
        out["note"] = FULL_VOCAB_NOTE.format(teacher=data.traced_by, projection=data.projection)
    return out


def pack_for_inference(student: BitNetLM) -> BitNetLM:
    """A packed copy of the student whose layers keep their unpacked weight after first use
    (a dense model, such as a pretrained source, runs as it is)."""
    if not student.cfg.quantize:
        return student
    packed = student if student.is_packed else packed_copy(student)
    for m in packed.modules():
        if isinstance(m, PackedBitLinear):
            m.cache_unpacked = True
    return packed


def generate_answers(packed: BitNetLM, data: HeldOut, cfg: DictConfig) -> list[dict]:
    """Greedy, KV-cached student answers next to the teacher's, for the answer metrics."""
    tokenizer = data.collector.tokenizer
    eos = tokenizer.eos_token_id
    answer_cats = set(cfg.json_categories) | set(cfg.exact_match_categories)
    answers = []
    for i in range(len(data.ds)):
        if cfg.answers_for_all_categories or data.categories[i] in answer_cats:
            out = packed.generate(_prompt_ids(data.ds, i), int(cfg.max_new_tokens), eos_id=eos)[0].tolist()
            text = tokenizer.decode([t for t in out if t != eos], skip_special_tokens=True)
            answers.append({"category": data.categories[i], "prompt": data.prompts[i], "student": text,
                            "teacher": data.teacher_text[i]})
    return answers


def add_answer_metrics(answers: list[dict], per_category: dict, cfg: DictConfig) -> None:
    """Add JSON validity and exact match (student, and the teacher's own JSON rate) per category."""
    groups: dict[str, dict[str, list]] = {}
    for a in answers:
        if a["category"] in cfg.json_categories:
            a["json_valid"] = {"student": json_valid(a["student"]), "teacher": json_valid(a["teacher"])}
            g = groups.setdefault(a["category"], {})
            g.setdefault("json_validity", []).append(a["json_valid"]["student"])
            g.setdefault("teacher_json_validity", []).append(a["json_valid"]["teacher"])
        if a["category"] in cfg.exact_match_categories:
            a["exact_match"] = normalize_answer(a["student"]) == normalize_answer(a["teacher"])
            groups.setdefault(a["category"], {}).setdefault("exact_match", []).append(a["exact_match"])
    pooled: dict[str, list] = {}
    for cat, metrics in groups.items():
        for name, values in metrics.items():
            per_category.setdefault(cat, {})[name] = sum(values) / len(values)
            per_category[cat][f"{name}_n"] = len(values)
            pooled.setdefault(name, []).extend(values)
    for name, values in pooled.items():
        per_category["overall"][name] = sum(values) / len(values)
        per_category["overall"][f"{name}_n"] = len(values)


def measure_student_speed(packed: BitNetLM, data: HeldOut, rows: list[int], n_new: int) -> dict:
    """Tokens/s of the packed student decoding `n_new` tokens for each row, one at a time."""

    def student_run(i):
        return packed.generate(_prompt_ids(data.ds, i), n_new).shape[1]  # no EOS: always n_new tokens

    tps, tokens, secs = _timed_tokens_per_s(student_run, rows)
    return {"tokens_per_s": tps, "tokens": tokens, "seconds": secs,
            "form": "packed ternary, KV cache, weights unpacked once (fp32 matmul)"}


def teacher_figures(cfg: DictConfig, data: HeldOut, rows: list[int], n_new: int) -> tuple[dict, dict]:
    """The teacher's report entry (name, weight bytes) and its speed: from the config or measured.

    Measuring loads the teacher and times it on the same prompts and token budget as the
    student; an in-process teacher's weight bytes are then counted from its loaded model.
    """
    teacher_info = {"name": data.traced_by, "weight_bytes": cfg.teacher_weight_bytes,
                    "weight_bytes_source": "config" if cfg.teacher_weight_bytes is not None else None}
    tps = tokens = secs = None
    if cfg.speed.teacher_tokens_per_s is not None:
        tps = float(cfg.speed.teacher_tokens_per_s)
    elif cfg.speed.measure_teacher:
        teacher = data.collector.teacher()
        lm = teacher.lm  # a local teacher's model: its real bytes
        if isinstance(lm, torch.nn.Module) and cfg.teacher_weight_bytes is None:
            teacher_info.update(weight_bytes=module_bytes(lm), weight_bytes_source="parameters and buffers as loaded",
                                dtype=str(next(lm.parameters()).dtype))
        sampling = SamplingConfig(max_new_tokens=n_new, temperature=0.0, top_k=1)

        def teacher_run(i):
            r = teacher.generate([data.prompts[i]], sampling)[0]
            if isinstance(r, TeacherFailure):
                raise TeacherSpeedError(f"{r.reason}: {r.message[:300]}")
            return r.completion_tokens

        try:
            tps, tokens, secs = _timed_tokens_per_s(teacher_run, rows)
        except TeacherSpeedError as e:
            # Quality figures are already computed: keep them, report why there is no speed.
            log.warning("teacher %s failed while measuring its speed (%s); QEI_speed left out", teacher.name, e)
            teacher_info["speed_error"] = str(e)
        finally:
            teacher.close()
    source = "config" if cfg.speed.teacher_tokens_per_s is not None else "measured" if tps is not None else None
    return teacher_info, {"tokens_per_s": tps, "tokens": tokens, "seconds": secs, "source": source}


def module_bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's parameters and buffers, counting shared (tied) tensors once."""
    seen, total = set(), 0
    for t in [*module.parameters(), *module.buffers()]:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def qei_section(cfg: DictConfig, overall: dict, student_bytes: int, teacher_bytes: int | None,
                student_tps: float, teacher_tps: float | None) -> dict:
    """The QEI terms for the quality metric named in the config, with its definition."""
    q = QUALITY_METRICS[cfg.quality_metric]
    q_teacher = 1.0 if q.teacher == "self" else overall.get(f"teacher_{q.name}")
    index = qei(q.name, overall.get(q.name), q_teacher, student_bytes, teacher_bytes, student_tps, teacher_tps)
    return {"quality_metric": q.name, "definition": q.description, "teacher_quality": q.teacher,
            **{k: v for k, v in index.__dict__.items() if k != "quality_metric"}}


def _batches(ds: TraceDataset, batch_size: int):
    for s in range(0, len(ds), batch_size):
        idx = list(range(s, min(s + batch_size, len(ds))))
        yield idx, collate_traces([ds[i] for i in idx])


def _prompt_ids(ds: TraceDataset, i: int) -> torch.Tensor:
    a = ds.row_off[i]
    return torch.from_numpy(ds.tokens[a:a + ds.completion_start[i]]).unsqueeze(0)


def _timed_tokens_per_s(fn, prompts: list, warmup: bool = True) -> tuple[float, int, float]:
    """Run `fn(prompt) -> tokens produced` over `prompts`; (tokens/s, tokens, seconds)."""
    if warmup and prompts:
        fn(prompts[0])
    tokens, t0 = 0, time.perf_counter()
    for p in prompts:
        tokens += fn(p)
    secs = time.perf_counter() - t0
    return (tokens / secs if secs > 0 else 0.0), tokens, secs
