"""The Pareto front of a multi-objective search, on cases whose answer is known."""

import math

import pandas as pd

from orchestrator.pareto import pareto_front


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
