"""Fair comparisons between objectives, as tables: mean ± standard error over seeds, values at matched optimiser
steps and at matched training FLOPs, and the paper's claims checked against a sweep.

Everything here is pandas over the results tables (``trials`` and ``layers``); the report, ``clmim results
show`` and ``benchmarks/RESULTS.md`` read the same functions. A "group" is one objective (lam) with the other
axes the sweep varies (besides the seed) held fixed; its spread is over the seeds.

A claim compares a pure CL objective with a pure MIM objective (every pair the sweep has: MoCo v3 or DINO against
SimMIM or MAE) inside one group of every other varied axis (``claim_axes``): Welch's t over seeds (n counts seeds),
a 95 % interval for the difference, Holm's correction over one table's claims (one group, one pair), and each
side's move from its untrained encoder beside it. Claims about the inside of the network read the late layers
(the last third of the blocks, ``late_layers``); claims about what a downstream head reads, the last layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import special

from trainables.vocab import family, label, objective_names, weights_of

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
# when CL's value exceeds MIM's; -1: when it is below. ``where``: "late" (the mean over the late layers,
# ``late_layers``: what happens inside the network), "last" (the encoder's output, as a linear or dense probe reads
# it), "peak" (MIM's best earlier layer minus its last, a within-MIM claim) or "cl_moved" (CL's late layers
# against its own untrained encoder, a within-CL claim).
CLAIMS = [
    ("attn_distance", "late-layer attention distance: CL > MIM", "attn_distance", "late", +1,
     "CL's later-layer attention reaches further (global); MIM's stays local"),
    ("attn_nmi", "late-layer attention NMI: CL < MIM", "attn_nmi", "late", -1,
     "CL's later-layer attention collapses to the same map for every query (low NMI)"),
    ("attn_collapse", "CL's late-layer attention is concentrated, not uniform: entropy below its untrained "
     "encoder's", "attn_entropy", "cl_moved", -1,
     "the collapse is onto a few salient tokens (uniform, untrained attention also has a low NMI)"),
    ("fourier", "late-layer Δ log amplitude at the highest frequency read, π − 2π/side: MIM > CL",
     "fourier_dlogamp_pi", "late", -1,
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
# Claims the literature states a direction for, beside the paper's: same fields, the statement naming its source.
# A family of their own (Holm over these), so adding one never moves a verdict of the paper's table. A ``metric``
# pair (a, b) is a - b per trial at the same layer: "CL's a - b exceeds MIM's" is "the CL-over-MIM lead in a is
# larger than in b".
LITERATURE_CLAIMS = [
    ("attentive", "the CL-over-MIM lead of the last layer's linear probe (CLS) shrinks under an attentive probe",
     ("linear_top1_cls", "attentive_top1"), "last", +1,
     "attentive probing closes most of MAE's linear-probe gap to CL methods (Beyond [CLS], arXiv 2412.03215; "
     "efficient probing, arXiv 2506.10178)"),
    ("lowshot", "last-layer linear probe on 1 % of the labels (GAP): CL > MIM", "linear1pct_top1_gap", "last", +1,
     "with 1 % of ImageNet's labels MAE's frozen features fall far behind joint-embedding methods (Assran et al. "
     "2022, Masked Siamese Networks)"),
    ("head_div", "late-layer attention head diversity: CL < MIM", "attn_head_div", "late", -1,
     "CL's later-layer attention maps are alike across heads as well as queries; MIM's heads stay diverse (Park et "
     "al. 2023, Sec. 2, read qualitatively from its attention maps)"),
    ("conflict_depth", "in a mix of the pair, the objectives' gradients conflict more with depth: the per-block "
     "gradient cosine falls from the first block to the last (its slope over blocks below 0)", "grad_cosine",
     "mix_depth", -1,
     "MIM's and CL's gradients conflict more in later layers, hence MIM below and CL above (Layer Grafted "
     "Pre-training, Jiang et al., ICLR 2023, Fig. 2)"),
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


ARCHITECTURE = ("model.variant", "model.img_size", "model.pos_embed", "model.patch_embed", "source_arch")
SOURCE = "source"  # an analysed checkpoint (``orchestrator/analysis.py``)
ALPHA = 0.05  # family-wise error rate of one claims table (Holm over its claims)
OBJECTIVE_AXES = ("mix", "lam", "objective.lam")  # what a claim compares; every other varied axis splits groups


# ------------------------------------------------------------------------------------------- the statistics
@dataclass
class Welch:
    """Welch's t test of ``b`` - ``a`` (unequal variances; Welch-Satterthwaite degrees of freedom), or with ``a``
    None a one-sample t test of ``b`` against 0: the difference, its 95 % interval, t, df and the two-sided p."""

    diff: float
    lo: float
    hi: float
    t: float
    df: float
    p: float
    n_a: int
    n_b: int

    @classmethod
    def of(cls, b, a=None) -> Welch:
        nan = float("nan")
        b = _finite(b)
        one = a is None  # one-sample: ``b`` against 0
        a = np.empty(0) if one else _finite(a)
        nb, na = len(b), len(a)
        if nb == 0 or (not one and na == 0):
            return cls(nan, nan, nan, nan, nan, nan, na, nb)
        diff = float(b.mean() - (0.0 if one else a.mean()))
        if nb < 2 or (not one and na < 2):  # no spread to test against
            return cls(diff, nan, nan, nan, nan, nan, na, nb)
        vb, va = b.var(ddof=1) / nb, (0.0 if one else a.var(ddof=1) / na)
        se = float(np.sqrt(va + vb))
        if se == 0:  # identical values on each side: the difference is exact
            return cls(diff, diff, diff, nan, nan, 0.0 if diff else 1.0, na, nb)
        df = float((va + vb) ** 2 / (vb ** 2 / (nb - 1) + (0.0 if one else va ** 2 / (na - 1))))
        t = diff / se
        half = float(special.stdtrit(df, 0.975)) * se  # the t distribution's quantile and tail (fast ufuncs)
        return cls(diff, diff - half, diff + half, t, df, float(2 * special.stdtr(df, -abs(t))), na, nb)

    @property
    def interval(self) -> str:
        if self.diff != self.diff:
            return "–"
        if self.lo != self.lo:
            return f"{self.diff:.3g} (no spread)"
        return f"{self.diff:.3g} [{self.lo:.3g}, {self.hi:.3g}]"

    @property
    def moved(self) -> int:
        """+1 / -1: the 95 % interval lies above / below 0; 0: it contains 0 (or nothing to test)."""
        return 1 if self.lo > 0 else -1 if self.hi < 0 else 0


def _finite(values) -> np.ndarray:
    v = pd.to_numeric(pd.Series(values), errors="coerce").to_numpy(dtype=float) if isinstance(values, pd.Series) \
        else np.asarray(values, dtype=float)
    return v[np.isfinite(v)]


def holm(p_values) -> list[float]:
    """Holm's step-down adjustment (controls the family-wise error rate) of the finite p-values; nan stays nan:
    the i-th smallest of m is multiplied by m - i, then made monotone and capped at 1 (R's ``p.adjust``).
    (statsmodels' ``multipletests`` gives the same but runs ``gc.collect()`` on every call: 70 ms here.)"""
    p = np.asarray(p_values, dtype=float)
    out = np.full(p.shape, np.nan)
    ok = np.flatnonzero(np.isfinite(p))
    order = ok[np.argsort(p[ok], kind="stable")]
    m = len(order)
    out[order] = np.minimum(1.0, np.maximum.accumulate(p[order] * (m - np.arange(m))))
    return list(out)


def _verdict(test: Welch, p_adj: float) -> str:
    """Holds / opposite when the Holm-adjusted p is below ``ALPHA`` (in the claim's / the other direction)."""
    if test.diff != test.diff:
        return "not measured"
    if test.p != test.p:
        return f"not testable (1 seed; {'in' if test.diff > 0 else 'against'} the claim's direction)"
    if p_adj < ALPHA:
        return "holds" if test.diff > 0 else "opposite"
    return "unclear"


# ------------------------------------------------------------------------------------------- the claims
# The pairs a claim compares, each CL objective against each MIM objective (the paper's is MoCo v3 vs SimMIM).
def pairs() -> tuple[tuple[str, str], ...]:
    """Every (CL objective, MIM objective) pair of the registry (MoCo v3 or DINO against SimMIM or MAE, and any
    registered objective in its family), in registration order."""
    names = objective_names()
    return tuple((cl, mim) for cl in names if family(cl) == "cl" for mim in names if family(mim) == "mim")


def late_layers(depth: int) -> list[int]:
    """The late layers every "late-layer" claim reads: the last third of the blocks, ceil(depth / 3) of them
    (9..12 of ViT-B's 12, 5..6 of 6, 3..4 of 4). One block alone is noisy: on the CPU reproduction the NMI verdict
    changed between reading the last block and the last two."""
    return list(range(depth - math.ceil(depth / 3) + 1, depth + 1))


def claim_axes(trials: pd.DataFrame) -> list[str]:
    """The axes that split claims into groups: every varied axis of the sweep (``group_axes``) except the
    objective and the seed; within a group the two sides of a pair differ only in the objective."""
    return [a for a in group_axes(trials) if a not in OBJECTIVE_AXES]


def pure_objective(trials: pd.DataFrame) -> pd.Series:
    """Per trial (indexed by trial), the one objective it trains alone (a registered objective), or None for a mix or a
    staged run: from its weights (``objective.weights.*``), else its lam (0: SimMIM, 1: MoCo v3)."""
    def one(row) -> str | None:
        if row.get("objective") == "staged":  # several objectives in turn: pure in none of them
            return None
        w = weights_of(row)
        if w is None and isinstance(row.get("lam"), (int, float)) and row["lam"] == row["lam"]:
            w = weights_of({"objective.lam": row["lam"]})
        return next(iter(w)) if w and len(w) == 1 else None
    t = trials.set_index("trial")
    return pd.Series([one(r) for r in t.to_dict("records")], index=t.index, dtype=object)


def _claim_groups(trials: pd.DataFrame):
    """(group name, pair name, {"cl": trials, "mim": trials, "mix": trials}) per combination of ``claim_axes`` and
    per (CL, MIM) pair of objectives that has pure runs of both; "mix": the group's trials that train both of the
    pair at once (a mix's own claims read them)."""
    axes = claim_axes(trials)
    pure = pure_objective(trials)
    weights = {t: weights_of(r) or {} for t, r in trials.set_index("trial").to_dict("index").items()}
    trials = trials.assign(_pure=trials.trial.map(pure))
    groups = trials.groupby(axes, dropna=False, sort=True) if axes else [((), trials)]
    for key, g in groups:
        values = key if isinstance(key, tuple) else (key,)
        name = ", ".join(f"{a}={v}" for a, v in zip(axes, values, strict=True)) or "all trials"
        for cl, mim in pairs():
            both = g.trial.map(lambda t, cl=cl, mim=mim: weights[t].get(cl, 0) > 0 and weights[t].get(mim, 0) > 0)
            sides = {"cl": g[g._pure == cl].drop(columns="_pure"), "mim": g[g._pure == mim].drop(columns="_pure"),
                     "mix": g[both.astype(bool)].drop(columns="_pure")}
            if len(sides["cl"]) and len(sides["mim"]):
                yield name, f"{label(cl)} vs {label(mim)}", sides


def _per_seed(values: pd.Series, seed: pd.Series) -> pd.Series:
    """One number per seed (the mean of that seed's trials: n counts seeds, never trials)."""
    return values.groupby(values.index.map(seed)).mean() if len(values) else values


def _peak_per_seed(d: pd.DataFrame, seed: pd.Series) -> pd.Series:
    """MIM's peak statistic without selection bias: for each seed, the earlier layer (1 .. depth-1) with the best
    mean over the *other* seeds, read on this seed, minus this seed's last layer. Choosing and measuring on the
    same numbers (the best of several noisy layers minus the last) is positive even with no peak at all."""
    if d.empty:
        return pd.Series(dtype=float)
    d = d.assign(seed=d.trial.map(seed))
    table = d.groupby(["seed", "layer"]).value.mean().unstack("layer")  # (seeds, layers)
    depth = int(table.columns.max())
    earlier = [c for c in table.columns if 0 < c < depth]
    if len(table) < 2 or not earlier:
        return pd.Series(dtype=float)
    out = {}
    for s in table.index:
        pick = table.drop(index=s)[earlier].mean().idxmax()
        out[s] = table.loc[s, pick] - table.loc[s, depth]
    return pd.Series(out, dtype=float)


def _depth_slope(rows: pd.DataFrame, metric: str) -> pd.Series:
    """Per trial, the least-squares slope of ``metric`` over its blocks (per block; head-averaged rows); trials with
    fewer than two blocks measured are left out."""
    d = rows[(rows.metric == metric) & rows["head"].isna()]
    out = {t: float(np.polyfit(g.layer.astype(float), g.value.astype(float), 1)[0])
           for t, g in d.groupby("trial") if g.layer.nunique() >= 2}
    return pd.Series(out, dtype=float)


def _per_trial(rows: pd.DataFrame, metric: str | tuple[str, str], where: str = "last") -> pd.Series:
    """Per trial, ``metric`` at its last layer (``where`` "last") or averaged over its late layers (any other
    ``where``; ``late_layers`` of the trial's depth, its largest layer), head-averaged rows; a pair (a, b): a - b."""
    if isinstance(metric, tuple):  # a - b, trial by trial
        a, b = (_per_trial(rows, m, where) for m in metric)
        return (a - b).dropna()
    d = rows[(rows.metric == metric) & rows["head"].isna()]
    if d.empty:
        return pd.Series(dtype=float)
    depth = d.groupby("trial").layer.transform("max")
    if where == "last":
        return d[d.layer == depth].set_index("trial").value
    first_late = depth.map(lambda k: late_layers(int(k))[0])
    return d[d.layer >= first_late].groupby("trial").value.mean()


def paper_claims(final: pd.DataFrame, untrained: pd.DataFrame, trials: pd.DataFrame,
                 claims: list[tuple] = CLAIMS) -> pd.DataFrame:
    """The paper's claims, one table per group of the sweep's other varied axes (``claim_axes``; the ``group``
    column) and per (CL, MIM) pair with pure runs of both (``pairs``; the ``pair`` column), over seeds. Per claim:
    each side's mean ± SE and n (seeds), the untrained encoder (step 0) and each side's trained − untrained with
    its 95 % interval (paired per seed), the difference in the claim's direction with its 95 % interval, Welch's
    t with its degrees of freedom and p, the Holm-adjusted p over the table's claims, and the verdict (holds /
    opposite at a family-wise 5 %; unclear otherwise), flagged when the side the claim is about did not move from
    the untrained encoder. ``final`` / ``untrained``: per-layer rows of the last probe and of step 0. ``claims``:
    the family read (``CLAIMS``, or ``LITERATURE_CLAIMS``); one no trial measured is "not measured" and outside
    the Holm family."""
    seed = _seeds(trials)
    out = []
    for group, pair, sides in _claim_groups(trials):
        g = pd.concat([sides["mim"], sides["cl"]])
        mine = final[final.trial.isin(g.trial)]
        base = untrained[untrained.trial.isin(g.trial)]
        rows = []
        for key, claim, metric, where, sign, paper in claims:
            if where == "mix_depth":
                mix = sides["mix"].trial
                slopes = [_depth_slope(rows_[rows_.trial.isin(mix)], metric) for rows_ in (final, untrained)]
                test = Welch.of(sign * _per_seed(slopes[0], seed))
                row = _one_sided_row(key, claim, paper, test, None, sign)
                row["untrained"] = fmt_mean_se(*mean_se(_per_seed(slopes[1], seed))[:2]) if len(slopes[1]) else "–"
                rows.append(row)
            elif where == "peak":
                d = mine[mine.trial.isin(sides["mim"].trial) & (mine.metric == metric) & mine["head"].isna()]
                rows.append(_one_sided_row(key, claim, paper, Welch.of(_peak_per_seed(d, seed)), "MIM"))
            elif where == "cl_moved":
                cl = sides["cl"].trial
                moved = (_per_trial(mine, metric, where) - _per_trial(base, metric, where)).dropna()
                test = Welch.of(sign * _per_seed(moved[moved.index.isin(cl)], seed))
                rows.append(_one_sided_row(key, claim, paper, test, "CL − untrained", sign))
            else:
                rows.append(_claim_row(key, claim, paper, _per_trial(mine, metric, where),
                                       _per_trial(base, metric, where), sides, seed, _shared(g), sign))
        out += _adjust(rows, group, pair)
    return pd.DataFrame(out, columns=CLAIM_COLUMNS)


CLAIM_COLUMNS = ["group", "pair", "claim", "paper (ViT-B/16, ImageNet)", "MIM", "CL", "untrained",
                 "MIM − untrained", "CL − untrained", "difference [95% CI]", "t (df)", "p", "p (Holm)", "verdict",
                 "key"]


def _seeds(trials: pd.DataFrame) -> pd.Series:
    """Per trial, its replicate: its seed, or for an analysed checkpoint the checkpoint (``SOURCE``: released models
    of one objective and size are that group's replicates; they share the probes' seed)."""
    t = trials.set_index("trial")
    seed = t[SEED] if SEED in t else pd.Series(range(len(t)), index=t.index)
    if SOURCE in t:
        seed = t[SOURCE].where(t[SOURCE].notna(), seed.astype(str))
    return seed


def _shared(g: pd.DataFrame) -> bool:
    """Whether both sides of group ``g`` share one architecture (one untrained encoder per seed)."""
    arch = [c for c in ARCHITECTURE if c in g]
    return not arch or g[arch].astype(str).drop_duplicates().shape[0] <= 1


def _adjust(rows: list[dict], group: str, pair: str) -> list[dict]:
    """Holm over the table's tested claims; the verdicts from the adjusted p-values."""
    adjusted = holm([r["_test"].p for r in rows])
    for r, p_adj in zip(rows, adjusted, strict=True):
        test = r.pop("_test")
        verdict = _verdict(test, p_adj)
        moved = r.pop("_moved", None)  # (CL moved in the claim's direction, MIM moved against it)
        if verdict == "holds" and moved is not None and not moved[0]:
            verdict += (", but only MIM moved the claim's way from its untrained encoder (CL did not)" if moved[1] else
                        ", but neither side moved the claim's way significantly from its untrained encoder")
        r.update({"group": group, "pair": pair, "p (Holm)": f"{p_adj:.3g}" if p_adj == p_adj else "–",
                  "verdict": verdict})
    return rows


def _claim_row(key: str, claim: str, paper: str, per: pd.Series, base: pd.Series, sides: dict, seed: pd.Series,
               shared: bool, sign: int, paired: bool = True) -> dict:
    """One claim's row (before the table's Holm adjustment): per-trial values ``per`` and their untrained
    baselines ``base`` (indexed by trial), averaged per seed, the pair's MIM side against its CL side. ``paired``:
    the baseline is the same measurement of the untrained encoder, so trained − untrained means something (not so
    when the trained value comes from another classifier, e.g. a fine-tuned model against the untrained linear
    probe)."""
    ids = {k: set(v.trial) for k, v in sides.items()}
    mim, cl = (_per_seed(per[per.index.isin(ids[k])], seed) for k in ("mim", "cl"))
    test = Welch.of(sign * cl, sign * mim)
    moved = (per - base).dropna() if paired else per.iloc[0:0]  # each trial against its own step-0 encoder
    move = {k: Welch.of(_per_seed(moved[moved.index.isin(ids[k])], seed)) for k in ("mim", "cl")}
    if base.empty:
        untrained_text = "–"
    elif shared:  # one architecture: a seed's untrained encoder is the same for both sides; count it once
        untrained_text = fmt_mean_se(*mean_se(base.groupby(base.index.map(seed)).first())[:2])
    else:  # e.g. MoCo v3's frozen patch projection on the CL side only: each side's own untrained encoder
        u = {k: mean_se(_per_seed(base[base.index.isin(ids[k])], seed)) for k in ("mim", "cl")}
        untrained_text = f"MIM {fmt_mean_se(*u['mim'][:2])} / CL {fmt_mean_se(*u['cl'][:2])}"
    return {"claim": claim, "paper (ViT-B/16, ImageNet)": paper,
            "MIM": fmt_mean_se(*mean_se(mim)), "CL": fmt_mean_se(*mean_se(cl)), "untrained": untrained_text,
            "MIM − untrained": move["mim"].interval if paired else "–",
            "CL − untrained": move["cl"].interval if paired else "–",
            "difference [95% CI]": test.interval, "t (df)": _t_text(test),
            "p": f"{test.p:.3g}" if test.p == test.p else "–", "key": key, "_test": test,
            # a CL-above-MIM difference can come from MIM moving alone: say which side moved the claim's way
            "_moved": (move["cl"].moved == sign, move["mim"].moved == -sign) if paired and base.size else None}


def _one_sided_row(key: str, claim: str, paper: str, test: Welch, column: str | None, sign: int = 1) -> dict:
    """A within-objective claim's row: one side's statistic per seed, in the claim's direction (``test``, against
    0), shown as measured (``sign`` times it) in ``column`` (None: a mix's, shown in the difference only)."""
    shown = test if sign > 0 else Welch(-test.diff, -test.hi, -test.lo, -test.t, test.df, test.p, test.n_a,
                                        test.n_b)
    cells = {"MIM": "–", "CL": "–", "untrained": "–", "MIM − untrained": "–", "CL − untrained": "–"}
    if column:
        cells[column] = shown.interval
    return {"claim": claim, "paper (ViT-B/16, ImageNet)": paper, **cells,
            "difference [95% CI]": test.interval, "t (df)": _t_text(test),
            "p": f"{test.p:.3g}" if test.p == test.p else "–", "key": key, "_test": test}


def _t_text(test: Welch) -> str:
    return f"{test.t:.2f} ({test.df:.1f})" if test.t == test.t and np.isfinite(test.t) else "–"


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
    """``EVAL_CLAIMS`` read as ``paper_claims`` reads the per-layer ones: per group and pair, Welch's t over seeds,
    Holm over the table's claims (rows with nothing measured say so)."""
    seed = _seeds(trials)
    t = trials.set_index("trial")
    drops = noise_drops(robustness)
    out = []
    for group, pair, sides in _claim_groups(trials):
        g = pd.concat([sides["mim"], sides["cl"]])
        rows = []
        for key, claim, what, sign, paper in EVAL_CLAIMS:
            if isinstance(what, tuple):
                pick = drops[drops.band == (drops.band.max() if what[1] == "high" else 0)].set_index("trial")
                pick = pick[pick.index.isin(g.trial)]
                per, base = pick["drop"], pick["untrained"].dropna()
                clf = "/".join(sorted(pick.classifier.unique())) or "–"
                label, paired = f"{claim} ({clf})", clf == "linear"  # the baseline is the untrained linear probe
            else:
                per = pd.to_numeric(t.loc[t.index.isin(g.trial), what], errors="coerce").dropna() if what in t \
                    else pd.Series(dtype=float)
                base, paired, label = pd.Series(dtype=float), False, claim  # no fine-tuning of an untrained encoder
            rows.append(_claim_row(key, label, paper, per, base, sides, seed, _shared(g), sign, paired=paired))
        out += _adjust(rows, group, pair)
    return pd.DataFrame(out, columns=CLAIM_COLUMNS)


# ------------------------------------------------------------------------------------------- lr tuned per group
TUNING_AXES = ("optim.lr_scale", "optim.blr")


def tuned_table(trials: pd.DataFrame, metric: str = "linear_top1", higher: bool = True,
                select: str = "val_linear_top1") -> pd.DataFrame:
    """For a sweep that varies an lr axis (``optim.lr_scale`` or ``optim.blr``) alongside the objective: per group
    of the other axes, the lr value whose mean ``select`` over seeds is best (the validation split: a choice read
    on the evaluation split would bias the accuracy reported for it), with that lr's mean ``metric`` ± SE on the
    evaluation split and every candidate's mean ``select``. Trials from before the validation split (no
    ``select``) are chosen on ``metric`` and say so in ``selected on``. Empty when no lr axis varies. This is the
    per-objective lr tuning a fair comparison needs: each objective is compared at its own best lr, not at one
    shared lr that suits one of them."""
    axes = group_axes(trials)
    tune = [a for a in TUNING_AXES if a in axes]
    if not tune or metric not in trials:
        return pd.DataFrame()
    held_out = select in trials and trials[select].notna().any()
    chooser = select if held_out else metric
    rest = [a for a in axes if a not in tune]
    rows = []
    for key, g in trials.groupby(rest, dropna=False, sort=True):
        cands = {lr[0] if len(lr) == 1 else lr: (mean_se(gg[chooser]), mean_se(gg[metric]))
                 for lr, gg in g.groupby(tune, dropna=False)}
        worst = -np.inf if higher else np.inf
        best = (max if higher else min)(cands, key=lambda k: cands[k][0][0] if cands[k][0][0] == cands[k][0][0]
                                        else worst)
        m, se, n = cands[best][1]
        rows.append({"group": group_name(key, rest), "best " + "/".join(tune): best, metric: fmt_mean_se(m, se),
                     "seeds": n, "selected on": f"{select} (validation split)" if held_out else
                     f"{metric} (evaluation split: these trials have no validation split)",
                     "candidates": ", ".join(f"{k}: {v[0][0]:.3g}" for k, v in cands.items())})
    return pd.DataFrame(rows)
