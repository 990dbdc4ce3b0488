"""The one rule for every training phase (pre-training, each stage of a staged run, fine-tuning): how many steps a
length in steps or epochs is, the per-step lr (linear warmup, then cosine decay, WSD or SimMIM's multistep), and the
seed of a step's random draws. The trainer and fine-tuning both read these, as MAE's and big_vision's phases share
one schedule function. ``wsd`` (warmup, stable, short cooldown) is there for search: a trial compared or stopped at
any budget has cooled down, and a stable-phase checkpoint can be cooled down or extended (``decay_shape``)."""

from __future__ import annotations

import math

import numpy as np


def phase_steps(steps: int | None, epochs: float | None, n_train: int, global_batch: int) -> int | None:
    """Optimiser steps of a phase given as ``steps`` or ``epochs`` of ``n_train`` images at ``global_batch`` (a
    partial last batch dropped, at least one step); None when neither is given."""
    if steps is not None:
        return steps
    if epochs is None:
        return None
    return max(1, math.ceil(epochs * steps_per_epoch(n_train, global_batch)))


def steps_per_epoch(n_train: int, global_batch: int) -> int:
    return max(1, n_train // global_batch)


def warmup_length(total: int, warmup_frac: float, warmup_steps: int | None = None) -> int:
    """Steps of linear warmup: ``warmup_steps`` when given (a length that does not depend on the run's, so runs of
    different lengths share their first steps), else ``warmup_frac`` of ``total``."""
    return min(total, warmup_steps) if warmup_steps is not None else int(round(warmup_frac * total))


def cooldown_start(total: int, cooldown_frac: float) -> int:
    """The first step of a WSD run's cooldown: the last ``cooldown_frac`` of its ``total`` steps cool down."""
    return total - int(round(cooldown_frac * total))


def decay_shape(total: int, warm: int, kind: str = "cosine", decay_at: float = 1.0, gamma: float = 1.0,
                cooldown_frac: float = 0.2) -> np.ndarray:
    """The lr's share of its peak after warmup, per step (total,), from 1 down to 0 for ``cosine`` and ``wsd``:

    - ``cosine``: half a cosine from the end of warmup to the last step;
    - ``wsd`` (warmup-stable-decay; Hägele et al. 2024, "Scaling Laws and Compute-Optimal Training Beyond Fixed
      Training Durations"): 1 until ``cooldown_start``, then 1 - sqrt(progress) over the cooldown (their best
      cooldown shape; 20 % of the run matches cosine). Every step before the cooldown has the same value whatever
      the run's length, so a checkpoint of the stable phase continues into a longer run or cools down into a
      shorter one exactly as a run of that length would have;
    - ``multistep`` (SimMIM's MultiStepLR): 1 until ``decay_at`` of the run, then ``gamma``.
    Steps of the warmup read 1 (the warmup is applied to the lr itself)."""
    steps = np.arange(total, dtype=np.float64)
    if kind == "multistep":
        return np.where(steps < int(round(decay_at * total)), 1.0, gamma)
    if kind == "wsd":
        start = max(cooldown_start(total, cooldown_frac), warm)
        progress = np.clip((steps - start + 1) / max(1, total - start), 0, 1)  # the last step reaches 0
        return 1 - np.sqrt(progress)
    progress = np.clip((steps - warm) / max(1, total - warm), 0, 1)
    return 0.5 * (1 + np.cos(np.pi * progress))  # 1 -> 0


def lr_schedule(peak: float, total: int, warmup_frac: float, kind: str = "cosine", min_ratio: float = 0.0,
                decay_at: float = 1.0, gamma: float = 1.0, warmup_steps: int | None = None,
                cooldown_frac: float = 0.2) -> np.ndarray:
    """Per-step lr (total,): a linear warmup to ``peak`` (``warmup_length``), then ``decay_shape``: ``cosine`` or
    ``wsd`` down to ``min_ratio`` x peak, or ``multistep``."""
    steps = np.arange(total, dtype=np.float64)
    warm = warmup_length(total, warmup_frac, warmup_steps)
    shape = decay_shape(total, warm, kind, decay_at, gamma, cooldown_frac)
    lr = peak * shape if kind == "multistep" else peak * (min_ratio + (1 - min_ratio) * shape)
    if warm:
        lr[:warm] = peak * (steps[:warm] + 1) / warm
    return lr


def step_seed(seed: int, step: int, rank: int) -> int:
    """The seed of one step's random draws on one rank (augmentation, masks, crops): a pure function of the run's
    seed and the run's global step, so a resumed run draws what a straight one would."""
    return seed * 1_000_003 + step * 1009 + rank
