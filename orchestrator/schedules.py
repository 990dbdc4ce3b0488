"""The hyperparameter schedule each PBT trial's final weights were trained under.

A PBT trial that exploits continues from its parent's checkpoint: the weights it ends with were trained by its
parent (with the parent's values) up to the exploit's step, then by itself with the perturbed values. Its schedule
is therefore its ancestry's: its own values until its first exploit are replaced by the parent's history up to the
step it continued from (as the parent's lineage stood at the exploit's wall time, ``exploited_at``), and so on back to a
trial's planned values. This is the result PBT is run for (Jaderberg et al. 2017 draw the same), and what the
report draws; the ``lineage`` table holds the exploits it is built from.

DataFrames in (``query.SweepFrames``: ``trials`` and ``lineage``), a DataFrame out.
"""

from __future__ import annotations

import math

import pandas as pd

COLUMNS = ["sweep", "trial", "step", "key", "value"]


def ancestral_schedules(trials: pd.DataFrame, lineage: pd.DataFrame) -> pd.DataFrame:
    """One row per (sweep, trial, segment start, mutated key): the value its final weights trained with from that
    step on, plus a last row at the trial's final step (so each schedule draws to its end). Only sweeps with
    exploits; a trial without exploits there keeps its planned values (``trials``' config columns)."""
    if lineage.empty:
        return pd.DataFrame(columns=COLUMNS)
    rows = []
    for sweep, lin in lineage.groupby("sweep", sort=True):
        rows += _sweep_rows(sweep, lin, trials[trials.sweep == sweep].set_index("trial"))
    return pd.DataFrame(rows, columns=COLUMNS)


def _sweep_rows(sweep: str, lin: pd.DataFrame, own: pd.DataFrame) -> list[dict]:
    """``ancestral_schedules``' rows of one sweep (``lin``: its lineage rows; ``own``: its trials by id)."""
    keys = sorted(lin.key.unique())
    exploits = {t: list(g.groupby("exploit", sort=True)) for t, g in lin.groupby("trial")}

    def planned(trial: str) -> dict:
        if trial in exploits:  # the values before its first exploit
            first = exploits[trial][0][1]
            return dict(zip(first.key, first.before, strict=True))
        row = own.loc[trial] if trial in own.index else pd.Series(dtype=object)
        return {k: _float(row.get(k)) for k in keys}

    def path(trial: str, until: float, depth: int = 0) -> list[tuple[int, dict]]:
        """[(first step, values)] of the weights ``trial`` held as its lineage stood at wall time ``until``."""
        out = [(0, planned(trial))]
        if depth > len(lin):  # (a cycle in damaged records: stop where they stop making sense)
            return out
        for _, e in exploits.get(trial, []):
            at = _float(e.exploited_at.iloc[0])
            if not math.isnan(at) and at >= until:
                break
            step = int(e.step.iloc[0])
            donor = path(str(e.parent.iloc[0]), at if not math.isnan(at) else until, depth + 1)
            out = [seg for seg in donor if seg[0] < step] + [(step, dict(zip(e.key, e.after, strict=True)))]
        return out

    rows = []
    for trial in own.index:
        end = _float(own.loc[trial].get("step"))
        segments = path(trial, math.inf)
        if not math.isnan(end):
            segments = [s for s in segments if s[0] <= end]
            segments.append((int(end), segments[-1][1]))
        for step, values in segments:
            rows += [{"sweep": sweep, "trial": trial, "step": step, "key": k, "value": _float(values.get(k))}
                     for k in keys]
    return rows


def _float(v) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def exploit_table(lineage: pd.DataFrame) -> pd.DataFrame:
    """One row per exploit: the trial, its order, the step it continued from, its parent, and each mutated key as
    ``before → after``."""
    if lineage.empty:
        return pd.DataFrame(columns=["trial", "exploit", "step", "parent"])
    rows = []
    for (sweep, trial, exploit), g in lineage.groupby(["sweep", "trial", "exploit"], sort=True):
        row = {"sweep": sweep, "trial": trial, "exploit": int(exploit), "step": int(g.step.iloc[0]),
               "parent": g.parent.iloc[0]}
        row.update({k: f"{b:.4g} → {a:.4g}" for k, b, a in zip(g.key, g.before, g.after, strict=True)})
        rows.append(row)
    out = pd.DataFrame(rows)
    return out.drop(columns="sweep") if out.sweep.nunique() == 1 else out
