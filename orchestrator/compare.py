"""Fair comparisons between objectives, as tables: mean ± standard error over seeds, values at matched optimiser
steps and at matched training FLOPs, and the paper's claims checked against a sweep.

Everything here is pandas over the results tables (``trials`` and ``layers``); the report, ``clmim results
show`` and ``benchmarks/RESULTS.md`` read the same functions. A "group" is one objective (lam) with the other
axes the sweep varies (besides the seed) held fixed; its spread is over the seeds.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from .scaling import group_axes, group_name

SEED = "run.seed"


def mean_se(values) -> tuple[float, float, int]:
    """(mean, standard error of the mean, n) of the finite values; se is nan for fewer than 2."""
    v = pd.to_numeric(pd.Series(values), errors="coerce").dropna()
    v = v[np.isfinite(v)]
    if v.empty:
        return float("nan"), float("nan"), 0
    se = float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else float("nan")
    return float(v.mean()), se, len(v)


def fmt_mean_se(m: float, se: float, n: int | None = None, digits: int = 3) -> str:
    """'0.512 ± 0.013' ('0.512' without a spread, '–' without a value)."""
    if m != m:
        return "–"
    text = f"{m:.{digits}g}" if se != se else f"{m:.{digits}g} ± {se:.2g}"
    return text if n is None else f"{text} (n={n})"


def split_baseline(layers: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(final, untrained) per-layer rows: each trial's last probed step, and step 0 (the untrained encoder).
    Rows without a step (schema-1 files) count as final."""
    step = layers.step.fillna(np.inf) if "step" in layers else pd.Series(np.inf, index=layers.index)
    last = step.groupby(layers.trial).transform("max")
    untrained = layers[step == 0] if "step" in layers else layers.iloc[0:0]
    return layers[(step == last) & (step != 0)], untrained


