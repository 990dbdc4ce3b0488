"""Population-based training through the trials' own checkpoints.

Tune's ``PopulationBasedTraining`` exploits by restarting a trial from the donor's checkpoint as Tune knows it. A
clmim trial never hands Tune a checkpoint (``trial.py``: Tune's record can lag the storage, and a restored trial
loading a stale or deleted checkpoint is the class of bug PBT in Tune has had), so this subclass keeps Tune's
choice of who exploits whom and its explore step (``_get_new_config``: each mutated key perturbed x 0.8 / 1.2 or
drawn afresh), and exploits differently: the trial is paused and restarted with the new hyperparameters and an
``EXPLOIT_KEY`` naming its donor and a fresh exploit id. The restarted trial takes over its donor's newest stored
checkpoint itself and records the exploit in its lineage, once (``trial.take_over``, ``records.append_lineage``).

The exploiting trial keeps its own identity: its id, its seed and every key that is not mutated; only the mutated
keys come from the donor (the weights come with the checkpoint).

``TrialOwnedPB2`` is the same exploit with Tune's PB2 explore step (Parker-Holder et al. 2020): a Gaussian process
over (time, reward, hyperparameters) fitted to the population's reward changes picks the new values by UCB within
each key's bounds, instead of PBT's random perturbation. Its data is the driver's memory: a resumed sweep's model
starts again from the results that arrive after the resume.
"""

from __future__ import annotations

import random
import uuid

from ray.tune.experiment import Trial
from ray.tune.schedulers import PopulationBasedTraining
from ray.tune.schedulers.pb2 import PB2

from .ray_private import pbt_trial_state
from .records import EXPLOIT_KEY, TRIAL_KEY, trial_id_of


class TrialOwnedPBT(PopulationBasedTraining):
    """``PopulationBasedTraining`` that exploits through the trials' own checkpoints (see the module docstring)."""

    def on_trial_add(self, tune_controller, trial: Trial) -> None:
        # Tune refuses any search algorithm here (one that learns from results would fight PBT's own choices);
        # clmim's searcher only hands over the sweep's planned population (grid or random: ``space`` refuses optuna
        # with pbt), and every mutated key is an axis of the space, so each trial's config has it
        self._trial_state[trial] = pbt_trial_state(trial)

    def on_trial_result(self, tune_controller, trial: Trial, result: dict) -> str:
        if "resumed_from" in result:  # a trial's final report: it has ended (exploiting it would train nothing)
            return self.CONTINUE
        return super().on_trial_result(tune_controller, trial, result)

    def _checkpoint_or_exploit(self, trial: Trial, tune_controller, upper_quantile: list[Trial],
                               lower_quantile: list[Trial]) -> None:
        # no Tune checkpoint to take: the donor's newest stored one is read by the exploiting trial itself
        self._trial_state[trial].last_checkpoint = None
        if trial in lower_quantile and upper_quantile:
            self._exploit(tune_controller, trial, random.choice(upper_quantile))  # (Tune's own draw)

    def _exploit(self, tune_controller, trial: Trial, trial_to_clone: Trial) -> None:
        perturbed, _ = self._get_new_config(trial, trial_to_clone)
        keys = sorted(self._hyperparam_mutations)
        config = {**trial.config, **{k: perturbed[k] for k in keys}}
        config[TRIAL_KEY] = trial.config[TRIAL_KEY]
        config[EXPLOIT_KEY] = {"id": uuid.uuid4().hex[:12], "keys": keys,
                               "donor": trial_id_of(trial_to_clone.config, trial_to_clone.trial_id)}
        if trial.status != Trial.PAUSED:
            tune_controller.pause_trial(trial, should_checkpoint=False)
        trial.set_config(config)
        self._num_perturbations += 1
        mine, theirs = self._trial_state[trial], self._trial_state[trial_to_clone]
        mine.last_perturbation_time = theirs.last_perturbation_time
        mine.last_train_time = theirs.last_train_time


class TrialOwnedPB2(TrialOwnedPBT, PB2):
    """PB2's explore step (``PB2._get_new_config``, the model's pick) with ``TrialOwnedPBT``'s exploit through the
    trials' own checkpoints. Built with ``hyperparam_bounds={key: [lo, hi]}``."""

    def on_trial_add(self, tune_controller, trial: Trial) -> None:
        # PB2 casts each new value to the type the donor's value had, so a population drawn from a grid of whole
        # numbers (lam 0 and 1) would only ever be given whole numbers; every key it mutates is a float setting
        for key in self._hyperparam_bounds_flat:
            trial.config[key] = float(trial.config[key])
        super().on_trial_add(tune_controller, trial)

    def _get_new_config(self, trial: Trial, trial_to_clone: Trial) -> tuple[dict, dict]:
        new, operations = super()._get_new_config(trial, trial_to_clone)
        # PB2 hands its pick back as float32 (a bound of 0.8 comes back 0.800000011920929, past the bound): the
        # precision it was chosen at, within the bounds
        for key, (lo, hi) in self._hyperparam_bounds_flat.items():
            new[key] = min(max(float(f"{float(new[key]):.7g}"), lo), hi)
        return new, operations
