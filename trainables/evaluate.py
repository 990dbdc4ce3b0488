"""One evaluation of one encoder: every probe a trial reports at an evaluation step, as flat metric names.

The trainer calls it at step 0, every ``eval.every`` steps and at the end (``trainer.evaluate``, which adds the
gradient cosines of a mix); an analysis sweep calls it on a saved or released model and on the untrained encoder of
the same architecture (``trainables/analysis.py``). One function, so a model probed after the fact reports exactly
the keys, in the same order and with the same fitted probes, as one probed during training.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from .config import Config
from .data import DataBundle
from .probes import Row, cka_rows, dense_rows, rows_to_metrics, run_probes
from .robustness import linear_noise_accuracy

TIMERS = ("probes", "dense", "cka", "noise")  # the parts of ``vocab.EVAL_PARTS`` timed here (``seconds``' keys)
Baseline = Callable[[dict[int, torch.Tensor]], dict[int, torch.Tensor]]


def evaluate_encoder(encoder, data: DataBundle, cfg: Config, seconds: dict[str, float], untrained: Baseline,
                     noise: bool, more_rows: Callable[[], list[Row]] = list) -> dict[str, float]:
    """``probes.run_probes`` (last-layer kNN / linear / shape bias plus per-layer rows), then ``more_rows()`` (the
    trainer's gradient cosines), the dense probe (and its validation-split ``val_dense_miou``), CKA of each layer
    with the untrained encoder (``untrained``: this encoder's GAP features per layer on the eval subset -> the
    untrained encoder's on the same images) and, with ``noise``, the linear probe's accuracy under band-passed
    noise. Seconds spent are added to ``seconds``
    (``probes``, ``dense``, ``cka``, ``noise``)."""
    e, clock = cfg.eval, time.perf_counter
    t = clock()
    keep: dict = {}  # the eval subset's features and the fitted linear probe, reused below
    rows, summary = run_probes(encoder, data, cfg, keep)
    rows += more_rows()
    seconds["probes"] += clock() - t
    t = clock()
    dense, dense_summary = dense_rows(encoder, data, cfg)
    rows, summary = rows + dense, summary | dense_summary
    seconds["dense"] += clock() - t
    if e.cka:
        t = clock()
        rows += cka_rows(keep["eval_gap"], untrained(keep["eval_gap"]))
        seconds["cka"] += clock() - t
    if e.noise.bands and noise:
        t = clock()
        summary |= linear_noise_accuracy(encoder, data, cfg, keep["predict"][e.pool])
        seconds["noise"] += clock() - t
    return {**summary, **rows_to_metrics(rows)}
