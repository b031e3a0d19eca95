"""Time the paired bootstrap at GSM8K size: 10,000 resamples x 1,319 problems, shared indices.

python bench/bench_bootstrap.py
python bench/bench_bootstrap.py --resamples 200 --repeats 1   # smoke run
"""

import argparse
import time

import numpy as np

from mathpt import stats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--resamples", type=int, default=10_000)
    ap.add_argument("--problems", type=int, default=1319, help="GSM8K test size")
    ap.add_argument("--repeats", type=int, default=5, help="timed calls per row; the median is printed")
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    print(f"| models | resamples | problems | seconds (median of {a.repeats}) |\n| --- | --- | --- | --- |")
    for m in (2, 5, 13):
        x = (rng.random((m, a.problems)) < 0.5).astype(np.float64)
        stats.bootstrap_means(x, 100, 0)  # warm-up
        times = []
        for _ in range(a.repeats):
            t = time.perf_counter()
            stats.bootstrap_means(x, a.resamples, 0)
            times.append(time.perf_counter() - t)
        print(f"| {m} | {a.resamples:,} | {a.problems:,} | {np.median(times):.3f} |")


if __name__ == "__main__":
    main()
