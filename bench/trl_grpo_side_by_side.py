"""mathpt's GRPO-clip step beside TRL's ``GRPOTrainer`` on one GPU, same shape and batch (issue 17).

Both sides: the random-init Qwen2.5-Math-1.5B-shape model made by ``bench_rollout.py prepare``
(same weights, same 151,936-token tokenizer), 64 GSM8K prompts x 8 samples = 512 rollouts per
batch, up to 1,024 new tokens, temperature 1, stop at ``</answer>``, the project's r1_zero reward,
4 optimizer steps per batch (minibatch 128, microbatch 8), lr 1e-5, clip 0.2, no KL term, vLLM
beside the trainer on the same GPU at ``gpu_memory_utilization`` 0.30 (``--gpu-mem``) and
microbatches of 4,096 tokens (``--microbatch-tokens``): the one-GPU reference recipe's working point,
which fits an 80 GB H100 (0.45 with 16,384 tokens ran out of memory there).

- mathpt: ``mathpt.train.pg.train_pg`` itself (the one_gpu layout: inference worker process, CUDA
  IPC hand-off, ``staleness`` 1 = the reference config), per-step split from its metrics.jsonl.
  Its settings are the train job's slice of the one-GPU reference recipe,
  ``config/qwen2.5-math-1.5b-1gpu.yaml``, as it stands (``--config`` for another), built the way
  ``scripts/train.py`` gets it (validated, schema defaults), with the sizes above over it; the CPU
  smoke run reads the same file, so a setting that cannot run fails there too.
- TRL: ``GRPOTrainer`` in vLLM colocate mode, ``loss_type="grpo"`` (per-sequence token mean, then
  the batch mean: our ``seq_mean``), ``steps_per_generation`` 64 x ``per_device_train_batch_size`` 8
  = 512 rollouts, ``gradient_accumulation_steps`` 16 (4 optimizer steps per batch), ``beta`` 0.

Each side runs in its own process, one after the other, from this one script:

    python bench/trl_grpo_side_by_side.py --model /tmp/bm --out $OUT [--sides mathpt,trl] [--steps 3]

On CPU (the smoke run in tests/bench): ``--layout cpu --engine hf`` for mathpt, ``--no-vllm`` for
TRL, with small ``--prompts/--group/--max-new``. A side that fails makes the run exit non-zero.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

LR = 1.0e-5


def log(msg: str) -> None:
    print(f"[side_by_side {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def prompts_of(model: str) -> list[dict]:
    return [json.loads(x) for x in (Path(model) / "prompts.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------- mathpt


def mathpt_config(a) -> dict:
    """The train job's settings exactly as ``scripts/train.py`` gets them: the reference config
    (validated, schema defaults filled), the bench's sizes and layout over it, then the rule's slice."""
    from mathpt.config import load_config, rule_slice, validate_config

    config = load_config(REPO / a.config)
    config["train"]["pg"].update(
        n_steps=a.steps,
        rollout_batch_size=a.prompts * a.group,
        group_size=a.group,
        max_new_tokens=a.max_new,
        minibatch_size=a.minibatch,
        microbatch_size=a.microbatch,
        lr=LR,
        staleness=a.staleness,
        eval_every=10_000,
        val_max_new_tokens=a.max_new,  # validation may not cut what rollouts allow (8 val prompts, step 0 only)
        checkpoint_every=10_000,
    )
    if a.microbatch_tokens:
        config["train"]["pg"]["microbatch_tokens"] = a.microbatch_tokens
    config["runtime"].update(
        layout=a.layout,
        engine=a.engine,
        handoff="auto",
        gpu_memory_utilization=a.gpu_mem if a.layout != "cpu" else 0.02,
        max_model_len=a.max_model_len,
        heartbeat_timeout_s=600,
    )
    config["train"]["dtype"] = "bfloat16" if a.layout != "cpu" else "float32"
    config["wandb"]["mode"] = "disabled"
    validate_config(config)
    return rule_slice(config, "train", algo="grpo_clip", seed=0)


def run_mathpt(a) -> dict:
    import torch

    from mathpt.train.pg import train_pg

    cfg = mathpt_config(a)
    work = Path(a.work) / f"mathpt_s{a.staleness}"
    t0 = time.perf_counter()
    train_pg(
        cfg,
        init_dir=a.model,
        train_prompts_path=str(Path(a.model) / "prompts.jsonl"),
        val_prompts_path=str(Path(a.model) / "val.jsonl"),
        out_dir=str(work / "ckpt"),
        run_dir=str(work / "run"),
        state_dir=str(work / "state"),
        wandb_cfg=cfg["wandb"],
    )
    total = time.perf_counter() - t0
    rows = [json.loads(x) for x in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "step_time_s" in r]
    return {
        "side": "mathpt",
        "staleness": a.staleness,
        "total_s": total,
        "steps": steps,
        "trainer_peak_alloc_gib": torch.cuda.max_memory_allocated() / 2**30
        if torch.cuda.is_available()
        else 0.0,
    }


# ---------------------------------------------------------------- TRL


def run_trl(a) -> dict:
    import torch
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from mathpt.rewards import get_reward_fn

    fn = get_reward_fn("r1_zero")
    rows = prompts_of(a.model)[: a.prompts]
    ds = Dataset.from_list([{"prompt": r["prompt"], "answer": r["answer"]} for r in rows])

    def reward(prompts, completions, answer, **_):
        return [float(fn(c, g)["reward"]) for c, g in zip(completions, answer, strict=True)]

    n_gen = a.prompts * a.group
    vllm_kw = (
        dict(
            vllm_mode="colocate",
            vllm_gpu_memory_utilization=a.gpu_mem,
            vllm_max_model_length=a.max_model_len,
            generation_kwargs={"stop": ["</answer>"], "include_stop_str_in_output": True},
        )
        if not a.no_vllm
        else {}
    )
    args = GRPOConfig(
        output_dir=str(Path(a.work) / "trl"),
        per_device_train_batch_size=a.microbatch,
        gradient_accumulation_steps=a.minibatch // a.microbatch,
        steps_per_generation=n_gen // a.microbatch,
        num_generations=a.group,
        max_completion_length=a.max_new,
        temperature=1.0,
        top_p=1.0,
        use_vllm=not a.no_vllm,
        **vllm_kw,
        loss_type="grpo",
        beta=0.0,
        epsilon=0.2,
        num_iterations=1,
        scale_rewards="group",
        learning_rate=LR,
        adam_beta1=0.9,
        adam_beta2=0.95,
        weight_decay=0.0,
        max_grad_norm=1.0,
        lr_scheduler_type="constant",
        warmup_steps=0,
        bf16=not a.no_vllm,
        use_cpu=a.no_vllm,
        max_steps=a.trl_steps,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        seed=0,
        shuffle_dataset=False,
        log_completions=False,
    )
    times, log_rows = [], []

    class Timer(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kw):
            row = dict(logs or {})
            row["step"] = state.global_step
            log_rows.append(row)

    tok = AutoTokenizer.from_pretrained(a.model)
    model = AutoModelForCausalLM.from_pretrained(
        a.model, dtype=torch.float32 if a.no_vllm else torch.bfloat16
    )
    t0 = time.perf_counter()
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=reward,
        args=args,
        train_dataset=ds,
        processing_class=tok,
        callbacks=[Timer()],
    )
    init_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - t1
    return {
        "side": "trl",
        "trl_version": trl.__version__,
        "optimizer_steps_per_batch": n_gen // a.minibatch,
        "rollouts": n_gen,
        "init_s": init_s,
        "train_s": train_s,
        "step_end_times": [t - t1 for t in times],
        "logs": log_rows,
        "trainer_peak_alloc_gib": torch.cuda.max_memory_allocated() / 2**30
        if torch.cuda.is_available()
        else 0.0,
    }


# ---------------------------------------------------------------- summary


def summarize(res: dict) -> list[tuple[str, str]]:
    rows = []
    if res.get("side") == "mathpt" and res.get("steps"):
        st = res["steps"][1:] or res["steps"]  # the first step includes compile and the first rollout wait
        med = lambda k: statistics.median(r[k] for r in st)  # noqa: E731
        toks = statistics.median(r["tokens_per_s"] * r["train_time_s"] for r in st)
        rows += [
            (f"mathpt s{res['staleness']}: step time (median of steps 2..)", f"{med('step_time_s'):.1f} s"),
            ("  generation (in worker)", f"{med('generation_s'):.1f} s"),
            ("  training (old log-probs + optimizer steps)", f"{med('train_time_s'):.1f} s"),
            ("  trainer waits for rollouts", f"{med('trainer_idle_s'):.1f} s"),
            ("  hand-off (push_weights)", f"{1e3 * med('handoff_s'):.1f} ms"),
            ("  response tokens / step", f"{toks:.0f}"),
            ("  response tokens / s of step", f"{toks / med('step_time_s'):.0f}"),
            ("  mean response length", f"{med('response_length_mean'):.0f}"),
            ("  trainer peak allocated", f"{res['trainer_peak_alloc_gib']:.1f} GiB"),
        ]
    if res.get("side") == "trl" and res.get("step_end_times"):
        t = res["step_end_times"]
        per_gen = res["optimizer_steps_per_batch"]
        rounds = [
            t[i + per_gen - 1] - (t[i - 1] if i else 0.0) for i in range(0, len(t) - per_gen + 1, per_gen)
        ]
        step = rounds[-1]
        lens = [lg.get("completions/mean_length") for lg in res["logs"] if lg.get("completions/mean_length")]
        mean_len = lens[-1] if lens else float("nan")
        rows += [
            (f"TRL {res['trl_version']}: step time (last batch, {per_gen} optimizer steps)", f"{step:.1f} s"),
            ("  all batches", ", ".join(f"{r:.1f}" for r in rounds) + " s"),
            ("  mean response length", f"{mean_len:.0f}"),
            ("  response tokens / s of step", f"{res['rollouts'] * mean_len / step:.0f}"),
            ("  trainer peak allocated", f"{res['trainer_peak_alloc_gib']:.1f} GiB"),
        ]
        for key in ("sampling/sampling_logp_difference/mean", "sampling/sampling_logp_difference/max"):
            vals = [lg[key] for lg in res["logs"] if isinstance(lg.get(key), (int, float))]
            if vals:
                rows.append((f"  {key} (TRL: trainer vs vLLM)", f"last {vals[-1]:.4f}, max {max(vals):.4f}"))
        prof = {}
        for lg in res["logs"]:
            for k, v in lg.items():
                if k.startswith("profiling/") and isinstance(v, (int, float)):
                    prof.setdefault(k, []).append(v)
        for k, v in sorted(prof.items()):
            rows.append(
                (
                    f"  {k.removeprefix('profiling/Time taken: ')}",
                    f"median {statistics.median(v):.2f} s x{len(v)}",
                )
            )
    return rows


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", default=os.environ.get("BENCH_OUT", "."))
    ap.add_argument("--work", default="/tmp/side_by_side")
    ap.add_argument("--sides", default="mathpt,trl")
    ap.add_argument("--steps", type=int, default=3, help="mathpt PG steps")
    ap.add_argument("--staleness", type=int, default=1)
    ap.add_argument("--trl-steps", type=int, default=8, help="TRL optimizer steps (4 per batch of 512)")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--max-new", type=int, default=1024)
    ap.add_argument("--minibatch", type=int, default=128)
    ap.add_argument("--microbatch", type=int, default=8)
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--gpu-mem", type=float, default=0.30, help="vLLM's share of the GPU, both sides")
    ap.add_argument("--microbatch-tokens", type=int, default=4096, help="mathpt side (the one-GPU recipe's)")
    ap.add_argument(
        "--layout", default="one_gpu", help="mathpt side: one_gpu (the measurement) or cpu (smoke test)"
    )
    ap.add_argument(
        "--engine", default="vllm", help="mathpt side's inference engine: vllm or hf (CPU smoke test)"
    )
    ap.add_argument(
        "--no-vllm", action="store_true", help="TRL side without vLLM, on CPU (a smoke test of this script)"
    )
    ap.add_argument(
        "--config",
        default="config/qwen2.5-math-1.5b-1gpu.yaml",
        help="mathpt side's recipe (relative to the repository); the bench's sizes and layout go over it",
    )
    ap.add_argument("--side", default=None, help=argparse.SUPPRESS)
    return ap


def main() -> None:
    a = parser().parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.side:  # child process: one side
        t_epoch = time.time()
        try:
            res = run_mathpt(a) if a.side == "mathpt" else run_trl(a)
        except Exception:  # noqa: BLE001 - reported in the JSON and the table
            import traceback

            res = {"side": a.side, "error": traceback.format_exc()}
            print(res["error"], file=sys.stderr, flush=True)  # the whole traceback in the phase's log
        res.update(
            finished=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            t_start_epoch=t_epoch,
            t_end_epoch=time.time(),
        )
        with open(out / "side_by_side.jsonl", "a") as f:
            f.write(json.dumps(res, default=str) + "\n")
        log(f"{a.side} done: {'error' if 'error' in res else 'ok'}")
        sys.stdout.flush()
        os._exit(0)
    t_run = time.time()
    for side in a.sides.split(","):
        log(f"start {side}")
        cmd = [sys.executable, __file__, "--side", side, *sys.argv[1:]]
        subprocess.run(cmd, check=False)
    results = [  # this run's rows (the file keeps earlier runs' rows too)
        r
        for r in (
            [json.loads(x) for x in (out / "side_by_side.jsonl").read_text().splitlines()]
            if (out / "side_by_side.jsonl").exists()
            else []
        )
        if r.get("t_start_epoch", 0) >= t_run
    ]
    table = []
    for r in results:
        if "error" in r:
            table.append((f"{r['side']}: ERROR", r["error"].strip().splitlines()[-1][:150]))
        else:
            table += summarize(r)
    w = max((len(k) for k, _ in table), default=0)
    print("\n".join(f"{k:<{w}}  {v}" for k, v in table))
    missing = set(a.sides.split(",")) - {r["side"] for r in results if "error" not in r}
    if missing:  # a side that failed (or never reported) fails the run, so a broken bench is seen
        sys.exit(f"side_by_side: no result from {', '.join(sorted(missing))}")


if __name__ == "__main__":
    main()
