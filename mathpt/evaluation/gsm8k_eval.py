"""GSM8K eval: greedy decoding, one graded row per test problem, with the prompt that was trained.

The primary eval is the training prompt (``prompt_style``, 0-shot) graded with the training reward,
so a gain over base is learning and not a change of prompt. When ``k_shot`` > 0 the same engine
also runs the original study's k-shot chain-of-thought prompt as a secondary eval, in the same
engine calls (no second engine): its grades go in the same rows under ``kshot_*`` keys.

The k few-shot examples are drawn once, deterministically by seed, from the train split (never the
test split) and shared by every test question. Generation goes through the project's inference
engine (vLLM, or the HF fallback). Data parallel: problems are cut into fixed chunks of
``batch_size`` by index, chunks are dealt out to ``num_shards`` shards (contiguous runs), each
shard runs in its own spawned process pinned to one device, and rows are merged by index. Because
each chunk is one engine call whose contents do not depend on the shard count, and decoding is
greedy, the merged rows are identical whatever ``num_shards`` is.

Row contract (one per problem, ordered by index): index, id, prompt_hash, response, extracted,
gold, correct, formatted, correct_any_format, generated_tokens, truncated. ``correct`` is the
style's grader (answer format required, as in training); ``formatted`` says the format was found;
``correct_any_format`` grades the final answer however it was written, so a gain that is only
format shows as such; ``truncated`` says generation hit ``max_new_tokens`` (finish_reason "length"),
which the grader counts as wrong whatever the text so far. With k_shot > 0 each row also has
kshot_prompt_hash, kshot_response, kshot_correct, kshot_formatted, kshot_correct_any_format,
kshot_generated_tokens and kshot_truncated (the same grading, on the k-shot prompt's answer).
"""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path
from typing import Any

from mathpt.engines import SamplingConfig, make_engine
from mathpt.evaluation.parallel import check_devices, default_devices, run_on_devices
from mathpt.io import (
    DataError,
    MathptError,
    atomic_write_json,
    iter_jsonl,
    sha256_file,
    sha256_text,
    write_jsonl,
)

VLLM_ONLY_KWARGS = ("gpu_memory_utilization", "max_model_len", "enforce_eager")

ROW_TYPES: dict[str, tuple[type, ...]] = {
    "index": (int,),
    "id": (str,),
    "prompt_hash": (str,),
    "response": (str,),
    "extracted": (str, type(None)),
    "gold": (str,),
    "correct": (bool,),
    "formatted": (bool,),
    "correct_any_format": (bool,),
    "generated_tokens": (int,),
    "truncated": (bool,),
}


def select_fewshot(pool: list[dict], k: int, seed: int, test_rows: list[dict] = ()) -> list[dict]:
    """``k`` examples from the train-split ``pool``, chosen by ``seed`` independently of row order.

    Refuses a pool holding test rows (ids ``test-*``) or any question of ``test_rows``: few-shot
    examples that leak the test set would inflate accuracy silently.
    """
    if k < 0:
        raise MathptError(f"k_shot must be >= 0, got {k}")
    if k == 0:
        return []
    for i, row in enumerate(pool):
        if "id" not in row or not isinstance(row["id"], str):
            raise MathptError(f"few-shot pool row {i}: missing string 'id'")
        if row["id"].startswith("test-"):
            raise MathptError(
                f"few-shot pool row {i} has id {row['id']!r}: few-shot examples must come "
                "from the train split, never from test"
            )
    if k > len(pool):
        raise MathptError(f"k_shot={k} but the few-shot pool has only {len(pool)} rows")
    ordered = sorted(pool, key=lambda r: r["id"])
    chosen = random.Random(seed).sample(ordered, k)
    test_questions = {r["question"].strip() for r in test_rows}
    leaked = [r["id"] for r in chosen if r["question"].strip() in test_questions]
    if leaked:
        raise MathptError(f"few-shot examples {leaked} have the same question as a test problem")
    return chosen


def chunk_indices(n: int, batch_size: int) -> list[list[int]]:
    """Problems 0..n-1 in fixed chunks of ``batch_size``: one engine call each, shard-independent."""
    if batch_size < 1:
        raise MathptError(f"batch_size must be >= 1, got {batch_size}")
    return [list(range(s, min(s + batch_size, n))) for s in range(0, n, batch_size)]


def split_shards(chunks: list, num_shards: int) -> list[list]:
    """Deal chunks out to ``num_shards`` contiguous shards of near-equal size; empty shards dropped."""
    if num_shards < 1:
        raise MathptError(f"num_shards must be >= 1, got {num_shards}")
    q, r = divmod(len(chunks), num_shards)
    shards, start = [], 0
    for s in range(num_shards):
        size = q + (s < r)
        shards.append(chunks[start : start + size])
        start += size
    return [s for s in shards if s]


