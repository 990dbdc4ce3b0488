"""The Pareto front of a multi-objective search, on cases whose answer is known."""

import json
import math

import pandas as pd
from sweeps import table_cfg

from orchestrator.layout import SweepLayout
from orchestrator.pareto import pareto_front
from orchestrator.report import build_report
from orchestrator.results import write_trial_tables


def test_the_front_is_the_trials_nothing_beats_on_every_objective_each_in_its_direction():
    done = pd.DataFrame({"trial": ["a", "b", "c", "d", "e", "f"],
                         "val_linear_top1": [0.9, 0.8, 0.7, 0.85, 0.9, math.nan],
                         "train_flops": [10.0, 5.0, 1.0, 6.0, 12.0, 0.5]})
    front = pareto_front(done, {"val_linear_top1": "max", "train_flops": "min"})
    # d: beaten by neither a (costlier) nor b (less accurate); e: a is as accurate and cheaper; f: not measured
    assert list(front.trial) == ["a", "d", "b", "c"]
    flipped = pareto_front(done, {"val_linear_top1": "min", "train_flops": "max"})
    assert list(flipped.trial) == ["c", "b", "d", "e"]  # each objective's own direction: now e beats a


def test_ties_are_all_on_the_front_and_missing_objectives_give_an_empty_one():
    done = pd.DataFrame({"trial": ["a", "b"], "val_rankme": [3.0, 3.0], "val_loss": [1.0, 1.0]})
    assert list(pareto_front(done, {"val_rankme": "max", "val_loss": "min"}).trial) == ["a", "b"]
    assert pareto_front(done, {"val_rankme": "max", "train_flops": "min"}).empty
    assert pareto_front(done, {}).empty


def test_the_report_draws_the_front_of_an_nsga2_sweeps_objectives(tmp_path):
    """A sweep recorded as an nsga2 search over the validation probe and training FLOPs: the report's table and its
    figure show the same front (the summary's, computed once)."""
    sweep = tmp_path / "pf"
    sweep.mkdir()
    space = {"search": {"algorithm": "nsga2", "objectives": ["val_linear_top1", "train_flops"]}}
    (sweep / "sweep.json").write_text(json.dumps({"name": "pf", "created": "2026-12-02T10:00:00", "n_trials": 4,
                                                  "space": space}))
    for i, (acc, flops) in enumerate([(0.9, 10.0), (0.8, 5.0), (0.7, 8.0), (0.6, 1.0)]):  # t2: t1 beats it
        final = {"step": 100, "loss": 1.0, "linear_top1": acc, "val_linear_top1": acc,
                 "train_flops_per_image": flops}  # train_flops: that x the images seen
        write_trial_tables(sweep, f"t{i}", "TERMINATED", table_cfg(lam=float(i % 2), seed=i), [final])
    page, files = build_report(SweepLayout(tmp_path, "pf"))
    assert "pareto.png" in {f.name for f in files}
    text = page.read_text()
    front = text[text.index("<h2>Pareto front</h2>"):]
    assert all(f">t{i}<" in front[:front.index("</table>")] for i in (0, 1, 3)) and ">t2<" not in \
        front[:front.index("</table>")]
