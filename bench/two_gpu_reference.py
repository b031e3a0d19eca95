"""The reference layout (issue 10): trainer on GPU 0, vLLM worker on GPU 1, NCCL broadcast hand-off.

Needs a machine with two GPUs (the ``nvidia-h200-x2`` kind). Builds the Qwen2.5-Math-1.5B shape
from config (random weights; vLLM starts from dummy weights and gets the trainer's through the
first hand-off), then:

1. hand-off: ``push_weights`` over NCCL (trainer blocked, and push -> applied in the engine) vs the
   /dev/shm safetensors fallback, each checked: after the hand-off, greedy generations' vLLM
   log-probs match the trainer's forward pass on the new weights;
2. a short policy-gradient-like loop (rollouts -> per-token log-probs -> REINFORCE-style loss with
   random advantages -> AdamW -> push) with synchronous rollouts (``max_staleness=0``) and
   one-step-ahead rollouts (``max_staleness=1``), measuring the trainer's idle fraction per step
   (waiting for rollouts + pushing weights). Each step also checks where the rollouts came from:
   with staleness 0 their vLLM log-probs must match the trainer's current weights.

NVLink multicast stays off (a program that uses it can take the host's GPUs out of service):
NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1, NVSHMEM_DISABLE_NVLS=1 are forced below,
before anything initializes CUDA, and the spawned worker inherits them.

    python bench/two_gpu_reference.py --out $OUT                 # on 2 GPUs
    python bench/two_gpu_reference.py --shape tiny --cpu --quick  # CPU smoke test (gloo instead of NCCL)
"""

from __future__ import annotations

import os

for _k, _v in {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}.items():
    os.environ[_k] = _v  # forced, not setdefault: these must never be on

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_handoff import (  # noqa: E402
    _sync,
    build_config,
    build_trainer_model,
    measure_handoff,
    med,
    random_prompts,
    write_model_dir,
)

from mathpt.engines.base import SamplingConfig  # noqa: E402


