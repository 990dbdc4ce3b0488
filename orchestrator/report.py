"""``clmim report NAME``: one self-contained HTML page per sweep (figures embedded as base64 PNG), plus the same
figures as PNG files beside it, and the page attached to the sweep's MLflow parent run.

Sections: summary and failures; per-layer curves per objective (attention distance, attention NMI, Fourier
delta log amplitude at pi, linear-probe accuracy vs depth, as in the paper's figures); the lam curve; scaling
curves with fitted power laws and exponent intervals (when the sweep varies model size); the best configurations.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from .results import QueryError, connect  # noqa: E402

LAYER_METRICS = [("attn_distance", "mean attention distance (px)"), ("attn_nmi", "attention NMI"),
                 ("fourier_dlogamp_pi", "Δ log amplitude at π"), ("linear_top1", "linear probe top-1")]


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _table_html(df: pd.DataFrame) -> str:
    return df.to_html(index=False, float_format=lambda v: f"{v:.4g}", na_rep="–", border=0, classes="t")


def layer_figure(layers: pd.DataFrame) -> bytes:
    """Per-layer curves, one line per objective group (lam), one panel per metric."""
    fig, axes = plt.subplots(1, len(LAYER_METRICS), figsize=(4.2 * len(LAYER_METRICS), 3.4))
    cmap = plt.get_cmap("coolwarm")
    for ax, (metric, label) in zip(axes, LAYER_METRICS, strict=True):
        d = layers[layers.metric == metric]
        for lam, g in d.groupby("lam"):
            g = g.groupby("layer").value.mean()
            ax.plot(g.index, g.values, marker="o", ms=3, color=cmap(lam), label=f"lam={lam:g}")
        ax.set_xlabel("layer (0 = patch embedding)")
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, title="MIM 0 … 1 CL", title_fontsize=8)
    return _png(fig)


def lam_figure(trials: pd.DataFrame) -> bytes:
    """Final accuracy against lam (mean and range over seeds / other axes)."""
    fig, ax = plt.subplots(figsize=(5, 3.4))
    for metric in ("linear_top1", "knn_top1"):
        values = pd.to_numeric(trials[metric], errors="coerce")
        if values.isna().all():
            continue
        g = values.groupby(trials.lam).agg(["mean", "min", "max"]).dropna()
        ax.plot(g.index, g["mean"], marker="o", label=metric)
        ax.fill_between(g.index, g["min"], g["max"], alpha=0.15)
    ax.set_xlabel("lam  (0 = SimMIM, 1 = MoCo v3)")
    ax.set_ylabel("top-1 accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def scaling_figure(trials: pd.DataFrame, fits: pd.DataFrame) -> bytes:
    """Error against parameters per objective group, with the fitted power law."""
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    cmap = plt.get_cmap("coolwarm")
    for lam, g in trials.groupby("lam"):
        ax.scatter(g.params, 1 - g.linear_top1, color=cmap(lam), s=14, label=f"lam={lam:g}")
        f = fits[fits.lam == lam] if "b" in fits else fits.iloc[0:0]
        if len(f) and pd.notna(f.b.iloc[0]):
            xs = np.logspace(np.log10(g.params.min()), np.log10(g.params.max()), 50)
            row = f.iloc[0]
            ax.plot(xs, row.a * xs**row.b + (row.c or 0), color=cmap(lam),
                    label=f"b={row.b:.3f} [{row.b_low:.3f}, {row.b_high:.3f}]")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("encoder parameters")
    ax.set_ylabel("1 - linear top-1")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    return _png(fig)


def build_report(name: str, root: str | Path, out: str | Path | None = None) -> Path:
    """Write ``report.html`` (and the PNG figures) for sweep ``name``; return the HTML path."""
    root = Path(root)
    sweep_dir = root / name
    if not sweep_dir.is_dir():
        raise QueryError(f"sweep {name!r} not found under {root}")
    con = connect(root)
    trials = con.execute("SELECT * FROM trials WHERE sweep = ?", [name]).df()
    if trials.empty:
        raise QueryError(f"sweep {name!r} has no results yet (try `clmim results rebuild {name}`)")
    done = trials[trials.status == "TERMINATED"]
    if done.empty:
        raise QueryError(f"sweep {name!r} has no finished trials to report on")
    layers = con.execute("SELECT l.*, t.lam FROM layers l JOIN trials t USING (sweep, trial) "
                         "WHERE l.sweep = ? AND l.head IS NULL AND t.status = 'TERMINATED'", [name]).df()
    out = Path(out) if out else sweep_dir / "report" / "report.html"
    out.parent.mkdir(parents=True, exist_ok=True)

    figures: list[tuple[str, str, bytes]] = []
    if not layers.empty:
        figures.append(("layers", "Per-layer probes by objective (mean over heads)", layer_figure(layers)))
    if done.lam.nunique() > 1:
        figures.append(("lam", "Accuracy against lam", lam_figure(done)))
    fits = pd.DataFrame()
    if done.variant.nunique() > 2 and done.params.notna().all():
        from .scaling import scaling_table

        fits, _ = scaling_table(name, root, n_boot=300)
        figures.append(("scaling", "Scaling: error against parameters with power-law fits", scaling_figure(done, fits)))
    for key, _, png in figures:
        (out.parent / f"{key}.png").write_bytes(png)

    status = trials.groupby("status").size().reset_index(name="trials")
    failed = trials[trials.status != "TERMINATED"][["trial", "status", "error"]]
    axes_cols = [c for c in ("lam", "variant", "objective.placement.mim_layer", "objective.placement.cl_layer",
                             "objective.placement.graft_layer", "optim.steps", "run.seed") if c in done]
    best = done.sort_values("linear_top1", ascending=False).head(10)[
        ["trial", *axes_cols, "linear_top1", "knn_top1", "shape_bias", "params", "wall_time_s"]]
    parts = [f"<h1>clmim sweep <code>{html.escape(name)}</code></h1>",
             f"<p>{len(trials)} trials; best linear-probe top-1 {done.linear_top1.max():.4g}.</p>",
             "<h2>Summary</h2>", _table_html(status)]
    if len(failed):
        parts += ["<h2>Failed or unfinished trials</h2>", _table_html(failed)]
    for key, title, png in figures:
        b64 = base64.b64encode(png).decode()
        parts += [f"<h2>{html.escape(title)}</h2>",
                  f'<img class="fig" alt="{key}" src="data:image/png;base64,{b64}">']
    if len(fits):
        parts += ["<h2>Power-law fits</h2>", _table_html(fits)]
    parts += ["<h2>Best configurations</h2>", _table_html(best)]
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>clmim {html.escape(name)}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1400px}} img.fig{{max-width:100%}}
table.t{{border-collapse:collapse;font-size:13px}} table.t td,table.t th{{padding:3px 8px;border-bottom:1px solid #ddd}}
</style></head><body>{''.join(parts)}
<script>
// lets a headless browser check that every figure decoded: <body data-figures="loaded/total">
window.addEventListener("load", () => {{
  const imgs = [...document.images];
  document.body.dataset.figures = imgs.filter(i => i.complete && i.naturalWidth > 0).length + "/" + imgs.length;
}});
</script></body></html>"""
    tmp = out.with_suffix(".tmp")
    tmp.write_text(page)
    tmp.replace(out)
    return out


def attach_to_mlflow(name: str, root: Path, report: Path, uri: str) -> bool:
    """Log the report (and figures) to the sweep's MLflow parent run; False if there is none."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(f"clmim/{name}")
    if exp is None:
        return False
    runs = client.search_runs([exp.experiment_id], filter_string="tags.`clmim.role` = 'sweep'", max_results=1)
    if not runs:
        return False
    client.log_artifacts(runs[0].info.run_id, str(report.parent), artifact_path="report")
    return True
