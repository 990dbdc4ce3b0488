"""``clmim report NAME``: one self-contained HTML page per sweep (figures embedded as base64 PNG), plus the same
figures as PNG files beside it, and the page attached to the sweep's MLflow parent run.

Sections: a numbers-only summary of what differed between objectives; the paper's claims checked against the
sweep (when it has pure MIM and pure CL); status and failures; training loss per trial; per-layer curves per
group (attention distance, attention NMI, Fourier delta log amplitude at the highest frequency, linear-probe
accuracy vs depth for GAP and CLS features, as in the paper's figures) with the untrained encoder beside them;
the linear probe against optimiser steps and against training FLOPs, and a table of both at matched budgets; the
lam curve (fine-tuning top-1 beside the probes); the accuracy drop under frequency-filtered noise per band; the
dense probe and CKA with the untrained encoder per layer; scaling curves
with fitted power laws and exponent intervals (when the sweep varies model size); the best configurations.
Curves are means over seeds with ± 1 standard error bars; accuracy axes carry the chance level of the data set.

Only the page and its figures are written (``report.html``, ``<figure>.png`` beside it) and only those files are
attached to MLflow, wherever ``--out`` points.
"""

from __future__ import annotations

import base64
import html
import io
import zlib
from pathlib import Path

import matplotlib

from .scaling import scaling_table

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from mlflow.tracking import MlflowClient

from trainables.files import write_bytes_atomic, write_text_atomic
from trainables.objectives import objectives  # noqa: E402
from trainables.vocab import layer_keys  # noqa: E402

from .cka import heatmap, trial_cka
from .compare import (  # noqa: E402
    fmt_mean_se,
    group_axes,
    group_name,
    mean_se,
    noise_drops,
    probe_history,
    split_baseline,
)
from .layout import SweepLayout  # noqa: E402
from .query import QueryError, no_results, sweep_frames  # noqa: E402
from .scaling import chance_level  # noqa: E402
from .schedules import ancestral_schedules  # noqa: E402
from .summary import sections  # noqa: E402

# (metric, panel title, y-axis label with units)
LAYER_METRICS = [("attn_distance", "mean attention distance", "distance (pixels)"),
                 ("attn_nmi", "attention NMI", "NMI (0 = uniform, 1 = one-to-one)"),
                 ("attn_entropy", "attention entropy", "entropy / log n (1 = uniform)"),
                 ("fourier_dlogamp_pi", "Δ log amplitude, highest frequency", "Δ log amplitude (π − 2π/side vs 0)"),
                 ("linear_top1_gap", "linear probe top-1, GAP", "top-1 accuracy (fraction)"),
                 ("linear_top1_cls", "linear probe top-1, CLS", "top-1 accuracy (fraction)"),
                 ("dense_miou", "dense probe (per patch)", "mIoU (fraction)"),
                 ("cka_untrained", "CKA with the untrained encoder", "linear CKA (1 = layer unchanged)")]
ACCURACY = ("linear_top1_gap", "linear_top1_cls")

def _chance_line(ax, chance: float | None) -> None:
    if chance is not None:
        ax.axhline(chance, color="grey", ls="--", lw=1, label=f"chance ({chance:.3g})")


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _table_html(df: pd.DataFrame) -> str:
    """A table in its own horizontally scrolling box (a wide table never widens the page), without its empty
    columns (e.g. the placement keys of a sweep that grafts nothing)."""
    df = df.dropna(axis=1, how="all")
    table = df.to_html(index=False, float_format=lambda v: f"{v:.4g}", na_rep="–", border=0, classes="t")
    return f'<div class="scroll">{table}</div>'


def lam_color(lam: float):
    """One colour per lam, MIM (0) dark purple through teal to CL (1) green: no grey or pale middle that could be
    mistaken for the untrained encoder's dashed grey line."""
    return plt.get_cmap("viridis")(0.85 * float(lam))


