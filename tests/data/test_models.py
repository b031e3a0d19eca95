"""mathpt.models builders the benchmarks share: a padded tokenizer, a config from a shape, a seeded model."""

from __future__ import annotations

from pathlib import Path

import torch

from mathpt.models import init_model, load_shape, qwen2_config, train_tokenizer

BENCH = Path(__file__).resolve().parents[2] / "bench"


def test_padded_tokenizer_keeps_the_bpe_and_fills_to_the_size(word_problems):
    texts = [r["question"] + "\n" + r["answer"] for r in word_problems[:300]]
    base = train_tokenizer(texts, 400)
    padded = train_tokenizer(texts, 400, pad_to=1000)
    assert len(base) < 1000 and len(padded) == 1000
    assert base.get_vocab().items() <= padded.get_vocab().items()  # the BPE's own ids are unchanged
    sample = texts[0]
    assert padded(sample).input_ids == base(sample).input_ids  # fillers are never produced by the merges
    fillers = list(range(len(base), 1000))
    assert len(padded.decode(fillers)) == 3 * len(fillers)  # each filler decodes to three characters
    assert padded.eos_token == "<|endoftext|>" and padded.chat_template == base.chat_template


def test_qwen2_config_and_init_model_from_the_shape_files(word_problems):
    shape = load_shape(BENCH / "qwen2.5-math-1.5b-shape.yaml")
    big = qwen2_config(shape)
    assert (big.vocab_size, big.hidden_size, big.num_hidden_layers) == (151936, 1536, 28)
    assert (big.bos_token_id, big.eos_token_id, big.pad_token_id) == (0, 1, 1)
    tiny = load_shape(BENCH / "tiny-shape.yaml")
    tok = train_tokenizer([r["question"] for r in word_problems[:200]], 300, pad_to=tiny["vocab_size"])
    cfg = qwen2_config(tiny, tok)
    assert cfg.vocab_size == len(tok) == tiny["vocab_size"] and cfg.eos_token_id == tok.eos_token_id
    a, b = init_model(cfg, seed=3), init_model(cfg, seed=3, dtype=torch.bfloat16)
    assert b.dtype == torch.bfloat16 and a.config.hidden_size == tiny["hidden_size"]
    for (n, p), (_, q) in zip(
        a.state_dict().items(), init_model(cfg, seed=3).state_dict().items(), strict=True
    ):
        assert torch.equal(p, q), n  # seeded: the same weights every time
    assert not torch.equal(a.lm_head.weight, init_model(cfg, seed=4).lm_head.weight)
