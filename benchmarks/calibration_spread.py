"""How many calibration images each method needs: the bootstrap spread of the fitted cut.

Not a timing benchmark (the numbers do not depend on the machine). Synthetic head logits with
a known truth: real ~ N(0, 1), fake ~ N(mu, 1) (mu = 2 by default, about RINE on an unseen
generator), balanced labelled sets, reals only for the target FPR, unlabelled for prior-shift.
For each size n, `--draws` independent calibration sets are drawn; on each, the cut is refitted
on `--boot` bootstrap resamples. Reported per method and n (medians over the draws):

  cut 95 %    width of the bootstrap 95 % interval of the cut, in logit units
  FPR range   the true false-positive rate at the two ends of that interval (from the normal
              distribution, not a sample), i.e. how far the rate could move with another draw
  TPR range   the same for the true-positive rate

    python benchmarks/calibration_spread.py                 # the table of docs/calibration.md
    python benchmarks/calibration_spread.py --draws 3 --boot 50   # a quick check
"""

from __future__ import annotations

import argparse

import numpy as np
from scipy.stats import norm

from rine.evaluation.calibration import CalibrationError, bootstrap_boundaries, min_reals_for

METHODS = {
    "target FPR 5 %": dict(target_fpr=0.05, data="reals"),
    "target FPR 10 %": dict(target_fpr=0.10, data="reals"),
    "objective balanced": dict(objective="balanced", data="labelled"),
    "platt": dict(method="platt", data="labelled"),
    "prior-shift": dict(method="prior-shift", data="unlabelled"),
}


def draw(rng: np.random.Generator, n: int, data: str, mu: float):
    if data == "reals":
        return rng.normal(0, 1, n), None
    y = np.r_[np.zeros(n - n // 2, int), np.ones(n // 2, int)]
    z = np.where(y == 1, rng.normal(mu, 1, n), rng.normal(0, 1, n))
    return z, (None if data == "unlabelled" else y)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="25,50,100,400")
    ap.add_argument("--draws", type=int, default=20)
    ap.add_argument("--boot", type=int, default=200)
    ap.add_argument("--mu", type=float, default=2.0, help="mean fake logit (reals: 0), unit variances")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    rng = np.random.default_rng(args.seed)
    print(f"real ~ N(0,1), fake ~ N({args.mu:g},1); {args.draws} draws x {args.boot} bootstrap refits; medians\n")
    print("| method | images | cut 95 % width (logit) | FPR range | TPR range |")
    print("|---|---|---|---|---|")
    for name, spec in METHODS.items():
        spec = dict(spec)
        data = spec.pop("data")
        for n in sizes:
            if "target_fpr" in spec and n < min_reals_for(spec["target_fpr"]):
                print(f"| {name} | {n} | refused: needs {min_reals_for(spec['target_fpr'])} reals | | |")
                continue
            widths, fprs, tprs = [], [], []
            for _ in range(args.draws):
                z, y = draw(rng, n, data, args.mu)
                try:
                    cuts = bootstrap_boundaries(z, y, n_boot=args.boot, seed=int(rng.integers(1 << 31)), **spec)
                except CalibrationError as e:  # a resample without the classes a fit needs
                    print(f"| {name} | {n} | failed: {e} | | |")
                    break
                lo, hi = np.quantile(cuts, [0.025, 0.975])
                widths.append(hi - lo)
                fprs.append((norm.sf(hi), norm.sf(lo)))
                tprs.append((norm.sf(hi - args.mu), norm.sf(lo - args.mu)))
            else:
                f, t = np.median(fprs, axis=0), np.median(tprs, axis=0)
                print(f"| {name} | {n} | {np.median(widths):.2f} | {100 * f[0]:.1f}-{100 * f[1]:.1f} % "
                      f"| {100 * t[0]:.1f}-{100 * t[1]:.1f} % |")


if __name__ == "__main__":
    main()
