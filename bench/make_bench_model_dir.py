"""Build a model directory (config.json + a tokenizer, no weights) for GPU benchmarks at the
Qwen2.5-Math-1.5B shape (``bench/qwen2.5-math-1.5b-shape.yaml``) with a *real-size* vocabulary
(151,936), made on the CPU machine.

The GPU machine cannot download Qwen's tokenizer. A GSM8K-trained byte-level BPE stops near 24.7k
tokens, so its vocabulary is padded to the shape's ``vocab_size`` with filler tokens
(``mathpt.models.train_tokenizer(..., pad_to=...)``): a random-init model then samples over the
full vocabulary as Qwen would, and detokenization and stop-string checks cost what they cost with
Qwen's tokenizer (one incremental decode per sampled token). Weights are made on the GPU machine
(``bench_rollout.py prepare`` builds and saves them).

    python bench/make_bench_model_dir.py --out .benchsnap/model1p5b
    python bench/make_bench_model_dir.py --out /tmp/bm_dir --shape bench/tiny-shape.yaml --gsm8k train.jsonl  # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mathpt.models import load_shape, qwen2_config, train_tokenizer  # noqa: E402

SHAPE = Path(__file__).with_name("qwen2.5-math-1.5b-shape.yaml")
BPE_SIZE = 32768  # asked of the BPE trainer; on GSM8K it stops near 24.7k, the rest is filler


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--shape", default=str(SHAPE), help="model shape file (Qwen2Config keys)")
    gsm8k = os.environ.get("MATHPT_GSM8K_DIR")
    ap.add_argument(
        "--gsm8k",
        default=str(Path(gsm8k) / "train.jsonl") if gsm8k else None,
        help="GSM8K-format train.jsonl (default: $MATHPT_GSM8K_DIR/train.jsonl, else the project's arith problems)",
    )
    a = ap.parse_args()

    shape = load_shape(a.shape)
    if a.gsm8k:
        rows = [json.loads(line) for line in Path(a.gsm8k).read_text().splitlines() if line.strip()]
    else:  # no GSM8K copy: the tokenizer learns from the project's generated word problems
        from mathpt.arith import generate_arith

        rows = generate_arith(2000, 200, seed=0)["train"]
    texts = [r["question"] + "\n" + r["answer"] for r in rows]
    vocab = shape["vocab_size"]
    tok = train_tokenizer(texts, min(BPE_SIZE, vocab), pad_to=vocab)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(out)
    qwen2_config(shape, tok).save_pretrained(out)
    ids = tok("Natalia sold clips to 48 of her friends.").input_ids
    print(
        f"wrote {out}: vocab {len(tok)}, sample ids {ids[:8]}, decode of 5 filler ids "
        f"{tok.decode(list(range(vocab - 5, vocab)))!r}"
    )


if __name__ == "__main__":
    main()