def last_layer_rows(layers: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Rows of ``metric`` at each trial's last layer (head-averaged rows only)."""
    d = layers[(layers.metric == metric) & layers["head"].isna()]
    depth = layers.groupby("trial").layer.transform("max")
    return d[d.layer == depth.loc[d.index]]


def probe_history(layers: pd.DataFrame, trials: pd.DataFrame, metric: str = "linear_top1_gap") -> pd.DataFrame:
    """The last layer's ``metric`` at every probed step of every trial, with the training FLOPs spent by then
    (step x global batch x FLOPs per image): columns trial, step, value, flops and the group axes."""
    d = last_layer_rows(layers, metric)[["trial", "step", "value"]]
    t = trials.set_index("trial")
    per_step = pd.to_numeric(t["train_flops_per_image"], errors="coerce") * pd.to_numeric(
        t["data.batch_size"], errors="coerce")
    d = d.assign(flops=d.step * d.trial.map(per_step))
    return d.merge(trials[["trial", *{*group_axes(trials), "lam"}, *([SEED] if SEED in trials else [])]],
                   on="trial")


def layer_table(layers: pd.DataFrame, untrained: pd.DataFrame, trials: pd.DataFrame, metric: str) -> pd.DataFrame:
    """``metric`` per layer, two rows per group: its trials at the end (mean ± SE over seeds) and the same trials'
    untrained encoder (step 0, mean ± SE), one column per layer (L0 = the patch embedding). Head-averaged rows."""
    axes = group_axes(trials)
    rows = []
    for key, g in trials.groupby(axes, dropna=False, sort=True):
        for kind, d in (("trained", layers), ("untrained", untrained)):
            d = d[(d.metric == metric) & d["head"].isna() & d.trial.isin(g.trial)]
            if d.empty:
                continue
            per = d.groupby(["layer", "trial"]).value.mean().groupby("layer")
            rows.append({"group": group_name(key, axes), "encoder": kind,
                         **{f"L{int(k)}": fmt_mean_se(*mean_se(v)[:2]) for k, v in per}})
    return pd.DataFrame(rows)


def at_matched(history: pd.DataFrame, by: str) -> tuple[pd.DataFrame, float]:
    """Each trial's value at the common budget of ``by`` ("step" or "flops"): the largest budget every trial
    reached, and per trial its last probe at or below it. Returns (per-trial rows, the common budget)."""
    history = history.dropna(subset=[by])  # FLOPs are unknown for trials that did not report their cost
    if history.empty:
        return history, float("nan")
    reached = history.groupby("trial")[by].max()
    budget = float(reached.min())
    below = history[history[by] <= budget * (1 + 1e-9)]
    rows = below.sort_values(by).groupby("trial").tail(1)
    return rows, budget


def matched_table(layers: pd.DataFrame, trials: pd.DataFrame,
                  metrics: tuple[str, ...] = ("linear_top1_gap", "linear_top1_cls")) -> pd.DataFrame:
    """Per group and metric: mean ± SE over seeds at matched optimiser steps and at matched training FLOPs,
    with the step each group was read at (at matched FLOPs a costlier objective is read at an earlier step)."""
    axes = group_axes(trials)
    out = []
    for metric in metrics:
        hist = probe_history(layers, trials, metric)
        if hist.empty:
            continue
        for by in ("step", "flops"):
            rows, budget = at_matched(hist, by)
            if rows.empty:
                continue
            for key, g in rows.groupby(axes, dropna=False, sort=True):
                m, se, n = mean_se(g.value)
                out.append({"group": group_name(key, axes), "lam": g.lam.iloc[0], "metric": metric,
                            "matched": "steps" if by == "step" else "FLOPs", "budget": budget,
                            "read_at_step": int(g.step.median()), "mean": m, "se": se, "seeds": n})
    return pd.DataFrame(out)


# ------------------------------------------------------------------------------------------- paper claims
# (key, claim, metric, where, sign, the paper's statement for ViT-B/16 on ImageNet). ``sign`` +1: the claim holds
# when CL's value exceeds MIM's; -1: when it is below. ``where``: "last" layer, or "peak" (MIM's best earlier
# layer minus its last layer, a within-objective claim).
CLAIMS = [
    ("attn_distance", "late-layer attention distance: CL > MIM", "attn_distance", "last", +1,
     "CL's later-layer attention reaches further (global); MIM's stays local"),
    ("attn_nmi", "late-layer attention NMI: CL < MIM", "attn_nmi", "last", -1,
     "CL's later-layer attention collapses to the same map for every query (low NMI)"),
    ("fourier", "Δ log amplitude at π (last layer): MIM > CL", "fourier_dlogamp_pi", "last", -1,
     "CL suppresses high frequencies (low-pass); MIM keeps them"),
    ("linear_gap", "last-layer linear probe (GAP): CL > MIM", "linear_top1_gap", "last", +1,
     "CL linearly separates images better (MoCo v3 ViT-B/16: 76.7% linear top-1)"),
    ("linear_cls", "last-layer linear probe (CLS): CL > MIM", "linear_top1_cls", "last", +1,
     "as above; CL trains the CLS token"),
    ("mim_peak", "MIM's linear probe (GAP) peaks before the last layer", "linear_top1_gap", "peak", +1,
     "MIM's later layers specialise to pixel prediction; its best linear features sit earlier"),
    ("dense", "last-layer dense probe mIoU: MIM > CL", "dense_miou", "last", -1,
     "MIM keeps the local information dense tasks need (MIM-pretrained ViTs lead on detection / segmentation)"),
]
# Claims on trial-level evaluations (key, claim, what, sign, the paper's statement): ``what`` is a trials column,
# or ("noise", "high" | "low"): the accuracy drop to the highest / lowest frequency band of noise (the fine-tuned
# model's where the trial fine-tuned, else the last layer's linear probe).
EVAL_CLAIMS = [
    ("finetune", "fine-tuning top-1: MIM > CL", "finetune_top1", -1,
     "SimMIM 81.90 vs MoCo v3 81.34 top-1 after fine-tuning (the hybrid: 82.29)"),
    ("noise_high", "accuracy drop to the highest-frequency noise: CL < MIM", ("noise", "high"), -1,
     "CL is low-pass (shape-like, low-frequency features): high-frequency noise hurts it less than MIM"),
    ("noise_low", "accuracy drop to the lowest-frequency noise: CL > MIM", ("noise", "low"), +1,
     "the other side of the same: CL relies on low frequencies, so low-frequency noise hurts it more"),
]


ARCHITECTURE = ("model.variant", "model.img_size", "model.pos_embed", "model.patch_embed")


def _per_trial(final: pd.DataFrame, metric: str, where: str) -> pd.Series:
    """One number per trial: the last layer's value, or (``peak``) best earlier layer minus last layer."""
    d = final[(final.metric == metric) & final["head"].isna()]
    if d.empty:
        return pd.Series(dtype=float)
    depth = d.groupby("trial").layer.transform("max")
    last = d[d.layer == depth].set_index("trial").value
    if where == "last":
        return last
    earlier = d[(d.layer < depth) & (d.layer > 0)].groupby("trial").value.max()
    return (earlier - last).dropna()


def _verdict(diff: float, se: float) -> str:
    if diff != diff:
        return "not measured"
    if se != se:
        return "holds (1 seed, no spread)" if diff > 0 else "does not hold (1 seed, no spread)"
    if diff > 2 * se:
        return "holds"
    if diff < -2 * se:
        return "opposite"
    return "unclear (within 2 SE)"


def paper_claims(final: pd.DataFrame, untrained: pd.DataFrame, trials: pd.DataFrame) -> pd.DataFrame:
    """The paper's claims on a sweep with a pure MIM (lam = 0) and a pure CL (lam = 1) group: per claim, each
    group's mean ± SE over seeds, the untrained encoder's value beside it and how far each group moved from it
    (trained minus untrained, paired per trial), the CL - MIM difference in the claim's direction with its SE, and
    a verdict (holds when the difference exceeds 2 SE). ``final`` / ``untrained``: per-layer rows of the last
    probe and of step 0."""
    lam, seed, shared = _context(trials)
    rows = [_claim_row(key, claim, paper, _per_trial(final, metric, where), _per_trial(untrained, metric, where),
                       lam, seed, shared, sign, where == "peak")
            for key, claim, metric, where, sign, paper in CLAIMS]
    return pd.DataFrame(rows)


def _context(trials: pd.DataFrame) -> tuple[pd.Series, pd.Series, bool]:
    """(lam per trial, seed per trial, whether pure MIM and pure CL share one architecture)."""
    t = trials.set_index("trial")
    seed = t[SEED] if SEED in t else pd.Series(range(len(t)), index=t.index)
    arch = [c for c in ARCHITECTURE if c in t]
    pure = t[t.lam.isin([0.0, 1.0])]
    return t.lam, seed, not arch or pure[arch].astype(str).drop_duplicates().shape[0] <= 1


def _claim_row(key: str, claim: str, paper: str, per: pd.Series, base: pd.Series, lam: pd.Series, seed: pd.Series,
               shared: bool, sign: int, mim_only: bool = False, paired: bool = True) -> dict:
    """One claim's row: per-trial values ``per`` and their untrained baselines ``base`` (indexed by trial) read
    as pure MIM vs pure CL (or, ``mim_only``, MIM's value against 0). ``paired``: the baseline is the same
    measurement of the untrained encoder, so trained minus untrained means something (not so when the trained
    value comes from another classifier, e.g. a fine-tuned model against the untrained linear probe)."""
    mim, cl = per[per.index.map(lam) == 0], per[per.index.map(lam) == 1]
    m0, s0, n0 = mean_se(mim)
    m1, s1, n1 = mean_se(cl)
    if base.empty:
        untrained_text = "–"
    elif shared:  # one architecture: a seed's untrained encoder is the same for both groups; count it once
        untrained_text = fmt_mean_se(*mean_se(base.groupby(base.index.map(seed)).first())[:2])
    else:  # e.g. MoCo v3's frozen patch projection at lam = 1 only: each group's own untrained encoder
        u0, u1 = mean_se(base[base.index.map(lam) == 0]), mean_se(base[base.index.map(lam) == 1])
        untrained_text = f"MIM {fmt_mean_se(*u0[:2])} / CL {fmt_mean_se(*u1[:2])}"
    if mim_only:  # a claim about MIM alone: its value must exceed 0
        diff, se = m0, s0
    else:
        diff, se = sign * (m1 - m0), float(np.hypot(s0, s1)) if n0 > 1 and n1 > 1 else float("nan")
    moved = (per - base).dropna() if paired else per.iloc[0:0]  # each trial against its own step-0 encoder
    return {"claim": claim, "paper (ViT-B/16, ImageNet)": paper,
            "MIM (lam=0)": fmt_mean_se(m0, s0, n0), "CL (lam=1)": fmt_mean_se(m1, s1, n1),
            "untrained": untrained_text,
            "MIM − untrained": fmt_mean_se(*mean_se(moved[moved.index.map(lam) == 0])[:2]),
            "CL − untrained": fmt_mean_se(*mean_se(moved[moved.index.map(lam) == 1])[:2]),
            "difference in the claim's direction": fmt_mean_se(diff, se),
            "verdict": _verdict(diff, se), "key": key}


def noise_drops(robustness: pd.DataFrame, every_classifier: bool = False) -> pd.DataFrame:
    """Per trial and band, the accuracy drop under that band's noise at the trial's end (``classifier``: the
    fine-tuned model where the trial fine-tuned, else the linear probe; with ``every_classifier`` both) and of the
    untrained encoder's linear probe at step 0: columns trial, band, freq_lo, freq_hi, classifier, drop,
    untrained."""
    cols = ["trial", "band", "freq_lo", "freq_hi", "classifier", "drop", "untrained"]
    d = robustness if robustness.empty else robustness[robustness.metric.str.endswith("_top1_drop")]
    if d.empty:
        return pd.DataFrame(columns=cols)
    d = d.assign(classifier=d.metric.str.replace("_top1_drop", "", regex=False))
    base = d[(d.step == 0) & (d.classifier == "linear")].set_index(["trial", "band"]).value
    end = d[d.step > 0]
    end = end[end.step == end.groupby("trial").step.transform("max")]
    tuned = end.groupby("trial").classifier.transform(lambda c: "finetune" if (c == "finetune").any() else "linear")
    end = end if every_classifier else end[end.classifier == tuned]
    untrained = [base.get((t, b), np.nan) for t, b in zip(end.trial, end.band, strict=True)]
    return end.assign(drop=end.value, untrained=untrained)[cols].reset_index(drop=True)


def eval_claims(trials: pd.DataFrame, robustness: pd.DataFrame) -> pd.DataFrame:
    """``EVAL_CLAIMS`` read as ``paper_claims`` reads the per-layer ones (rows with nothing measured say so)."""
    lam, seed, shared = _context(trials)
    t = trials.set_index("trial")
    drops = noise_drops(robustness)
    rows = []
    for key, claim, what, sign, paper in EVAL_CLAIMS:
        if isinstance(what, tuple):
            pick = drops[drops.band == (drops.band.max() if what[1] == "high" else 0)].set_index("trial")
            per, base = pick["drop"], pick["untrained"].dropna()
            clf = "/".join(sorted(pick.classifier.unique())) or "–"
            claim, paired = f"{claim} ({clf})", clf == "linear"  # the baseline is the untrained linear probe
        else:
            per = pd.to_numeric(t[what], errors="coerce").dropna() if what in t else pd.Series(dtype=float)
            base, paired = pd.Series(dtype=float), False  # fine-tuning an untrained encoder is not run
        rows.append(_claim_row(key, claim, paper, per, base, lam, seed, shared, sign, paired=paired))
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------------------- lr tuned per group
TUNING_AXES = ("optim.lr_scale", "optim.blr")


def tuned_table(trials: pd.DataFrame, metric: str = "linear_top1", higher: bool = True) -> pd.DataFrame:
    """For a sweep that varies an lr axis (``optim.lr_scale`` or ``optim.blr``) alongside lam: per group of the
    other axes, the lr value whose mean ``metric`` over seeds is best, with that mean ± SE and every candidate's
    mean. Empty when no lr axis varies. This is the per-objective lr tuning a fair comparison needs: each objective
    is compared at its own best lr, not at one shared lr that suits one of them."""
    axes = group_axes(trials)
    tune = [a for a in TUNING_AXES if a in axes]
    if not tune or metric not in trials:
        return pd.DataFrame()
    rest = [a for a in axes if a not in tune]
    rows = []
    for key, g in trials.groupby(rest, dropna=False, sort=True):
        cands = {lr[0] if len(lr) == 1 else lr: mean_se(gg[metric]) for lr, gg in g.groupby(tune, dropna=False)}
        best = (max if higher else min)(cands, key=lambda k: cands[k][0] if cands[k][0] == cands[k][0] else
                                        (-np.inf if higher else np.inf))
        m, se, n = cands[best]
        rows.append({"group": group_name(key, rest), "best " + "/".join(tune): best, metric: fmt_mean_se(m, se),
                     "seeds": n, "candidates": ", ".join(f"{k}: {v[0]:.3g}" for k, v in cands.items())})
    return pd.DataFrame(rows)
