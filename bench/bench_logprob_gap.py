"""Sampler-vs-trainer log-prob gap on identical weights (issue 14 item 1).

An inference engine samples responses and returns its own log-probs of the sampled tokens; the
trainer then scores the very same tokens with ``get_response_log_probs`` (the path ``pg_update``
uses, via ``train.pg.rollout_batch``). On identical weights both should give the same numbers; the
gap is the numerical mismatch a ratio against the sampler's log-probs would carry (and what TIS
corrects). Reported per response token: mean and max |log pi_trainer - log pi_sampler|, the k3
estimate of KL(sampler || trainer), and the TIS weight min(pi_trainer / pi_sampler, 2) statistics.

The model is the pipeline's random-init tiny Qwen2 (tokenizer trained on GSM8K when
``MATHPT_GSM8K_DIR`` names a copy, else on the project's arith problems) and, with
``--sharpen``, the same with its tied embedding scaled, so the next-token distributions are as
peaked as a trained model's. Measured (issue-14 note): x8 is too sharp (every sampled token has
p ~ 1, so log p ~ 0 on both sides and the gap vanishes); x1 shows the bf16 mismatch.
Each engine runs in its own subprocess (vLLM sets process-wide state).

    .venv/bin/python bench/bench_logprob_gap.py --engines hf,vllm --dtype float32
    .venv/bin/python bench/bench_logprob_gap.py --engines hf,vllm --dtype bfloat16
    BENCH_DEVICE=cuda python bench/bench_logprob_gap.py --engines hf --dtype bfloat16   # on a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
GSM8K = os.environ.get("MATHPT_GSM8K_DIR")  # unset: the project's arith word problems
DEVICE = os.environ.get("BENCH_DEVICE", "cpu")  # cuda: the trainer and the hf engine on the GPU


def problems(split: str, n: int) -> list[dict]:
    """The first ``n`` raw rows (question, answer) of GSM8K's split, or of generated arith problems."""
    if GSM8K:
        return [json.loads(x) for x in (Path(GSM8K) / f"{split}.jsonl").read_text().splitlines()[:n]]
    from mathpt.arith import generate_arith

    return generate_arith(2000, 200, seed=0)[split][:n]


def build_model(out: Path, sharpen: float, dtype: str) -> Path:
    import torch

    from mathpt.models import build_tiny_model, load_model, load_tokenizer, save_model

    rows = problems("train", 2000)
    base = build_tiny_model([r["question"] + "\n" + r["answer"] for r in rows], out / "base")
    model = load_model(base)
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(sharpen)
    model = model.to(getattr(torch, dtype))
    save_model(model, load_tokenizer(base), out / "model")
    return out / "model"


def child(
    engine: str, model_dir: str, dtype: str, out_path: str, n_prompts: int, n: int, max_new: int
) -> None:
    from mathpt.engines import SamplingConfig, make_engine

    rows = problems("test", n_prompts)
    kwargs = {"dtype": dtype}
    if engine == "vllm":
        kwargs.update(
            max_model_len=1024, gpu_memory_utilization=None, **json.loads(os.environ.get("VLLM_KWARGS", "{}"))
        )
    eng = make_engine(engine, model_dir, device=DEVICE, **kwargs)
    params = SamplingConfig(max_new_tokens=max_new, temperature=1.0, n=n, seed=0)
    gens = eng.generate([r["question"] for r in rows], params)
    Path(out_path).write_text(
        json.dumps(
            [
                {"prompt_token_ids": g.prompt_token_ids, "token_ids": g.token_ids, "logprobs": g.logprobs}
                for g in gens
            ]
        )
    )


def gap(model_dir: Path, gens_path: Path, dtype: str) -> dict:
    import torch

    from mathpt.engines.base import Generation
    from mathpt.functional import get_response_log_probs
    from mathpt.models import load_model
    from mathpt.train.pg import rollout_batch

    raw = json.loads(gens_path.read_text())
    gens = [
        Generation(0, 0, "", g["token_ids"], g["logprobs"], "stop", 0, g["prompt_token_ids"]) for g in raw
    ]
    batch = rollout_batch(gens, pad_id=0)
    model = load_model(model_dir, dtype=getattr(torch, dtype), device=DEVICE).eval()
    with torch.no_grad():
        lp = get_response_log_probs(model, batch["input_ids"].to(DEVICE), batch["labels"].to(DEVICE))[
            "log_probs"
        ]
    lp = lp.double().cpu()
    mask = batch["response_mask"]
    d = (lp - batch["sampler_log_probs"].double())[mask]
    r = torch.exp(d)  # pi_trainer / pi_sampler
    return {
        "tokens": int(mask.sum()),
        "mean_abs": float(d.abs().mean()),
        "max_abs": float(d.abs().max()),
        "p99_abs": float(d.abs().quantile(0.99)),
        "k3": float(((r - 1) - d).mean()),
        "tis_mean": float(r.clamp(max=2.0).mean()),
        "tis_capped": float((r >= 2.0).double().mean()),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--child", nargs=7)
    ap.add_argument("--engines", default="hf,vllm")
    ap.add_argument("--sharpen", default="1")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    a = ap.parse_args()
    if a.child:
        e, m, dt, o, p, n, t = a.child
        child(e, m, dt, o, int(p), int(n), int(t))
        return
    print(
        "| engine | dtype | sharpen | tokens | mean abs dlogp | p99 | max | k3 KL | TIS mean (cap 2) | capped |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for s in (float(x) for x in a.sharpen.split(",")):
            model_dir = build_model(Path(tmp) / f"s{s}", s, a.dtype)
            for engine in a.engines.split(","):
                out = Path(tmp) / f"{engine}-{s}.json"
                cmd = [
                    sys.executable,
                    __file__,
                    "--child",
                    engine,
                    str(model_dir),
                    a.dtype,
                    str(out),
                    str(a.prompts),
                    str(a.n),
                    str(a.max_new_tokens),
                ]
                subprocess.run(
                    cmd, check=True, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.DEVNULL
                )
                g = gap(model_dir, out, a.dtype)
                print(
                    f"| {engine} | {a.dtype} | {s:g} | {g['tokens']} | {g['mean_abs']:.2e} | {g['p99_abs']:.2e} | "
                    f"{g['max_abs']:.2e} | {g['k3']:.2e} | {g['tis_mean']:.4f} | {g['tis_capped']:.4f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
