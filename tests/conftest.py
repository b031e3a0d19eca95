"""Shared fixtures: the GSM8K copy in ../shared and a tiny model built once per test session."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
GSM8K_DIR = Path(os.environ.get("MATHPT_GSM8K_DIR", REPO.parent / "shared" / "data" / "gsm8k"))


@pytest.fixture(scope="session")
def gsm8k_dir() -> Path:
    if not (GSM8K_DIR / "train.jsonl").exists():
        pytest.fail(f"GSM8K not found at {GSM8K_DIR}; set MATHPT_GSM8K_DIR")
    return GSM8K_DIR


@pytest.fixture(scope="session")
def gsm8k_train_rows(gsm8k_dir) -> list[dict]:
    with open(gsm8k_dir / "train.jsonl") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, gsm8k_train_rows) -> Path:
    """A random-init tiny Qwen2 model + BPE tokenizer trained on 2,000 GSM8K train rows."""
    from mathpt.models import build_tiny_model

    out = tmp_path_factory.mktemp("tiny_model")
    texts = [r["question"] + "\n" + r["answer"] for r in gsm8k_train_rows[:2000]]
    return build_tiny_model(texts, out)
