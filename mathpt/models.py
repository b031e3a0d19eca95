"""Build, load and save causal LMs in HF format (loadable by transformers, vLLM and lm-eval).

The embedded default needs no hub: it trains a small byte-level BPE tokenizer on the train split
and initializes a Qwen2-architecture model with random weights whose sizes come from config.
"""

from __future__ import annotations

import copy
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


def train_tokenizer(texts: Iterable[str], vocab_size: int, pad_to: int | None = None):
    """A byte-level BPE tokenizer (GPT-2/Qwen style) trained on ``texts``, as a fast HF tokenizer.

    ``pad_to``: pad the vocabulary to that many tokens with filler tokens (three byte-level
    characters each: unreachable by the merges, but decodable), so a random-init model samples over
    a real model's vocabulary and detokenization costs what it costs there (the GPU benchmarks).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

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
    if pad_to is not None:
        tok = _pad_vocab(tok, pad_to)
    return _fast_tokenizer(tok)


def _pad_vocab(tok, vocab_size: int):
    """``tok`` with filler tokens appended until its vocabulary has ``vocab_size`` entries."""
    import json

    from tokenizers import Tokenizer, pre_tokenizers

    spec = json.loads(tok.to_str())
    vocab: dict[str, int] = spec["model"]["vocab"]
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    n = len(alphabet)
    i = 0
    while len(vocab) < vocab_size:
        s = alphabet[(i // n**2) % n] + alphabet[(i // n) % n] + alphabet[i % n]
        i += 1
        if s not in vocab:
            vocab[s] = len(vocab)
    if sorted(vocab.values()) != list(range(len(vocab))):
        raise ValueError(f"padded vocabulary ids are not 0..{len(vocab) - 1}")
    return Tokenizer.from_str(json.dumps(spec))


def _fast_tokenizer(tok):
    """The project's HF wrapper of a ``tokenizers`` BPE: special tokens, chat template, no length cap."""
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.model_max_length = 1 << 20
    return fast


def load_shape(path: str | os.PathLike) -> dict:
    """A model shape file (YAML of ``Qwen2Config`` keys, e.g. ``bench/qwen2.5-math-1.5b-shape.yaml``)."""
    import yaml

    return dict(yaml.safe_load(Path(path).read_text()))


def qwen2_config(shape: dict, tokenizer=None, **extra):
    """A Qwen2 config of ``shape`` (``Qwen2Config`` keys). With a tokenizer, its vocabulary size and
    special ids; without one (token-id prompts only), ids 0/1 for bos/eos and pad."""
    from transformers import Qwen2Config

    shape = {k: v for k, v in shape.items() if k not in ("seed", "tokenizer_rows")}
    if tokenizer is None:
        ids = {"bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1}
    else:
        shape["vocab_size"] = len(tokenizer)
        ids = {
            "bos_token_id": tokenizer.eos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        }
    return Qwen2Config(**shape, **ids, **extra)


def init_model(
    config, *, seed: int = 0, device: str | torch.device = "cpu", dtype: torch.dtype | None = None, **kwargs
):
    """A seeded random-init causal LM of ``config``, built directly on ``device`` in ``dtype`` (no hub;
    ``kwargs`` go to ``from_config``, e.g. ``attn_implementation``)."""
    from transformers import AutoModelForCausalLM

    if dtype is not None:
        kwargs["dtype"] = dtype
    torch.manual_seed(seed)
    with torch.device(device):  # a copy: from_config(dtype=...) writes the dtype into the config it gets
        return AutoModelForCausalLM.from_config(copy.deepcopy(config), **kwargs)


def build_tiny_model(texts: Iterable[str], out_dir: str | os.PathLike, sizes: dict | None = None) -> Path:
    """Train a tokenizer on ``texts`` and save a seeded random-init Qwen2 model + tokenizer to ``out_dir``."""
    cfg = {**DEFAULT_TINY, **(sizes or {})}
    tokenizer = train_tokenizer(texts, cfg["vocab_size"])
    config = qwen2_config(cfg, tokenizer, torch_dtype="float32")
    model = init_model(config, seed=cfg["seed"])
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
