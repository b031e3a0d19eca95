"""Print the short table of a ``bench/gpu_suite.sh`` run: engine start-up, rollout tok/s per
variant, sampler-vs-trainer log-prob gap, mathpt vs TRL step, peak GPU memory per phase.

    python bench/summarize_gpu_suite.py BENCH_OUT [gpumem.csv] [job.log]
"""

from __future__ import annotations

import json
import re
import sys
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []


def phase_windows(job_log: Path) -> dict[str, tuple[int, int]]:
    starts, out = {}, {}
    if not job_log.exists():
        return out
    for line in job_log.read_text().splitlines():
        if m := re.match(r"=== (\S+) start (\d+)", line):
            starts[m[1]] = int(m[2])
        elif (m := re.match(r"=== (\S+) rc=\S+ end (\d+)", line)) and m[1] in starts:
            out[m[1]] = (starts[m[1]], int(m[2]))
    return out


def peak_mib(gpumem: Path, t0: float, t1: float) -> float | None:
    """Peak memory.used (MiB) in nvidia-smi samples between epoch seconds t0 and t1."""
    if not gpumem.exists():
        return None
    best = None
    for line in gpumem.read_text().splitlines():
        parts = [p.strip() for p in line.split(",")]
        try:
            ts = datetime.strptime(parts[0], "%Y/%m/%d %H:%M:%S.%f").timestamp()
            used = float(parts[1])
        except (ValueError, IndexError):
            continue
        if t0 <= ts <= t1:
            best = used if best is None else max(best, used)
    return best


def main() -> None:
    out = Path(sys.argv[1])
    gpumem = Path(sys.argv[2]) if len(sys.argv) > 2 else Path("/tmp/gpumem.csv")
    job_log = Path(sys.argv[3]) if len(sys.argv) > 3 else Path("/tmp/job.log")
    rows: list[tuple[str, str]] = []
    for r in jsonl(out / "bench_rollout.jsonl"):
        if r["phase"] == "engine":
            rows.append(
                (
                    f"engine start [{r['label']}] (import / LLM() / first token)",
                    f"{r['import_s']:.1f} / {r['engine_start_s']:.1f} / {r['first_token_s']:.2f} s; "
                    f"max_num_seqs {r.get('max_num_seqs')}, async {r.get('async_scheduling')}, "
                    f"KV {r.get('kv_cache_tokens')} tok, graphs<= {r.get('cudagraph_max')}",
                )
            )
        elif r["phase"] == "throughput":
            rows.append(
                (
                    f"rollout tok/s [{r['label']}] {r['variant']}",
                    f"{r['tok_s']:,.0f} ({r['tokens']} tok in {r['seconds']:.1f} s, mean len {r['mean_len']:.0f})",
                )
            )
        elif r["phase"] == "gap_engine":
            rows.append(("engine start [gap, warm cache] LLM()", f"{r['engine_start_s']:.1f} s"))
        elif r["phase"] == "gap":
            rows.append(
                (
                    f"log-prob gap, norm x{r['norm_scale']:g} (entropy {r['entropy_mean']:.2f})",
                    f"mean {r['abs_diff_mean']:.4f}, p99 {r['abs_diff_p99']:.3f}, max {r['abs_diff_max']:.3f}, "
                    f"k3 {r['k3_kl_mean']:.2e}, |ratio-1|>0.2 {100 * r['ratio_outside_0.8_1.2']:.2f}%",
                )
            )
    try:
        from trl_grpo_side_by_side import summarize
    except Exception:  # noqa: BLE001
        summarize = None
    for r in jsonl(out / "side_by_side.jsonl"):
        if "error" in r:
            rows.append((f"{r['side']}: ERROR", r["error"].strip().splitlines()[-1][:160]))
        elif summarize:
            rows += summarize(r)
        p = peak_mib(gpumem, r.get("t_start_epoch", 0), r.get("t_end_epoch", 0))
        if p:
            rows.append((f"  {r['side']}: GPU memory peak (nvidia-smi)", f"{p / 1024:.1f} GiB"))
    for name, (t0, t1) in phase_windows(job_log).items():
        p = peak_mib(gpumem, t0, t1)
        rows.append((f"phase {name}", f"{t1 - t0} s" + (f", GPU peak {p / 1024:.1f} GiB" if p else "")))
    w = max((len(k) for k, _ in rows), default=0)
    print("\n".join(f"{k:<{w}}  {v}" for k, v in rows))


if __name__ == "__main__":
    main()
