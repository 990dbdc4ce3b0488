"""The paper's claims on a finished sweep, as Markdown for benchmarks/RESULTS.md: per-layer probes per group
beside the untrained encoder, the claims table at the last probed step (with pure SimMIM and pure MoCo v3
trials), the verdict of every claim at every probed step (the smallest training budget at which each direction
shows), the last-layer linear probe at matched steps and matched training FLOPs, and, where the trials ran them,
the evaluations (fine-tuning, noise robustness per band, CKA with the untrained encoder) and where each trial's
time went.

    python benchmarks/repro_claims.py repro-20261129 [--results clmim-results]
    python benchmarks/repro_claims.py repro-lr-20261129 repro-lr30-20261129 --where '"optim.lr_scale" = 30'

Several sweeps are read as one (e.g. the lr-tuned trials of two sweeps); ``--where`` filters the trials table.
"""

from __future__ import annotations

import argparse

import pandas as pd

from orchestrator.layout import find_sweep, results_root
from orchestrator.query import sweep_frames
from orchestrator.summary import sections
from trainables.errors import UserError

# the sections this page shows, in its order (``summary.sections`` computes them all)
SHOWN = ("layer/linear_top1_gap", "layer/linear_top1_cls", "layer/attn_distance", "layer/attn_nmi",
         "layer/attn_entropy", "layer/fourier_dlogamp_pi", "layer/grad_cosine", "claims", "claims_per_step",
         "claims_literature", "matched", "evaluations", "per_group", "noise", "cka", "time")
# the per-group columns this page shows (the console shows every measured one)
PER_GROUP = ("group", "seeds", "finetune_top1", "linear_top1_gap", "linear_top1_cls", "linear_top1_clean",
             "finetune_top1_clean")


def markdown(df: pd.DataFrame) -> str:
    cols = list(df.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, r in df.iterrows():
        lines.append("| " + " | ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in r) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sweeps", nargs="+")
    ap.add_argument("--results", default=None)
    ap.add_argument("--where", default="true", help="an SQL condition on the trials table")
    args = ap.parse_args()
    root = results_root(args.results)
    try:
        names = [find_sweep(n, root).name for n in args.sweeps]
        frames = sweep_frames(root, names, args.where)
    except UserError as e:
        raise SystemExit(f"repro_claims: {e}") from None
    if frames.done.empty:
        raise SystemExit(f"repro_claims: {', '.join(names)} has no finished trials yet (see: clmim results show "
                         f"{names[0]})")
    if frames.layers.empty:
        raise SystemExit(f"repro_claims: {', '.join(names)} has no finished trials with probes yet "
                         f"({len(frames.done)} finished; see: clmim results show NAME)")
    steps = sorted(int(s) for s in frames.layers.step.unique() if s > 0)
    if not steps:
        raise SystemExit(f"repro_claims: {', '.join(names)} has only the untrained encoder's probes (step 0)")
    print(f"{len(frames.done)} finished trials; probed steps {steps}\n")
    found = {sec.key: sec for sec in sections(frames)}
    blocks = []
    for key in (k for k in SHOWN if k in found):
        table = found[key].table
        if key == "per_group":
            table = table[[c for c in PER_GROUP if c in table]]
        blocks.append(f"## {found[key].title}\n\n{markdown(table)}")
    print("\n\n".join(blocks))


if __name__ == "__main__":
    main()
