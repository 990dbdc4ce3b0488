"""The paper's claims on a finished sweep, as Markdown for benchmarks/RESULTS.md: the claims table at the last
probed step, the verdict of every claim at every probed step (the smallest training budget at which each direction
shows), and the last-layer linear probe at matched steps and matched training FLOPs.

    python benchmarks/repro_claims.py repro-20261129 [--results clmim-results]
    python benchmarks/repro_claims.py repro-lr-20261129 repro-lr30-20261129 --where '"optim.lr_scale" = 30'

Several sweeps are read as one (e.g. the lr-tuned trials of two sweeps); ``--where`` filters the trials table.
"""

from __future__ import annotations

import argparse

import pandas as pd

from orchestrator.compare import matched_table, paper_claims
from orchestrator.layout import find_sweep, results_root
from orchestrator.results import connect


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
    names = [find_sweep(n, root).name for n in args.sweeps]
    con = connect(root)
    keep = f"t.sweep IN ({', '.join('?' * len(names))}) AND t.status = 'TERMINATED' AND ({args.where})"
    trials = con.execute(f"SELECT * FROM trials t WHERE {keep}", names).df()
    layers = con.execute("SELECT l.*, t.lam FROM layers l JOIN trials t USING (sweep, trial) "
                         f"WHERE {keep} AND l.head IS NULL", names).df()
    untrained = layers[layers.step == 0]
    steps = sorted(int(s) for s in layers.step.unique() if s > 0)
    print(f"{len(trials)} finished trials; probed steps {steps}\n")
    final = layers[layers.step == steps[-1]]
    claims = paper_claims(final, untrained, trials)
    print("## claims at the last step\n")
    print(markdown(claims.drop(columns="key")))
    print("\n## verdict per probed step\n")
    per_step = {"claim": list(claims.claim)}
    for s in steps:
        per_step[f"step {s}"] = list(paper_claims(layers[layers.step == s], untrained, trials).verdict)
    print(markdown(pd.DataFrame(per_step)))
    print("\n## last-layer linear probe at matched budgets\n")
    matched = matched_table(layers, trials)
    matched["mean ± SE"] = [f"{m:.3f} ± {se:.3f}" for m, se in zip(matched["mean"], matched["se"], strict=True)]
    print(markdown(matched[["group", "metric", "matched", "budget", "read_at_step", "mean ± SE", "seeds"]]))


if __name__ == "__main__":
    main()
