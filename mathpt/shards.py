"""Tokenized SFT shards (safetensors + index.json) and the prompt sets used by rollouts and validation.

SFT data is tokenized once, here, instead of inside the training loop: the trainer then reads
fixed tensors whose provenance (traces hash, tokenizer hash, drop counts) is in ``index.json``.
Each example is ``prompt + response + EOS`` (the EOS teaches the model to stop), tokenized by
:func:`mathpt.functional.tokenize_prompt_and_output`. Examples longer than ``max_seq_len`` tokens
are dropped and counted, never truncated (a truncated response would teach the model to stop
mid-solution or lose its answer). Rows are shuffled with a seed and stored in microbatch order:
rows ``[i*mb, (i+1)*mb)`` of the concatenated shards form microbatch ``i`` (``iter_sft_shards``).
The SFT trainer does not use that order: it loads every row (``load_sft_examples``) and draws a
new order per (run seed, epoch), so training seeds see different data orders (train/sft.py).

Shard tensors, each (rows, seq_len) right-padded with the pad token: ``input_ids`` and ``labels``
(int64, labels = input_ids shifted left by one) and ``response_mask`` (bool, true on label
positions that are response tokens, EOS included).
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from mathpt.io import (
    DataError,
    MathptError,
    atomic_dir,
    atomic_write_json,
    read_json,
    read_jsonl,
    sha256_file,
    sha256_text,
)

log = logging.getLogger(__name__)

FORMAT = "mathpt-sft-shards/1"
KEYS = {"input_ids": torch.int64, "labels": torch.int64, "response_mask": torch.bool}
TRACE_KEYS = ("id", "prompt", "response", "correct")
TOKENIZE_CHUNK = 64


def tokenizer_sha256(tokenizer) -> str:
    """A hash of what the tokenizer does (vocab, merges, normalizer, special tokens), not of file layout."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    special = json.dumps(
        {"eos": tokenizer.eos_token, "pad": tokenizer.pad_token, "special": tokenizer.all_special_tokens},
        sort_keys=True,
    )
    return sha256_text(spec + "\n" + special)


def _read_traces(path: Path, keep: str) -> tuple[list[dict], int]:
    rows = read_jsonl(path, required_keys=TRACE_KEYS)
    for i, r in enumerate(rows):
        if not isinstance(r["prompt"], str) or not isinstance(r["response"], str):
            raise DataError(f"{path}: row {i + 1} (id={r['id']}): 'prompt' and 'response' must be strings")
        if not isinstance(r["correct"], bool):
            raise DataError(f"{path}: row {i + 1} (id={r['id']}): 'correct' must be true or false")
    kept = [r for r in rows if keep == "all" or r["correct"]]
    return kept, len(rows)


