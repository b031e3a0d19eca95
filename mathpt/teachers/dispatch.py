"""The traces stage: every train prompt -> teacher chain(s) of thought in the chosen style, for SFT.

``generate_traces(teacher_cfg, rows, style, out_path, work_dir)`` picks the teacher by
``teacher_cfg["kind"]``:

- ``gold``  the reference solutions (``mathpt.teachers.gold.gold_traces``), offline and free;
- ``api``   any OpenAI-compatible API (``mathpt.teachers.api``), e.g. DeepSeek-R1 or a ``vllm serve``;
- ``local`` a model on disk through ``mathpt.engines`` (``mathpt.teachers.local``), k samples per prompt.

Outputs: the trace rows (shared contract) at ``out_path`` and ``summary_path(out_path)`` beside it
(counts, accuracy, dropped-line counts, tokens, cost). Both are written atomically and only once
every prompt is done; the summary first, so the rule's traces file is the last thing to appear.
Resumable state (the completion cache) lives in ``work_dir``, which must not be a declared output
(Snakemake deletes those when a job fails).

Every completion is written with its ``correct`` flag, whatever ``teacher.keep`` says: rejection
sampling (``keep: correct``) is applied by the shards stage with ``select_traces`` so that changing
``keep`` never asks a teacher again, and the traces file shows what was thrown away.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from collections import Counter
from pathlib import Path

from mathpt.io import MathptError, atomic_write_json, read_json, read_jsonl, write_jsonl
from mathpt.secrets import scrub

log = logging.getLogger(__name__)

KINDS = ("gold", "api", "local")
KEEP = ("all", "correct")
ROW_KEYS = ("id", "question", "answer")


def summary_path(out_path: str | os.PathLike) -> Path:
    """``results/traces/train.jsonl`` -> ``results/traces/train.summary.json``."""
    p = Path(out_path)
    return p.with_name(p.name.removesuffix(".jsonl") + ".summary.json")


def select_traces(traces: list[dict], keep: str) -> list[dict]:
    """Rows for SFT: all of them, or only those whose answer matched the gold (``keep: correct``)."""
    if keep not in KEEP:
        raise MathptError(f"config key 'teacher.keep': {keep!r} is not one of {KEEP}")
    return list(traces) if keep == "all" else [t for t in traces if t["correct"]]


def _clean_records(
    rows: list[dict], records: list[dict], k: int, style: str, teacher: str, reasoning_source: str
) -> tuple[list[dict], Counter]:
    from mathpt.teachers.cleaning import make_trace_row

    traces, dropped = [], Counter()
    for j, row in enumerate(rows):
        for i in range(k):
            rec = records[j * k + i]
            trace, d = make_trace_row(
                row,
                style,
                teacher,
                i,
                rec["content"],
                rec.get("reasoning_content"),
                reasoning_source,
                rec.get("finish_reason") or "unknown",
            )
            traces.append(trace)
            dropped.update(d)
    return traces, dropped


def _check_keys(teacher_cfg: dict) -> None:
    """Unknown teacher keys are typos (``concurency``): fail instead of silently using a default."""
    from dataclasses import fields

    from mathpt.teachers.api import APITeacherSettings, refuse_credentials
    from mathpt.teachers.local import LocalTeacherSettings

    refuse_credentials(teacher_cfg)
    known = {"kind", "keep", "reasoning_source", "unformatted_fraction"}
    known |= {f.name for f in fields(APITeacherSettings)} | {f.name for f in fields(LocalTeacherSettings)}
    unknown = sorted(set(teacher_cfg) - known)
    if unknown:
        raise MathptError(
            f"config key 'teacher.{unknown[0]}': unknown teacher setting (known: {sorted(known)})"
        )


def generate_traces(
    teacher_cfg: dict, rows: list[dict], style: str, out_path: str | os.PathLike, work_dir: str | os.PathLike
) -> dict:
    """Write the trace rows and their summary; return the summary dict."""
    from mathpt.prompts import check_style

    check_style(style)
    kind = teacher_cfg.get("kind")
    if kind not in KINDS:
        raise MathptError(f"config key 'teacher.kind': {kind!r} is not one of {KINDS}")
    for n, r in enumerate(rows):
        missing = [k for k in ROW_KEYS if k not in r]
        if missing:
            raise MathptError(f"traces input row {n} (id={r.get('id', '?')}): missing key(s) {missing}")
    _check_keys(teacher_cfg)
    if kind != "gold" and teacher_cfg.get("unformatted_fraction", 0.0):
        raise MathptError("config key 'teacher.unformatted_fraction': only the gold teacher takes it")
    work_dir = Path(work_dir)
    t0 = time.time()
    accounting: dict = {}
    dropped: Counter = Counter()
    k = 1

    if kind == "gold":
        from mathpt.teachers.gold import gold_traces

        traces = gold_traces(rows, style, teacher_cfg.get("unformatted_fraction", 0.0))
        teacher = "gold"
    elif kind == "api":
        from mathpt.teachers.api import APITeacherSettings, run_api_teacher

        s = APITeacherSettings.from_config(teacher_cfg)
        k, teacher = s.samples_per_prompt, f"api:{s.model}"
        records, accounting = run_api_teacher(
            s, [(r["id"], r["question"]) for r in rows], work_dir / "api_cache.jsonl"
        )
        traces, dropped = _clean_records(
            rows, records, k, style, teacher, teacher_cfg.get("reasoning_source", "content")
        )
    else:
        from mathpt.teachers.local import LocalTeacherSettings, run_local_teacher

        s = LocalTeacherSettings.from_config(teacher_cfg)
        k, teacher = s.samples_per_prompt, f"local:{Path(s.model_path).name}"
        records, accounting = run_local_teacher(s, rows, style, work_dir / "local_cache.jsonl")
        traces, dropped = _clean_records(rows, records, k, style, teacher, "content")

    n_correct = sum(t["correct"] for t in traces)
    summary = {
        "kind": kind,
        "teacher": teacher,
        "style": style,
        "n_prompts": len(rows),
        "samples_per_prompt": k,
        "n_traces": len(traces),
        "n_correct": n_correct,
        "accuracy": n_correct / len(traces) if traces else None,
        "prompts_with_a_correct_trace": len({t["id"] for t in traces if t["correct"]}),
        "n_no_answer": sum(t["teacher_answer"] is None for t in traces),
        # Truncated (finish_reason "length") or empty completions: never correct (teachers.cleaning).
        "n_truncated": sum(t["reject_reason"] == "truncated" for t in traces),
        "n_empty": sum(t["reject_reason"] == "empty" for t in traces),
        "finish_reasons": dict(Counter(t["finish_reason"] for t in traces)),
        "n_kept_if_keep_correct": n_correct,
        "dropped_lines": dict(dropped),
        "accounting": accounting,
        "elapsed_s": round(time.time() - t0, 3),
        "teacher_config": scrub(teacher_cfg),
        "traces": str(out_path),
    }
    atomic_write_json(summary_path(out_path), summary)
    write_jsonl(out_path, traces)
    log.info("traces: %d rows (%d correct) from %s -> %s", len(traces), n_correct, teacher, out_path)
    return summary


def main(argv: list[str] | None = None) -> None:
    """Command line for manual runs: ``python -m mathpt.teachers.dispatch --help``."""
    ap = argparse.ArgumentParser(description="Generate teacher traces for SFT.")
    ap.add_argument("--teacher-config", required=True, help="JSON file with the teacher config section")
    ap.add_argument("--rows", required=True, help="data rows jsonl (id, question, answer, ...)")
    ap.add_argument("--style", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--work-dir", required=True)
    ap.add_argument("--limit", type=int, default=None)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    rows = read_jsonl(args.rows, ROW_KEYS)[: args.limit]
    try:
        summary = generate_traces(read_json(args.teacher_config), rows, args.style, args.out, args.work_dir)
    except MathptError as e:
        raise SystemExit(f"error: {e}") from None
    print(f"{summary['n_traces']} traces, {summary['n_correct']} correct -> {args.out}")


if __name__ == "__main__":
    main()
