"""The short table of a GPU smoke run (bench/gpu_smoke.sh): job wall times, training throughput,
generation, peak memory, and the packed train-step study.

    python bench/summarize_smoke.py results /tmp/bench_out
"""

from __future__ import annotations

import json
import re
import statistics
import sys
from pathlib import Path


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def main(results: str, bench_out: str) -> None:
    res, out = Path(results), Path(bench_out)
    print("\n| job | wall s | notes |\n| --- | --- | --- |")
    for logf in sorted(res.glob("logs/**/*.log")):
        text = logf.read_text(errors="replace")
        stamps = re.findall(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),\d+ ", text, re.M)
        peak = re.findall(r"peak GPU memory on cuda:0: ([\d.]+) GiB allocated", text)
        wall = ""
        if len(stamps) >= 2:
            from datetime import datetime

            t = [datetime.strptime(s, "%Y-%m-%d %H:%M:%S") for s in (stamps[0], stamps[-1])]
            wall = f"{(t[1] - t[0]).total_seconds():.0f}"
        notes = f"peak {max(map(float, peak)):.1f} GiB (torch, per process)" if peak else ""
        print(f"| {logf.relative_to(res)} | {wall} | {notes} |")
    print("\n| run | steps | median real tok/s | median step s | median gen s | trainer idle |")
    print("| --- | --- | --- | --- | --- | --- |")
    for m in sorted(res.glob("runs/*/metrics.jsonl")):
        train = [r for r in rows(m) if r.get("kind") == "train"][1:]  # the first step compiles
        tok = [r["real_tokens_per_s"] for r in train if "real_tokens_per_s" in r]
        step = [r["step_time_s"] for r in train if "step_time_s" in r]
        gen = [r["generation_s"] for r in train if "generation_s" in r]
        idle = [r["trainer_idle_fraction"] for r in train if "trainer_idle_fraction" in r]
        print(
            f"| {m.parent.name} | {len(train) + 1} | {med(tok):.0f} | {med(step):.2f} | "
            f"{med(gen):.2f} | {med(idle):.2f} |"
        )
    study = out / "bench_train_step.json"
    if study.exists():
        data = json.loads(study.read_text())
        print(f"\ntrain-step study (matmul peak {data.get('matmul_peak_tflops', float('nan')):.0f} TFLOP/s)")
        print("| shape / cut | real tok/s | MFU | peak GiB |\n| --- | --- | --- | --- |")
        for r in data["rows"]:
            if "error" not in r:
                print(f"| {r['shape']} | {r['tok_s']:.0f} | {r['mfu']:.3f} | {r['peak']:.1f} |")
    acc = res / "accuracy.csv"
    if acc.exists():
        print("\n" + acc.read_text())


if __name__ == "__main__":
    main(*sys.argv[1:3])
