"""Storage a trial leaves behind: measured for a finished sweep, computed for a model scale.

    python benchmarks/storage_bytes.py --sweep clmim-results/quickstart     # measured: bytes per trial, by kind
    python benchmarks/storage_bytes.py --variant B/16 --img-size 224        # computed from the objective's tensors

Computed: a full checkpoint is the objective's state dict (encoder, heads, MoCo's momentum encoder, SimMIM's
decoder) plus AdamW's two moments per trainable parameter; the export (run/model.pt) is the encoder's tensors only.
Before issue 13 a finished trial held four full checkpoints (the trainer's last two and Tune's two copies of them);
now it holds the export (plus `checkpoints.keep` full ones, default 0), and one full checkpoint while it runs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def measured(sweep: Path) -> None:
    trials = [d for d in (sweep / "tune").iterdir() if d.is_dir()]
    kinds = {"full checkpoints": 0, "weights export (model.pt)": 0, "other trial files": 0}
    for d in trials + ([sweep / "train"] if (sweep / "train").is_dir() else []):
        for f in d.rglob("*"):
            if not f.is_file():
                continue
            size = f.stat().st_size
            if f.name == "checkpoint.pt":
                kinds["full checkpoints"] += size
            elif f.name == "model.pt":
                kinds["weights export (model.pt)"] += size
            else:
                kinds["other trial files"] += size
    total = sum(kinds.values())
    print(f"{sweep}: {len(trials)} trials, {total / 1e6:.1f} MB of trial files, {total / len(trials) / 1e6:.2f} MB "
          "per trial")
    for k, v in kinds.items():
        print(f"  {k}: {v / 1e6:.1f} MB ({v / len(trials) / 1e6:.2f} MB per trial)")


def computed(variant: str, img_size: int, lam: float) -> None:
    import torch

    from trainables.config import load_config
    from trainables.objectives.mixture import build_objective

    cfg = load_config({"model": {"variant": variant, "img_size": img_size}, "objective": {"lam": lam}})
    with torch.device("meta"):  # sizes only: no memory for the weights
        objective = build_objective(cfg)
    state = objective.state_dict()
    weights = sum(t.numel() * t.element_size() for t in state.values())
    moments = sum(2 * p.numel() * 4 for p in objective.parameters() if p.requires_grad)  # AdamW exp_avg, exp_avg_sq
    encoder = sum(t.numel() * t.element_size() for k, t in state.items() if k.startswith("encoder."))
    full = weights + moments
    print(f"{variant} at {img_size} px, lam = {lam:g}: full checkpoint {full / 1e9:.2f} GB (state dict "
          f"{weights / 1e9:.2f} GB + AdamW moments {moments / 1e9:.2f} GB); encoder export {encoder / 1e9:.3f} GB")
    print(f"  per finished trial: before {4 * full / 1e9:.2f} GB (4 full copies), after {encoder / 1e9:.3f} GB "
          f"(export; + {full / 1e9:.2f} GB per kept checkpoint); while running: before {4 * full / 1e9:.2f} GB, "
          f"after {full / 1e9:.2f} GB")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sweep", type=Path, help="a finished sweep's folder (trial files under tune/ and train/)")
    p.add_argument("--variant", help="a model scale, e.g. B/16")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--lam", type=float, default=0.5, help="0 SimMIM, 1 MoCo v3, between: both (the largest)")
    a = p.parse_args()
    if a.sweep:
        measured(a.sweep)
    if a.variant:
        computed(a.variant, a.img_size, a.lam)


if __name__ == "__main__":
    main()