# Objectives off the SimMIM / MoCo v3 line in their own colours (each declaration's ``color``: MAE red, DINO blue,
# none the viridis line takes); other mixes from a palette, the same colour for the same mix in every figure.
PALETTE = ("#8c564b", "#e377c2", "#ff7f0e", "#17becf", "#bcbd22", "#7f7f7f")


def group_color(g: pd.DataFrame):
    """The colour of a group's rows: by lam on the SimMIM / MoCo v3 line, else its objective's own colour when one
    trains alone, else by its mix's label (``PALETTE``)."""
    lam, mix = g.lam.iloc[0], g["mix"].iloc[0] if "mix" in g else None
    if pd.notna(lam):
        return lam_color(lam)
    label = str(mix)
    own = {o.label: o.color for o in objectives()}
    return own.get(label, PALETTE[zlib.crc32(label.encode()) % len(PALETTE)])


def _seed_curve(d: pd.DataFrame, x: str) -> pd.DataFrame:
    """mean and standard error of ``value`` over trials (seeds) at each ``x``."""
    g = d.groupby(x).value
    return pd.DataFrame({"mean": g.mean(), "se": g.std(ddof=1) / np.sqrt(g.count())}).fillna({"se": 0.0})


PANELS_PER_ROW = 3  # at the page's 1,400 px, ~450 px a panel: axis labels stay readable


def _untrained_lines(untrained: pd.DataFrame, metric: str, axes_cols: list[str]) -> list[tuple[str, pd.Series, str]]:
    """The untrained encoder's curve of ``metric`` (mean over trials per layer): one grey line when every group's
    is the same, else one per group in the group's colour (groups that differ in architecture or seed start from
    different encoders)."""
    u = untrained[untrained.metric == metric]
    if u.empty:
        return []
    per = [(group_name(k, axes_cols), g.groupby("layer").value.mean(), group_color(g))
           for k, g in u.groupby(axes_cols, dropna=False)]
    first = per[0][1]
    if all(len(c) == len(first) and np.allclose(c.values, first.values, rtol=1e-6, atol=1e-9) for _, c, _ in per):
        return [("untrained (step 0)", first, "grey")]
    return [(f"untrained: {name}", c, color) for name, c, color in per]


def layer_figure(layers: pd.DataFrame, chance: float | None = None,
                 untrained: pd.DataFrame | None = None, axes_cols: list[str] | None = None) -> tuple[bytes, int]:
    """Per-layer curves, one line per group (lam and the other varied axes) with ± 1 SE over seeds, one panel per
    metric in a grid of ``PANELS_PER_ROW``; the untrained encoder (step 0) dashed (``_untrained_lines``). Returns
    the PNG and its panels per row."""
    axes_cols = axes_cols or ["mix"]
    metrics = [m for m in LAYER_METRICS if (layers.metric == m[0]).any()]
    cols = min(PANELS_PER_ROW, len(metrics))
    rows = -(-len(metrics) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.6 * rows), squeeze=False)
    flat = list(axes.flat)
    for ax in flat[len(metrics):]:
        ax.set_visible(False)
    for ax, (metric, title, ylabel) in zip(flat, metrics, strict=False):
        d = layers[layers.metric == metric]
        for key, g in d.groupby(axes_cols, dropna=False):
            c = _seed_curve(g.groupby(["trial", "layer"]).value.mean().reset_index(), "layer")
            ax.errorbar(c.index, c["mean"], yerr=c["se"], marker="o", ms=3, capsize=2, color=group_color(g),
                        label=group_name(key, axes_cols))
        if untrained is not None and not untrained.empty:
            for label, u, color in _untrained_lines(untrained, metric, axes_cols):
                ax.plot(u.index, u.values, color=color, ls="--", lw=1.2, label=label)
        if metric in ACCURACY:
            _chance_line(ax, chance)
        ax.set_xlabel("layer (0 = patch embedding)")
        ax.set_ylabel(ylabel, fontsize=9)
        ax.set_title(title, fontsize=11)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    handles, labels = {}, {}
    for ax in flat[:len(metrics)]:  # every panel's entries once (an untrained line per group may be in some only)
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(lab, h)
    labels = list(handles)
    fig.legend([handles[lab] for lab in labels], labels, loc="upper center", bbox_to_anchor=(0.5, 0.0),
               ncol=min(len(labels), 4), fontsize=9,
               title="SimMIM (lam 0) … MoCo v3 (lam 1), MAE, DINO, mixes; bars: ± 1 SE over seeds", title_fontsize=9)
    return _png(fig), cols


