"""GSM8K (or the synthetic arith set) -> ``results/data/{train,val,test}.jsonl`` + ``manifest.json``.

Output rows follow the shared contract: ``{"id", "question", "solution", "answer"}`` where
``solution`` is the reference reasoning without calculator annotations and without the ``#### N``
line, and ``answer`` is the gold from ``#### N`` with thousands commas removed. Validation problems
are carved out of train by a seeded shuffle, so train and val are disjoint and reproducible; every
row keeps the id of its source row (``train-00012``), which makes the split auditable.

Sources (``source["name"]``):
- ``"gsm8k"`` with ``origin`` ``"local"``: a directory holding ``train.jsonl`` and ``test.jsonl``
  (the env var ``MATHPT_GSM8K_DIR`` wins over ``source["dir"]``); ``"hub"``: the HF hub
  (``openai/gsm8k``, config ``main``) through ``datasets``; ``"auto"`` (the default): the local
  directory when one is named and exists, else the hub. The manifest records which was used.
- ``"arith"``: procedurally generated word problems (:mod:`mathpt.arith`), same raw format.
"""

from __future__ import annotations

import json
import os
import random
import re
from pathlib import Path
from typing import Any

from mathpt.io import (
    DataError,
    MathptError,
    atomic_write_json,
    iter_jsonl_numbered,
    sha256_file,
    sha256_text,
    write_jsonl,
)

ENV_DIR = "MATHPT_GSM8K_DIR"
HUB_ID = "openai/gsm8k"
HUB_CONFIG = "main"
SPLITS = ("train", "val", "test")
ORIGINS = ("auto", "local", "hub")
SOURCE_KEYS = {
    "gsm8k": {"name", "origin", "dir", "hub_id", "hub_config"},
    "arith": {"name", "n_train", "n_test", "max_steps", "max_value", "seed"},
}
_ANNOTATION = re.compile(r"<<[^<>]*>>")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")

# A raw row is the GSM8K record plus where it came from ("path:line"), for error messages.
RawRow = tuple[str, dict]


def strip_calculator_annotations(text: str) -> str:
    """Remove GSM8K calculator annotations: ``48/2 = <<48/2=24>>24`` -> ``48/2 = 24``."""
    return _ANNOTATION.sub("", text)


def parse_gsm8k_answer(answer: str, where: str = "<answer>") -> tuple[str, str]:
    """Split a GSM8K ``answer`` field into (solution without annotations, gold answer).

    The gold is the text after the last line starting with ``#### `` with commas removed; it must
    be a number. Raises DataError naming ``where`` otherwise.
    """
    lines = answer.split("\n")
    marks = [i for i, line in enumerate(lines) if line.startswith("#### ")]
    if not marks:
        raise DataError(f"{where}: answer has no '#### N' line")
    i = marks[-1]
    gold = lines[i][len("#### ") :].strip().replace(",", "")
    if not _NUMBER.fullmatch(gold):
        raise DataError(f"{where}: gold answer {lines[i][5:].strip()!r} after '#### ' is not a number")
    solution = strip_calculator_annotations("\n".join(lines[:i])).strip()
    if "<<" in solution or ">>" in solution:
        raise DataError(f"{where}: unbalanced calculator annotation in solution")
    return solution, gold


def to_row(raw: dict, row_id: str, where: str) -> dict:
    """One raw GSM8K record -> one contract row."""
    for key in ("question", "answer"):
        if key not in raw:
            raise DataError(f"{where}: missing key {key!r}")
        if not isinstance(raw[key], str) or not raw[key].strip():
            raise DataError(f"{where}: {key!r} must be a non-empty string")
    solution, gold = parse_gsm8k_answer(raw["answer"], where)
    return {"id": row_id, "question": raw["question"].strip(), "solution": solution, "answer": gold}


def read_raw_jsonl(path: str | os.PathLike) -> list[RawRow]:
    """Read a GSM8K jsonl file keeping each row's ``path:line`` for the answer parser's errors."""
    return [(f"{path}:{lineno}", row) for lineno, row in iter_jsonl_numbered(path)]


def _rows_sha256(rows: list[RawRow]) -> str:
    """Hash of in-memory raw rows, serialized as GSM8K jsonl lines (for hub / generated sources)."""
    return sha256_text(
        "".join(json.dumps({"question": r["question"], "answer": r["answer"]}) + "\n" for _, r in rows)
    )


def resolve_gsm8k_dir(source: dict) -> Path | None:
    """The local GSM8K directory named: ``$MATHPT_GSM8K_DIR`` if set, else ``source["dir"]``, else None."""
    d = os.environ.get(ENV_DIR) or source.get("dir")
    return Path(d).expanduser() if d else None


