"""How many training seeds the reference study needs: the median minimum detectable difference
(80% power, two-sided 5%) of the seeds x problems interval (``mathpt.stats``) on a simulated
GSM8K-sized design, by number of seeds. README ("The full experiment") quotes its table.

Model (an assumption, stated in the output): 1,319 test problems whose per-problem accuracy is
logit-normal around 0.70 (SD 0.25 before clipping); each (model, seed) shifts every problem's logit
by N(0, ``seed_sd_logit``) (0.08 on the logit is about 1.5-2 accuracy points of seed-to-seed spread,
the scale RL runs on GSM8K show); two models with no true difference, scored independently.

    python bench/power_design.py [--reps 200] [--seed-sd-logit 0.08]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mathpt.stats import mde, seeds_problems_interval  # noqa: E402


def median_mde(n_seeds: int, reps: int, seed_sd: float, n: int = 1319, seed: int = 0) -> float:
    rng = np.random.default_rng([seed, n_seeds])
    out = []
    for _ in range(reps):
        p = np.clip(rng.normal(0.7, 0.25, n), 0.02, 0.98)
        logit = np.log(p / (1 - p))
        d = []
        for _s in range(n_seeds):
            a = rng.random(n) < 1 / (1 + np.exp(-(logit + rng.normal(0, seed_sd))))
            b = rng.random(n) < 1 / (1 + np.exp(-(logit + rng.normal(0, seed_sd))))
            d.append(a.astype(float) - b)
        r = seeds_problems_interval(np.array(d))
        out.append(mde(r["se"], r["df"]))
    return float(np.median(out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--seed-sd-logit", type=float, default=0.08)
    ap.add_argument("--seeds", default="2,3,4,5,6,8")
    a = ap.parse_args()
    print(f"1,319 problems, seed SD {a.seed_sd_logit} on the logit, {a.reps} simulated studies per row")
    print("| seeds | median MDE (80% power, 5% two-sided) |\n| --- | --- |")
    for s in map(int, a.seeds.split(",")):
        print(f"| {s} | {median_mde(s, a.reps, a.seed_sd_logit):.3f} |")


if __name__ == "__main__":
    main()