def budget_figure(layers: pd.DataFrame, trials: pd.DataFrame, chance: float | None = None) -> bytes:
    """Last-layer linear probe (GAP and CLS) against optimiser steps and against training FLOPs, one line per
    group with ± 1 SE over seeds: the two ways of matching a budget (CL costs ~2.7x MIM's FLOPs per image)."""
    axes_cols = group_axes(trials)
    fig, axes = plt.subplots(2, 2, figsize=(10, 6.8))
    for row, metric in enumerate(ACCURACY):
        hist = probe_history(layers, trials, metric)
        for col, (x, xlabel) in enumerate((("step", "optimiser step"), ("flops", "training FLOPs"))):
            ax = axes[row][col]
            for key, g in hist.dropna(subset=[x]).groupby(axes_cols, dropna=False):
                c = _seed_curve(g, x)  # a group's seeds share their config, so their FLOPs per step too
                ax.errorbar(c.index, c["mean"], yerr=c["se"], marker="o", ms=3, capsize=2,
                            color=group_color(g), label=group_name(key, axes_cols))
            ax.set_xlabel(xlabel)
            # no chance line here: it would squeeze the differences this figure is for into a sliver
            where = f", chance {chance:.3g}" if chance is not None else ""
            ax.set_ylabel(f"last-layer {metric.replace('_', ' ')} (fraction{where})", fontsize=8)
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    return _png(fig)


def loss_figure(curves: pd.DataFrame, trials: pd.DataFrame) -> bytes:
    """Training loss against step, one line per trial, coloured by its objective (lam or mix)."""
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    by_trial = trials.set_index("trial")
    for trial, g in curves.groupby("trial"):
        g = g.sort_values("step")
        t = by_trial.loc[[trial]] if trial in by_trial.index else None
        ax.plot(g.step, g.value, color=group_color(t) if t is not None else "black", lw=1.2, alpha=0.85,
                label=f"{trial[-5:]} ({t['mix'].iloc[0] if t is not None else '?'})")
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("training loss (objective's own units)")
    ax.grid(alpha=0.3)
    if curves.trial.nunique() <= 12:
        ax.legend(fontsize=7)
    return _png(fig)


