"""Is the first minibatch's ratio exactly 1 on-policy in bf16, and how far apart are the trainer and
its behaviour copy at staleness 1? (issue 27.1)

Runs ``pg_update`` (GRPO-clip, bf16, packing, token budget) on a random model of a bench shape
through the library's own paths: ``load_model``, ``compile_if_cuda`` (as ``load_policy``), the
master-weight AdamW, and ``train.pg.Behaviour`` for staleness 1. Prints, per case, mb0/ratio_min,
mb0/ratio_max and the gap metrics (mb0/logp_gap_mean, mb0/logp_gap_max, mb0/kl_k3):

- staleness 0: pi_old is the first optimizer step's own forward (ratio exactly 1); next to it the
  old way (old log-probs cut over the whole batch in a separate no-grad pass), for comparison;
- staleness 1, same weights: the behaviour copy holds exactly the trainer's weights, so the gap is
  numerical only (copy: no grad, eval; trainer: grad, train; both compiled on CUDA, same cuts);
- staleness 1, one version behind: the copy is one optimizer step (lr ``--lr``) behind.

    PYTHONPATH=. python bench/check_ratio_gpu.py                       # CUDA, Qwen2.5-Math-1.5B shape
    PYTHONPATH=. python bench/check_ratio_gpu.py --shape bench/tiny-shape.yaml --rows 32 \\
        --minibatch 8 --tokens 512 --max-len 120                       # CPU smoke, seconds
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path

import torch

from mathpt.train.compile import compile_if_cuda
from mathpt.train.pg import Behaviour
from mathpt.train.settings import update_settings
from mathpt.train.steps import compute_old_log_probs, pg_update

HERE = Path(__file__).resolve().parent
KEYS = ("ratio_min", "ratio_max", "logp_gap_mean", "logp_gap_max", "kl_k3")


def rollout(rows: int, max_len: int, vocab: int, group: int, seed: int) -> dict[str, torch.Tensor]:
    """Right-padded rows: a prompt of max_len/8..max_len/4 tokens, a response up to the width."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (rows, max_len + 1), generator=gen)
    mask = torch.zeros(rows, max_len, dtype=torch.bool)
    for i in range(rows):
        p = int(torch.randint(max_len // 8, max_len // 4 + 1, (1,), generator=gen))
        r = int(torch.randint(1, max_len - p + 1, (1,), generator=gen))
        mask[i, p - 1 : p - 1 + r] = True
        ids[i, p + r :] = 0
    rewards = (torch.rand(rows, generator=gen) < 0.5).float()
    grp = rewards.view(-1, group)
    adv = ((grp - grp.mean(1, keepdim=True)) / (grp.std(1, keepdim=True) + 1e-6)).reshape(-1)
    return {
        "input_ids": ids[:, :-1],
        "labels": ids[:, 1:],
        "response_mask": mask,
        "raw_rewards": rewards,
        "advantages": adv,
    }


def model_dir(shape_file: str, out: Path) -> Path:
    """A random-init Qwen2 of ``shape_file``'s shape saved in HF format (the library's builders)."""
    from mathpt.models import init_model, load_shape, qwen2_config

    init_model(qwen2_config(load_shape(shape_file)), seed=0).save_pretrained(out)
    return out


def main() -> None:
    cuda = torch.cuda.is_available()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--shape", default=str(HERE / ("qwen2.5-math-1.5b-shape.yaml" if cuda else "tiny-shape.yaml"))
    )
    ap.add_argument("--rows", type=int, default=512 if cuda else 32, help="rollout batch")
    ap.add_argument("--minibatch", type=int, default=128 if cuda else 8, help="rows per optimizer step")
    ap.add_argument("--tokens", type=int, default=16384 if cuda else 512, help="microbatch token budget")
    ap.add_argument(
        "--max-len", type=int, default=1024 if cuda else 120, help="row width (prompt + response)"
    )
    ap.add_argument("--lr", type=float, default=1e-6)
    args = ap.parse_args()

    from mathpt.models import load_model
    from mathpt.optim import make_optimizer

    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16
    with tempfile.TemporaryDirectory() as tmp:
        init = model_dir(args.shape, Path(tmp))
        model = load_model(init, dtype=dtype, device=device).train()
        compile_if_cuda(model)
        opt = make_optimizer(model, {"lr": args.lr, "betas": [0.9, 0.95], "weight_decay": 0.0})
        vocab = model.config.vocab_size
        # GRPO-clip with the schema's defaults (one epoch, grad-norm clip 1), packed under a budget
        settings = update_settings(
            "grpo_clip",
            cliprange=0.2,
            minibatch_size=args.minibatch,
            microbatch_tokens=args.tokens,
            packing=True,
        )
        print(
            f"device {device}, bf16, packing, shape {Path(args.shape).name}, rows {args.rows}, "
            f"minibatch {args.minibatch}, budget {args.tokens} tokens, width {args.max_len}"
        )

        def report(name: str, out: dict) -> None:
            mb0 = out["per_step"][0]
            print(f"{name:<44}" + "  ".join(f"mb0/{k} {mb0[k]:.6g}" for k in KEYS))

        batch = rollout(args.rows, args.max_len, vocab, 8, seed=1)
        # the old way, on a copy: old log-probs cut over the whole batch in a separate no-grad pass
        legacy = dict(batch)
        legacy["old_log_probs"] = compute_old_log_probs(
            model, batch, args.rows, None, microbatch_tokens=args.tokens, packing=True
        )
        state = copy.deepcopy(model.state_dict())
        opt_state = copy.deepcopy(opt.state_dict())
        report("staleness 0, old (whole-batch cuts):", pg_update(model, opt, legacy, settings, seed=0))
        model.load_state_dict(state)
        opt.load_state_dict(opt_state)
        report("staleness 0 (first step's own forward):", pg_update(model, opt, batch, settings, seed=0))
        model.load_state_dict(state)
        opt.load_state_dict(opt_state)

        behaviour = Behaviour(model, 0, True, str(init), dtype)  # compiled like the trainer on CUDA
        behaviour.advance(1)  # the copy holds v0 = the trainer's weights: a numerical gap only
        b = rollout(args.rows, args.max_len, vocab, 8, seed=2)
        b["old_log_probs"] = behaviour.log_probs(b, 0, settings, 0)
        report("staleness 1, same weights (numerics only):", pg_update(model, opt, b, settings, seed=0))
        # the trainer now holds v1, the copy still v0: a batch generated with v0, as at staleness 1
        b = rollout(args.rows, args.max_len, vocab, 8, seed=3)
        b["old_log_probs"] = behaviour.log_probs(b, 0, settings, 0)
        behaviour.advance(2)
        report("staleness 1, one version behind:", pg_update(model, opt, b, settings, seed=0))


if __name__ == "__main__":
    main()
