"""The Pareto front of a multi-objective search (``search.algorithm: nsga2``): the finished trials no other trial
beats on every objective at once.

A trial dominates another when it is at least as good on every objective (each in its own direction: an accuracy
higher, a cost lower) and better on one. The front is the trials nothing dominates: the trade-offs a researcher
chooses between (e.g. a linear probe against training FLOPs); every other trial is beaten outright by one on it.
The objectives are those the search optimised, read as the trials measured them (the validation split's probes,
never the evaluation split's the claims use).

DataFrames in (the finished trials), a DataFrame out.
"""

from __future__ import annotations

import numpy as np
import pandas as pd


def pareto_front(done: pd.DataFrame, objectives: dict[str, str]) -> pd.DataFrame:
    """The trials on the front of ``objectives`` (metric -> "min" / "max"), best first on the first objective:
    their id, group (``mix``, where known) and each objective. Trials missing an objective are left out."""
    cols = list(objectives)
    keep = [c for c in ("trial", "mix") if c in done]
    if not cols or any(c not in done for c in cols):
        return pd.DataFrame(columns=[*keep, *cols])
    d = done[[*keep, *cols]].copy()
    d[cols] = d[cols].apply(pd.to_numeric, errors="coerce")
    d = d.dropna(subset=cols).reset_index(drop=True)
    # every objective as a loss: lower is better (a maximised one negated)
    x = np.stack([d[c].to_numpy(float) * (-1.0 if objectives[c] == "max" else 1.0) for c in cols], axis=1)
    dominated = np.zeros(len(d), dtype=bool)
    for i in range(len(d)):  # (n^2 over one sweep's trials: hundreds at most)
        le, lt = (x <= x[i]).all(axis=1), (x < x[i]).any(axis=1)
        dominated[i] = bool((le & lt).any())
    front = d[~dominated]
    return front.sort_values(cols[0], ascending=objectives[cols[0]] == "min", kind="stable", ignore_index=True)
