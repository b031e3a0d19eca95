"""Cost of one policy-gradient update per algorithm of the registry, on one model shape, one run.

Builds a random-init model from a shape file (bench_train_step.build_model, no downloads), makes one
synthetic rollout batch (groups of ``--group`` responses of mixed lengths, 0/1 rewards, a quarter of
the groups all-equal), and times, per algorithm: the behaviour policy's log-probs
(``compute_old_log_probs``) + ``pg_update`` with the algorithm's defaults from config/schema.yaml
(clip ranges, aggregation) on a copy of the same weights. The rollouts themselves are synthetic:
sampling costs the same for every algorithm except dapo, whose dynamic sampling draws up to
``max_draws`` batches (its extra draws cost what ``bench/bench_rollout.py`` measures per batch; the
batch here has 25% all-equal groups, so one extra draw on average at that rate).

    PYTHONPATH=. python bench/bench_algorithms.py --shape bench/tiny-shape.yaml --device cpu   # seconds
    PYTHONPATH=. python bench/bench_algorithms.py --device cuda                                # 1.5B shape
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train_step import build_model  # noqa: E402

from mathpt.algorithms import ALGORITHMS, PG_ALGOS  # noqa: E402
from mathpt.functional import group_advantages  # noqa: E402
from mathpt.optim import make_optimizer  # noqa: E402
from mathpt.train.settings import update_settings  # noqa: E402
from mathpt.train.steps import compute_old_log_probs, pg_update  # noqa: E402


def synthetic_batch(n: int, group: int, prompt_len: int, max_new: int, vocab: int, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    resp = torch.randint(max_new // 8, max_new + 1, (n,), generator=gen)
    width = prompt_len + int(resp.max()) - 1
    ids = torch.randint(0, vocab, (n, width + 1), generator=gen)
    mask = torch.zeros(n, width, dtype=torch.bool)
    for i, r in enumerate(resp.tolist()):
        mask[i, prompt_len - 1 : prompt_len - 1 + r] = True
    rewards = (torch.rand(n, generator=gen) < 0.5).float()
    rewards.view(-1, group)[::4] = 0.0  # a quarter of the groups all-equal
    return {
        "input_ids": ids[:, :-1],
        "labels": ids[:, 1:].clone(),
        "response_mask": mask,
        "raw_rewards": rewards,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default=str(Path(__file__).with_name("qwen2.5-math-1.5b-shape.yaml")))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=3, help="timed updates per algorithm (after one warm-up)")
    ap.add_argument("--batch", type=int, default=64, help="rollouts per batch")
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--max-new", type=int, default=1024)
    ap.add_argument("--microbatch-tokens", type=int, default=16384)
    ap.add_argument("--algorithms", default=",".join(PG_ALGOS))
    args = ap.parse_args()

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model, shape = build_model(args.shape, device, dtype)
    init = copy.deepcopy(model.state_dict())
    batch = synthetic_batch(args.batch, args.group, args.prompt_len, args.max_new, shape["vocab_size"])
    print(
        f"shape {Path(args.shape).name} on {device} ({dtype}); {args.batch} rollouts, "
        f"{int(batch['response_mask'].sum())} response tokens, {args.steps} timed steps each"
    )
    rows = []
    for name in args.algorithms.split(","):
        algo = ALGORITHMS[name]
        b = dict(batch)
        b["advantages"] = group_advantages(b["raw_rewards"], args.group, algo.advantage, 1e-6, True)
        model.load_state_dict(init)
        opt = make_optimizer(model, {"lr": 1e-6, "betas": (0.9, 0.95), "weight_decay": 0.0})
        # the algorithm's update with the schema's defaults (its clip ranges and aggregation)
        settings = update_settings(
            name,
            microbatch_size=args.batch,
            microbatch_tokens=args.microbatch_tokens,
            packing=True,
            max_new_tokens=args.max_new,
        )
        times = []
        for i in range(args.steps + 1):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            b["old_log_probs"] = compute_old_log_probs(
                model, b, args.batch, None, microbatch_tokens=args.microbatch_tokens, packing=True
            )
            out = pg_update(model, opt, b, settings, seed=0)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i:  # the first is a warm-up
                times.append(time.perf_counter() - t0)
        rows.append((name, statistics.median(times), min(times), out["loss"]))
    base = next((t for n, t, _, _ in rows if n == "grpo_clip"), None)
    print("\n| algorithm | median s/update | min s | vs grpo_clip | loss |")
    print("| --- | --- | --- | --- | --- |")
    for name, med, lo, loss in rows:
        rel = f"{med / base:.2f}x" if base else "-"
        print(f"| {name} | {med:.3f} | {lo:.3f} | {rel} | {loss:.4g} |")


if __name__ == "__main__":
    main()
