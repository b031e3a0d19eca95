"""Time the paired bootstrap at GSM8K size: 10,000 resamples x 1,319 problems, shared indices.

python bench/bench_bootstrap.py
"""

import time

import numpy as np

from mathpt import stats


def main() -> None:
    rng = np.random.default_rng(0)
    print("| models | resamples | problems | seconds (median of 5) |\n| --- | --- | --- | --- |")
    for m in (2, 5, 13):
        x = (rng.random((m, 1319)) < 0.5).astype(np.float64)
        stats.bootstrap_means(x, 100, 0)  # warm-up
        times = []
        for _ in range(5):
            t = time.perf_counter()
            stats.bootstrap_means(x, 10_000, 0)
            times.append(time.perf_counter() - t)
        print(f"| {m} | 10,000 | 1,319 | {np.median(times):.3f} |")


if __name__ == "__main__":
    main()
