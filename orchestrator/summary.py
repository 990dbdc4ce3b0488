"""The one list of a sweep's result sections: status counts, the best trial per objective and variant, per-group
mean ± SE over seeds, where the trials' time went, lr tuned per group, matched budgets, per-layer tables, the
paper's claims (at the end and at every probed step), the evaluations' claims, noise robustness per band, CKA with
the untrained encoder, how well early signals rank the trials (``early_signals``), a multi-objective search's Pareto
front (``pareto``), PBT's exploits (``schedules``), failed trials.

DataFrames in (``query.SweepFrames``), DataFrames out, no I/O. Every view renders this list: the console
(``clmim results show``), the HTML report (``report.py``) and the Markdown of ``benchmarks/repro_claims.py``; each
picks the sections it shows by ``key`` and may add its own prose, never its own numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from trainables.vocab import EVAL_PARTS

from .compare import (
    LITERATURE_CLAIMS,
    eval_claims,
    fmt_mean_se,
    layer_table,
    matched_table,
    mean_se,
    noise_drops,
    paper_claims,
    split_baseline,
    tuned_table,
)
from .early_signals import AT, TARGET, early_signal_table
from .pareto import pareto_front
from .query import SweepFrames
from .records import Status
from .scaling import group_axes, group_name
from .schedules import exploit_table

# per-group columns: final probes and evaluations (each shown where the sweep measured it)
GROUP_METRICS = ("finetune_top1", "linear_top1_gap", "linear_top1_cls", "knn_top1_gap", "knn_top1_cls",
                 "shape_bias_gap", "shape_bias_cls", "cue_match_gap", "linear_top1_clean", "finetune_top1_clean")
LAYER_METRICS = ("linear_top1_gap", "linear_top1_cls", "attn_distance", "attn_nmi", "attn_entropy",
                 "fourier_dlogamp_pi", "grad_cosine")  # (grad_cosine: mixes only; its step-0 row is at init)


@dataclass
class Section:
    key: str  # what a view selects it by: "claims", "layer/attn_nmi", ...
    title: str
    table: pd.DataFrame


def sections(frames: SweepFrames) -> list[Section]:
    """Every section the sweeps' frames support, in the order the console shows them."""
    trials, done = frames.trials, frames.done
    out = [Section("status", "status", trials.groupby("status").size().reset_index(name="trials"))]
    if len(done):
        out.append(best_section(done))
        out += comparisons(done, frames.layers, frames.robustness)
        early = early_signal_table(done, frames.signals)
        if len(early):
            out.append(Section("early_signals", f"early signals: read at <= {AT:.0%} of each run, Spearman's rho "
                                                f"with the final {TARGET} (in the signal's direction)", early))
    front = pareto_front(done, frames.objectives) if len(done) else pd.DataFrame()
    if len(front):
        out.append(Section("pareto", "Pareto front of the search's objectives ("
                           + ", ".join(f"{m}: {d}" for m, d in frames.objectives.items())
                           + "): the trials no other beats on every objective", front))
    if not frames.lineage.empty:
        out.append(Section("lineage", "PBT exploits: each continued from its parent's checkpoint at that step, "
                                      "with the mutated hyperparameters before → after", exploit_table(frames.lineage)))
    failed = trials[trials.status != Status.TERMINATED.value][["trial", "status", "error"]]
    if len(failed):
        out.append(Section("failed", "failed or unfinished trials", failed.reset_index(drop=True)))
    return out


