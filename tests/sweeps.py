"""Tables of made-up trials for tests that read a sweep's tables (no training: rows written directly)."""

import json
from pathlib import Path

from orchestrator.results import write_trial_tables
from trainables.config import load_config, to_dict


def table_cfg(lam=0.5, seed=0):
    """A resolved config tree on the SimMIM / MoCo v3 line."""
    return to_dict(load_config({}, [f"objective.lam={lam}", f"run.seed={seed}"]))


def few_reports(final=0.5, steps=3):
    """``steps`` loss reports and a final probe report."""
    return [{"step": s, "loss": 2.0 - s / 10} for s in range(1, steps + 1)] + [
        {"step": steps, "linear_top1": final, "layer/1/attn_nmi": 0.3}]


def probed_reports(final=0.5):
    untrained = {"step": 0, "linear_top1": 0.125, "layer/6/attn_distance": 16.5, "layer/6/attn_nmi": 0.0,
                 "layer/6/linear_top1_gap": 0.125, "layer/0/linear_top1_gap": 0.125}
    return [untrained] + [{"step": s, "loss": 2.0 - s / 10, "total_steps": 3} for s in (1, 2, 3)] + [
        {"step": 3, "loss": 1.7, "linear_top1": final, "knn_top1": final / 2, "layer/6/attn_distance": 9.0,
         "layer/6/attn_nmi": 0.2, "layer/6/linear_top1_gap": final, "layer/0/linear_top1_gap": 0.2}]


def make_sweep(root: Path, name: str, n: int = 2) -> Path:
    sweep = root / name
    sweep.mkdir(parents=True)
    (sweep / "sweep.json").write_text(json.dumps({"name": name, "created": "2026-11-29T10:00:00", "n_trials": n}))
    for i in range(n):
        write_trial_tables(sweep, f"t{i}", "TERMINATED", table_cfg(lam=float(i % 2), seed=i // 2),
                           probed_reports(0.3 + i / 10))
    return sweep
