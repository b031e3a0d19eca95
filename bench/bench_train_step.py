"""Train-step speed and memory: mathpt's SFT/PG steps against the naive step, side by side, one run.

Builds a random-init model from a shape file (no downloads), measures the bf16 matmul peak in the
same run, checks the loss and gradients of our step against the naive one (both against an fp32
reference), then times, per batch shape:
  naive      HF forward -> full logits -> fp32 log_softmax -> gather, AdamW on bf16 params
  ours       body once + chunked log-probs/entropy (mathpt.functional), sft_update / pg_update,
             fp32 master-weight AdamW (fused), grad clipping; variants: eager, compiled layers,
             compiled + activation checkpointing of k layers
Shapes: BxL fixed (all tokens real), "ga4" (4 microbatches of 8x1024 per optimizer step), and
"mix" (32 rollouts, prompts 80-200 + responses 100-1500 tokens, microbatches of 8).
Tokens/s counts real (non-pad) tokens only; MFU = (6 N + 12 L d T) FLOPs per real token over the
same-run matmul peak. Memory: peak, and peak minus state (weights + grads + optimizer state).

    PYTHONPATH=. python bench/bench_train_step.py --out /tmp/bench           # GPU, full shape
    PYTHONPATH=. python bench/bench_train_step.py --quick                    # CPU smoke test
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import math
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

from mathpt.functional import get_response_log_probs, sft_microbatch_train_step
from mathpt.optim import MasterWeightAdamW
from mathpt.train.batching import response_lengths, token_budget_microbatches
from mathpt.train.compile import compile_layers, decoder_layers
from mathpt.train.settings import UpdateSettings, update_settings
from mathpt.train.steps import pg_update, sft_update

GiB = 1024**3
T0 = time.time()


def log(msg: str) -> None:
    print(f"[{time.time() - T0:6.1f}s] {msg}", flush=True)


# ----------------------------------------------------------------------------- setup


def checkpoint_layers(model: torch.nn.Module, n_layers: int) -> int:
    """Activation checkpointing on the first ``n_layers`` decoder layers (HF GradientCheckpointingLayer).

    Each checkpointed layer keeps only its input and recomputes its forward in backward: ~1/3 more
    compute for that layer, all its activations saved. Use the smallest count that fits memory.
    Returns how many layers were switched on.
    """
    import functools

    from torch.utils.checkpoint import checkpoint

    fn = functools.partial(checkpoint, use_reentrant=False)
    count = 0
    for i, layer in enumerate(decoder_layers(model)):
        if not hasattr(layer, "gradient_checkpointing"):
            raise ValueError(f"{type(layer).__name__} does not support HF gradient checkpointing")
        on = i < n_layers
        layer.gradient_checkpointing = on
        layer._gradient_checkpointing_func = fn
        count += on
    return count


def build_model(shape_file: str, device: torch.device, dtype: torch.dtype):
    from mathpt.models import init_model, load_shape, qwen2_config

    shape = load_shape(shape_file)
    model = init_model(qwen2_config(shape), seed=0, device=device, dtype=dtype, attn_implementation="sdpa")
    model.train()
    return model, shape


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())  # tied weights counted once


def matmul_peak(device: torch.device) -> float:
    if device.type != "cuda":
        return float("nan")
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    times = []
    for _ in range(10):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(5):
            a @ b
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e) / 5 / 1e3)
    del a, b
    return 2 * n**3 / statistics.median(times) / 1e12


def make_batch(
    lengths: list[int], prompt_lens: list[int], pad_to: int, vocab: int, gen: torch.Generator
) -> dict:
    """Right-padded rows like tokenize_prompt_and_output: (B, pad_to) ids/labels/mask, pad id 0."""
    b = len(lengths)
    full = torch.randint(1, vocab, (b, pad_to + 1), generator=gen)
    mask = torch.zeros(b, pad_to, dtype=torch.bool)
    attn = torch.zeros(b, pad_to, dtype=torch.long)
    for i, (n, p) in enumerate(zip(lengths, prompt_lens, strict=True)):
        full[i, n:] = 0
        mask[i, p - 1 : n - 1] = True
        attn[i, : n - 1] = 1
    rewards = (torch.rand(b, generator=gen) < 0.5).float()
    return {
        "input_ids": full[:, :-1].contiguous(),
        "labels": full[:, 1:].contiguous(),
        "response_mask": mask,
        "attention_mask": attn,
        "raw_rewards": rewards,
        "advantages": rewards - rewards.mean(),
        "old_log_probs": -torch.rand(b, pad_to, generator=gen) * 3,  # as if from the sampler
        "lengths": torch.tensor([n - 1 for n in lengths]),
    }


def workloads(vocab: int, quick: bool) -> dict[str, dict]:
    gen = torch.Generator().manual_seed(0)
    out = {}
    if quick:
        fixed = [(4, 64), (2, 128)]
        mix_n, mb, pr, rr, budget = 8, 4, (8, 20), (10, 100), 256
    else:
        fixed = [(8, 1024), (4, 2048)]
        mix_n, mb, pr, rr, budget = 32, 4, (80, 200), (100, 1500), 8192
    for b, seq in fixed:
        batch = make_batch([seq + 1] * b, [129 if not quick else 9] * b, seq, vocab, gen)
        out[f"{b}x{seq}"] = {"batch": batch, "micro": b, "n_micro": 1}
    b, seq = fixed[0]
    batch = make_batch([seq + 1] * (4 * b), [129 if not quick else 9] * (4 * b), seq, vocab, gen)
    out[f"ga4x{b}x{seq}"] = {"batch": batch, "micro": b, "n_micro": 4}
    p = torch.randint(pr[0], pr[1] + 1, (mix_n,), generator=gen)
    r = torch.randint(rr[0], rr[1] + 1, (mix_n,), generator=gen)
    lengths = (p + r).tolist()
    batch = make_batch(lengths, p.tolist(), max(lengths) - 1, vocab, gen)
    # naive: padded microbatches of `mb` rows (8 rows of ~1,700 padded tokens do not fit in 80 GB);
    # ours: length-sorted microbatches of at most `budget` padded tokens, trimmed
    out["mix"] = {"batch": batch, "micro": mb, "n_micro": mix_n // mb, "tokens": budget}
    return out


def flops_per_step(batch: dict, n: int, layers: int, hidden: int) -> float:
    lens = batch["lengths"].double()
    return float((6 * n * lens + 12 * layers * hidden * lens * lens).sum())


def split(
    batch: dict, micro: int, keys=("input_ids", "labels", "response_mask", "attention_mask")
) -> list[dict]:
    b = batch["input_ids"].shape[0]
    return [{k: batch[k][s : s + micro] for k in keys} for s in range(0, b, micro)]


# ----------------------------------------------------------------------------- the steps


def naive_step(model, opt, batch: dict, micro: int, device) -> None:
    """The textbook step: full logits, fp32 log_softmax, SFT loss, AdamW (on bf16 params)."""
    mbs = split(batch, micro)
    for mb in mbs:
        mb = {k: v.to(device, non_blocking=True) for k, v in mb.items()}
        am = mb["attention_mask"]
        logits = model(input_ids=mb["input_ids"], attention_mask=am if bool((am == 0).any()) else None).logits
        logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, mb["labels"].unsqueeze(-1)).squeeze(-1)
        loss = -(logp * mb["response_mask"]).sum(-1).mean() / len(mbs)
        loss.backward()
        del logits, logp, loss
    opt.step()
    opt.zero_grad(set_to_none=True)


def ours_sft(
    model, opt, batch: dict, micro: int, device, tokens: int | None = None, packing: bool = False
) -> None:
    keys = ("input_ids", "labels", "response_mask")
    if tokens is None:
        mbs = split(batch, micro, keys)
    else:
        lengths = response_lengths(batch["response_mask"])
        groups = token_budget_microbatches(lengths, tokens, packed=packing)
        mbs = [{k: batch[k][g] for k in keys} for g in groups]
    sft_update(model, opt, mbs, autocast_dtype=None, packing=packing)


def ours_pg(
    model, opt, batch: dict, micro: int, device, tokens: int | None = None, packing: bool = False
) -> None:
    rb = {
        k: batch[k]
        for k in ("input_ids", "labels", "response_mask", "raw_rewards", "advantages", "old_log_probs")
    }
    rows = micro if tokens is None else len(rb["input_ids"])
    pg_update(model, opt, rb, _grpo_clip(rows, tokens, packing and tokens is not None), seed=0)


@functools.cache
def _grpo_clip(microbatch_size: int, tokens: int | None, packing: bool) -> UpdateSettings:
    """GRPO-clip's update with the schema's defaults, cut by rows or by a token budget (parsed once)."""
    return update_settings(
        "grpo_clip", cliprange=0.2, microbatch_size=microbatch_size, microbatch_tokens=tokens, packing=packing
    )


def kernel_check(device) -> dict:
    """MasterWeightAdamW's Triton kernel against its torch path on the same grads (3 steps)."""
    gen = torch.Generator(device=device).manual_seed(3)
    w0 = [(torch.randn(n, generator=gen, device=device) * 0.02).bfloat16() for n in (3_000_000, 4096, 77)]
    grads = [[torch.randn(w.shape, generator=gen, device=device).bfloat16() for w in w0] for _ in range(3)]
    out = {}
    runs = {}
    for flag in ("1", "0"):
        os.environ["MATHPT_MASTER_KERNEL"] = flag
        ps = [torch.nn.Parameter(w.clone()) for w in w0]
        opt = MasterWeightAdamW(ps, lr=1e-4, weight_decay=0.1, betas=(0.9, 0.999))
        for gs in grads:
            for p, g in zip(ps, gs, strict=True):
                p.grad = g.clone()
            opt.clip_grad_norm_(float("inf"))
            opt.step()
        runs[flag] = (opt, ps)
        out[f"use_kernel_{flag}"] = opt.use_kernel
    os.environ["MATHPT_MASTER_KERNEL"] = "1"
    (ko, kp), (ro, rp) = runs["1"], runs["0"]
    out["master_max_abs_diff"] = max(
        float((a - b).abs().max()) for a, b in zip(ko.masters[0], ro.masters[0], strict=True)
    )
    out["update_max_abs"] = max(
        float((a - w.float()).abs().max()) for a, w in zip(ro.masters[0], w0, strict=True)
    )
    out["param_is_rounded_master"] = all(
        torch.equal(p, m.bfloat16()) for p, m in zip(kp, ko.masters[0], strict=True)
    )
    out["params_equal_torch_path"] = sum(int((a != b).sum()) for a, b in zip(kp, rp, strict=True))
    return out


