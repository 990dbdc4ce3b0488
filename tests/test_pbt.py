"""The PBT / PB2 schedulers' exploit and explore steps on Tune's own trial objects, without a cluster: who is
paused, what config the exploiting trial restarts with, and (PB2) that the model picks the new values."""

from __future__ import annotations

import numpy as np
import pytest
from ray.tune.experiment import Trial

from orchestrator.pbt import TrialOwnedPB2
from orchestrator.records import EXPLOIT_KEY, TRIAL_KEY

BOUNDS = {"objective.lam": [0.2, 0.8], "optim.lr_scale": [0.5, 2.0]}


class Controller:
    """What the scheduler calls on Tune's controller during an exploit."""

    def __init__(self):
        self.paused: list[Trial] = []

    def pause_trial(self, trial: Trial, should_checkpoint: bool = True) -> None:
        self.paused.append(trial)
        trial.set_status(Trial.PAUSED)


def population(lams, lrs) -> tuple[TrialOwnedPB2, list[Trial], Controller]:
    sched = TrialOwnedPB2(time_attr="sched_epoch", metric="sched_value", mode="max", perturbation_interval=1,
                          quantile_fraction=0.25, hyperparam_bounds=BOUNDS)
    ctl = Controller()
    trials = [Trial("clmim", stub=True, config={TRIAL_KEY: f"t{i}", "objective.lam": lam, "optim.lr_scale": lr,
                                                "run.seed": i})
              for i, (lam, lr) in enumerate(zip(lams, lrs, strict=True))]
    for t in trials:
        sched.on_trial_add(ctl, t)
        t.set_status(Trial.RUNNING)
    return sched, trials, ctl


def test_pb2_gives_a_population_drawn_from_whole_numbers_float_values_it_can_move_between():
    _, trials, _ = population([0, 1], [1, 2])
    assert [type(t.config[k]) for t in trials for k in BOUNDS] == [float] * 4
    assert [t.config["objective.lam"] for t in trials] == [0.0, 1.0]


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")  # (a kernel parameter at its bound)
def test_a_pb2_exploit_restarts_the_trial_as_itself_with_the_models_pick_within_the_bounds():
    """Reward grows with lam in every trial; the worst trial exploits the best: it is paused and restarts with its
    own id and seed, its donor named, and new values the model picked inside the bounds (towards high lam, where the
    reward grows), at the precision they were chosen at; the model keeps the pick, to credit the reward that follows
    to it."""
    np.random.seed(0)  # (PB2's acquisition search starts from random points)
    sched, trials, ctl = population([0.2, 0.8, 0.2, 0.8], [1.0, 1.0, 2.0, 2.0])
    for epoch in (1, 2, 3):
        for t in trials:
            result = {"sched_epoch": epoch, "sched_value": epoch * t.config["objective.lam"]}
            sched._save_trial_state(sched._trial_state[t], epoch, result, t)
    sched._exploit(ctl, trials[0], trials[3])
    cfg = trials[0].config
    assert ctl.paused == [trials[0]]
    assert cfg[TRIAL_KEY] == "t0" and cfg["run.seed"] == 0
    assert cfg[EXPLOIT_KEY]["donor"] == "t3" and cfg[EXPLOIT_KEY]["keys"] == sorted(BOUNDS)
    for key, (lo, hi) in BOUNDS.items():
        assert isinstance(cfg[key], float) and lo <= cfg[key] <= hi and cfg[key] == float(f"{cfg[key]:.7g}")
    assert cfg["objective.lam"] >= 0.6
    picked = sched.data.iloc[-1]
    assert picked.Trial == str(trials[0]) and picked.Time == 3
    assert [picked[k] for k in BOUNDS] == pytest.approx([cfg[k] for k in BOUNDS], rel=1e-6)