def generate_shard(
    model_dir: str,
    engine: str,
    engine_kwargs: dict,
    chunks: list[list[tuple[int, str]]],
    params: SamplingConfig,
    device: str,
) -> list[dict]:
    """Generate every chunk of one shard with one engine; one raw result per (index, prompt)."""
    from tqdm import tqdm

    kwargs = dict(engine_kwargs)
    kwargs.setdefault("device", device)  # cuda:0 inside a pinned process
    if engine == "hf":  # one runtime config serves both engines: drop the vLLM-only knobs
        for key in VLLM_ONLY_KWARGS:
            kwargs.pop(key, None)
    eng = make_engine(engine, model_dir, **kwargs)
    out = []
    try:
        for chunk in tqdm(chunks, desc=f"gsm8k eval ({device}, pid {os.getpid()})", unit="batch"):
            gens = eng.generate([p for _, p in chunk], params)
            if len(gens) != len(chunk):
                raise MathptError(
                    f"engine {engine} returned {len(gens)} generations for {len(chunk)} prompts"
                )
            for (index, _), g in zip(chunk, sorted(gens, key=lambda g: g.prompt_index), strict=True):
                out.append(
                    {
                        "index": index,
                        "text": g.text,
                        "generated_tokens": len(g.token_ids),
                        "truncated": g.truncated,
                        "weight_version": g.weight_version,
                    }
                )
    finally:
        eng.close()
    return out


def check_context(model_dir: str, prompts: list[str], max_new_tokens: int, max_model_len: int | None) -> int:
    """Fail up front if a prompt plus ``max_new_tokens`` does not fit the context; return the longest.

    vLLM rejects an over-long prompt mid-run and cuts generation at its context; transformers runs
    past the position table silently. Either would corrupt the eval quietly or late.
    """
    from mathpt.models import load_tokenizer

    config = json.loads(Path(model_dir, "config.json").read_text(encoding="utf-8"))
    limits = [v for v in (config.get("max_position_embeddings"), max_model_len) if v]
    lengths = [len(ids) for ids in load_tokenizer(model_dir)(prompts)["input_ids"]]
    longest = max(range(len(prompts)), key=lengths.__getitem__)
    if limits and lengths[longest] + max_new_tokens > min(limits):
        raise MathptError(
            f"GSM8K eval: problem {longest} has a {lengths[longest]}-token prompt; with max_new_tokens="
            f"{max_new_tokens} it needs {lengths[longest] + max_new_tokens} positions but the context is "
            f"{min(limits)} (max_position_embeddings/max_model_len). Use fewer shots (k_shot), a smaller "
            "max_new_tokens or a larger max_model_len."
        )
    return lengths[longest]


def weights_sha256(model_dir: str | os.PathLike) -> dict[str, str]:
    """Checksums of the weight files, so a summary names the exact weights it scored."""
    files = sorted(p for p in Path(model_dir).iterdir() if p.suffix in (".safetensors", ".bin", ".pt"))
    return {p.name: sha256_file(p) for p in files}


