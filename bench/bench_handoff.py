"""Benchmark the dual-process runtime on one device: weight hand-off, trainer idle time, rollout throughput.

Builds a Qwen2 model from config (the Qwen2.5-Math-1.5B shape by default, random weights, no
downloads; the worker's vLLM starts from ``load_format="dummy"`` and token-id prompts, so no
tokenizer is needed), then measures:

1. hand-off: ``push_weights`` (what the trainer blocks for) and push -> applied in the worker's
   engine, for the in-memory path (``auto``: CUDA IPC on one GPU, shared memory on CPU) and the
   /dev/shm safetensors fallback (``disk``); plus a check that generations after each hand-off
   come from the new weights (vLLM's log-probs vs the trainer's own forward pass);
2. trainer idle time per optimizer step while eval jobs run in the worker (poll + submit + push);
3. rollout throughput (64 prompts x 8 samples x 512 new tokens) through the runtime vs vLLM alone
   in a fresh process with the same settings.

    python bench/bench_handoff.py --device cuda:0 --out $OUT             # the H100 run
    python bench/bench_handoff.py --shape tiny --device cpu --quick     # CPU smoke test

Prints a table and writes ``bench_handoff.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mathpt.engines.base import SamplingConfig  # noqa: E402

BENCH = Path(__file__).resolve().parent
SHAPES = {"1.5b": BENCH / "qwen2.5-math-1.5b-shape.yaml", "tiny": BENCH / "tiny-shape.yaml"}


def build_config(shape: str):
    """The Qwen2 config of a shape name (``SHAPES``) or shape file; no tokenizer (token-id prompts)."""
    from mathpt.models import load_shape, qwen2_config

    return qwen2_config(load_shape(SHAPES.get(shape, shape)))


def write_model_dir(config, path: Path) -> Path:
    """config.json only: vLLM builds the model with dummy weights (the trainer pushes real ones)."""
    path.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(path)
    return path


def build_trainer_model(config, device: str, dtype: torch.dtype):
    from mathpt.models import init_model

    return init_model(config, seed=0, device=device, dtype=dtype)


def random_prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, vocab, (n, length), generator=g).tolist()


@torch.no_grad()
def trainer_logprobs(model, gens) -> list[list[float]]:
    """Log-probs of each generation's tokens under the trainer's model (the reference)."""
    dev = next(model.parameters()).device
    out = []
    for g in gens:
        ids = torch.tensor([g.prompt_token_ids + g.token_ids], device=dev)
        logits = model(ids).logits[0, len(g.prompt_token_ids) - 1 : -1].float()
        lp = torch.log_softmax(logits, -1).gather(1, ids[0, len(g.prompt_token_ids) :, None]).squeeze(1)
        out.append(lp.tolist())
    return out


def logprob_gap(model, gens) -> float:
    """Mean |engine log-prob - trainer log-prob| over all generated tokens."""
    ref = trainer_logprobs(model, gens)
    diffs = [abs(a - b) for g, r in zip(gens, ref, strict=True) for a, b in zip(g.logprobs, r, strict=True)]
    return sum(diffs) / len(diffs)


@torch.no_grad()
def perturb(model, scale: float = 0.02, seed: int = 0) -> None:
    """A stand-in for an optimizer update that moves every weight (and so every generation)."""
    g = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    for p in model.parameters():
        p.add_(
            torch.randn(p.shape, generator=g, device=p.device, dtype=p.dtype)
            * scale
            * p.float().std().to(p.dtype)
        )


def med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


# ---------------------------------------------------------------- measurements


def measure_handoff(client, model, reps: int, probe, version: int) -> tuple[dict, int]:
    """push_weights (trainer blocked) and push -> applied (worker idle), plus the new-weights check."""
    push_s, total_s, gaps_new, gaps_old = [], [], [], []
    for i in range(reps):
        perturb(model, seed=version)
        check = i < 3  # the correctness check costs two generations + forward passes
        if check:
            before = client.wait(client.submit("eval", probe[0], probe[1], step=version))  # old weights
        version += 1
        _sync(model)
        t0 = time.perf_counter()
        push_s.append(client.push_weights(model, version))
        client.wait_applied(version)
        total_s.append(time.perf_counter() - t0)
        if check:
            after = client.wait(client.submit("eval", probe[0], probe[1], step=version))
            assert after.weight_version == version, (after.weight_version, version)
            gaps_new.append(logprob_gap(model, after.generations))
            gaps_old.append(logprob_gap(model, before.generations))
    return {
        "mode": client.handoff_mode,
        "push_ms_median": 1e3 * med(push_s),
        "push_ms_min": 1e3 * min(push_s),
        "push_ms_max": 1e3 * max(push_s),
        "push_to_applied_ms_median": 1e3 * med(total_s),
        "push_to_applied_ms_min": 1e3 * min(total_s),
        "reps": reps,
        "logprob_gap_new_weights": med(gaps_new),
        "logprob_gap_previous_weights": med(gaps_old),
    }, version


def _sync(model) -> None:
    if next(model.parameters()).is_cuda:
        torch.cuda.synchronize()


def measure_idle(
    client,
    model,
    steps: int,
    batch: tuple[int, int],
    eval_every: int,
    eval_job,
    version: int,
    push_every: int,
):
    """Train ``steps`` optimizer steps while eval jobs run in the worker; time what blocks the trainer.

    Idle = poll (before the optimizer step) + push_weights + submit. The device is synchronized
    before each push so the optimizer's own kernels count as step time, not as hand-off time.
    """
    dev = next(model.parameters()).device
    vocab = model.config.vocab_size
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, foreach=True)
    g = torch.Generator().manual_seed(1)
    rows = []
    evals = 0
    for step in range(steps + 2):  # the first two warm up (allocator, optimizer state)
        t_step = time.perf_counter()
        ids = torch.randint(2, vocab, batch, generator=g).to(dev)
        loss = model(ids, labels=ids).loss
        loss.backward()
        t_idle = time.perf_counter()
        results = client.poll()  # drained before the optimizer step, never blocks
        idle_poll = time.perf_counter() - t_idle
        evals += sum(r.kind == "eval" and r.ok for r in results)
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(model)
        idle_push = 0.0
        if step % push_every == 0:
            version += 1
            idle_push = client.push_weights(model, version)
        t_sub = time.perf_counter()
        if step % eval_every == 0:
            client.submit("eval", eval_job[0], eval_job[1], step=step)
        idle_submit = time.perf_counter() - t_sub
        _sync(model)
        dt = time.perf_counter() - t_step
        if step >= 2:
            rows.append((dt, idle_poll, idle_push, idle_submit))
    while client.pending:  # let the last evals finish (not timed)
        evals += sum(r.kind == "eval" and r.ok for r in client.poll())
        time.sleep(0.05)
    idle = [r[1] + r[2] + r[3] for r in rows]
    pushes = [r[2] for r in rows if r[2] > 0]
    return {
        "steps": steps,
        "batch": list(batch),
        "eval_every": eval_every,
        "push_every": push_every,
        "evals_finished": evals,
        "step_s_median": med([r[0] for r in rows]),
        "step_s_mean": sum(r[0] for r in rows) / len(rows),
        "idle_ms_median": 1e3 * med(idle),
        "idle_ms_mean": 1e3 * sum(idle) / len(idle),
        "idle_fraction_total": sum(idle) / sum(r[0] for r in rows),
        "poll_ms_median": 1e3 * med([r[1] for r in rows]),
        "push_ms_median": 1e3 * med(pushes),
        "push_ms_max": 1e3 * max(pushes),
        "submit_ms_median": 1e3 * med([r[3] for r in rows]),
    }, version


def measure_step_alone(model, steps: int, batch: tuple[int, int]) -> float:
    """Median optimizer step time with the worker idle (to see the contention from eval jobs)."""
    dev = next(model.parameters()).device
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, foreach=True)
    g = torch.Generator().manual_seed(3)
    times = []
    for _ in range(steps + 2):
        t0 = time.perf_counter()
        ids = torch.randint(2, model.config.vocab_size, batch, generator=g).to(dev)
        model(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(model)
        times.append(time.perf_counter() - t0)
    del opt
    return med(times[2:])


def measure_throughput(client, prompts, params: SamplingConfig, reps: int) -> dict:
    warm = SamplingConfig(max_new_tokens=16, n=params.n, seed=1)  # full batch, short: allocations, kernels
    client.wait(client.submit("rollout", prompts, warm, step=0))
    rates, e2e = [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        r = client.wait(client.submit("rollout", prompts, params, step=0)).raise_for_error()
        dt = time.perf_counter() - t0
        toks = sum(len(g.token_ids) for g in r.generations)
        e2e.append(toks / dt)
        rates.append(toks / r.elapsed_s)
    return {
        "tokens": toks,
        "tok_s_end_to_end": med(e2e),
        "tok_s_in_worker": med(rates),
        "tok_s_end_to_end_all": e2e,
        "tok_s_in_worker_all": rates,
    }


def _vllm_alone(model_dir: str, engine_kwargs: dict, prompts, params: SamplingConfig, reps: int, q) -> None:
    """In a fresh process: plain vLLM ``LLM.generate`` with the same settings (the baseline)."""
    try:
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        from vllm import LLM, SamplingParams

        kw = dict(engine_kwargs)
        t0 = time.perf_counter()
        llm = LLM(model=model_dir, **kw)
        start_s = time.perf_counter() - t0
        sp = SamplingParams(
            n=params.n,
            temperature=params.temperature,
            top_p=params.top_p,
            max_tokens=params.max_new_tokens,
            logprobs=0 if params.logprobs else None,
            seed=params.seed,
            detokenize=False,
        )
        inputs = [{"prompt_token_ids": p} for p in prompts]
        llm.generate(
            inputs, SamplingParams(max_tokens=16, n=params.n, seed=1, detokenize=False), use_tqdm=False
        )
        rates = []
        for _ in range(reps):
            t0 = time.perf_counter()
            outs = llm.generate(inputs, sp, use_tqdm=False)
            dt = time.perf_counter() - t0
            toks = sum(len(c.token_ids) for o in outs for c in o.outputs)
            rates.append(toks / dt)
        q.put({"tok_s": med(rates), "tok_s_all": rates, "tokens": toks, "engine_start_s": start_s})
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        import traceback

        q.put({"error": f"{e!r}\n{traceback.format_exc()}"})


def vllm_alone(model_dir, engine_kwargs, prompts, params, reps) -> dict:
    ctx = torch.multiprocessing.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_vllm_alone, args=(str(model_dir), engine_kwargs, prompts, params, reps, q))
    p.start()
    res = q.get()
    p.join(timeout=60)
    if p.is_alive():
        p.kill()
    return res


# ---------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="1.5b", help=f"{' or '.join(SHAPES)} or a shape file")
    ap.add_argument("--device", default="cuda:0")
    ap.add_argument("--handoff", default="auto")
    ap.add_argument("--gpu-mem", type=float, default=0.45, help="vLLM's share of the shared GPU")
    ap.add_argument(
        "--compiled", action="store_true", help="torch.compile + CUDA graphs (default: enforce_eager)"
    )
    ap.add_argument("--quick", action="store_true", help="small sizes (CPU smoke test)")
    ap.add_argument(
        "--skip", default="", help="comma list of phases to skip: alone,handoff,disk,idle,throughput"
    )
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    a = ap.parse_args()
    skip = set(filter(None, a.skip.split(",")))

    on_gpu = a.device.startswith("cuda")
    dtype = torch.bfloat16 if on_gpu else torch.float32
    config = build_config(a.shape)
    model_dir = write_model_dir(
        config, Path(os.environ.get("TMPDIR", "/tmp")) / f"mathpt_bench_{Path(a.shape).stem}"
    )
    engine_kwargs = dict(
        dtype="bfloat16" if on_gpu else "float32",
        load_format="dummy",
        skip_tokenizer_init=True,
        enforce_eager=not a.compiled,
        max_model_len=min(1024, config.max_position_embeddings),
        seed=0,
    )
    if on_gpu:
        engine_kwargs["gpu_memory_utilization"] = a.gpu_mem
    else:
        engine_kwargs["kv_cache_memory_bytes"] = 256 << 20
    if a.quick:
        n_prompts, n_samples, new_tokens, prompt_len = 8, 4, 64, 32
        train_batch, idle_steps, eval_prompts, eval_tokens = (2, 64), 6, 8, 32
    else:
        n_prompts, n_samples, new_tokens, prompt_len = 64, 8, 512, 128
        train_batch, idle_steps, eval_prompts, eval_tokens = (4, 1024), 20, 64, 256
    vocab = config.vocab_size
    rollout_prompts = random_prompts(n_prompts, prompt_len, vocab, seed=0)
    rollout_params = SamplingConfig(max_new_tokens=new_tokens, temperature=1.0, n=n_samples, seed=0)
    probe = (random_prompts(8, 32, vocab, seed=1), SamplingConfig(max_new_tokens=16, temperature=0.0))
    eval_job = (
        random_prompts(eval_prompts, prompt_len, vocab, seed=2),
        SamplingConfig(max_new_tokens=eval_tokens, temperature=0.0),
    )
    report: dict = {
        "shape": a.shape,
        "device": a.device,
        "engine_kwargs": engine_kwargs,
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0) if on_gpu else "cpu",
    }

    def log(msg: str) -> None:
        print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)

    if "alone" not in skip:
        log("vLLM alone (fresh process)")
        report["vllm_alone"] = vllm_alone(model_dir, engine_kwargs, rollout_prompts, rollout_params, reps=3)
        log(f"vLLM alone: {report['vllm_alone']}")

    log("building the trainer model")
    model = build_trainer_model(config, a.device, dtype)
    report["params"] = sum(p.numel() for p in model.parameters())
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        (out / "bench_handoff.json").write_text(json.dumps(report, indent=2, default=str))

    sizes = dict(
        probe=probe,
        eval_job=eval_job,
        rollout_prompts=rollout_prompts,
        rollout_params=rollout_params,
        train_batch=train_batch,
        idle_steps=idle_steps,
        save=save,
    )
    try:
        runtime_phases(report, model, model_dir, a.device, a.handoff, engine_kwargs, skip, sizes, log)
    except Exception:  # noqa: BLE001 - keep what was measured; retry with the shared-memory path
        import traceback

        report[f"error_{a.handoff}"] = traceback.format_exc()
        log(f"runtime phases failed with handoff={a.handoff}:\n{report[f'error_{a.handoff}']}")
        if a.handoff != "shm":
            runtime_phases(
                report, model, model_dir, a.device, "shm", engine_kwargs, skip | {"disk"}, sizes, log
            )
    save()
    print_table(report)


def runtime_phases(report, model, model_dir, device, handoff, engine_kwargs, skip, sz, log) -> None:
    """One worker, then each phase; a failing phase is recorded and the next one still runs."""
    from mathpt.runtime import InferenceClient

    state = {"version": 0}
    t0 = time.perf_counter()
    with InferenceClient(
        "vllm", model_dir, device=device, handoff=handoff, engine_kwargs=engine_kwargs, heartbeat_timeout_s=60
    ) as client:
        client.wait_ready()
        report["runtime_engine_start_s"] = time.perf_counter() - t0
        log(f"worker ready after {report['runtime_engine_start_s']:.1f} s")
        state["version"] += 1
        report["first_push_s"] = client.push_weights(model, state["version"])  # sets the hand-off up
        client.wait_applied(state["version"])

        def handoff_phase():
            report["handoff"], state["version"] = measure_handoff(
                client, model, 10, sz["probe"], state["version"]
            )

        def disk_phase():
            client.set_handoff("disk")
            try:
                report["handoff_disk"], state["version"] = measure_handoff(
                    client, model, 3, sz["probe"], state["version"]
                )
            finally:
                client.set_handoff(handoff)
                state["version"] += 1
                client.push_weights(model, state["version"])

        def throughput_phase():
            report["throughput"] = measure_throughput(
                client, sz["rollout_prompts"], sz["rollout_params"], reps=3
            )

        def idle_phase():
            report["step_s_worker_idle"] = measure_step_alone(model, 6, sz["train_batch"])
            # PG-like: weights pushed after every optimizer step; SFT-like: only with each eval job
            for name, push_every in (("idle_push_every_step", 1), ("idle_push_with_eval", 5)):
                report[name], state["version"] = measure_idle(
                    client,
                    model,
                    sz["idle_steps"],
                    sz["train_batch"],
                    eval_every=5,
                    eval_job=sz["eval_job"],
                    version=state["version"],
                    push_every=push_every,
                )

        for name, fn in (
            ("handoff", handoff_phase),
            ("disk", disk_phase),
            ("throughput", throughput_phase),
            ("idle", idle_phase),
        ):
            if name in skip:
                continue
            try:
                fn()
                log(
                    f"{name}: "
                    + json.dumps(
                        {k: v for k, v in report.items() if k.startswith((name, "idle_", "step_"))},
                        default=str,
                    )
                )
            except Exception:  # noqa: BLE001 - keep the other phases' numbers
                import traceback

                report[f"error_{name}"] = traceback.format_exc()
                log(f"phase {name} failed:\n{report[f'error_{name}']}")
            sz["save"]()


def print_table(r: dict) -> None:
    rows = []
    if "handoff" in r:
        h = r["handoff"]
        rows += [
            (f"hand-off {h['mode']}: push_weights (trainer blocked)", f"{h['push_ms_median']:.1f} ms median"),
            (
                f"hand-off {h['mode']}: push -> applied in engine",
                f"{h['push_to_applied_ms_median']:.1f} ms median",
            ),
            (
                "  log-prob gap new / previous weights",
                f"{h['logprob_gap_new_weights']:.4f} / {h['logprob_gap_previous_weights']:.4f}",
            ),
        ]
    if "handoff_disk" in r:
        h = r["handoff_disk"]
        rows += [
            ("hand-off disk (/dev/shm): push (save)", f"{h['push_ms_median']:.0f} ms median"),
            ("hand-off disk (/dev/shm): push -> applied", f"{h['push_to_applied_ms_median']:.0f} ms median"),
        ]
    if "step_s_worker_idle" in r:
        rows.append(("trainer step, worker idle", f"{r['step_s_worker_idle'] * 1e3:.0f} ms median"))
    for name in ("idle_push_every_step", "idle_push_with_eval"):
        if name in r:
            i = r[name]
            rows += [
                (f"{name}: trainer step (evals running)", f"{i['step_s_median'] * 1e3:.0f} ms median"),
                (
                    f"{name}: idle (poll+push+submit)",
                    f"{i['idle_ms_mean']:.1f} ms/step = {100 * i['idle_fraction_total']:.2f}% of step time",
                ),
                (
                    f"{name}:   push_weights",
                    f"{i['push_ms_median']:.1f} ms median, {i['push_ms_max']:.1f} max",
                ),
            ]
    if "throughput" in r:
        t = r["throughput"]
        rows += [
            ("rollouts via runtime (end to end)", f"{t['tok_s_end_to_end']:.0f} tok/s"),
            ("rollouts via runtime (generate in worker)", f"{t['tok_s_in_worker']:.0f} tok/s"),
        ]
    if "vllm_alone" in r and "tok_s" in r["vllm_alone"]:
        rows.append(("vLLM alone", f"{r['vllm_alone']['tok_s']:.0f} tok/s"))
        if "throughput" in r:
            rows.append(
                (
                    "runtime / vLLM alone",
                    f"{r['throughput']['tok_s_end_to_end'] / r['vllm_alone']['tok_s']:.3f}",
                )
            )
    w = max(len(k) for k, _ in rows) if rows else 0
    print(f"\n{r['shape']} on {r['gpu']} ({r.get('params', 0) / 1e9:.2f}e9 params)")
    for k, v in rows:
        print(f"{k:<{w}}  {v}")


if __name__ == "__main__":
    main()