def optimizer_only(model, opt, device, clip: bool, iters: int = 5) -> float:
    """Seconds per optimizer step (+ grad clipping) with random bf16 grads in place."""
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    times = []
    for _ in range(iters + 2):
        sync(device)
        t = time.perf_counter()
        if clip and hasattr(opt, "clip_grad_norm_"):
            opt.clip_grad_norm_(1.0)
        elif clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sync(device)
        times.append(time.perf_counter() - t)
    opt.zero_grad(set_to_none=True)
    return statistics.median(times[2:])


def timed(fn, warmup: int, iters: int, device) -> dict:
    for _ in range(warmup):
        fn()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    state = mem_now(device)
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return {
        "s_per_step": statistics.median(times),
        "s_min": min(times),
        "peak": mem_peak(device),
        "state_before": state,
    }


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def mem_now(device) -> float:
    return torch.cuda.memory_allocated() / GiB if device.type == "cuda" else float("nan")


def mem_peak(device) -> float:
    return torch.cuda.max_memory_allocated() / GiB if device.type == "cuda" else float("nan")


# ----------------------------------------------------------------------------- correctness


def grad_check(model, device, vocab: int, seq: int, b: int) -> dict:
    """Loss/grads of naive bf16 and ours bf16 on one batch, each against an fp32 naive reference."""
    gen = torch.Generator().manual_seed(1)
    batch = make_batch([seq + 1] * b, [min(129, seq // 2)] * b, seq, vocab, gen)
    ids, labels = batch["input_ids"].to(device), batch["labels"].to(device)
    mask = batch["response_mask"].to(device)

    def naive_loss(m):
        logits = m(input_ids=ids).logits
        logp = torch.log_softmax(logits.float(), -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        return -(logp * mask).sum(-1).mean()

    import copy

    ref_model = copy.deepcopy(model).float()
    loss_ref = naive_loss(ref_model)
    loss_ref.backward()
    ref = {n: p.grad.detach() for n, p in ref_model.named_parameters()}
    del ref_model
    out = {"loss_ref": loss_ref.item()}

    def compare(tag, loss):
        num = den = 0.0
        for n, p in model.named_parameters():
            num += (p.grad.float() - ref[n]).pow(2).sum().item()
            den += ref[n].pow(2).sum().item()
        out[f"{tag}_loss_relerr"] = abs(loss - out["loss_ref"]) / abs(out["loss_ref"])
        out[f"{tag}_grad_relerr"] = math.sqrt(num / den)
        model.zero_grad(set_to_none=True)

    model.zero_grad(set_to_none=True)
    loss = naive_loss(model)
    loss.backward()
    compare("naive_bf16", loss.item())
    lp = get_response_log_probs(model, ids, labels)["log_probs"]
    loss, _ = sft_microbatch_train_step(lp, mask, 1)
    compare("ours_bf16", loss.item())
    ref.clear()
    return out


# ----------------------------------------------------------------------------- mixed lengths


def mix_study(model, opt, work, device, args, results, save, n, L, d, peak) -> None:
    """Where the time of a mixed-length batch goes: grouping rule x attention backend, single shapes."""
    import contextlib

    from torch.nn.attention import SDPBackend, sdpa_kernel

    w = work["mix"]
    gen = torch.Generator().manual_seed(2)
    singles = {}
    for shp in args.single_shapes.split(","):
        b, t = (int(x) for x in shp.split("x"))
        singles[shp] = make_batch([t + 1] * b, [min(129, t // 2)] * b, t, model.config.vocab_size, gen)
    cases = []
    for backend in args.backends.split(","):
        for rule, kw in (
            ("rows8", {"micro": 8, "tokens": None}),
            ("tok8k", {"micro": 32, "tokens": 8192}),
            ("tok16k", {"micro": 32, "tokens": 16384}),
            ("pack16k", {"micro": 32, "tokens": 16384, "packing": True}),
            ("pack32k", {"micro": 32, "tokens": 32768, "packing": True}),
        ):
            cases.append((backend, "mix", rule, w["batch"], kw))
        for shp, batch in singles.items():
            cases.append(
                (backend, shp, "single", batch, {"micro": batch["input_ids"].shape[0], "tokens": None})
            )
    for backend, wname, rule, batch, kw in cases:
        if time.time() - T0 > args.budget_s:
            log("budget reached in mix study")
            break
        ctx = (
            (lambda: sdpa_kernel(SDPBackend.FLASH_ATTENTION))
            if backend == "flash"
            else contextlib.nullcontext
        )

        def fn(batch=batch, kw=kw, ctx=ctx):
            with ctx():
                ours_pg(
                    model,
                    opt,
                    batch,
                    kw["micro"],
                    device,
                    tokens=kw["tokens"],
                    packing=kw.get("packing", False),
                )

        try:
            r = timed(fn, args.warmup, args.iters, device)
        except Exception:
            log(f"FAILED mixstudy {backend}/{wname}/{rule}\n{traceback.format_exc()}")
            continue
        tokens = float(batch["lengths"].sum())
        fl = flops_per_step(batch, n, L, d)
        row = {
            "variant": f"mixstudy-{backend}",
            "step": "pg",
            "shape": f"{wname}/{rule}",
            "real_tokens": tokens,
            "padded_tokens": batch["input_ids"].numel(),
            "tok_s": tokens / r["s_per_step"],
            "tflops": fl / r["s_per_step"] / 1e12,
            "mfu": fl / r["s_per_step"] / 1e12 / peak,
            **r,
        }
        row["above_state_gib"] = row["peak"] - row["state_before"] - n * 2 / GiB
        results["rows"].append(row)
        save()
        log(
            f"mixstudy {backend:7s} {wname:8s} {rule:6s} {row['tok_s']:8.0f} tok/s MFU {row['mfu']:.3f} ({r['s_per_step'] * 1e3:.0f} ms)"
        )
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            ours_pg(model, opt, w["batch"], 32, device, tokens=8192)
            sync(device)
        ka = prof.key_averages()
        text = ka.table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60)
        text += "\n\n" + ka.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60)
        (Path(args.out) / "profile_pg_mix.txt").write_text(text)


# ----------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default=str(Path(__file__).with_name("qwen2.5-math-1.5b-shape.yaml")))
    ap.add_argument("--quick", action="store_true", help="tiny shape on CPU: a smoke test of this script")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--ckpt-layers", type=int, default=6, help="layers to checkpoint in the 'ckpt' variant")
    ap.add_argument("--variants", default="naive,eager,compiled,ckpt")
    ap.add_argument(
        "--single-shapes", default="5x1626,12x642,8x1024", help="single microbatches in the mix study"
    )
    ap.add_argument("--no-grad-check", action="store_true")
    ap.add_argument("--backends", default="default,flash", help="SDPA backends in the mix study")
    ap.add_argument("--profile", action="store_true", help="CUDA kernel profile of one compiled PG step")
    ap.add_argument("--budget-s", type=float, default=540, help="skip remaining work after this many seconds")
    args = ap.parse_args()
    if args.quick:
        args.shape = str(Path(__file__).with_name("tiny-shape.yaml"))
        args.warmup, args.iters = 1, 2
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    results: dict = {"argv": sys.argv, "rows": []}

    def save():
        (out_dir / "bench_train_step.json").write_text(json.dumps(results, indent=1))

    import transformers

    results["env"] = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": sys.version.split()[0],
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "cuda": torch.version.cuda,
    }
    log(f"env {results['env']}")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        import torch._dynamo as dynamo

        dynamo.config.cache_size_limit = 64
    results["matmul_peak_tflops"] = peak = matmul_peak(device)
    log(f"bf16 matmul peak {peak:.0f} TFLOP/s")

    model, shape = build_model(args.shape, device, torch.bfloat16)
    n = n_params(model)
    L, d, V = shape["num_hidden_layers"], shape["hidden_size"], shape["vocab_size"]
    results["params"] = n
    log(f"model {n / 1e9:.3f}e9 params")
    try:
        if args.no_grad_check:
            raise RuntimeError("skipped (--no-grad-check)")
        results["grad_check"] = grad_check(model, device, V, 1024 if not args.quick else 64, 2)
        log(f"grad check {results['grad_check']}")
    except Exception:
        results["grad_check_error"] = traceback.format_exc()
        log(results["grad_check_error"])
    save()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()

    work = workloads(V, args.quick)
    variants = args.variants.split(",")

    def run(variant: str, step_name: str, step_fn, opt, only: tuple[str, ...] | None = None) -> None:
        for wname, w in work.items():
            if only is not None and wname not in only:
                continue
            if time.time() - T0 > args.budget_s:
                log(f"budget reached, skipping {variant}/{step_name}/{wname}")
                return
            kw = {"tokens": w["tokens"]} if ("tokens" in w and variant != "naive") else {}
            try:
                r = timed(
                    lambda w=w, kw=kw: step_fn(model, opt, w["batch"], w["micro"], device, **kw),
                    args.warmup,
                    args.iters,
                    device,
                )
            except Exception:
                log(f"FAILED {variant}/{step_name}/{wname}\n{traceback.format_exc()}")
                results["rows"].append(
                    {
                        "variant": variant,
                        "step": step_name,
                        "shape": wname,
                        "error": traceback.format_exc()[-2000:],
                    }
                )
                save()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            tokens = float(w["batch"]["lengths"].sum())
            fl = flops_per_step(w["batch"], n, L, d)
            row = {
                "variant": variant,
                "step": step_name,
                "shape": wname,
                "real_tokens": tokens,
                "padded_tokens": w["batch"]["input_ids"].numel(),
                "tok_s": tokens / r["s_per_step"],
                "tflops": fl / r["s_per_step"] / 1e12,
                "mfu": fl / r["s_per_step"] / 1e12 / peak if peak == peak else float("nan"),
                **r,
            }
            row["above_state_gib"] = row["peak"] - row["state_before"] - n * 2 / GiB  # state: + bf16 grads
            results["rows"].append(row)
            save()
            log(
                f"{variant:9s} {step_name:4s} {wname:10s} {row['tok_s']:9.0f} tok/s  MFU {row['mfu']:.3f}  "
                f"peak {row['peak']:.1f} GiB  above-state {row['above_state_gib']:.1f} GiB  ({r['s_per_step'] * 1e3:.0f} ms)"
            )

    first = next(iter(work))
    if "naive" in variants:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
        run("naive", "sft", naive_step, opt)
        results["optimizer_only_s"] = {"naive_adamw_bf16": optimizer_only(model, opt, device, clip=False)}
        del opt
        gc.collect()
        torch.cuda.empty_cache() if device.type == "cuda" else None

    if device.type == "cuda":
        results["kernel_check"] = kernel_check(device)
        log(f"master-weight kernel check {results['kernel_check']}")
        os.environ["MATHPT_MASTER_KERNEL"] = "0"
        opt = MasterWeightAdamW(model.parameters(), lr=1e-6, betas=(0.9, 0.999), weight_decay=0.01)
        results.setdefault("optimizer_only_s", {})["master_torch_fused_adamw_plus_clip"] = optimizer_only(
            model, opt, device, clip=True
        )
        del opt
        gc.collect()
        torch.cuda.empty_cache()
        os.environ["MATHPT_MASTER_KERNEL"] = "1"
    opt = MasterWeightAdamW(model.parameters(), lr=1e-6, betas=(0.9, 0.999), weight_decay=0.01)
    results["master_kernel"] = opt.use_kernel
    results.setdefault("optimizer_only_s", {})["master_ours_plus_clip"] = optimizer_only(
        model, opt, device, clip=True
    )
    log(f"optimizer only: {results['optimizer_only_s']}")
    if "eager" in variants:
        run("eager", "sft", ours_sft, opt, only=(first, "mix"))
        run("eager", "pg", ours_pg, opt, only=(first,))
    if {"compiled", "ckpt", "mixstudy"} & set(variants):
        compile_layers(model)
        if "compiled" in variants:
            run("compiled", "sft", ours_sft, opt)
            run("compiled", "pg", ours_pg, opt)
        if "mixstudy" in variants:
            mix_study(model, opt, work, device, args, results, save, n, L, d, peak)
        if args.profile and device.type == "cuda":
            try:
                w = work[first]
                from torch.profiler import ProfilerActivity, profile

                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    ours_pg(model, opt, w["batch"], w["micro"], device)
                    sync(device)
                table = prof.key_averages().table(
                    sort_by="cuda_time_total", row_limit=30, max_name_column_width=70
                )
                (out_dir / "profile_pg_8x1024.txt").write_text(table)
                print(table[:6000])
            except Exception:
                log(f"profile failed\n{traceback.format_exc()}")
        if "ckpt" in variants:
            k = checkpoint_layers(model, args.ckpt_layers)
            results["ckpt_layers"] = k
            run("ckpt", "sft", ours_sft, opt, only=(first,))  # only where memory could need it
            run("ckpt", "pg", ours_pg, opt, only=(first,))
    save()

    print("\n| variant | step | shape | real tok/s | TFLOP/s | MFU | peak GiB | above state GiB | ms/step |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results["rows"]:
        if "error" in r:
            print(f"| {r['variant']} | {r['step']} | {r['shape']} | FAILED | | | | | |")
            continue
        print(
            f"| {r['variant']} | {r['step']} | {r['shape']} | {r['tok_s']:.0f} | {r['tflops']:.0f} | {r['mfu']:.3f} | "
            f"{r['peak']:.1f} | {r['above_state_gib']:.1f} | {r['s_per_step'] * 1e3:.0f} |"
        )
    print(f"matmul peak {peak:.0f} TFLOP/s; params {n}; grad check {results.get('grad_check')}")
    print(f"optimizer only (s/step): {results.get('optimizer_only_s')}")


if __name__ == "__main__":
    main()
