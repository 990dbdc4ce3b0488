"""How well a signal read early in training ranks a sweep's trials by their final validation linear probe: the
question a search that stops or pauses trials early is betting on.

Per sweep, each trial's signals are read at its last evaluation at or before a share of its run (``AT``: 20 % of
its steps), and Spearman's rank correlation across the sweep's finished trials with the final
``val_linear_top1`` is reported with its p-value and n, in the signal's own direction (a loss, where lower is
better, is negated), so 1 is a perfect ranking and 0 none; in a sweep of several objective mixes, within each mix
too (a SimMIM loss and a MoCo v3 loss are not one scale, nor need their features' spectra be). The label-free
signals (``vocab.EARLY_SIGNALS``: RankMe and the held-out pre-training loss) stand beside the validation linear
probe itself read as early: what labels would buy.

DataFrames in (``query.SweepFrames``: ``done`` and ``signals``), a DataFrame out.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats

from trainables.vocab import EARLY_SIGNALS as SIGNALS
from trainables.vocab import metric_mode

AT = 0.2  # the share of each trial's steps at (or before) which its early signals are read
TARGET = SIGNALS[-1]  # val_linear_top1: the final value every signal is ranked against
MIN_TRIALS = 3  # the fewest trials of one mix ranked on their own (Spearman's rho needs three)


def early_readings(done: pd.DataFrame, signals: pd.DataFrame, at: float = AT) -> pd.DataFrame:
    """One row per (sweep, trial, signal): the value at the trial's last evaluation with 0 < step <= ``at`` x its
    final step (``read_at_step``), and the final ``TARGET``. Trials without such an evaluation are left out."""
    if signals.empty or TARGET not in done or "step" not in done:
        return pd.DataFrame(columns=["sweep", "trial", "metric", "read_at_step", "value", "final"])
    ends = done[["sweep", "trial", "step", TARGET]].rename(columns={"step": "end", TARGET: "final"})
    s = signals.merge(ends, on=["sweep", "trial"])
    s = s[(s.step > 0) & (s.step <= at * s.end) & s.final.notna()]
    s = s.sort_values("step").groupby(["sweep", "trial", "metric"], as_index=False).last()
    return s.rename(columns={"step": "read_at_step"})[["sweep", "trial", "metric", "read_at_step", "value",
                                                       "final"]]


def early_signal_table(done: pd.DataFrame, signals: pd.DataFrame, at: float = AT) -> pd.DataFrame:
    """Per sweep and signal: trials read, the median share of the run at which it was read, Spearman's rho with
    the final ``TARGET`` in the signal's direction, and its p-value; ``mix`` "all" over the sweep's trials, and,
    in a sweep of several objective mixes, the same within each mix of at least ``MIN_TRIALS`` trials (a signal may
    rank the trials of one objective and not trials across objectives, whose losses and spectra are not one scale).
    Empty when no trial was evaluated early."""
    rows = []
    readings = early_readings(done, signals, at)
    readings = readings[readings.metric.isin(SIGNALS)].merge(done[["sweep", "trial", "step"]], on=["sweep", "trial"])
    if "mix" in done:
        readings = readings.merge(done[["sweep", "trial", "mix"]], on=["sweep", "trial"])
    for (sweep, metric), g in readings.groupby(["sweep", "metric"], sort=False):
        rows.append(_ranking(g, sweep, metric, "all"))
        if "mix" in g and g.mix.nunique() > 1:
            rows += [_ranking(h, sweep, metric, mix) for mix, h in g.groupby("mix") if len(h) >= MIN_TRIALS]
    out = pd.DataFrame(rows, columns=["sweep", "mix", "signal", "labels", "trials", "read_at_share", "spearman_rho",
                                      "p"])
    order = {m: i for i, m in enumerate(SIGNALS)}
    key = {"signal": lambda c: c.map(order), "mix": lambda c: c.where(c != "all", "")}  # "all" first
    return out.sort_values(["sweep", "mix", "signal"], key=lambda c: key[c.name](c) if c.name in key else c,
                           ignore_index=True)


def _ranking(g: pd.DataFrame, sweep: str, metric: str, mix: str) -> dict:
    """One row of ``early_signal_table``: the readings ``g`` (``value``, ``final``, ``read_at_step``, ``step``: the
    trial's end) of ``metric`` ranked against their final ``TARGET``."""
    sign = -1.0 if metric_mode(metric) == "min" else 1.0
    rho, p = (stats.spearmanr(sign * g.value, g.final) if len(g) >= 3 and g.value.nunique() > 1
              and g.final.nunique() > 1 else (np.nan, np.nan))
    return {"sweep": sweep, "mix": mix, "signal": metric, "labels": "yes" if metric == TARGET else "no",
            "trials": len(g), "read_at_share": float(np.median(g.read_at_step.to_numpy() / g.step.to_numpy())),
            "spearman_rho": float(rho), "p": float(p)}