def lam_figure(trials: pd.DataFrame, chance: float | None = None) -> bytes:
    """Final last-layer accuracy against lam, GAP and CLS features: mean ± 1 standard error over trials."""
    fig, ax = plt.subplots(figsize=(5, 3.4))
    metrics = [m for m in ("finetune_top1", "linear_top1_gap", "linear_top1_cls", "knn_top1_gap", "knn_top1_cls")
               if m in trials]
    for metric in metrics or ["linear_top1", "knn_top1"]:  # files from before both poolings were probed
        if metric not in trials:
            continue
        values = pd.to_numeric(trials[metric], errors="coerce")
        if values.isna().all():
            continue
        g = values.groupby(trials.lam).agg(["mean", "sem"]).fillna({"sem": 0.0})  # NaN lam (off the line) left out
        ax.errorbar(g.index, g["mean"], yerr=g["sem"], marker="o", ms=3, capsize=2, label=metric)
    _chance_line(ax, chance)
    ax.set_xlabel("lam  (0 = SimMIM, 1 = MoCo v3)")
    ax.set_ylabel("top-1 accuracy (fraction)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def noise_figure(drops: pd.DataFrame, trials: pd.DataFrame) -> bytes:
    """Accuracy drop under band-passed noise against the band's frequency, one line per group (± 1 SE over seeds),
    one panel per classifier (fine-tuned model, linear probe); the untrained encoder's linear probe dashed in the
    linear probe's panel."""
    axes_cols = group_axes(trials)
    d = drops.merge(trials[["trial", *{*axes_cols, "lam"}]], on="trial")
    d = d.assign(freq=(d.freq_lo + d.freq_hi) / 2 / np.pi)
    classifiers = sorted(d.classifier.unique(), reverse=True)  # finetune first
    fig, axes = plt.subplots(1, len(classifiers), figsize=(5.2 * len(classifiers), 3.6), squeeze=False)
    for ax, clf in zip(axes[0], classifiers, strict=True):
        g_all = d[d.classifier == clf]
        for key, g in g_all.groupby(axes_cols, dropna=False):
            c = _seed_curve(g.rename(columns={"drop": "value"}), "freq")
            ax.errorbar(c.index, c["mean"], yerr=c["se"], marker="o", ms=3, capsize=2, color=group_color(g),
                        label=group_name(key, axes_cols))
        u = d.groupby("freq").untrained.mean().dropna()
        if len(u) and clf == "linear":  # the untrained baseline is a linear probe's: drawn with its own kind
            ax.plot(u.index, u.values, color="grey", ls="--", lw=1.2, label="untrained, linear probe (step 0)")
        ax.axhline(0, color="black", lw=0.6)
        ax.set_xlabel("noise band centre (fraction of π; low → high frequency)")
        ax.set_ylabel("top-1 drop (clean − noisy)", fontsize=8)
        ax.set_title("fine-tuned model" if clf == "finetune" else "last-layer linear probe", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return _png(fig)


def scaling_figure(trials: pd.DataFrame, fits: pd.DataFrame) -> bytes:
    """Error against parameters per objective group, with the fitted power law."""
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for mix, g in trials.groupby("mix"):
        ax.scatter(g.params, 1 - g.linear_top1, color=group_color(g), s=14, label=mix)
        f = fits[fits["mix"] == mix] if "b" in fits and "mix" in fits else fits.iloc[0:0]
        if len(f) and pd.notna(f.b.iloc[0]):
            xs = np.logspace(np.log10(g.params.min()), np.log10(g.params.max()), 50)
            row = f.iloc[0]
            ax.plot(xs, row.a * xs**row.b + (row.c or 0), color=group_color(g),
                    label=f"b={row.b:.3f} [{row.b_low:.3f}, {row.b_high:.3f}]")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("encoder parameters (count)")
    ax.set_ylabel("error = 1 − linear top-1 (fraction)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    return _png(fig)


def schedule_figure(schedules: pd.DataFrame, done: pd.DataFrame) -> bytes:
    """PBT: each mutated hyperparameter against step, one step line per trial, the schedule its final weights
    trained under (its ancestors' values before each exploit: ``schedules.ancestral_schedules``); the best trial
    on the validation linear probe (where measured) drawn bold."""
    keys = sorted(schedules.key.unique())
    fig, axes = plt.subplots(1, len(keys), figsize=(4.8 * len(keys), 3.4), squeeze=False)
    best = None
    if "val_linear_top1" in done and done.val_linear_top1.notna().any():
        best = done.loc[done.val_linear_top1.idxmax(), "trial"]
    for ax, key in zip(axes[0], keys, strict=True):
        for trial, g in schedules[schedules.key == key].groupby("trial", sort=True):
            ax.step(g.step, g.value, where="post", lw=2.4 if trial == best else 1.0, alpha=0.9,
                    label=trial[-5:] + (" (best)" if trial == best else ""))
        ax.set_xlabel("optimiser step")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
        if schedules.trial.nunique() <= 12:
            ax.legend(fontsize=7)
    fig.tight_layout()
    return _png(fig)


def pareto_figure(done: pd.DataFrame, objectives: dict[str, str], front: pd.DataFrame) -> bytes:
    """The first two objectives of a multi-objective search: every finished trial, the Pareto front (over all the
    objectives: ``pareto.pareto_front``, the summary's table) marked and joined in the first's order."""
    x, y = list(objectives)[:2]
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    ax.scatter(pd.to_numeric(done[x], errors="coerce"), pd.to_numeric(done[y], errors="coerce"), s=14,
               color="0.6", label="trials")
    f = front.sort_values(x)
    ax.plot(f[x], f[y], "o-", color="C3", ms=5, lw=1.2, label="Pareto front")
    ax.set_xlabel(f"{x} ({'higher' if objectives[x] == 'max' else 'lower'} is better)")
    ax.set_ylabel(f"{y} ({'higher' if objectives[y] == 'max' else 'lower'} is better)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def _mean_se(values: pd.Series) -> str:
    return fmt_mean_se(*mean_se(values)[:2])


def summary_text(done: pd.DataFrame, layers: pd.DataFrame, chance: float | None,
                 untrained: pd.DataFrame | None = None) -> str:
    """One paragraph of numbers: per objective group, the final probes and last-layer attention; the untrained
    encoder's values; which group is highest on the linear probe and by how much. No claim the numbers do not
    carry."""
    parts = []
    last = layers[layers.layer == layers.layer.max()] if not layers.empty else layers
    for mix, g in done.groupby("mix"):
        att = last[last.trial.isin(g.trial)] if not last.empty else last
        dist = att[att.metric == "attn_distance"].value if not att.empty else pd.Series(dtype=float)
        nmi = att[att.metric == "attn_nmi"].value if not att.empty else pd.Series(dtype=float)
        parts.append(f"{mix}, {len(g)} trial(s): linear top-1 {_mean_se(g.linear_top1)}, "
                     f"kNN top-1 {_mean_se(g.knn_top1)}, last-layer attention distance {_mean_se(dist)} px, "
                     f"NMI {_mean_se(nmi)}")
    text = "Per objective (mean ± standard error over trials where there are several): " + "; ".join(parts) + "."
    if untrained is not None and not untrained.empty:
        u = untrained[untrained.layer == untrained.layer.max()].groupby("metric").value.mean()
        text += (f" The untrained encoder (step 0, same seeds) gives linear top-1 (GAP) "
                 f"{u.get('linear_top1_gap', u.get('linear_top1', np.nan)):.3g},"
                 f" last-layer attention distance {u.get('attn_distance', np.nan):.3g} px, NMI "
                 f"{u.get('attn_nmi', np.nan):.3g}: a probe value means something only against these.")
    means = done.groupby("mix").linear_top1.mean().dropna()
    if len(means) > 1:
        hi, lo = means.idxmax(), means.idxmin()
        text += (f" Highest mean linear top-1: {hi} ({means[hi]:.3g}), "
                 f"{means[hi] - means[lo]:.3g} above the lowest, {lo} ({means[lo]:.3g}).")
    if chance is not None:
        text += f" Chance level is {chance:.3g}."
    if done.groupby("mix").size().max() < 3:
        text += (" With fewer than 3 trials (seeds) per objective there is no usable spread: treat differences as "
                 "unconfirmed.")
    return text


def _pure_cka(layout: SweepLayout, done: pd.DataFrame) -> tuple[bytes, str, str] | None:
    """The CKA heatmap of the sweep's first pure-MIM trial against its first pure-CL trial (lowest seed), when both
    kept their final weights; None otherwise."""
    seed = "run.seed" if "run.seed" in done else "trial"
    pick = {lam: done[done.lam == lam].sort_values([seed, "trial"]).trial.tolist()[:1] for lam in (0.0, 1.0)}
    if not (pick[0.0] and pick[1.0]):
        return None
    mim, cl = pick[0.0][0], pick[1.0][0]
    if not all(layout.store.exists(f"{layout.run_path(t)}/model.pt") for t in (mim, cl)):
        return None
    return heatmap(trial_cka(layout, mim, layout, cl), f"MIM {mim}", f"CL {cl}"), mim, cl


def _page(name: str, parts: list[str]) -> str:
    """The self-contained HTML page around the report's ``parts``, with the script a headless browser reads."""
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>clmim {html.escape(name)}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1400px}} img.fig{{max-width:100%}}
table.t{{border-collapse:collapse;font-size:13px}} table.t td,table.t th{{padding:3px 8px;border-bottom:1px solid #ddd}}
p.summary{{max-width:1000px;line-height:1.4}} div.scroll{{overflow-x:auto;max-width:100%}}
p.note{{background:#fff6d5;padding:4px 8px;max-width:1000px}}
</style></head><body>{''.join(parts)}
<script>
// lets a headless browser check the page: every figure decoded (data-figures="loaded/total"), the rendered
// width of one panel of each grid figure (data-panel-px), and that nothing widens the page (data-page-px)
window.addEventListener("load", () => {{
  const imgs = [...document.images];
  const b = document.body.dataset;
  b.figures = imgs.filter(i => i.complete && i.naturalWidth > 0).length + "/" + imgs.length;
  b.panelPx = imgs.filter(i => i.dataset.panelsPerRow)
    .map(i => i.alt + ":" + Math.round(i.clientWidth / Number(i.dataset.panelsPerRow))).join(",");
  b.pagePx = document.documentElement.scrollWidth;
}});
</script></body></html>"""


def _figures(layout: SweepLayout, frames, all_layers: pd.DataFrame, layers: pd.DataFrame, untrained: pd.DataFrame,
             axes_cols: list[str], chance: float | None, front: pd.DataFrame):
    """The report's figures: [(key, title, PNG)], panels per row of the grid figures (the browser test checks each
    panel's rendered width), and the scaling fits (empty unless the sweep varies model size). ``all_layers``: every
    probed step; ``layers``, ``untrained``: its final and step-0 rows (``split_baseline``); ``front``: the summary's
    Pareto front (empty unless the sweep optimised several objectives)."""
    trials, done, curves = frames.trials, frames.done, frames.curves
    figures: list[tuple[str, str, bytes]] = []
    panels: dict[str, int] = {}  # figure -> panels per row (the browser test checks each panel's rendered width)
    if not curves.empty:
        figures.append(("loss", "Training loss per trial", loss_figure(curves, trials)))
    if not layers.empty:
        png, per_row = layer_figure(layers, chance, untrained, axes_cols)
        panels["layers"] = per_row
        figures.append(("layers", "Per-layer probes by objective (mean over heads, ± 1 SE over seeds; dashed: "
                                  "untrained encoder)", png))
        if (all_layers.metric == "linear_top1_gap").any():
            figures.append(("budget", "Linear probe at matched optimiser steps (left) and matched training FLOPs "
                                      "(right)", budget_figure(all_layers, done, chance)))
    if done.lam.nunique() > 1:
        figures.append(("lam", "Accuracy against lam", lam_figure(done, chance)))
    fits = pd.DataFrame()
    if done.variant.nunique() > 2 and done.params.notna().all():
        fits, _ = scaling_table(done, n_boot=300)
        figures.append(("scaling", "Scaling: error against parameters with power-law fits", scaling_figure(done, fits)))
    drops = noise_drops(frames.robustness, every_classifier=True)
    if not drops.empty:
        figures.append(("noise", "Accuracy drop under frequency-filtered noise (Gaussian noise band-passed to each "
                                 "band, fixed RMS)", noise_figure(drops, done)))
    if frames.objectives and len(front):
        figures.append(("pareto", "Multi-objective search: the trials and their Pareto front",
                        pareto_figure(done, frames.objectives, front)))
    schedules = ancestral_schedules(done, frames.lineage)
    if not schedules.empty:
        figures.append(("schedules", "PBT: the hyperparameter schedule each trial's final weights trained under (its "
                                     "ancestors' values before each exploit)", schedule_figure(schedules, done)))
    cka = _pure_cka(layout, done)
    if cka is not None:
        figures.append(("cka", f"Linear CKA between the layers of pure MIM ({cka[1]}) and pure CL ({cka[2]}), GAP "
                               "features of the same eval images", cka[0]))
    return figures, panels, fits


def build_report(layout: SweepLayout, out: str | Path | None = None) -> tuple[Path, list[Path]]:
    """Write ``report.html`` and its PNG figures for a sweep; return the HTML path and every file written."""
    name = layout.name
    frames = sweep_frames(layout.root, [name])
    if frames.trials.empty:
        raise no_results(layout)
    trials, done = frames.trials, frames.done
    if done.empty:
        raise QueryError(f"sweep {name!r} has no finished trials to report on")
    axes_cols = group_axes(done)
    # every probed step (step 0, each eval.every, the end), with the group axes the figures colour by
    all_layers = frames.layers.drop(columns="lam").merge(done[["trial", *{*axes_cols, "lam"}]], on="trial")
    layers, untrained = split_baseline(all_layers)
    tables = {sec.key: sec.table for sec in sections(frames)}
    out = Path(out) if out else layout.report_dir / "report.html"
    if out.is_dir():
        raise QueryError(f"--out: {str(out)!r} is a folder; give the HTML file's path (e.g. {out / 'report.html'})")
    out.parent.mkdir(parents=True, exist_ok=True)
    chance = chance_level(done)

    figures, panels, fits = _figures(layout, frames, all_layers, layers, untrained, axes_cols, chance,
                                     tables.get("pareto", pd.DataFrame()))
    written = []
    for key, _, png in figures:
        f = out.parent / f"{key}.png"
        write_bytes_atomic(f, png)
        written.append(f)

    shown = [c for c in ("mix", "variant", *(f"objective.placement.{k}" for k in layer_keys().values()),
                         "objective.placement.graft_layer", "optim.steps", "run.seed") if c in done]
    # ranked on the validation split where the trials have one; the accuracy shown is the evaluation split's
    rank = [c for c in ("val_linear_top1", "linear_top1") if c in done and done[c].notna().any()]
    best = done.sort_values(rank, ascending=False).head(10)[
        ["trial", *shown, *rank[:-1], "linear_top1", "knn_top1", "shape_bias", "params", "wall_time_s"]]
    chosen = (f"the trial best on the validation split ({best.trial.iloc[0]}) reads "
              f"{best.linear_top1.iloc[0]:.4g} linear-probe top-1 on the evaluation split" if len(rank) > 1 else
              f"best linear-probe top-1 {done.linear_top1.max():.4g}")
    parts = [f"<h1>clmim sweep <code>{html.escape(name)}</code></h1>",
             f"<p>{len(trials)} trials; {html.escape(chosen)}.</p>",
             "<h2>What differed between objectives</h2>",
             f"<p class=summary>{html.escape(summary_text(done, layers, chance, untrained))}</p>",
             "<h2>Status</h2>", _table_html(tables["status"])]
    if "claims" in tables:
        parts += ["<h2>Paper claims</h2>",
                  "<p>Each claim of Park et al. (ICLR 2023) read on this sweep's pure runs, one table per pair of a "
                  "CL objective (MoCo v3, DINO) and a MIM objective (SimMIM, MAE) and per group of the sweep's "
                  "other varied axes: mean ± standard error over seeds (n counts seeds), the untrained encoder "
                  "(step 0) and each side's move from it with a 95 % interval; the difference in the claim's "
                  "direction with its 95 % interval, Welch's t test and Holm's correction over the table's claims. "
                  "A claim holds (or is opposite) when its Holm-adjusted p is below 0.05 in its direction (or the "
                  "other); a claim that holds although CL did not move from its untrained encoder says so. Late "
                  "layers: the mean over the last third of the blocks.</p>",
                  _table_html(tables["claims"])]
        if "claims_per_step" in tables:
            parts += ["<h3>The claims' verdict at every probed step</h3>", _table_html(tables["claims_per_step"])]
        if "claims_literature" in tables:
            parts += ["<h3>Claims from the literature</h3>",
                      "<p>Directions later work states (each with its source), read the same way; a family of their "
                      "own, so they never move a verdict of the paper's table.</p>",
                      _table_html(tables["claims_literature"])]
        if "evaluations" in tables:
            parts += ["<h3>Evaluations: fine-tuning and robustness to frequency-filtered noise</h3>",
                      _table_html(tables["evaluations"])]
    if "tuned" in tables:
        parts += ["<h2>lr tuned per objective</h2>",
                  "<p>Per group, the lr whose mean linear top-1 over seeds is best on the validation split, with its "
                  "linear top-1 on the evaluation split; compare objectives at their own best lr.</p>",
                  _table_html(tables["tuned"])]
    if "matched" in tables:
        matched = tables["matched"]
        step0 = (matched.read_at_step == 0).any()
        parts += ["<h2>Matched budgets</h2>",
                  "<p>Last-layer linear probe at the largest optimiser step (and the largest training-FLOPs "
                  "budget) every trial reached; each trial is read at its last probe within the budget.</p>",
                  *(["<p class=note><b>Note:</b> some rows read step 0, the untrained encoder: this sweep "
                     "probes only at step 0 and at each trial's end (no <code>eval.every</code>), so a budget "
                     "below a trial's end falls back to its untrained probe. Set <code>eval.every</code> to "
                     "compare trained models at matched budgets.</p>"] if step0 else []),
                  _table_html(matched)]
    if "early_signals" in tables:
        parts += ["<h2>Early signals</h2>",
                  "<p>How well each signal, read at each trial's last evaluation within the first 20 % of its steps, "
                  "ranks the sweep's finished trials by their final validation linear probe: Spearman's rho in the "
                  "signal's direction (1: the same order; a loss is negated), with its p-value. RankMe of the "
                  "validation images' features and the pre-training loss on them need no labels; the validation "
                  "linear probe read as early is what labels would buy. In a sweep of several objective mixes, "
                  "the rows of one mix rank its trials among themselves (mix <i>all</i>: every trial): a signal "
                  "can rank runs of one objective and not runs across objectives. A search that stops or pauses "
                  "trials early is as good as this ranking.</p>", _table_html(tables["early_signals"])]
    if "pareto" in tables:
        parts += ["<h2>Pareto front</h2>",
                  "<p>The finished trials that no other trial beats on every objective the search optimised at once "
                  "(each in its own direction); every other trial is beaten outright by one of these. The objectives "
                  "are read on the validation split or cost nothing to read (FLOPs, parameters): choosing among "
                  "these and then reporting the evaluation split's numbers keeps the claims honest.</p>",
                  _table_html(tables["pareto"])]
    if "lineage" in tables:
        parts += ["<h2>PBT exploits</h2>",
                  "<p>Each exploit: the trial continued from its parent's newest checkpoint at that step (the "
                  "parent's weights) with the mutated hyperparameters perturbed or redrawn, before → after. The "
                  "schedules figure below follows each trial's final weights back through these exploits.</p>",
                  _table_html(tables["lineage"])]
    if "failed" in tables:
        parts += ["<h2>Failed or unfinished trials</h2>", _table_html(tables["failed"])]
    for key, title, png in figures:
        b64 = base64.b64encode(png).decode()
        per_row = f' data-panels-per-row="{panels[key]}"' if key in panels else ""
        parts += [f"<h2>{html.escape(title)}</h2>",
                  f'<img class="fig" alt="{key}"{per_row} src="data:image/png;base64,{b64}">']
    if len(fits):
        parts += ["<h2>Power-law fits</h2>", _table_html(fits)]
    parts += ["<h2>Best configurations</h2>", _table_html(best)]
    page = _page(name, parts)
    write_text_atomic(out, page)
    return out, [out, *written]


def attach_to_mlflow(name: str, files: list[Path], uri: str) -> bool:
    """Log the report's own files (the page and its figures, nothing else beside them) to the sweep's MLflow
    parent run; False if there is none."""
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(f"clmim/{name}")
    if exp is None:
        return False
    runs = client.search_runs([exp.experiment_id], filter_string="tags.`clmim.role` = 'sweep'", max_results=1)
    if not runs:
        return False
    for f in files:
        client.log_artifact(runs[0].info.run_id, str(f), artifact_path="report")
    return True
