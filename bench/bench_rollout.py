"""Rollout throughput, engine start-up and the sampler-vs-trainer log-prob gap of the vLLM engine
as the pipeline uses it (issues 16.2, 16.3 and 14.1), at the Qwen2.5-Math-1.5B shape.

Each phase runs in its own process (``bench/gpu_suite.sh`` calls them in order), so engine
settings and start-up times are those of a fresh job:

    python bench/bench_rollout.py prepare --model-dir .benchsnap/model1p5b --out /tmp/bm
    python bench/bench_rollout.py engine --model /tmp/bm --label inproc --variants pipeline,noseed,bare
    python bench/bench_rollout.py engine --model /tmp/bm --label mp --mp --variants mp_pipeline,mp_bare
    python bench/bench_rollout.py gap --model /tmp/bm --scales 1,4,10

``prepare`` writes random-init bf16 weights (seed 0) beside the tokenizer/config made on the CPU
machine by ``bench/make_bench_model_dir.py`` (vocab 151,936), plus 64 GSM8K prompts in the r1_zero
format. Every phase appends one JSON line to ``--json``.

Sampling variants (64 prompts x 8 samples, up to 1,024 new tokens, temperature 1):
- ``seeded``: plain ``LLM.generate`` with what the engine asked for before this change (a seed per
  request, the sampled tokens' log-probs as one dict per token, the stop string, detokenized text);
- ``pipeline``: ``VLLMEngine.generate`` exactly as ``train_pg`` calls it (today's engine code,
  conversion to ``Generation`` included);
- ``noseed``: the same without a per-request seed (vLLM's sampler draws seeded requests one row at a time);
- ``noseed_flat``: ``noseed`` with ``flat_logprobs`` (no per-token Logprob dicts);
- ``noseed_nolp``: ``noseed`` without log-probs;
- ``bare``: no seed, no log-probs, no stop string, no detokenization (vLLM alone).
``--mp`` builds a plain ``LLM`` with the engine core in its own process (vLLM's default), where
output processing overlaps the GPU; variants ``mp_*`` are the same sampling settings there.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

T_START = time.perf_counter()
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

STYLE = "r1_zero"
N_PROMPTS, N_SAMPLES = 64, 8


def log(msg: str) -> None:
    print(f"[bench_rollout {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def emit(path: str, row: dict) -> None:
    row = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **row}
    with open(path, "a") as f:
        f.write(json.dumps(row, default=str) + "\n")
    log(json.dumps(row, default=str)[:2000])


# ---------------------------------------------------------------- prepare


def prepare(a) -> None:
    """Random-init weights (bf16, seed 0) + tokenizer + prompts files, for every later phase."""
    import shutil

    from transformers import AutoConfig, AutoTokenizer

    from mathpt.models import init_model
    from mathpt.prompts import format_prompt

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for f in Path(a.model_dir).iterdir():
        shutil.copy(f, out / f.name)
    config = AutoConfig.from_pretrained(out)
    t0 = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = init_model(config, seed=0, device=device, dtype=torch.bfloat16)
    model.save_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    rows = [json.loads(x) for x in Path(a.gsm8k).read_text().splitlines() if x.strip()]
    prompts = []
    for i, r in enumerate(rows[: max(N_PROMPTS, a.n_train)]):
        answer = r["answer"].split("####")[-1].strip().replace(",", "")
        prompts.append({"id": f"train-{i}", "prompt": format_prompt(r["question"], STYLE), "answer": answer})
    (out / "prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts))
    (out / "val.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts[:8]))
    lens = [len(tok(p["prompt"]).input_ids) for p in prompts[:N_PROMPTS]]
    emit(
        a.json,
        {
            "phase": "prepare",
            "params": sum(p.numel() for p in model.parameters()),
            "save_s": time.perf_counter() - t0,
            "prompt_tokens_mean": statistics.mean(lens),
            "prompt_tokens_max": max(lens),
            "n_prompts_file": len(prompts),
        },
    )


def load_prompts(model: str) -> list[dict]:
    return [json.loads(x) for x in (Path(model) / "prompts.jsonl").read_text().splitlines()][:N_PROMPTS]


# ---------------------------------------------------------------- engine throughput


def engine_info(llm) -> dict:
    """The settings vLLM actually chose (defaults resolved) and the KV-cache size."""
    info = {}
    try:
        vc = llm.llm_engine.vllm_config
        info.update(
            max_num_seqs=vc.scheduler_config.max_num_seqs,
            max_num_batched_tokens=vc.scheduler_config.max_num_batched_tokens,
            async_scheduling=vc.scheduler_config.async_scheduling,
            num_gpu_blocks=vc.cache_config.num_gpu_blocks,
            block_size=vc.cache_config.block_size,
            cudagraph_max=vc.compilation_config.max_cudagraph_capture_size,
            enforce_eager=vc.model_config.enforce_eager,
        )
        if info["num_gpu_blocks"]:
            info["kv_cache_tokens"] = info["num_gpu_blocks"] * info["block_size"]
    except Exception as e:  # noqa: BLE001 - informative only
        info["info_error"] = repr(e)
    return info


def sampling_params(variant: str, max_tokens: int, seed: int):
    from vllm import SamplingParams

    base = variant.removeprefix("mp_")
    kw = dict(n=N_SAMPLES, temperature=1.0, top_p=1.0, max_tokens=max_tokens, include_stop_str_in_output=True)
    if base in ("seeded", "noseed", "noseed_flat", "noseed_nolp"):
        kw["stop"] = ["</answer>"]
    if base in ("seeded", "noseed", "noseed_flat"):
        kw["logprobs"] = 0
    if base == "seeded":
        kw["seed"] = seed
    if base == "noseed_flat":
        kw["flat_logprobs"] = True
    if base == "bare":
        kw["detokenize"] = False
    return SamplingParams(**kw)


def run_engine(a) -> None:
    t_imp0 = time.perf_counter()
    if not a.mp:
        from mathpt.engines.vllm_engine import VLLMEngine
    else:
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1"
    from vllm import LLM

    t_import = time.perf_counter() - t_imp0
    prompts = load_prompts(a.model)
    kw = dict(gpu_memory_utilization=a.gpu_mem, max_model_len=a.max_model_len, seed=0, dtype=a.dtype)
    kw.update(json.loads(a.engine_kwargs))
    t0 = time.perf_counter()
    if a.mp:
        llm = LLM(model=a.model, enforce_eager=False, **kw)
        engine = None
    else:
        engine = VLLMEngine(a.model, device=a.device, **kw)
        llm = engine.llm
    start_s = time.perf_counter() - t0
    first_token_s = None
    t1 = time.perf_counter()
    from vllm import SamplingParams

    llm.generate([prompts[0]["prompt"]], SamplingParams(max_tokens=1), use_tqdm=False)
    first_token_s = time.perf_counter() - t1
    row = {
        "phase": "engine",
        "label": a.label,
        "mp": a.mp,
        "engine_kwargs": kw,
        "import_s": t_import,
        "process_to_import_s": t_imp0 - T_START,
        "engine_start_s": start_s,
        "first_token_s": first_token_s,
        "since_process_start_s": time.perf_counter() - T_START,
        "cache_root": os.environ.get("VLLM_CACHE_ROOT"),
        **engine_info(llm),
    }
    emit(a.json, row)
    texts = [p["prompt"] for p in prompts]
    # warm-up: the full batch, short (allocations, sampler paths)
    llm.generate(texts, SamplingParams(n=N_SAMPLES, max_tokens=16), use_tqdm=False)
    for variant in a.variants.split(","):
        for rep in range(a.reps):
            seed = 1_000_003 + rep
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            if variant in ("pipeline", "pipeline_nolp") and engine is not None:
                from mathpt.engines.base import SamplingConfig

                gens = engine.generate(
                    texts,
                    SamplingConfig(
                        max_new_tokens=a.max_tokens,
                        temperature=1.0,
                        n=N_SAMPLES,
                        stop=("</answer>",),
                        seed=seed,
                        logprobs=variant == "pipeline",
                    ),
                )
                dt = time.perf_counter() - t0
                lengths = [len(g.token_ids) for g in gens]
                stopped = sum(g.finish_reason == "stop" for g in gens)
            else:
                outs = llm.generate(texts, sampling_params(variant, a.max_tokens, seed), use_tqdm=False)
                dt = time.perf_counter() - t0
                lengths = [len(c.token_ids) for o in outs for c in o.outputs]
                stopped = sum(c.finish_reason == "stop" for o in outs for c in o.outputs)
            toks = sum(lengths)
            emit(
                a.json,
                {
                    "phase": "throughput",
                    "label": a.label,
                    "variant": variant,
                    "rep": rep,
                    "seconds": dt,
                    "tokens": toks,
                    "tok_s": toks / dt,
                    "sequences": len(lengths),
                    "mean_len": toks / len(lengths),
                    "stopped": stopped,
                    "max_tokens": a.max_tokens,
                },
            )


# ---------------------------------------------------------------- log-prob gap


@torch.no_grad()
def trainer_log_probs(model, gens, mb: int = 16) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per-response-token log-probs and entropies under the trainer's own path (bf16 model, regional
    torch.compile, the chunked fp32 head of ``mathpt.functional``), right-padded microbatches."""
    from mathpt.functional import get_response_log_probs

    lps, ents = [], []
    for i in range(0, len(gens), mb):
        chunk = gens[i : i + mb]
        seqs = [g.prompt_token_ids + g.token_ids for g in chunk]
        width = max(len(s) for s in seqs) - 1
        ids = torch.zeros((len(seqs), width), dtype=torch.long)
        labels = torch.zeros_like(ids)
        for j, s in enumerate(seqs):
            t = torch.tensor(s)
            ids[j, : len(s) - 1] = t[:-1]
            labels[j, : len(s) - 1] = t[1:]
        dev = next(model.parameters()).device
        out = get_response_log_probs(model, ids.to(dev), labels.to(dev), return_token_entropy=True)
        for j, g in enumerate(chunk):
            p = len(g.prompt_token_ids)
            sl = slice(p - 1, p - 1 + len(g.token_ids))
            lps.append(out["log_probs"][j, sl].float().cpu())
            ents.append(out["token_entropy"][j, sl].float().cpu())
    return lps, ents