def write_sft_shards(
    traces_path: str | os.PathLike,
    tokenizer_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    max_seq_len: int,
    microbatch_size: int,
    keep: str = "all",
    seed: int = 0,
    rows_per_shard: int = 4096,
) -> dict:
    """Tokenize a traces jsonl into ``out_dir/shard-XXXXX.safetensors`` + ``index.json``; return the index.

    ``keep``: "all" traces or only the "correct" ones. ``max_seq_len`` bounds the full example
    (prompt + response + EOS tokens); the model input is one token shorter. ``rows_per_shard`` is
    rounded down to a multiple of ``microbatch_size`` so no microbatch straddles two files.
    """
    from mathpt.functional import tokenize_prompt_and_output
    from mathpt.models import load_tokenizer

    if keep not in ("all", "correct"):
        raise MathptError(f"keep must be 'all' or 'correct', got {keep!r}")
    if max_seq_len < 2 or microbatch_size < 1 or rows_per_shard < 1:
        raise MathptError(
            f"need max_seq_len >= 2, microbatch_size >= 1, rows_per_shard >= 1; got "
            f"{max_seq_len}, {microbatch_size}, {rows_per_shard}"
        )
    from tqdm import tqdm

    traces_path = Path(traces_path)
    rows, n_traces = _read_traces(traces_path, keep)
    tokenizer = load_tokenizer(tokenizer_dir)
    if tokenizer.eos_token is None:
        raise MathptError(f"tokenizer in {tokenizer_dir} has no EOS token")
    eos_id = tokenizer.eos_token_id
    outputs = [r["response"] + tokenizer.eos_token for r in rows]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id

    # Tokenize in small chunks (a runaway response pads only its own chunk) and keep each example
    # unpadded; over-long ones are dropped here, before anything is padded to their length.
    examples: dict[int, dict[str, torch.Tensor]] = {}
    lengths: dict[int, int] = {}  # full example length: prompt + response + EOS tokens
    dropped = []
    for start in tqdm(
        range(0, len(rows), TOKENIZE_CHUNK),
        desc="tokenize",
        unit="chunk",
        disable=len(rows) <= TOKENIZE_CHUNK,
    ):
        idx = range(start, min(start + TOKENIZE_CHUNK, len(rows)))
        batch = tokenize_prompt_and_output(
            [rows[i]["prompt"] for i in idx], [outputs[i] for i in idx], tokenizer
        )
        mask = batch["response_mask"]
        last = mask.shape[1] - 1 - mask.flip(1).int().argmax(1)  # last response label: the EOS
        if not (batch["labels"].gather(1, last[:, None]) == eos_id).all():  # a tokenizer that splits it
            raise MathptError(
                f"tokenizer in {tokenizer_dir} does not map {tokenizer.eos_token!r} to its EOS id"
            )
        for j, (i, n) in enumerate(zip(idx, (last + 2).tolist(), strict=True)):
            if n > max_seq_len:
                dropped.append(
                    {"id": rows[i]["id"], "sample_index": rows[i].get("sample_index", 0), "tokens": n}
                )
                continue
            examples[i] = {key: batch[key][j, : n - 1].to(KEYS[key]) for key in KEYS}
            lengths[i] = n
    if dropped:
        log.warning(
            "%s: dropped %d of %d examples longer than max_seq_len=%d tokens",
            traces_path,
            len(dropped),
            len(rows),
            max_seq_len,
        )
    order = sorted(examples)
    if not order:
        raise MathptError(
            f"{traces_path}: no example left to train on ({n_traces} traces, keep={keep!r}, "
            f"{len(rows)} kept, {len(dropped)} longer than max_seq_len={max_seq_len})"
        )
    random.Random(seed).shuffle(order)

    per_shard = max(microbatch_size, rows_per_shard // microbatch_size * microbatch_size)
    files, response_tokens = [], 0
    with atomic_dir(out_dir) as tmp:
        from safetensors.torch import save_file

        for k, start in enumerate(range(0, len(order), per_shard)):
            idx = order[start : start + per_shard]
            width = max(lengths[i] for i in idx) - 1
            batch = {
                key: torch.full((len(idx), width), False if key == "response_mask" else pad_id, dtype=dtype)
                for key, dtype in KEYS.items()
            }
            for j, i in enumerate(idx):
                for key in KEYS:
                    batch[key][j, : lengths[i] - 1] = examples[i][key]
            response_tokens += int(batch["response_mask"].sum())
            name = f"shard-{k:05d}.safetensors"
            save_file(batch, tmp / name, metadata={"format": FORMAT})
            files.append(
                {"name": name, "rows": len(idx), "seq_len": width, "sha256": sha256_file(tmp / name)}
            )
        index = {
            "format": FORMAT,
            "files": files,
            "counts": {
                "traces": n_traces,
                "filtered_incorrect": n_traces - len(rows),
                "dropped_too_long": len(dropped),
                "examples": len(order),
                "microbatches": math.ceil(len(order) / microbatch_size),
                "tokens": sum(lengths[i] for i in order),
                "response_tokens": response_tokens,
            },
            "dropped": dropped,
            # (id, sample_index) of every stored row, in storage order: row i of the concatenated shards.
            "rows": [[rows[i]["id"], rows[i].get("sample_index", 0)] for i in order],
            "keep": keep,
            "max_seq_len": max_seq_len,
            "longest_example": max(lengths[i] for i in order),
            "microbatch_size": microbatch_size,
            "rows_per_shard": per_shard,
            "seed": seed,
            "traces": {"path": str(traces_path), "sha256": sha256_file(traces_path)},
            "tokenizer": {
                "dir": str(tokenizer_dir),
                "sha256": tokenizer_sha256(tokenizer),
                "eos_token_id": eos_id,
                "pad_token_id": tokenizer.pad_token_id,
            },
        }
        atomic_write_json(tmp / "index.json", index)
    return index


def read_index(out_dir: str | os.PathLike, verify: bool = True) -> dict:
    """The shard index; with ``verify``, every file must exist with the recorded sha256."""
    out_dir = Path(out_dir)
    index = read_json(out_dir / "index.json")
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise DataError(f"{out_dir / 'index.json'}: not a {FORMAT} index")
    if verify:
        for f in index["files"]:
            path = out_dir / f["name"]
            if not path.is_file():
                raise DataError(f"{path}: shard listed in index.json is missing")
            if sha256_file(path) != f["sha256"]:
                raise DataError(f"{path}: sha256 differs from index.json (file changed or corrupted)")
    return index


def _load_shard(path: Path, meta: dict) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors = load_file(path)
    for key, dtype in KEYS.items():
        t = tensors.get(key)
        if t is None or t.dtype != dtype or tuple(t.shape) != (meta["rows"], meta["seq_len"]):
            raise DataError(
                f"{path}: tensor {key!r} missing or not {dtype} of shape ({meta['rows']}, {meta['seq_len']})"
            )
    return {key: tensors[key] for key in KEYS}


def _trim(mb: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Cut all-padding columns: the last response token of the longest row ends the microbatch."""
    width = int(mb["response_mask"].any(0).nonzero().max()) + 1
    return {k: v[:, :width] for k, v in mb.items()}


def load_sft_examples(out_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every stored row, in storage order: ``input_ids``, ``labels``, ``response_mask`` (N, W), right-padded
    to the longest row of all shards, checked against index.json first. For trainers that cut their
    own microbatches (a new row order each epoch)."""
    out_dir = Path(out_dir)
    index = read_index(out_dir, verify=True)
    loaded = [_load_shard(out_dir / f["name"], f) for f in index["files"]]
    width = max(s["input_ids"].shape[1] for s in loaded)
    pad = index["tokenizer"]["pad_token_id"]
    pad = pad if pad is not None else index["tokenizer"]["eos_token_id"]
    return {
        k: torch.cat(
            [
                torch.nn.functional.pad(
                    s[k], (0, width - s[k].shape[1]), value=False if k == "response_mask" else pad
                )
                for s in loaded
            ]
        )
        for k in KEYS
    }


def iter_sft_shards(
    out_dir: str | os.PathLike, drop_last: bool = False, shuffle_seed: int | None = None
) -> Iterator[dict[str, torch.Tensor]]:
    """Yield microbatches ``{"input_ids", "labels", "response_mask"}`` of ``index["microbatch_size"]`` rows.

    Files are checked against index.json (sha256, dtypes, shapes) before the first microbatch.
    Each microbatch is trimmed to its longest row. Without ``shuffle_seed`` microbatches come in
    written order (already seeded-shuffled); with it, all rows are reshuffled (e.g. per epoch).
    ``drop_last`` skips a final partial microbatch.
    """
    out_dir = Path(out_dir)
    index = read_index(out_dir, verify=True)
    mb = index["microbatch_size"]
    shards: Iterable[dict[str, torch.Tensor]] = (_load_shard(out_dir / f["name"], f) for f in index["files"])
    if shuffle_seed is not None:
        full = load_sft_examples(out_dir)
        perm = torch.randperm(
            full["input_ids"].shape[0], generator=torch.Generator().manual_seed(shuffle_seed)
        )
        shards = [{k: v[perm] for k, v in full.items()}]
    for shard in shards:
        n = shard["input_ids"].shape[0]
        for start in range(0, n, mb):
            if drop_last and start + mb > n:
                break
            yield _trim({k: v[start : start + mb] for k, v in shard.items()})


def write_prompt_set(rows: Iterable[dict], style: str, out_path: str | os.PathLike) -> int:
    """Write ``{"id", "prompt", "answer"}`` jsonl (prompts for rollouts / validation); return the row count."""
    from mathpt.io import write_jsonl
    from mathpt.prompts import format_prompt

    out = []
    for i, r in enumerate(rows):
        missing = [k for k in ("id", "question", "answer") if k not in r]
        if missing:
            raise DataError(f"prompt set row {i} (id={r.get('id', '?')}): missing key(s) {missing}")
        out.append({"id": r["id"], "prompt": format_prompt(r["question"], style), "answer": r["answer"]})
    write_jsonl(out_path, out)
    return len(out)
