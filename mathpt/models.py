"""Build, load and save causal LMs in HF format (loadable by transformers, vLLM and lm-eval).

The embedded default needs no hub: it trains a small byte-level BPE tokenizer on the train split
and initializes a Qwen2-architecture model with random weights whose sizes come from config.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import torch

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

DEFAULT_TINY = {
    "vocab_size": 512,
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": True,
    "seed": 0,
}


def train_tokenizer(texts: Iterable[str], vocab_size: int):
    """A byte-level BPE tokenizer (GPT-2/Qwen style) trained on ``texts``, as a fast HF tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.model_max_length = 1 << 20
    return fast


def build_tiny_model(texts: Iterable[str], out_dir: str | os.PathLike, sizes: dict | None = None) -> Path:
    """Train a tokenizer on ``texts`` and save a seeded random-init Qwen2 model + tokenizer to ``out_dir``."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = {**DEFAULT_TINY, **(sizes or {})}
    tokenizer = train_tokenizer(texts, cfg["vocab_size"])
    torch.manual_seed(cfg["seed"])
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_hidden_layers=cfg["num_hidden_layers"],
        num_attention_heads=cfg["num_attention_heads"],
        num_key_value_heads=cfg["num_key_value_heads"],
        max_position_embeddings=cfg["max_position_embeddings"],
        tie_word_embeddings=cfg["tie_word_embeddings"],
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        torch_dtype="float32",
    )
    model = Qwen2ForCausalLM(config)
    out = Path(out_dir)
    save_model(model, tokenizer, out)
    return out


def save_model(model, tokenizer, out_dir: str | os.PathLike) -> None:
    """Save model (safetensors) + tokenizer in HF format."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def load_tokenizer(path: str | os.PathLike):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(
    path: str | os.PathLike, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    return model.to(device)


def materialize_base_model(cfg: dict, train_path: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Rule base_model: the embedded tiny model (tokenizer trained on the train split) or a
    pretrained model from a hub id / local path, saved in HF format with a provenance file."""
    from mathpt.io import MathptError, atomic_dir, read_jsonl
    from mathpt.provenance import write_provenance

    with atomic_dir(out_dir) as tmp:
        if cfg["kind"] == "tiny":
            tiny = dict(cfg["tiny"])
            rows = read_jsonl(train_path, required_keys=("question", "solution"))
            n = tiny.pop("tokenizer_rows", len(rows))
            # Both prompt templates are part of the corpus so the tiny tokenizer merges their words too.
            from mathpt.prompts import STYLES, format_prompt

            texts = [
                format_prompt(r["question"], s) + f"{r['solution']}\n{r['answer']}"
                for r in rows[:n]
                for s in STYLES
            ]
            build_tiny_model(texts, tmp, tiny)
        else:
            path = cfg["path"]
            try:
                model = load_model(path)
                tokenizer = load_tokenizer(path)
            except OSError as e:
                raise MathptError(
                    f"model.path {path!r}: cannot load it as a local directory or hub id "
                    f"(offline? set HF_HUB_OFFLINE=0 or point model.path at a local copy): {e}"
                ) from None
            save_model(model, tokenizer, tmp)
        write_provenance(tmp / "provenance.json", cfg, [train_path])
    return Path(out_dir)
