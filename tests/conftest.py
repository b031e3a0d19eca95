"""Shared fixtures. The suite runs on a fresh machine: tests that only need math word problems get
them from the project's own arith generator; only tests about GSM8K's real text ask for ``gsm8k_dir``:
the local copy ``MATHPT_GSM8K_DIR`` names, else GSM8K downloaded from the HF hub (openai/gsm8k, main)
once per session; the tests skip, with the reason, when neither is there."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
ASSETS = Path(__file__).resolve().parent / "assets"
_env = os.environ.get("MATHPT_GSM8K_DIR")
GSM8K_DIR = Path(_env) if _env else None


@pytest.fixture(scope="session")
def gsm8k_dir(tmp_path_factory) -> Path:
    """GSM8K's train.jsonl and test.jsonl: the local copy, else the hub's; skips when neither is there."""
    if GSM8K_DIR is None:
        from mathpt.data import _load_hub
        from mathpt.io import MathptError, write_jsonl

        try:
            splits = _load_hub("openai/gsm8k", "main")
        except MathptError as e:
            pytest.skip(f"needs the real GSM8K text and found none: {e}")
        out = tmp_path_factory.mktemp("gsm8k_hub")
        for split in ("train", "test"):
            write_jsonl(out / f"{split}.jsonl", [row for _, row in splits[split]])
        return out
    if not (GSM8K_DIR / "train.jsonl").is_file() or not (GSM8K_DIR / "test.jsonl").is_file():
        pytest.fail(f"MATHPT_GSM8K_DIR={GSM8K_DIR} has no train.jsonl and test.jsonl")
    return GSM8K_DIR


@pytest.fixture(scope="session")
def gsm8k_train_rows(gsm8k_dir) -> list[dict]:
    with open(gsm8k_dir / "train.jsonl") as f:
        return [json.loads(line) for line in f]


# The keys every teacher's trace rows carry (the traces contract checked by the teacher tests).
TRACE_KEYS = {
    "id",
    "question",
    "answer",
    "prompt",
    "response",
    "teacher",
    "teacher_answer",
    "correct",
    "sample_index",
    "finish_reason",
    "reject_reason",
}


def data_rows(raw: list[dict], n: int, start: int = 0) -> list[dict]:
    """Contract rows (id, question, solution, answer) of raw GSM8K-format records, as the data rule
    writes them (``mathpt.data.to_row``), ids ``train-00000``..."""
    from mathpt.data import to_row

    return [
        to_row(r, f"train-{i:05d}", f"row {i}") for i, r in enumerate(raw[start : start + n], start=start)
    ]


@pytest.fixture(scope="session")
def word_problems() -> list[dict]:
    """2,000 raw GSM8K-format rows (``question``, ``answer`` ending ``#### N``) from the arith generator."""
    from mathpt.arith import generate_arith

    return generate_arith(2000, 1, seed=0)["train"]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, word_problems) -> Path:
    """A random-init tiny Qwen2 model + BPE tokenizer trained on 2,000 arith word problems."""
    from mathpt.models import build_tiny_model

    out = tmp_path_factory.mktemp("tiny_model")
    texts = [r["question"] + "\n" + r["answer"] for r in word_problems]
    return build_tiny_model(texts, out)


def tiny_qwen(dtype=None, seed: int = 0, vocab_size: int = 97, max_position_embeddings: int = 128):
    """A random-init tiny Qwen2 causal LM (float64 by default, no tokenizer) for numeric tests.

    The one definition the test modules share (``from conftest import tiny_qwen``).
    """
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        max_position_embeddings=max_position_embeddings,
    )
    return Qwen2ForCausalLM(cfg).to(torch.float64 if dtype is None else dtype)