def run_gsm8k_eval(
    model_dir: str | os.PathLike,
    test_rows: list[dict],
    fewshot_pool: list[dict],
    *,
    k_shot: int,
    style: str,
    max_new_tokens: int,
    engine: str = "vllm",
    num_shards: int = 1,
    devices: list[str] | None = None,
    engine_kwargs: dict | None = None,
    fewshot_seed: int = 0,
    limit: int | None = None,
    batch_size: int = 256,
    inline: bool = False,
) -> tuple[list[dict], dict]:
    """Evaluate a checkpoint on GSM8K test rows; return (rows ordered by index, summary).

    ``devices``: e.g. ["cpu"] or ["cuda:0", "cuda:1"] (default: every visible GPU, else cpu); shard i
    runs on ``devices[i % len(devices)]``. ``batch_size`` prompts go to the engine per call.
    ``inline`` runs the shards one after another in this process (debugging; the hf engine on cpu).
    """
    from mathpt.prompts import format_fewshot_prompt, stop_strings
    from mathpt.rewards import answer_correct_any_format, extract_final_answer, get_reward_fn

    t0 = time.time()
    if inline and engine != "hf":
        raise MathptError(f"inline=True runs engines in this process: only the hf engine, not {engine!r}")
    model_dir = str(model_dir)
    if not Path(model_dir, "config.json").exists():
        raise MathptError(f"{model_dir}: not a model directory (no config.json)")
    rows_in = list(test_rows[:limit] if limit is not None else test_rows)
    if not rows_in:
        raise MathptError("GSM8K eval: no test rows")
    for i, r in enumerate(rows_in):
        missing = [k for k in ("id", "question", "answer") if k not in r]
        if missing:
            raise MathptError(f"test row {i} (id={r.get('id', '?')}): missing key(s) {missing}")
    examples = select_fewshot(fewshot_pool, k_shot, fewshot_seed, rows_in)
    n_rows = len(rows_in)
    # Primary: the trained prompt, 0-shot. Secondary (k_shot > 0): k-shot, after it in one list,
    # so one engine generates both and the chunks stay independent of the shard count.
    prompts = [format_fewshot_prompt(r["question"], [], style) for r in rows_in]
    if examples:
        prompts += [format_fewshot_prompt(r["question"], examples, style) for r in rows_in]
    params = SamplingConfig(
        max_new_tokens=max_new_tokens,
        temperature=0.0,
        top_p=1.0,
        n=1,
        stop=tuple(stop_strings(style)),
        seed=0,
        logprobs=False,
    )
    engine_kwargs = dict(engine_kwargs or {})
    longest_prompt = check_context(model_dir, prompts, max_new_tokens, engine_kwargs.get("max_model_len"))
    devices = list(devices or default_devices())
    check_devices(devices)

    chunks = [[(i, prompts[i]) for i in c] for c in chunk_indices(len(prompts), batch_size)]
    shards = split_shards(chunks, num_shards)
    common = dict(model_dir=model_dir, engine=engine, engine_kwargs=engine_kwargs, params=params)
    # vLLM sets process-wide state, so it always gets a process of its own
    if inline or (len(shards) == 1 and devices[0] == "cpu" and engine == "hf"):
        results = [generate_shard(chunks=shard, device="cpu", **common) for shard in shards]
    else:
        jobs = [(devices[s % len(devices)], dict(chunks=shard, **common)) for s, shard in enumerate(shards)]
        results = run_on_devices(generate_shard, jobs, what="gsm8k eval shard")
    gens = sorted((g for shard in results for g in shard), key=lambda g: g["index"])
    if [g["index"] for g in gens] != list(range(len(prompts))):
        raise MathptError("GSM8K eval: shards returned an incomplete or duplicated set of problems")

    reward_fn = get_reward_fn(style)

    def grade(g: dict, gold: str, prompt: str) -> dict:
        # `correct` is the style's grader (the training reward's answer part): it requires the
        # style's answer format, so a bare number at the end that `extracted` finds is not enough
        reward = reward_fn(g["text"], gold)
        return {
            "prompt_hash": sha256_text(prompt),
            "response": g["text"],
            "extracted": extract_final_answer(g["text"]),
            "correct": bool(reward["answer_reward"] > 0),
            "formatted": bool(reward["format_reward"] > 0),
            "correct_any_format": answer_correct_any_format(g["text"], gold),
            "generated_tokens": g["generated_tokens"],
            "truncated": bool(g["truncated"]),
        }

    rows = []
    for i, r in enumerate(rows_in):
        gold = str(r["answer"])
        row = {"index": i, "id": r["id"], "gold": gold, **grade(gens[i], gold, prompts[i])}
        if examples:
            k = grade(gens[n_rows + i], gold, prompts[n_rows + i])
            row.update({f"kshot_{key}": v for key, v in k.items() if key != "extracted"})
        rows.append(row)
    n_format = sum(r["formatted"] for r in rows)
    n = len(rows)
    summary: dict[str, Any] = {
        "n": n,
        "accuracy": sum(r["correct"] for r in rows) / n,
        "format_rate": n_format / n,
        "accuracy_any_format": sum(r["correct_any_format"] for r in rows) / n,
        "truncated_fraction": sum(r["truncated"] for r in rows) / n,
        "mean_generated_tokens": sum(r["generated_tokens"] for r in rows) / n,
        "prompt": "trained prompt_style, 0-shot (primary)",
        "accuracy_kshot": sum(r["kshot_correct"] for r in rows) / n if examples else None,
        "k_shot": k_shot,
        "style": style,
        "fewshot_seed": fewshot_seed,
        "fewshot_ids": [e["id"] for e in examples],
        "decoding": {"temperature": 0.0, "max_new_tokens": max_new_tokens, "stop": list(params.stop)},
        "model_path": model_dir,
        "engine": engine,
        "engine_kwargs": engine_kwargs,
        "longest_prompt_tokens": longest_prompt,
        "weight_versions": sorted({g["weight_version"] for g in gens}),
        "weights_sha256": weights_sha256(model_dir),
        "num_shards": num_shards,
        "batch_size": batch_size,
        "devices": devices,
        "limit": limit,
        "elapsed_s": time.time() - t0,
    }
    return rows, summary


def write_eval(
    rows: list[dict], summary: dict, out_jsonl: str | os.PathLike, out_summary_json: str | os.PathLike
) -> None:
    """Write the rows and the summary, each atomically."""
    write_jsonl(out_jsonl, rows)
    atomic_write_json(out_summary_json, summary)


def read_eval(path: str | os.PathLike) -> list[dict]:
    """Read eval rows strictly: a malformed row fails with ``path:line`` and what is wrong with it."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found")
    with open(path, encoding="utf-8") as f:
        linenos = [i for i, line in enumerate(f, start=1) if line.strip()]
    rows = []
    for lineno, row in zip(linenos, iter_jsonl(path, required_keys=ROW_TYPES), strict=True):
        for key, types in ROW_TYPES.items():
            value = row[key]
            # bool is an int in Python: an index or token count of `true` is still malformed
            if not isinstance(value, types) or (bool not in types and isinstance(value, bool)):
                raise DataError(
                    f"{path}:{lineno}: key {key!r} should be {'/'.join(t.__name__ for t in types)}, "
                    f"got {json.dumps(value)[:80]}"
                )
        if row["index"] != len(rows):
            raise DataError(f"{path}:{lineno}: index {row['index']} out of order (expected {len(rows)})")
        rows.append(row)
    return rows