def _ways_out(hub_id: str) -> str:
    return (
        f"set {ENV_DIR} (or data.local_dir in the config) to a directory holding GSM8K train.jsonl "
        f"and test.jsonl, or give this machine access to the HF hub (for {hub_id}), or set "
        "HF_HUB_OFFLINE=1 to use a copy already in the HF cache"
    )


def _probe_hub(endpoint: str) -> None:
    """Raise OSError within seconds when the hub's host cannot be reached (``datasets`` retries ~25 s)."""
    import socket
    from urllib.parse import urlparse

    url = urlparse(endpoint)
    socket.create_connection(
        (url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=5
    ).close()


def _load_hub(hub_id: str, hub_config: str, why: str = "") -> dict[str, list[RawRow]]:
    """Load GSM8K's train and test splits from the HF hub; one clear error naming both ways out."""
    hint = f"{why}{_ways_out(hub_id)}"
    try:
        import datasets
        from huggingface_hub import constants
    except ImportError as e:
        raise MathptError(
            f"loading {hub_id} from the HF hub needs the 'datasets' package ({e}); {hint}"
        ) from None
    if not (constants.HF_HUB_OFFLINE or os.environ.get("HF_DATASETS_OFFLINE") == "1"):
        try:
            _probe_hub(constants.ENDPOINT)
        except OSError as e:
            raise MathptError(
                f"cannot reach the HF hub at {constants.ENDPOINT} to download {hub_id} ({e}); {hint}"
            ) from None
    try:
        ds = datasets.load_dataset(hub_id, hub_config)
    except (ConnectionError, OSError, ValueError) as e:
        raise MathptError(
            f"could not load {hub_id} (config {hub_config}) from the HF hub ({e}); {hint}"
        ) from None
    missing = [s for s in ("train", "test") if s not in ds]
    if missing:
        raise MathptError(
            f"{hub_id} (config {hub_config}) has no split(s) {missing}; expected train and test"
        )
    return {
        split: [(f"{hub_id}[{split}][{i}]", dict(r)) for i, r in enumerate(ds[split])]
        for split in ("train", "test")
    }


def _local_or_hub(source: dict) -> tuple[str, Path | None]:
    """Decide where GSM8K comes from: ("local", dir) or ("hub", None); explain a missing local copy."""
    origin = source.get("origin", "auto")
    if origin not in ORIGINS:
        raise MathptError(f"data source 'gsm8k': origin {origin!r} is not one of {list(ORIGINS)}")
    if origin == "hub":
        return "hub", None
    local = resolve_gsm8k_dir(source)
    env = os.environ.get(ENV_DIR)
    if local is not None and local.is_dir():
        return "local", local
    if origin == "local" or env:  # an explicit local choice that does not exist is a mistake, not a fallback
        named = (f"{ENV_DIR}={env}" if env else f"data.local_dir={source.get('dir')}") if local else "nothing"
        raise DataError(
            f"data.source is {origin!r} but the GSM8K directory ({named}) does not exist; set {ENV_DIR} "
            "or data.local_dir to a directory holding train.jsonl and test.jsonl"
            + (", or use data.source: hub" if origin == "local" else ", or unset it to use the HF hub")
        )
    return "hub", None


def load_source(source: dict, seed: int) -> tuple[dict[str, list[RawRow]], dict[str, Any]]:
    """Raw train/test rows of a source, plus what the manifest records about them."""
    name = source.get("name", "gsm8k")
    allowed = SOURCE_KEYS.get(name)
    if allowed is None:
        raise MathptError(f"unknown data source name {name!r} (expected one of {sorted(SOURCE_KEYS)})")
    unknown = set(source) - allowed
    if unknown:  # a typo (e.g. "dri") must not silently fall back to the hub
        raise MathptError(
            f"data source {name!r}: unknown key(s) {sorted(unknown)}; allowed: {sorted(allowed)}"
        )
    if name == "gsm8k":
        requested = source.get("origin", "auto")
        origin, local = _local_or_hub(source)
        if local is not None:
            raw = {s: read_raw_jsonl(local / f"{s}.jsonl") for s in ("train", "test")}
            inputs = {
                s: {
                    "path": str(local / f"{s}.jsonl"),
                    "sha256": sha256_file(local / f"{s}.jsonl"),
                    "rows": len(raw[s]),
                }
                for s in raw
            }
            return raw, {
                "name": "gsm8k",
                "requested": requested,
                "origin": "local",
                "dir": str(local),
                "inputs": inputs,
            }
        hub_id, hub_config = source.get("hub_id", HUB_ID), source.get("hub_config", HUB_CONFIG)
        why = ""
        if requested == "auto":
            named = resolve_gsm8k_dir(source)
            why = (
                f"no local copy ({ENV_DIR} is unset and data.local_dir "
                f"{'is null' if named is None else f'={named} does not exist'}); "
            )
        raw = _load_hub(hub_id, hub_config, why)
        inputs = {s: {"sha256_rows": _rows_sha256(raw[s]), "rows": len(raw[s])} for s in raw}
        return raw, {
            "name": "gsm8k",
            "requested": requested,
            "origin": "hub",
            "hub_id": hub_id,
            "hub_config": hub_config,
            "inputs": inputs,
        }
    if name == "arith":
        from mathpt.arith import MAX_VALUE, generate_arith

        for key in ("n_train", "n_test"):
            if not isinstance(source.get(key), int) or source[key] < 1:
                raise MathptError(
                    f"data source 'arith': {key!r} must be a positive integer, got {source.get(key)!r}"
                )
        arith_seed = source.get("seed", seed)
        max_steps = source.get("max_steps", 3)
        max_value = source.get("max_value", MAX_VALUE)
        gen = generate_arith(
            source["n_train"], source["n_test"], seed=arith_seed, max_steps=max_steps, max_value=max_value
        )
        raw = {s: [(f"arith[{s}][{i}]", r) for i, r in enumerate(rows)] for s, rows in gen.items()}
        inputs = {s: {"sha256_rows": _rows_sha256(raw[s]), "rows": len(raw[s])} for s in raw}
        return raw, {
            "name": "arith",
            "seed": arith_seed,
            "max_steps": max_steps,
            "max_value": max_value,
            "inputs": inputs,
        }
    raise AssertionError(name)


def split_indices(n: int, val_size: int, seed: int) -> tuple[list[int], list[int]]:
    """(train, val) index lists from a seeded shuffle of ``range(n)``, each in shuffled order."""
    if not 0 <= val_size < n:
        raise MathptError(f"val_size={val_size} must be >= 0 and smaller than the {n} train problems")
    perm = list(range(n))
    random.Random(seed).shuffle(perm)
    return perm[val_size:], perm[:val_size]


def _limit(limits: dict | None, split: str) -> int | None:
    n = (limits or {}).get(split)
    if n is not None and (not isinstance(n, int) or n < 1):
        raise MathptError(f"data limit for {split!r} must be a positive integer or null, got {n!r}")
    return n


def prepare_data(
    source: dict, out_dir: str | os.PathLike, val_size: int = 512, seed: int = 0, limits: dict | None = None
) -> dict:
    """Write ``train/val/test.jsonl`` and ``manifest.json`` under ``out_dir``; return the manifest.

    ``limits`` ({"train": n, "val": n, "test": n}, each optional) subsamples after the val split:
    train and val keep the first n of their seeded shuffle (so val never leaks into train whatever
    the limits), test keeps its first n problems in file order (independent of the seed, like
    lm-eval's ``limit``). Rows are written in source order.
    """
    unknown = set(limits or {}) - set(SPLITS)
    if unknown:
        raise MathptError(f"unknown data limit key(s) {sorted(unknown)}; expected {list(SPLITS)}")
    lim = {s: _limit(limits, s) for s in SPLITS}
    raw, info = load_source(source, seed)
    train_idx, val_idx = split_indices(len(raw["train"]), val_size, seed)
    test_idx = list(range(len(raw["test"])))
    chosen = {"train": train_idx, "val": val_idx, "test": test_idx}
    # Parse every row, not only the chosen ones, so a malformed source fails whatever the limits.
    parsed = {
        src: [to_row(r, f"{src}-{i:05d}", where) for i, (where, r) in enumerate(raw[src])]
        for src in ("train", "test")
    }
    out_dir = Path(out_dir)
    outputs, counts = {}, {}
    for split in SPLITS:
        idx = chosen[split][: lim[split]]
        rows = [parsed["test" if split == "test" else "train"][i] for i in sorted(idx)]
        path = out_dir / f"{split}.jsonl"
        write_jsonl(path, rows)
        outputs[split] = {"path": path.name, "sha256": sha256_file(path), "rows": len(rows)}
        counts[split] = len(rows)
    manifest = {
        "source": info,
        "seed": seed,
        "val_size": val_size,
        "limits": lim,
        "counts": counts,
        "outputs": outputs,
    }
    atomic_write_json(out_dir / "manifest.json", manifest)
    return manifest
