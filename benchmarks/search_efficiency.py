"""Search efficiency on a CPU space: does a scheduler that stops trials on a label-free signal find the grid's best
configuration for a fraction of the grid's training, and how well do the early signals rank the trials?

One space (nano/4 on digits at 32 px: lam {0, .25, .5, .75} x lr scale {30, 100, 300, 1000} x SimMIM's mask ratio
{.4, .6}, 32 configurations that each train differently, with an lr range that brackets the best) runs on one Ray
instance:
  1. the grid: every configuration with ``--seeds`` seeds (0, 1, ...), every trial to the end, evaluated every
     ``--eval-every`` epochs;
  2. one search per ``--metrics`` entry: every configuration once, with a seed the grid does not use (so the
     search's pick is not read off the same noise the grid judges it by), under ASHA on that metric, stopping the
     worse at each rung. Defaults: ``val_rankme`` (RankMe of the validation images' features, no label read) and
     ``val_linear_top1`` (the validation probe itself, read early).
Then, from the tables:
  - the grid's best configuration (mean ``val_linear_top1`` over its seeds) and that mean's standard error;
  - the configuration the search picks (the best ``val_linear_top1`` among its trials that reached the end: the
    labels are read once, for the final choice) and that configuration's mean in the grid: the search succeeds when
    it lies within one SE of the grid's best;
  - training steps the search used, as a share of the grid's (target: <= 25 %);
  - Spearman's rho between each early signal read at <= 20 % of a run and the final ``val_linear_top1``, over the
    grid's trials (``orchestrator.early_signals``; target for the label-free one: >= 0.8).

    python benchmarks/search_efficiency.py --results runs/search-eff  # 2026-12-02, 2 cores: grid 80 min, search ~30 min
    python benchmarks/search_efficiency.py --results runs/search-eff --grid GRID --searches RANKME PROBE  # report only
    python benchmarks/search_efficiency.py --results runs/search-eff --steps 60 --seeds 1 --lams 0 1 --masks 0.6
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from orchestrator.early_signals import AT, early_signal_table  # noqa: E402
from orchestrator.query import query, sweep_frames  # noqa: E402
from orchestrator.space import load_space  # noqa: E402
from orchestrator.sweep import init_ray, run_sweep  # noqa: E402
from trainables.config import load_config  # noqa: E402
from trainables.data import build_data  # noqa: E402
from trainables.schedule import steps_per_epoch  # noqa: E402

AXES = ("objective.lam", "optim.lr_scale", "objective.simmim.mask_ratio")
TARGET = "val_linear_top1"


def space(name: str, args, seeds: list[int], scheduler: dict | None) -> dict:
    raw = {"name": name,
           "base": {"model": {"variant": "nano/4", "img_size": 32, "pos_embed": "sincos", "patch_embed": "frozen"},
                    "data": {"dataset": "digits", "batch_size": 64},
                    "optim": {"steps": args.steps},
                    "eval": {"every": args.eval_every, "samples": 512, "probe_images": 8, "dense_images": 0,
                             "cka": False, "noise": {"bands": 0}, "attentive_steps": 0, "lowshot": False,
                             "grad_cosine": False},
                    "run": {"log_every": 20, "threads": 1}},
           "space": {"objective.lam": {"grid": args.lams}, "optim.lr_scale": {"grid": args.lrs},
                     "objective.simmim.mask_ratio": {"grid": args.masks}, "run.seed": {"grid": seeds}},
           "search": {"algorithm": "grid", "metric": TARGET, "mode": "max"},
           "resources": {"workers": 1, "cpus_per_worker": 1}}
    if scheduler:
        raw["scheduler"] = scheduler
    return raw


def per_config(done: pd.DataFrame) -> pd.DataFrame:
    """Mean, SE and count of the target per configuration (over seeds), best first."""
    g = done.groupby(list(AXES))[TARGET]
    out = g.agg(["mean", "count"]).join(g.sem().rename("se")).reset_index()
    return out.sort_values("mean", ascending=False, ignore_index=True)


def describe(row) -> str:
    return ", ".join(f"{k.rsplit('.', 1)[-1]} {float(row[k]):g}" for k in AXES)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", required=True)
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--eval-every", type=int, default=1, help="epochs between evaluations")
    ap.add_argument("--seeds", type=int, default=2, help="seeds per configuration in the grid")
    ap.add_argument("--lams", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75])
    ap.add_argument("--lrs", type=float, nargs="+", default=[30.0, 100.0, 300.0, 1000.0])
    ap.add_argument("--masks", type=float, nargs="+", default=[0.4, 0.6])
    ap.add_argument("--metrics", nargs="+", default=["val_rankme", "val_linear_top1"],
                    help="what ASHA compares trials on: one search per metric, each against the same grid")
    ap.add_argument("--grace", type=int, default=1, help="ASHA's grace period, epochs")
    ap.add_argument("--reduction", type=float, default=3.0, help="ASHA's reduction factor")
    ap.add_argument("--grid", help="reuse this earlier grid sweep (same space and --results) instead of running it")
    ap.add_argument("--searches", nargs="+", help="reuse these earlier searches (one per --metrics entry, in order)")
    args = ap.parse_args()
    root = Path(args.results)
    root.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    grid_name = f"eff-grid-{stamp}"
    searches = {m: f"eff-asha-{m.replace('/', '-')}-{stamp}" for m in args.metrics}
    if args.searches:  # earlier runs' searches of the same space, reused: only the report below runs
        if len(args.searches) != len(args.metrics):
            ap.error(f"--searches: {len(args.searches)} names for {len(args.metrics)} --metrics")
        searches = dict(zip(args.metrics, args.searches, strict=True))
    walls = {}
    # the epoch count of a run: what the scheduler's time is measured in
    per_epoch = _steps_per_epoch(load_space(_write(root, space("probe", args, [0], None))))
    max_t = int(np.ceil(args.steps / per_epoch))
    runs = [(name, [args.seeds], {"type": "asha", "metric": m, "grace_period": args.grace, "max_t": max_t,
                                  "reduction_factor": args.reduction}) for m, name in searches.items()
            if not args.searches]
    if args.grid:  # an earlier run's grid of the same space, reused
        grid_name = args.grid
    else:
        runs.insert(0, (grid_name, list(range(args.seeds)), None))
    if runs:
        init_ray(None)
    for name, seeds, sched in runs:
        raw = space(name, args, seeds, sched)
        if sched:  # a checkpoint at every evaluation: a scheduler reads a trial as of its newest stored checkpoint
            raw["base"]["run"]["ckpt_every"] = args.eval_every * per_epoch
        t = time.perf_counter()
        run_sweep(load_space(_write(root, raw)), results=str(root))
        walls[name] = time.perf_counter() - t

    grid = sweep_frames(root, [grid_name])
    configs = per_config(grid.done)
    best = configs.iloc[0]
    steps = query("SELECT sweep, sum(step) AS steps FROM trials GROUP BY sweep", root).set_index("sweep").steps
    early = early_signal_table(grid.done, grid.signals)
    print(f"\n## search efficiency ({time.strftime('%Y-%m-%d')}; {len(configs)} configurations; grid "
          f"{len(grid.done)} trials ({args.seeds} seeds), {args.steps} steps each, {per_epoch} steps per epoch)")
    print(f"- grid: best {describe(best)}: {TARGET} {best['mean']:.4f} ± {best['se']:.4f} (SE over "
          f"{int(best['count'])} seeds); {int(steps[grid_name])} training steps; wall "
          f"{f'{walls[grid_name]:.0f} s' if grid_name in walls else 'of an earlier run'}")
    for metric, name in searches.items():
        done = sweep_frames(root, [name]).done
        finished = done[done.step >= args.steps]
        share = float(steps[name] / steps[grid_name])
        print(f"- search: ASHA on {metric} (grace {args.grace} epoch(s), reduction {args.reduction:g}, max_t "
              f"{max_t} epochs), one trial per configuration at seed {args.seeds}: {len(finished)} of "
              f"{len(done)} trials reached the end; {int(steps[name])} training steps = {share:.1%} of the grid's "
              f"(target <= 25 %: {'met' if share <= 0.25 else 'NOT met'}); wall "
              f"{f'{walls[name]:.0f} s' if name in walls else 'of an earlier run'}")
        if not len(finished):
            print("  - no trial reached the end")
            continue
        pick = finished.sort_values(TARGET, ascending=False).iloc[0]
        key = [float(pick[k]) for k in AXES]
        in_grid = configs.set_index(list(AXES)).loc[tuple(key)]
        # inclusive, to float rounding: accuracies are multiples of 1 / (validation images), so a mean exactly one
        # SE below the best is common (two seeds' SE is half their difference)
        ok = bool(in_grid["mean"] >= best["mean"] - best["se"] - 1e-9)
        rank = int(np.flatnonzero((configs[list(AXES)] == key).all(axis=1))[0]) + 1
        print(f"  - it picks {describe(pick)} ({TARGET} {pick[TARGET]:.4f} in its own trial); its grid mean "
              f"{in_grid['mean']:.4f} is {'within' if ok else 'NOT within'} 1 SE of the grid's best (rank {rank} of "
              f"{len(configs)} in the grid)")
    print(f"- early signals over the grid's trials (read at <= {AT:.0%} of each run; Spearman's rho with the final "
          f"{TARGET}; target >= 0.8 for a label-free one):")
    print(early.drop(columns="sweep").to_string(index=False, float_format="{:.3f}".format))


def _write(root: Path, raw: dict) -> Path:
    p = root / f"{raw['name']}.yaml"
    p.write_text(yaml.safe_dump(raw))
    return p


def _steps_per_epoch(sp) -> int:
    """Optimiser steps per epoch of the space's base config, as the trainer counts them (its training split)."""
    cfg = load_config(sp.base)
    return steps_per_epoch(len(build_data(cfg).train), cfg.data.batch_size)


if __name__ == "__main__":
    main()
