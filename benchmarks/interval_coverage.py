"""Coverage of the scaling exponent's 95% intervals on simulated sweeps (what `clmim scaling` reports).

Each simulated sweep has S model sizes (1e5..1e8 parameters) x R trials with y = a * x^b * noise (log-normal,
multiplicative). Without offset it compares the t interval of the log-log slope (what `clmim scaling` uses) with
the percentile bootstrap over trials; with offset (y = a * x^b + c) the bootstrap with the t interval from the
nonlinear fit's covariance. Coverage = share of sweeps whose interval holds the true b.

    python benchmarks/interval_coverage.py --sweeps 200
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import numpy as np
from scipy import stats
from scipy.optimize import curve_fit

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from orchestrator.scaling import bootstrap_exponent, exponent_interval, fit_power_law  # noqa: E402


def wald_offset(x, y, level=0.95):
    """t interval of b from the covariance of the nonlinear least-squares fit of a * x^b + c."""
    p, cov = curve_fit(lambda x, a, b, c: a * np.power(x, b) + c, x, y, p0=fit_power_law(x, y, True), maxfev=20000)
    half = stats.t.ppf((1 + level) / 2, len(x) - 3) * np.sqrt(cov[1, 1])
    return p[1] - half, p[1] + half


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sweeps", type=int, default=200)
    ap.add_argument("--n-boot", type=int, default=500)
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    cases = [(False, 3, 2, -0.25, 0.05), (False, 5, 2, -0.25, 0.05), (False, 8, 4, -0.25, 0.05),
             (True, 5, 2, -0.4, 0.03), (True, 8, 4, -0.4, 0.03)]
    print(f"{'fit':<10}{'sizes x trials':>15}{'interval':>24}{'coverage':>10}{'median width':>14}")
    for offset, sizes, reps, b_true, sigma in cases:
        x = np.repeat(np.logspace(5, 8, sizes), reps)
        methods = {"percentile bootstrap": lambda x, y, s, o=offset: bootstrap_exponent(x, y, o, args.n_boot, s)}
        if offset:
            methods["t (fit covariance)"] = lambda x, y, s: wald_offset(x, y)
        else:
            methods["t (log-log slope)"] = lambda x, y, s: exponent_interval(x, y)[:2]
        for name, interval in methods.items():
            hits, widths = 0, []
            for s in range(args.sweeps):
                rng = np.random.default_rng(s)
                clean = 2.0 * x**b_true + 0.01 if offset else 3.0 * x**b_true
                lo, hi = interval(x, clean * np.exp(rng.normal(0, sigma, len(x))), s)
                hits += lo < b_true < hi
                widths.append(hi - lo)
            print(f"{'a*x^b+c' if offset else 'a*x^b':<10}{f'{sizes} x {reps}':>15}{name:>24}"
                  f"{hits / args.sweeps:>10.3f}{np.median(widths):>14.4f}", flush=True)


if __name__ == "__main__":
    main()