def best_section(done: pd.DataFrame) -> Section:
    """The best trial per objective and variant: chosen on the validation split where the trials have one, its
    accuracy shown on the evaluation split (choosing on the number shown would report the winner's luck)."""
    metric = "linear_top1" if "linear_top1" in done else "loss"
    by = "mix" if "mix" in done else "objective"  # mix: one group per weight vector
    held_out = "val_linear_top1" in done and metric != "loss"
    rank = ["val_linear_top1", metric] if held_out else [metric]
    shown = [c for c in (by, "variant", "lam", "trial", *rank, "knn_top1", "step", "wall_time_s") if c in done]
    best = (done.sort_values(rank, ascending=metric == "loss", na_position="last", kind="stable")
            .groupby([by, "variant"], dropna=False, sort=False).head(1)
            .sort_values(["variant", by], kind="stable")[shown].reset_index(drop=True))
    title = (f"best trial per objective and variant (chosen on val_linear_top1, the validation split; {metric} is "
             "the evaluation split's)" if held_out else f"best {metric} per objective and variant")
    return Section("best", title, best)


def comparisons(done: pd.DataFrame, layers: pd.DataFrame, robustness: pd.DataFrame | None = None) -> list[Section]:
    """The sections that compare groups of finished trials (see the module docstring)."""
    axes = group_axes(done)
    metrics = [m for m in GROUP_METRICS if m in done and done[m].notna().any()]
    rows = []
    for key, g in done.groupby(axes, dropna=False, sort=True):
        row = {"group": group_name(key, axes), "seeds": len(g)}
        row.update({m: fmt_mean_se(*mean_se(g[m])[:2]) for m in metrics})
        rows.append(row)
    out = [Section("per_group", "per group: mean ± standard error over seeds", pd.DataFrame(rows))]
    cost = time_shares(done)
    if len(cost):
        out.append(Section("time", "where a trial's time went (share of its wall time, mean over the group's "
                                   "trials)", cost))
    tuned = tuned_table(done)
    if len(tuned):
        out.append(Section("tuned", "lr tuned per group (the lr with the best mean over seeds on the validation "
                                    "split; its linear_top1 on the evaluation split)", tuned))
    probed = "step" in layers and len(layers)
    trained = done[done["step"].notna()] if "step" in done else done  # (an analysed checkpoint has no step count)
    if probed and len(trained) and (layers.metric == "linear_top1_gap").any():
        matched = matched_table(layers[layers.trial.isin(trained.trial)], trained)
        if len(matched):
            matched["mean ± SE"] = [fmt_mean_se(m, se) for m, se in zip(matched["mean"], matched["se"], strict=True)]
            note = (" (read_at_step 0 is the untrained encoder: without eval.every a budget below a trial's end "
                    "falls back to step 0)" if (matched.read_at_step == 0).any() else "")
            out.append(Section("matched", f"last-layer linear probe at matched steps and matched training FLOPs{note}",
                               matched[["group", "metric", "matched", "budget", "read_at_step", "mean ± SE",
                                        "seeds"]]))
    if not probed or not (layers.step == 0).any():
        return out + _evaluations(done, layers, robustness)
    final, untrained = split_baseline(layers)
    for metric in LAYER_METRICS:
        table = layer_table(final, untrained, done, metric)
        if len(table):
            out.append(Section(f"layer/{metric}", f"{metric} per layer (L0: patch embedding), trained and untrained "
                                                  "(step 0): mean ± SE over seeds", table))
    claims = paper_claims(final, untrained, done)
    if len(claims):
        out.append(Section("claims", "the paper's claims, each pure CL objective vs each pure MIM objective per "
                                     "group of the other varied axes (Welch's t over seeds, Holm over each table's "
                                     "claims; intervals 95 %; late layers: the last third of the blocks)",
                           claims.drop(columns="key")))
        literature = paper_claims(final, untrained, done, LITERATURE_CLAIMS)
        if (literature.verdict != "not measured").any():  # (sweeps before these probes: not shown)
            out.append(Section("claims_literature", "claims the literature states a direction for, read the same way "
                                                    "(a family of their own: Holm over these claims)",
                               literature.drop(columns="key").rename(
                                   columns={"paper (ViT-B/16, ImageNet)": "the literature's statement"})))
        steps = sorted(int(s) for s in layers.step.dropna().unique() if s > 0)
        if len(steps) > 1:  # (one probed step after 0 is the claims table itself)
            per_step = {"group": list(claims.group), "pair": list(claims.pair), "claim": list(claims.claim)}
            for s in steps:
                per_step[f"step {s}"] = list(paper_claims(layers[layers.step == s], untrained, done).verdict)
            out.append(Section("claims_per_step", "the claims' verdict at every probed step", pd.DataFrame(per_step)))
    return out + _evaluations(done, layers, robustness)


