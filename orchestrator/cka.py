"""``clmim compare SWEEP/TRIAL SWEEP/TRIAL``: linear CKA between every pair of layers of two trained encoders
(``probes.linear_cka`` on GAP features of the same eval images), or of one trial against its untrained encoder
(``--untrained``: how far each layer moved). Writes the layer x layer table (Parquet) and a heatmap (PNG) under the
first trial's sweep: ``<results>/<sweep>/cka/<name>.{parquet,png}``.
"""

from __future__ import annotations

import io
import re
from pathlib import Path

import matplotlib
import pandas as pd

from trainables.checkpoints import load_encoder, load_weights
from trainables.data import build_data
from trainables.errors import UserError
from trainables.files import write_bytes_atomic
from trainables.probes import extract_features, linear_cka

from .layout import SweepLayout, find_sweep

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the non-interactive backend)


def parse_trial(spec: str, root: Path) -> tuple[SweepLayout, str]:
    """``SWEEP/TRIAL`` -> (layout, trial id); a ``UserError`` naming what is missing."""
    if not isinstance(spec, str) or spec.count("/") != 1:
        raise UserError(f"trial: {spec!r} is not SWEEP/TRIAL (e.g. quickstart/abc12_00000)")
    sweep, trial = spec.split("/")
    layout = find_sweep(sweep, root)
    trials = layout.trials()
    if trial not in trials:
        raise UserError(f"trial: {trial!r} is not a trial of sweep {layout.name!r} (trials: {', '.join(trials[:8])}"
                        f"{' ...' if len(trials) > 8 else ''})")
    return layout, trial


def trial_encoder(layout: SweepLayout, trial: str, untrained: bool = False):
    """(encoder, config) of a finished trial from its final weights in the storage (``run/model.pt``); with
    ``untrained``, the encoder as the trial initialised it (same seed and construction order as the trainer)."""
    data = layout.store.read_bytes(f"{layout.run_path(trial)}/model.pt")
    if data is None:
        raise UserError(f"trial: {layout.name}/{trial} has no final weights (run/model.pt): it has not finished")
    return load_encoder(load_weights(io.BytesIO(data)), ["run.device=cpu"], untrained=untrained)


def cka_table(a, b, images, size_a: int, size_b: int) -> pd.DataFrame:
    """Long table (layer_a, layer_b, cka) over blocks 1..depth of both encoders."""
    fa = extract_features(a, images, size_a, layers=list(range(1, a.depth + 1)))["gap"]
    fb = extract_features(b, images, size_b, layers=list(range(1, b.depth + 1)))["gap"]
    return pd.DataFrame([(la, lb, linear_cka(xa, xb)) for la, xa in fa.items() for lb, xb in fb.items()],
                        columns=["layer_a", "layer_b", "cka"])


def heatmap(table: pd.DataFrame, label_a: str, label_b: str) -> bytes:
    """PNG of the layer x layer CKA matrix (rows: ``label_a``'s layers)."""
    grid = table.pivot(index="layer_a", columns="layer_b", values="cka")
    fig, ax = plt.subplots(figsize=(4.5, 4))
    im = ax.imshow(grid.values, origin="lower", vmin=0, vmax=1, cmap="magma",
                   extent=(0.5, grid.shape[1] + 0.5, 0.5, grid.shape[0] + 0.5))
    ax.set_xlabel(f"layer of {label_b}")
    ax.set_ylabel(f"layer of {label_a}")
    ax.set_title("linear CKA (GAP features)", fontsize=10)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    return buf.getvalue()


def trial_cka(la: SweepLayout, ta: str, lb: SweepLayout | None, tb: str | None, samples: int = 512) -> pd.DataFrame:
    """CKA of trial ``ta`` against trial ``tb`` (or, when ``lb`` is None, its own untrained encoder) on the first
    trial's fixed eval images."""
    enc_a, cfg_a = trial_encoder(la, ta)
    enc_b, cfg_b = trial_encoder(la, ta, untrained=True) if lb is None else trial_encoder(lb, tb)
    images = build_data(cfg_a).eval.subset(samples, seed=0).images  # the same fixed images for both
    return cka_table(enc_a, enc_b, images, cfg_a.model.img_size, cfg_b.model.img_size)


def compare(spec_a: str, spec_b: str | None, root: Path, samples: int = 512) -> tuple[pd.DataFrame, Path]:
    """CKA of two trials (or of ``spec_a`` against its untrained encoder when ``spec_b`` is None); return the table
    and where it was written."""
    la, ta = parse_trial(spec_a, root)
    if spec_b is None:
        lb = tb = None
        name, label_b = f"{ta}__untrained", f"{ta} (untrained)"
    else:
        lb, tb = parse_trial(spec_b, root)
        # both sides named the same way: bare trial ids within one sweep, <sweep>.<trial> across sweeps
        name = f"{ta}__{tb}" if lb.name == la.name else f"{la.name}.{ta}__{lb.name}.{tb}"
        label_b = f"{lb.name}/{tb}"
    table = trial_cka(la, ta, lb, tb, samples)
    out = la.sweep_dir / "cka"
    out.mkdir(parents=True, exist_ok=True)
    name = re.sub(r"[^A-Za-z0-9._-]", "_", name)
    table.assign(trial_a=f"{la.name}/{ta}", trial_b=label_b).to_parquet(out / f"{name}.parquet", index=False)
    write_bytes_atomic(out / f"{name}.png", heatmap(table, f"{la.name}/{ta}", label_b))
    return table, out / f"{name}.parquet"
