"""Print the short table of a ``bench/gpu_real_experiment.sh`` run: the mb0 ratio check, the one-GPU
reference recipe's steps and memory (plan vs measured peaks), the smoke DAG's outcome, mathpt vs TRL,
and the per-algorithm update cost.

    python bench/summarize_real_experiment.py BENCH_OUT REFERENCE_RESULTS SMOKE_RESULTS [gpumem.csv]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []


def tail(path: Path, prefix: tuple[str, ...], n: int = 12) -> list[str]:
    if not path.exists():
        return [f"(no {path.name})"]
    return [x for x in path.read_text().splitlines() if x.startswith(prefix)][-n:]


def memory_rows(metrics: list[dict]) -> list[str]:
    out = []
    for r in metrics:
        if r.get("kind") in ("memory_plan", "memory_peaks"):
            keys = [k for k, v in r.items() if isinstance(v, (int, float)) and k != "step"]
            out.append(f"  {r['kind']}: " + ", ".join(f"{k} {r[k]:.3g}" for k in keys))
    return out


def pg_steps(metrics: list[dict]) -> list[str]:
    keys = ("step_time_s", "generation_s", "train_time_s", "real_tokens_per_s", "response_length_mean")
    rows = [r for r in metrics if r.get("kind") == "train" and "step_time_s" in r]
    out = []
    for r in rows:
        peaks = [k for k, v in r.items() if k.endswith("_gib") and isinstance(v, (int, float))]
        out.append(f"  step {r['step']}: " + ", ".join(f"{k} {r[k]:.4g}" for k in (*keys, *peaks) if k in r))
    return out


def main(bench_out: str, ref: str, smoke: str, gpumem: str | None = None) -> None:
    b = Path(bench_out)
    print("=== ratio (bench/check_ratio_gpu.py)")
    print("\n".join(tail(b / "ratio.log", ("mb0", "old", "new", "stale", "case", "  "))))
    print("=== reference recipe (config/qwen2.5-math-1.5b-1gpu.yaml, 5 GRPO-clip steps, 512 x <= 2048)")
    m = jsonl(Path(ref) / "runs" / "grpo_clip-seed0" / "metrics.jsonl")
    print("\n".join(pg_steps(m) + memory_rows(m)) or "  (no metrics)")
    print("=== smoke DAG (config/gpu-smoke.yaml)")
    print(f"  ci_table.csv: {'yes' if (Path(smoke) / 'ci_table.csv').exists() else 'NO'}")
    for run in sorted((Path(smoke) / "runs").glob("*/metrics.jsonl")):
        print(f"  {run.parent.name}:")
        print("\n".join(memory_rows(jsonl(run))))
    print("=== mathpt vs TRL (bench/trl_grpo_side_by_side.py)")
    print("\n".join(tail(b / "side.log", ("[side_by_side",))))
    print("=== per-algorithm update (bench/bench_algorithms.py)")
    print("\n".join(tail(b / "algos.log", ("|", "[bench_algorithms", "algorithm"), n=14)))
    if gpumem and Path(gpumem).exists():
        used = [float(x.split(",")[1]) for x in Path(gpumem).read_text().splitlines() if x.count(",") >= 2]
        if used:
            print(f"=== nvidia-smi: peak memory.used {max(used) / 1024:.1f} GiB over {len(used)} samples")


if __name__ == "__main__":
    main(*sys.argv[1:])