def sequence_logprobs(model, gens, micro: int, grad: bool) -> list[torch.Tensor]:
    """Per-token log-probs of each generation's response under ``model`` (chunks of ``micro`` rows)."""
    dev = next(model.parameters()).device
    out = []
    for i in range(0, len(gens), micro):
        chunk = gens[i : i + micro]
        seqs = [g.prompt_token_ids + g.token_ids for g in chunk]
        width = max(len(s) for s in seqs)
        ids = torch.zeros((len(seqs), width), dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for r, s in enumerate(seqs):
            ids[r, : len(s)] = torch.tensor(s)
            mask[r, : len(s)] = 1
        ids, mask = ids.to(dev), mask.to(dev)
        with torch.set_grad_enabled(grad):
            logits = model(ids, attention_mask=mask).logits[:, :-1]
            lp = torch.log_softmax(logits.float(), -1).gather(2, ids[:, 1:, None]).squeeze(2)
        for r, g in enumerate(chunk):
            n = len(g.prompt_token_ids)
            out.append(lp[r, n - 1 : n - 1 + len(g.token_ids)])
    return out


def pg_loop(client, model, opt, steps: int, staleness: int, prompts, params, micro: int, version: int, log):
    """REINFORCE-like steps fed by a RolloutPipeline; returns per-step timings and checks."""
    from mathpt.runtime import RolloutPipeline

    n = len(prompts)
    per_step = max(1, n // max(1, steps))
    pipe = RolloutPipeline(
        client,
        params,
        lambda s: (prompts[(s * per_step) % n :][:per_step] or prompts[:per_step], {"step": s}),
        max_staleness=staleness,
    )
    rows = []
    g = torch.Generator().manual_seed(0)
    for step in range(steps):
        t0 = time.perf_counter()
        res = pipe.get(step)
        wait_s = time.perf_counter() - t0
        gens = res.generations
        lag = client.pushed_version - res.weight_version
        # where did the rollouts come from? their vLLM log-probs vs the trainer's current weights
        with torch.no_grad():
            cur = sequence_logprobs(model, gens, micro, grad=False)
        gap = float(
            torch.cat([c - torch.tensor(x.logprobs, device=c.device) for c, x in zip(cur, gens, strict=True)])
            .abs()
            .mean()
        )
        adv = torch.randn(len(gens), generator=g)
        adv = (adv - adv.mean()) / (adv.std() + 1e-6)
        for i in range(0, len(gens), micro):
            lps = sequence_logprobs(model, gens[i : i + micro], micro, grad=True)
            loss = -sum(a * lp.mean() for a, lp in zip(adv[i : i + micro].tolist(), lps, strict=True)) / len(
                gens
            )
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(model)
        version += 1
        push_s = client.push_weights(model, version)
        dt = time.perf_counter() - t0
        tokens = sum(len(x.token_ids) for x in gens)
        rows.append(
            {
                "step": step,
                "step_s": dt,
                "wait_s": wait_s,
                "push_s": push_s,
                "idle_fraction": (wait_s + push_s) / dt,
                "rollout_version": res.weight_version,
                "lag": lag,
                "logprob_gap_vs_trainer": gap,
                "rollout_tokens": tokens,
            }
        )
        log(f"staleness {staleness} step {step}: {rows[-1]}")
    timed = rows[1:] if len(rows) > 1 else rows  # step 0 waits for the first batch in both modes
    return {
        "max_staleness": staleness,
        "steps": steps,
        "step_s_median": med([r["step_s"] for r in timed]),
        "idle_fraction_total": sum(r["wait_s"] + r["push_s"] for r in timed)
        / sum(r["step_s"] for r in timed),
        "wait_ms_median": 1e3 * med([r["wait_s"] for r in timed]),
        "push_ms_median": 1e3 * med([r["push_s"] for r in timed]),
        "rows": rows,
    }, version


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="1.5b")
    ap.add_argument(
        "--cpu", action="store_true", help="both processes on CPU, gloo instead of NCCL (smoke test)"
    )
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--gpu-mem", type=float, default=0.85, help="vLLM's share of GPU 1")
    ap.add_argument("--compiled", action="store_true")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    a = ap.parse_args()

    from mathpt.runtime import InferenceClient

    if not a.cpu and torch.cuda.device_count() < 2:
        sys.exit(
            f"two_gpu_reference.py needs 2 GPUs, found {torch.cuda.device_count()} (use --cpu for a smoke test)"
        )
    trainer_dev, worker_dev = ("cpu", "cpu") if a.cpu else ("cuda:0", "cuda:1")
    dtype = torch.float32 if a.cpu else torch.bfloat16
    config = build_config(a.shape)
    model_dir = write_model_dir(
        config, Path(os.environ.get("TMPDIR", "/tmp")) / f"mathpt_bench_{Path(a.shape).stem}"
    )
    engine_kwargs = dict(
        dtype="float32" if a.cpu else "bfloat16",
        load_format="dummy",
        skip_tokenizer_init=True,
        enforce_eager=not a.compiled,
        max_model_len=min(2048, config.max_position_embeddings),
        seed=0,
    )
    if a.cpu:
        engine_kwargs["kv_cache_memory_bytes"] = 256 << 20
    else:
        engine_kwargs["gpu_memory_utilization"] = a.gpu_mem
    n_prompts, n_samples, new_tokens, micro = (8, 2, 32, 4) if a.quick else (32, 8, 512, 8)
    vocab = config.vocab_size
    prompts = random_prompts(n_prompts * a.steps, 128 if not a.quick else 16, vocab, seed=5)
    params = SamplingConfig(max_new_tokens=new_tokens, temperature=1.0, n=n_samples, seed=0)
    probe = (random_prompts(8, 32, vocab, seed=1), SamplingConfig(max_new_tokens=16, temperature=0.0))
    report: dict = {
        "shape": a.shape,
        "trainer": trainer_dev,
        "worker": worker_dev,
        "engine_kwargs": engine_kwargs,
        "nccl_env": {k: os.environ[k] for k in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST")},
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
    }
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)

    def log(msg: str) -> None:
        print(f"[2gpu {time.strftime('%H:%M:%S')}] {msg}", flush=True)

    def save() -> None:
        (out / "two_gpu_reference.json").write_text(json.dumps(report, indent=2, default=str))

    model = build_trainer_model(config, trainer_dev, dtype)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, foreach=True)
    version = 0
    with InferenceClient(
        "vllm",
        model_dir,
        device=worker_dev,
        handoff="nccl",
        engine_kwargs=engine_kwargs,
        heartbeat_timeout_s=120,
    ) as client:
        t0 = time.perf_counter()
        client.wait_ready()
        report["engine_start_s"] = time.perf_counter() - t0
        version += 1
        report["first_push_s"] = client.push_weights(model, version)  # includes the NCCL rendezvous
        client.wait_applied(version)
        report["handoff_nccl"], version = measure_handoff(client, model, 10, probe, version)
        log(f"nccl: {report['handoff_nccl']}")
        save()
        client.set_handoff("disk")
        report["handoff_disk"], version = measure_handoff(client, model, 3, probe, version)
        log(f"disk: {report['handoff_disk']}")
        client.set_handoff("nccl")
        version += 1
        client.push_weights(model, version)
        save()
        for staleness in (0, 1):
            report[f"pg_staleness_{staleness}"], version = pg_loop(
                client, model, opt, a.steps, staleness, prompts, params, micro, version, log
            )
            save()
    print(f"\n{a.shape}: trainer {trainer_dev}, worker {worker_dev}")
    for k in ("handoff_nccl", "handoff_disk"):
        h = report[k]
        print(
            f"{k:<22} push {h['push_ms_median']:8.1f} ms  push->applied {h['push_to_applied_ms_median']:8.1f} ms  "
            f"log-prob gap new/prev {h['logprob_gap_new_weights']:.4f}/{h['logprob_gap_previous_weights']:.4f}"
        )
    for s in (0, 1):
        p = report[f"pg_staleness_{s}"]
        print(
            f"pg max_staleness={s}:    step {p['step_s_median'] * 1e3:8.0f} ms  idle {100 * p['idle_fraction_total']:5.1f}%  "
            f"(wait {p['wait_ms_median']:.0f} ms, push {p['push_ms_median']:.1f} ms)"
        )
    save()


if __name__ == "__main__":
    main()
