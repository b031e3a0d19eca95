"""Packed forward/backward on CUDA (varlen FlashAttention) against the padded one, eager and with
compiled layers: the check to run once on a GPU machine before trusting ``packing: true`` there
(CPU tests cover the SDPA path in float64; this covers the bf16 varlen kernel).

    PYTHONPATH=. python bench/check_packing_gpu.py
    PYTHONPATH=. python bench/check_packing_gpu.py --device cpu --shape bench/tiny-shape.yaml --eager-only  # smoke
"""

from __future__ import annotations

import argparse
import copy
import sys

import torch

from mathpt.functional import get_response_log_probs
from mathpt.models import init_model, load_shape, qwen2_config
from mathpt.train.compile import compile_layers
from mathpt.train.packing import packed_response_log_probs

# Small enough to check in seconds, large enough for several heads and the 128-column head blocks.
CHECK_SHAPE = dict(
    vocab_size=4096,
    hidden_size=512,
    intermediate_size=1024,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    tie_word_embeddings=True,
)


def batch(rows: int, width: int, vocab: int, device) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1, vocab, (rows, width + 1), generator=gen)
    mask = torch.zeros(rows, width, dtype=torch.bool)
    for i in range(rows):
        p = int(torch.randint(20, 60, (1,), generator=gen))
        r = int(torch.randint(10, width - p + 1, (1,), generator=gen))
        mask[i, p - 1 : p - 1 + r] = True
        ids[i, p + r :] = 0
    return {k: v.to(device) for k, v in (("ids", ids[:, :-1]), ("labels", ids[:, 1:]), ("mask", mask))}


def loss_and_grads(model, b, packed: bool):
    model.zero_grad(set_to_none=True)
    if packed:
        lp = packed_response_log_probs(model, b["ids"], b["labels"], b["mask"])["log_probs"]
    else:
        lp = get_response_log_probs(model, b["ids"], b["labels"])["log_probs"]
    loss = -torch.where(b["mask"], lp.float(), 0.0).sum() / b["mask"].sum()
    loss.backward()
    return lp.detach().float(), torch.cat([p.grad.float().flatten() for p in model.parameters()])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="cuda (the check) or cpu (a smoke run of this script)")
    ap.add_argument("--shape", default=None, help="shape file (default: a 4-layer, 512-wide model)")
    ap.add_argument("--eager-only", action="store_true", help="skip the compiled-layers half")
    a = ap.parse_args()
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        print(
            "check_packing_gpu.py needs CUDA (the varlen FlashAttention path); use --device cpu for a smoke run"
        )
        return 2
    cfg = qwen2_config(load_shape(a.shape) if a.shape else CHECK_SHAPE)
    dtype = torch.bfloat16 if a.device.startswith("cuda") else torch.float32
    ok = True
    for compiled in (False,) if a.eager_only else (False, True):
        model = init_model(cfg, seed=0, device=a.device, dtype=dtype)
        if compiled:
            compile_layers(model)
        for width in (300, 517):  # two shapes: a compiled model must not break on a new length
            b = batch(6, width, cfg.vocab_size, a.device)
            ref_lp, ref_g = loss_and_grads(copy.deepcopy(model) if not compiled else model, b, False)
            lp, g = loss_and_grads(model, b, True)
            m = b["mask"]
            gap = float((lp[m] - ref_lp[m]).abs().max())
            cos = float(torch.nn.functional.cosine_similarity(g, ref_g, dim=0))
            good = gap < 0.15 and cos > 0.995  # bf16 kernels differ in rounding, not in what they attend
            ok &= good
            print(
                f"packing check compiled={compiled} width={width}: max |dlogp| {gap:.4f}, "
                f"grad cosine {cos:.5f} -> {'ok' if good else 'FAIL'}"
            )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
