"""Build a model directory (config.json + a tokenizer, no weights) for GPU benchmarks at the
Qwen2.5-Math-1.5B shape with a *real-size* vocabulary (151,936), made on the CPU machine.

The GPU machine cannot download Qwen's tokenizer. A GSM8K-trained byte-level BPE stops near 24.7k
tokens, so its vocabulary is padded to 151,936 with filler tokens (three byte-level characters
each, unreachable by the merges but decodable): a random-init model then samples over the full
vocabulary as Qwen would, and detokenization and stop-string checks cost what they cost with
Qwen's tokenizer (one incremental decode per sampled token). Weights are made on the GPU machine
(``bench_rollout.py`` builds and saves them).

    python bench/make_bench_model_dir.py --out .benchsnap/model1p5b
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

QWEN_1P5B = dict(
    vocab_size=151936,
    hidden_size=1536,
    intermediate_size=8960,
    num_hidden_layers=28,
    num_attention_heads=12,
    num_key_value_heads=2,
    max_position_embeddings=4096,
    tie_word_embeddings=True,
    rope_theta=10000.0,
    rms_norm_eps=1e-6,
)


def padded_tokenizer(texts: list[str], vocab_size: int):
    """The project's BPE trained on ``texts``, its vocabulary padded with filler tokens to ``vocab_size``."""
    from tokenizers import Tokenizer, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from mathpt.models import CHAT_TEMPLATE, train_tokenizer

    base = train_tokenizer(texts, 32768)
    spec = json.loads(base.backend_tokenizer.to_str())
    vocab: dict[str, int] = spec["model"]["vocab"]
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    n_alpha = len(alphabet)
    i = 0
    while len(vocab) < vocab_size:
        s = alphabet[(i // n_alpha**2) % n_alpha] + alphabet[(i // n_alpha) % n_alpha] + alphabet[i % n_alpha]
        i += 1
        if s not in vocab:
            vocab[s] = len(vocab)
    assert sorted(vocab.values()) == list(range(vocab_size))
    tok = Tokenizer.from_str(json.dumps(spec))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.model_max_length = 1 << 20
    return fast


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--gsm8k", default="../shared/data/gsm8k/train.jsonl")
    a = ap.parse_args()
    from transformers import Qwen2Config

    rows = [json.loads(line) for line in Path(a.gsm8k).read_text().splitlines() if line.strip()]
    texts = [r["question"] + "\n" + r["answer"] for r in rows]
    tok = padded_tokenizer(texts, QWEN_1P5B["vocab_size"])
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(out)
    Qwen2Config(
        **QWEN_1P5B,
        bos_token_id=tok.eos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    ).save_pretrained(out)
    ids = tok("Natalia sold clips to 48 of her friends.").input_ids
    print(
        f"wrote {out}: vocab {len(tok)}, sample ids {ids[:8]}, decode of 5 filler ids "
        f"{tok.decode(list(range(150000, 150005)))!r}"
    )


if __name__ == "__main__":
    main()
