"""Power-law scaling fits over a sweep's trials: y = a * x^b (+ c), per objective group, with confidence
intervals for the exponent.

Without offset the fit is a line in log-log space and the interval is the t interval of its slope, exact when
the noise is multiplicative and log-normal. A percentile bootstrap over trials was measured to under-cover there
(90% of 95% intervals held the true exponent with 3 sizes x 2 trials, 93.5% with 8 x 4; the t interval 95% and
95.5%; `benchmarks/interval_coverage.py`). With an offset (a nonlinear fit) the t interval from the fit's
covariance covered less (89-92.5%) than the bootstrap (92-96.5%), so offset fits keep the percentile bootstrap.

Accuracy metrics (``*_top1``) are fitted as error = 1 - accuracy, the quantity that falls as a power law, on the
trials whose accuracy is above the data set's chance level (a trial at chance has learned nothing its size could
explain; its error is the chance error whatever x is). Trials are grouped by every axis the sweep varies except x
and the seed (lam, training length, data, lr, ...): pooling trials that differ in another axis would read that
axis's effect as noise around the fit and bias the exponent.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats
from scipy.optimize import curve_fit

from trainables.errors import UserError
from trainables.vocab import objective_label, step_metrics

X_COLUMNS = {"params": "params", "flops": "train_flops", "samples": "samples_seen", "data": "train_images"}
# Config columns that set x itself (so they are x, not a grouping axis), per x.
X_AXES = {"params": {"model.variant"},
          "flops": {"model.variant", "optim.steps", "optim.epochs", "optim.flops_budget"},
          "samples": {"optim.steps", "optim.epochs", "optim.flops_budget"},
          "data": {"data.fraction", "data.train_size"}}
NOT_AXES = {"run.seed", "run.out_dir", "run.resume", "run.threads", "run.log_every", "run.ckpt_every", "lam",
            "objective.lam"}
CLASSES = {"digits": 10, "cifar10": 10, "cifar100": 100}  # data sets whose class count is fixed


def chance_level(trials: pd.DataFrame) -> float | None:
    """1 / classes of the sweep's data set, if all trials use one known class count."""
    counts = set()
    for _, t in trials.iterrows():
        ds = t.get("data.dataset")
        n = t.get("data.num_classes") if ds == "synthetic" else CLASSES.get(ds)
        counts.add(int(n) if n is not None and n == n else None)
    return 1.0 / counts.pop() if len(counts) == 1 and None not in counts else None


def varied_axes(trials: pd.DataFrame, exclude: set[str] = frozenset()) -> list[str]:
    """Config columns (dotted names) that take more than one value across ``trials``, besides ``exclude``, the
    seed, bookkeeping and the mixing coefficients (``objective.lam`` / ``objective.weights.*``: the ``mix``)."""
    cols = [c for c in trials.columns if "." in c and c not in exclude and c not in NOT_AXES
            and not c.startswith("objective.weights.")]
    return sorted(c for c in cols if trials[c].astype(str).nunique(dropna=False) > 1)


def with_mix(trials: pd.DataFrame) -> pd.DataFrame:
    """``trials`` with its ``mix`` column (the objective label per weight vector); tables written before weights
    existed get it from lam."""
    if "mix" in trials and trials["mix"].notna().all():
        return trials
    from_lam = trials.lam.map(lambda lam: objective_label(lam) if pd.notna(lam) else None)
    return trials.assign(mix=trials["mix"].fillna(from_lam) if "mix" in trials else from_lam)


def group_axes(trials: pd.DataFrame, exclude: set[str] = frozenset()) -> list[str]:
    """The axes that tell groups apart: ``mix`` (the objective and its weights) plus every other varied config axis
    (besides ``exclude`` and the seed), leaving out those that only follow the mix (a per-objective recipe default
    splits nothing the mix does not). A frame without ``mix`` (see ``with_mix``) is grouped by ``lam``."""
    key = "mix" if "mix" in trials else "lam"
    axes = varied_axes(trials, exclude)
    return [key, *[a for a in axes if (trials.groupby(key)[a].nunique(dropna=False) > 1).any()]]


def group_name(key, axes: list[str]) -> str:
    """'lam=0.5, optim.steps=400' or 'MAE, model.variant=nano/4' from a groupby ``key`` over ``axes``
    (``mix`` among them)."""
    values = dict(zip(axes, key if isinstance(key, tuple) else (key,), strict=True))
    label = str(values["mix"]) if "mix" in values else objective_label(values["lam"])
    return ", ".join([label, *(f"{a}={values[a]}" for a in axes if a not in ("mix", "lam"))])


