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

from orchestrator.compare import (
    eval_claims,
    fmt_mean_se,
    group_axes,
    group_name,
    layer_table,
    matched_table,
    mean_se,
    noise_drops,
    paper_claims,
)
from orchestrator.layout import find_sweep, results_root
from orchestrator.results import connect
from orchestrator.scaling import with_mix
from trainables.errors import UserError


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
    except UserError as e:
        raise SystemExit(f"repro_claims: {e}") from None
    con = connect(root)
    keep = f"t.sweep IN ({', '.join('?' * len(names))}) AND t.status = 'TERMINATED' AND ({args.where})"
    trials = con.execute(f"SELECT * FROM trials t WHERE {keep}", names).df()
    if trials.empty:
        raise SystemExit(f"repro_claims: {', '.join(names)} has no finished trials yet (see: clmim results show "
                         f"{names[0]})")
    trials = with_mix(trials)
    layers = con.execute("SELECT l.*, t.lam FROM layers l JOIN trials t USING (sweep, trial) "
                         f"WHERE {keep} AND l.head IS NULL", names).df()
    if layers.empty:
        raise SystemExit(f"repro_claims: {', '.join(names)} has no finished trials with probes yet ({len(trials)} "
                         "finished; see: clmim results show NAME)")
    untrained = layers[layers.step == 0]
    steps = sorted(int(s) for s in layers.step.unique() if s > 0)
    if not steps:
        raise SystemExit(f"repro_claims: {', '.join(names)} has only the untrained encoder's probes (step 0)")
    print(f"{len(trials)} finished trials; probed steps {steps}\n")
    final = layers[layers.step == steps[-1]]
    for metric in ("linear_top1_gap", "linear_top1_cls", "attn_distance", "attn_nmi", "attn_entropy",
                   "fourier_dlogamp_pi"):
        table = layer_table(final, untrained, trials, metric)
        if len(table):
            print(f"## {metric} per layer (L0 = patch embedding): trained at step {steps[-1]} and untrained "
                  "(step 0), mean ± SE over seeds\n")
            print(markdown(table) + "\n")
    claims = paper_claims(final, untrained, trials)
    if claims.empty:  # no pair of a pure CL and a pure MIM objective
        evaluations(trials, layers, con.execute("SELECT r.* FROM robustness r JOIN trials t USING (sweep, trial) "
                                                f"WHERE {keep}", names).df())
        return
    print("## claims at the last step\n")
    print(markdown(claims.drop(columns="key")))
    print("\n## verdict per probed step\n")
    per_step = {"group": list(claims.group), "pair": list(claims.pair), "claim": list(claims.claim)}
    for s in steps:
        per_step[f"step {s}"] = list(paper_claims(layers[layers.step == s], untrained, trials).verdict)
    print(markdown(pd.DataFrame(per_step)))
    matched = matched_table(layers, trials)
    if len(matched):
        print("\n## last-layer linear probe at matched budgets\n")
        matched["mean ± SE"] = [f"{m:.3f} ± {se:.3f}" for m, se in zip(matched["mean"], matched["se"], strict=True)]
        print(markdown(matched[["group", "metric", "matched", "budget", "read_at_step", "mean ± SE", "seeds"]]))
    robustness = con.execute("SELECT r.* FROM robustness r JOIN trials t USING (sweep, trial) "
                             f"WHERE {keep}", names).df()
    evaluations(trials, layers, robustness)


def evaluations(trials: pd.DataFrame, layers: pd.DataFrame, robustness: pd.DataFrame) -> None:
    """The evaluation tables: claims, per-group values, noise drop per band, CKA per layer, time shares."""
    from orchestrator.summary import time_shares

    claims = eval_claims(trials, robustness)
    claims = claims[claims.verdict != "not measured"]
    if len(claims):
        print("\n## evaluation claims\n")
        print(markdown(claims.drop(columns="key")))
    axes = group_axes(trials)
    rows = []
    for key, g in trials.groupby(axes, dropna=False, sort=True):
        row = {"group": group_name(key, axes), "seeds": len(g)}
        for m in ("finetune_top1", "linear_top1_gap", "linear_top1_cls", "linear_top1_clean", "finetune_top1_clean"):
            if m in g and g[m].notna().any():
                row[m] = fmt_mean_se(*mean_se(g[m])[:2])
        rows.append(row)
    print("\n## per group (mean ± SE over seeds)\n")
    print(markdown(pd.DataFrame(rows)))
    drops = noise_drops(robustness, every_classifier=True)
    if len(drops):
        d = drops.merge(trials[["trial", *axes]], on="trial")
        table = {}
        for (clf, key), g in d.groupby(["classifier", axes[0] if len(axes) == 1 else axes], dropna=False):
            table[f"{clf}: {group_name(key, axes)}"] = {b: fmt_mean_se(*mean_se(gb["drop"])[:2])
                                                      for b, gb in g.groupby("band")}
        base = d.groupby("band").untrained.mean()
        table["untrained linear probe (step 0)"] = {b: f"{v:.3g}" for b, v in base.items()}
        out = pd.DataFrame(table).T
        out.columns = [f"band {b}" for b in out.columns]
        print("\n## top-1 drop under band-passed noise (band 0 = lowest frequency)\n")
        print(markdown(out.reset_index(names="classifier: group")))
    cka = layers[(layers.metric == "cka_untrained")]
    if len(cka):
        cka = cka[cka.step == cka.groupby("trial").step.transform("max")].drop(columns=[c for c in axes if c in cka])
        cka = cka.merge(trials[["trial", *axes]], on="trial")
        table = {group_name(key, axes): {k: fmt_mean_se(*mean_se(gk.value)[:2]) for k, gk in g.groupby("layer")}
                 for key, g in cka.groupby(axes[0] if len(axes) == 1 else axes, dropna=False)}
        out = pd.DataFrame(table).T
        out.columns = [f"layer {k}" for k in out.columns]
        print("\n## CKA of each layer with the untrained encoder, at the end (1 = unchanged)\n")
        print(markdown(out.reset_index(names="group")))
    shares = time_shares(trials)
    if len(shares):
        print("\n## where a trial's time went (share of wall time)\n")
        print(markdown(shares))


if __name__ == "__main__":
    main()