def run_gap(a) -> None:
    """Sampler (vLLM bf16) vs trainer (HF bf16 + chunked head) log-probs of the same tokens, same weights."""
    from transformers import AutoModelForCausalLM

    from mathpt.engines.base import SamplingConfig
    from mathpt.engines.vllm_engine import VLLMEngine
    from mathpt.train.compile import compile_layers

    prompts = [p["prompt"] for p in load_prompts(a.model)]
    t0 = time.perf_counter()
    engine = VLLMEngine(
        a.model,
        device=a.device,
        gpu_memory_utilization=a.gpu_mem,
        max_model_len=a.max_model_len,
        seed=0,
        dtype=a.dtype,
    )
    start_s = time.perf_counter() - t0
    emit(
        a.json,
        {
            "phase": "gap_engine",
            "engine_start_s": start_s,
            "since_process_start_s": time.perf_counter() - T_START,
            "cache_root": os.environ.get("VLLM_CACHE_ROOT"),
            **engine_info(engine.llm),
        },
    )
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=getattr(torch, a.dtype)).to(a.device)
    model.train()  # as the trainer holds it (no dropout in Qwen2)
    if a.device.startswith("cuda"):
        compile_layers(model)  # as load_policy does on CUDA
    base_norm = model.model.norm.weight.detach().clone()
    for version, scale in enumerate(float(s) for s in a.scales.split(",")):
        with torch.no_grad():
            model.model.norm.weight.copy_(base_norm * scale)  # sharper distributions, like a trained model
        t1 = time.perf_counter()
        engine.load_weights(((n, p.detach()) for n, p in model.named_parameters()), version=version + 1)
        load_s = time.perf_counter() - t1
        gens = engine.generate(
            prompts,
            SamplingConfig(
                max_new_tokens=a.gap_tokens,
                temperature=1.0,
                n=N_SAMPLES,
                stop=("</answer>",),
                logprobs=True,
                seed=7 + version if a.device != "cpu" else None,
            ),
        )
        lps, ents = trainer_log_probs(model, gens)
        samp = torch.cat([torch.tensor(g.logprobs, dtype=torch.float32) for g in gens])
        train = torch.cat(lps)
        ent = torch.cat(ents)
        d = (train - samp).double()
        ratio = torch.exp(d)
        k3 = (
            torch.exp(-d) - 1 + d
        )  # k3 estimate of KL(behaviour || trainer) per token, samples from behaviour
        seq_max = torch.tensor(
            [float((t - torch.tensor(g.logprobs)).abs().max()) for t, g in zip(lps, gens, strict=True)]
        )
        emit(
            a.json,
            {
                "phase": "gap",
                "norm_scale": scale,
                "tokens": int(d.numel()),
                "sequences": len(gens),
                "load_weights_s": load_s,
                "entropy_mean": float(ent.mean()),
                "sampler_logprob_mean": float(samp.mean()),
                "abs_diff_mean": float(d.abs().mean()),
                "abs_diff_p50": float(d.abs().median()),
                "abs_diff_p99": float(d.abs().quantile(0.99)),
                "abs_diff_max": float(d.abs().max()),
                "diff_mean": float(d.mean()),
                "seq_max_abs_diff_mean": float(seq_max.mean()),
                "k3_kl_mean": float(k3.mean()),
                "ratio_outside_0.8_1.2": float(((ratio < 0.8) | (ratio > 1.2)).double().mean()),
                "ratio_max": float(ratio.max()),
                "ratio_min": float(ratio.min()),
            },
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--model-dir", required=True)
    p.add_argument("--out", required=True)
    p.add_argument(
        "--gsm8k",
        default=os.path.join(os.environ.get("MATHPT_GSM8K_DIR", "."), "train.jsonl"),
        help="GSM8K train.jsonl (default: $MATHPT_GSM8K_DIR/train.jsonl)",
    )
    p.add_argument("--n-train", type=int, default=512)
    for name in ("engine", "gap"):
        q = sub.add_parser(name)
        q.add_argument("--model", required=True)
        q.add_argument("--gpu-mem", type=float, default=0.45)
        q.add_argument("--max-model-len", type=int, default=4096)
        q.add_argument(
            "--device", default="cuda", help="cuda (the measurement) or cpu (a smoke test of this script)"
        )
        q.add_argument("--dtype", default="bfloat16")
        if name == "engine":
            q.add_argument("--label", required=True)
            q.add_argument("--mp", action="store_true")
            q.add_argument("--variants", default="pipeline,noseed,noseed_flat,noseed_nolp,bare")
            q.add_argument("--reps", type=int, default=1)
            q.add_argument("--max-tokens", type=int, default=1024)
            q.add_argument("--engine-kwargs", default="{}", help="JSON: extra vLLM engine arguments")
        else:
            q.add_argument("--scales", default="1,4,10")
            q.add_argument("--gap-tokens", type=int, default=256)
    for q in sub.choices.values():
        q.add_argument(
            "--json", default=os.path.join(os.environ.get("BENCH_OUT", "."), "bench_rollout.jsonl")
        )
    a = ap.parse_args()
    {"prepare": prepare, "engine": run_engine, "gap": run_gap}[a.cmd](a)
    os._exit(0)  # vLLM can leave non-daemon threads behind


if __name__ == "__main__":
    main()