def _evaluations(done: pd.DataFrame, layers: pd.DataFrame, robustness: pd.DataFrame | None) -> list[Section]:
    """Fine-tuning and noise claims, the top-1 drop per noise band, CKA of each layer with the untrained encoder."""
    out = []
    axes = group_axes(done)
    if robustness is not None:
        evals = eval_claims(done, robustness)
        evals = evals[evals.verdict != "not measured"]
        if len(evals):
            out.append(Section("evaluations", "evaluations (pure CL vs pure MIM)", evals.drop(columns="key")))
        drops = noise_drops(robustness, every_classifier=True)
        if len(drops):
            d = drops.merge(done[["trial", *axes]], on="trial")
            table = {}
            for (clf, key), g in d.groupby(["classifier", axes[0] if len(axes) == 1 else axes], dropna=False):
                table[f"{clf}: {group_name(key, axes)}"] = {b: fmt_mean_se(*mean_se(gb["drop"])[:2])
                                                          for b, gb in g.groupby("band")}
            base = d.groupby("band").untrained.mean()
            table["untrained linear probe (step 0)"] = {b: f"{v:.3g}" for b, v in base.items()}
            noise = pd.DataFrame(table).T
            noise.columns = [f"band {b}" for b in noise.columns]
            out.append(Section("noise", "top-1 drop under band-passed noise (band 0 = lowest frequency)",
                               noise.reset_index(names="classifier: group")))
    cka = layers[layers.metric == "cka_untrained"] if "metric" in layers else layers
    if len(cka):
        cka = cka[cka.step == cka.groupby("trial").step.transform("max")].drop(columns=[c for c in axes if c in cka])
        cka = cka.merge(done[["trial", *axes]], on="trial")
        table = {group_name(key, axes): {k: fmt_mean_se(*mean_se(gk.value)[:2]) for k, gk in g.groupby("layer")}
                 for key, g in cka.groupby(axes[0] if len(axes) == 1 else axes, dropna=False)}
        cka_table = pd.DataFrame(table).T
        cka_table.columns = [f"layer {k}" for k in cka_table.columns]
        out.append(Section("cka", "CKA of each layer with the untrained encoder, at the end (1 = unchanged)",
                           cka_table.reset_index(names="group")))
    return out


def time_shares(done):
    """Per group: the share of a trial's wall time spent training and in each evaluation (``seconds_<part>`` /
    ``wall_time_s``), the evaluations together, and the rest (start-up, data, reporting); empty without timings."""
    cols = [f"seconds_{p}" for p in EVAL_PARTS if f"seconds_{p}" in done and done[f"seconds_{p}"].notna().any()]
    if not cols or "wall_time_s" not in done:
        return pd.DataFrame()
    axes = group_axes(done)
    rows = []
    for key, g in done.groupby(axes, dropna=False, sort=True):
        wall = pd.to_numeric(g.wall_time_s, errors="coerce")
        share = {c[8:]: (pd.to_numeric(g[c], errors="coerce").fillna(0) / wall).mean() for c in cols}
        evals = sum(v for k, v in share.items() if k != "train")
        rows.append({"group": group_name(key, axes), "wall s": round(float(wall.mean()), 1),
                     **{k: round(float(v), 3) for k, v in share.items()}, "evaluations": round(float(evals), 3),
                     "other": round(float(1 - evals - share.get("train", 0)), 3)})
    return pd.DataFrame(rows)