def fit_power_law(x: np.ndarray, y: np.ndarray, offset: bool = False) -> tuple[float, float, float]:
    """Least-squares fit of y = a * x^b (+ c); returns (a, b, c). Without offset, a line in log-log space."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    if not offset:
        b, log_a = np.polyfit(np.log(x), np.log(y), 1)
        return float(np.exp(log_a)), float(b), 0.0

    a0, b0, _ = fit_power_law(x, y - 0.9 * y.min())
    (a, b, c), _ = curve_fit(lambda x, a, b, c: a * np.power(x, b) + c, x, y, p0=(a0, b0, 0.9 * y.min()),
                             maxfev=20000)
    return float(a), float(b), float(c)


def bootstrap_exponent(x, y, offset=False, n_boot=1000, seed=0, level=0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the exponent b (resampling trials with replacement)."""
    rng = np.random.default_rng(seed)
    x, y = np.asarray(x, float), np.asarray(y, float)
    bs = []
    for _ in range(n_boot):
        idx = rng.integers(0, len(x), len(x))
        if len(np.unique(x[idx])) < (3 if offset else 2):
            continue
        try:
            bs.append(fit_power_law(x[idx], y[idx], offset)[1])
        except (RuntimeError, ValueError, np.linalg.LinAlgError):
            continue
    lo, hi = np.percentile(bs, [(1 - level) / 2 * 100, (1 + level) / 2 * 100])
    return float(lo), float(hi)


def exponent_interval(x, y, offset=False, n_boot=1000, seed=0, level=0.95) -> tuple[float, float, str]:
    """(low, high, method) of the exponent b: the t interval of the log-log slope without offset, the
    percentile bootstrap with one (see the module docstring)."""
    if offset:
        return (*bootstrap_exponent(x, y, offset, n_boot, seed, level), "percentile bootstrap")

    fit = stats.linregress(np.log(np.asarray(x, float)), np.log(np.asarray(y, float)))
    half = stats.t.ppf((1 + level) / 2, len(x) - 2) * fit.stderr
    return float(fit.slope - half), float(fit.slope + half), "t (log-log slope)"


def scaling_table(done: pd.DataFrame, x: str = "params", y: str = "linear_top1", offset: bool = False,
                  n_boot: int = 1000) -> tuple[pd.DataFrame, str]:
    """Fit every objective group of a sweep's finished trials (``done``); return (table, description of what was
    fitted). DataFrames in and out: ``clmim scaling`` saves the table (``results.write_scaling``)."""
    if x not in X_COLUMNS:
        raise UserError(f"--x: {x!r} is not one of {', '.join(X_COLUMNS)}")
    if y not in done:
        metrics = sorted(c for c in done if c in ("loss", "knn_top1", "linear_top1", "shape_bias", *step_metrics()))
        raise UserError(f"--y: {y!r} is not a column of the trials table; try one of {', '.join(metrics)}")
    xcol = X_COLUMNS[x]
    df = with_mix(done)
    df = df.assign(x=pd.to_numeric(df[xcol], errors="coerce"), y=pd.to_numeric(df[y], errors="coerce"))
    df = df[(df.x > 0) & df.y.notna()]
    if df.empty:
        raise UserError(f"the sweep has no finished trials with {xcol} and {y}")
    is_acc = y.endswith("top1")
    chance = chance_level(df) if is_acc else None
    target = 1 - df.y if is_acc else df.y
    what = f"{'error = 1 - ' + y if is_acc else y} ~ a * {xcol}^b" + (" + c" if offset else "")
    if chance is not None:
        what += f", trials above chance ({chance:.3g}) only"
    axes = group_axes(df, X_AXES[x])
    rows = []
    for key, g in df.assign(t=target).groupby(axes, dropna=False, sort=True):
        values = dict(zip(axes, key if isinstance(key, tuple) else (key,), strict=True))
        dropped = 0
        if chance is not None:
            above = g.y > chance
            dropped, g = int((~above).sum()), g[above]
        n_x = g.x.nunique()
        need = 4 if offset else 3
        row = {"group": group_name(key, axes), **values, "lam": g.lam.iloc[0], "points": len(g), "distinct_x": n_x}
        if dropped:
            row["at_chance"] = dropped
        if n_x < need or (g.t <= 0).any():
            row["note"] = (f"too few points to fit: {n_x} distinct {xcol} values above chance, need {need}"
                           if n_x < need else "non-positive values cannot be fitted in log space")
        else:
            a, b, c = fit_power_law(g.x.values, g.t.values, offset)
            lo, hi, method = exponent_interval(g.x.values, g.t.values, offset, n_boot)
            row.update({"a": a, "b": b, "b_low": lo, "b_high": hi, "interval": method, "c": c if offset else None,
                        "note": ""})
        rows.append(row)
    return pd.DataFrame(rows), what
