"""The one rule for every training phase (pre-training, each stage of a staged run, fine-tuning): how many steps a
length in steps or epochs is, the per-step lr (linear warmup, then cosine decay or SimMIM's multistep), and the
seed of a step's random draws. The trainer and fine-tuning both read these, as MAE's and big_vision's phases share
one schedule function."""

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


def lr_schedule(peak: float, total: int, warmup_frac: float, kind: str = "cosine", min_ratio: float = 0.0,
                decay_at: float = 1.0, gamma: float = 1.0) -> np.ndarray:
    """Per-step lr (total,): a linear warmup over ``warmup_frac`` of the steps to ``peak``, then ``cosine`` decay to
    ``min_ratio`` x peak, or ``multistep`` (SimMIM's MultiStepLR, stepped by step: the peak until ``decay_at`` of the
    run, then x ``gamma``)."""
    steps = np.arange(total, dtype=np.float64)
    warm = int(round(warmup_frac * total))
    if kind == "multistep":
        lr = np.where(steps < int(round(decay_at * total)), peak, peak * gamma)
    else:
        progress = np.clip((steps - warm) / max(1, total - warm), 0, 1)
        cosine = 0.5 * (1 + np.cos(np.pi * progress))  # 1 -> 0
        lr = peak * (min_ratio + (1 - min_ratio) * cosine)
    if warm:
        lr[:warm] = peak * (steps[:warm] + 1) / warm
    return lr


def step_seed(seed: int, step: int, rank: int) -> int:
    """The seed of one step's random draws on one rank (augmentation, masks, crops): a pure function of the run's
    seed and the run's global step, so a resumed run draws what a straight one would."""
    return seed * 1_000_003 + step * 1009 + rank
