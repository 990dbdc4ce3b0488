"""What ``clmim results show`` prints for one sweep: status counts, the best trial per objective and variant, per-group
mean ± SE over seeds, where the trials' time went, matched budgets, the paper's claims, failed trials and storage.
DataFrames in, DataFrames out: it reads the tables (``results.py``) and the comparisons (``compare.py``)."""

from __future__ import annotations

import pandas as pd

from trainables.vocab import EVAL_PARTS

from .compare import (
    eval_claims,
    fmt_mean_se,
    layer_table,
    matched_table,
    mean_se,
    paper_claims,
    split_baseline,
    tuned_table,
)
from .layout import SweepLayout
from .results import connect, no_results, storage_bytes
from .scaling import group_axes, group_name, with_mix


def _comparisons(done, layers, robustness=None) -> list[tuple[str, object]]:
    """Per-group mean ± SE over seeds of the final probes and evaluations; where the trials' time went; the
    last-layer linear probe at matched steps and at matched FLOPs; the paper's claims when the sweep has pure MIM
    and pure CL (see ``compare.py``)."""

    axes = group_axes(done)
    metrics = [m for m in ("finetune_top1", "linear_top1_gap", "linear_top1_cls", "knn_top1_gap", "knn_top1_cls",
                           "shape_bias_gap", "shape_bias_cls", "cue_match_gap") if m in done and done[m].notna().any()]
    rows = []
    for key, g in done.groupby(axes, dropna=False, sort=True):
        row = {"group": group_name(key, axes), "seeds": len(g)}
        row.update({m: fmt_mean_se(*mean_se(g[m])[:2]) for m in metrics})
        rows.append(row)
    out = [("per group: mean ± standard error over seeds", pd.DataFrame(rows))]
    cost = time_shares(done)
    if len(cost):
        out.append(("where a trial's time went (share of its wall time, mean over the group's trials)", cost))
    tuned = tuned_table(done)
    if len(tuned):
        out.append(("lr tuned per group (the lr with the best mean over seeds on the validation split; its "
                    "linear_top1 on the evaluation split)", tuned))
    if "step" in layers and (layers.metric == "linear_top1_gap").any():
        matched = matched_table(layers, done)
        if len(matched):
            matched["value"] = [fmt_mean_se(m, se) for m, se in zip(matched["mean"], matched["se"], strict=True)]
            note = (" (read_at_step 0 is the untrained encoder: without eval.every a budget below a trial's end "
                    "falls back to step 0)" if (matched.read_at_step == 0).any() else "")
            out.append((f"last-layer linear probe at matched steps and matched training FLOPs{note}",
                        matched[["group", "metric", "matched", "budget", "read_at_step", "value", "seeds"]]))
    if "step" in layers and (layers.step == 0).any():
        final, untrained = split_baseline(layers)
        for metric in ("linear_top1_gap", "attn_distance", "attn_nmi", "attn_entropy", "fourier_dlogamp_pi"):
            table = layer_table(final, untrained, done, metric)
            if len(table):
                out.append((f"{metric} per layer (L0: patch embedding), trained and untrained (step 0): mean ± SE "
                            "over seeds", table))
    claims = paper_claims(*split_baseline(layers), done) if "step" in layers else pd.DataFrame()
    if len(claims):
        cols = ["group", "pair", "claim", "MIM", "CL", "untrained", "MIM − untrained", "CL − untrained",
                "difference [95% CI]", "p (Holm)", "verdict"]
        out.append(("the paper's claims, each pure CL objective vs each pure MIM objective per group of the other "
                    "varied axes (Welch's t over seeds, Holm over each table's claims; intervals 95 %; late layers: "
                    "the last third of the blocks)", claims[cols]))
        if robustness is not None:
            evals = eval_claims(done, robustness)
            evals = evals[evals.verdict != "not measured"]
            if len(evals):
                out.append(("evaluations (pure CL vs pure MIM)", evals[cols]))
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


def show(layout: SweepLayout) -> list[tuple[str, object]]:
    """Summary tables of one sweep: status counts, best trial per objective and variant, per-group mean ± SE over
    seeds, matched-budget and paper-claim tables, failed trials, storage."""
    name, root = layout.name, layout.root
    con = connect(root)
    if not con.execute("SELECT count(*) FROM trials WHERE sweep = ?", [name]).fetchone()[0]:
        raise no_results(layout)
    out = [("status", con.execute("SELECT status, count(*) AS trials FROM trials WHERE sweep = ? "
                                  "GROUP BY status ORDER BY status", [name]).df())]
    cols = {r[0] for r in con.execute("DESCRIBE trials").fetchall()}
    metric = "linear_top1" if "linear_top1" in cols else "loss"
    order = "DESC" if metric != "loss" else "ASC"
    by = "mix" if "mix" in cols else "objective"  # mix: one group per weight vector (tables since weights)
    # the best trial is chosen on the validation split where the trials have one; its accuracy shown is the
    # evaluation split's (choosing on the number shown would report the winner's luck with it)
    held_out = "val_linear_top1" in cols and metric != "loss"
    rank = f"val_linear_top1 DESC NULLS LAST, {metric} DESC NULLS LAST" if held_out else f"{metric} {order} NULLS LAST"
    shown = f"val_linear_top1, {metric}" if held_out else metric
    title = (f"best trial per objective and variant (chosen on val_linear_top1, the validation split; {metric} is "
             "the evaluation split's)" if held_out else f"best {metric} per objective and variant")
    out.append((title, con.execute(f"""
        SELECT {by}, variant, lam, trial, {shown}, knn_top1, step, wall_time_s FROM (
          SELECT *, row_number() OVER (PARTITION BY {by}, variant ORDER BY {rank}) AS r
          FROM trials WHERE sweep = ? AND status = 'TERMINATED') WHERE r = 1 ORDER BY variant, {by}""",
                                   [name]).df()))
    done = with_mix(con.execute("SELECT * FROM trials WHERE sweep = ? AND status = 'TERMINATED'", [name]).df())
    if len(done):
        layers = con.execute("SELECT l.*, t.lam FROM layers l JOIN trials t USING (sweep, trial) "
                             "WHERE l.sweep = ? AND t.status = 'TERMINATED' AND l.head IS NULL", [name]).df()
        robustness = con.execute("SELECT r.* FROM robustness r JOIN trials t USING (sweep, trial) WHERE r.sweep = ? "
                                 "AND t.status = 'TERMINATED'", [name]).df()
        out += _comparisons(done, layers, robustness)
    failed = con.execute("SELECT trial, status, error FROM trials WHERE sweep = ? AND status <> 'TERMINATED' "
                         "ORDER BY trial", [name]).df()
    if len(failed):
        out.append(("failed or unfinished trials", failed))
    b = storage_bytes(layout)
    n = max(1, b["trials"])
    parts = [("results root (tables, reports" + ("" if layout.storage else ", trial files") + ")", b["driver"])]
    if layout.storage:
        parts.append((f"storage {layout.store.display(layout.experiment_path)}", b["storage"]))
    parts.append(("  of which checkpoints and final weights", b["checkpoints"]))
    storage = pd.DataFrame([{"sweep": name, "part": p, "MB": round(v / 1e6, 1), "MB per trial": round(v / n / 1e6, 2)}
                            for p, v in parts])
    out.append(("storage", storage))
    return out
