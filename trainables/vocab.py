"""One vocabulary: the names of what trials report and the objective groups, used by the trainer, the space
validator, the results tables, MLflow, the console and the report.

- Step metrics are reported at every log step (and are the curves' main content).
- Probe metrics are the last layer's summary, reported at the end of a trial (and every ``eval.every`` epochs);
  per-layer probe rows are reported as ``layer/<L>/<metric>`` or ``layer/<L>/h<H>/<metric>``.
- Fine-tuning (``eval.finetune``) reports ``finetune_loss`` at its log steps and ``finetune_top1`` (curves, at the
  run's steps after pre-training's) and ``finetune_top1`` at the end.
- Robustness to frequency-filtered noise is reported as ``noise/<band>/<classifier>_top1[_drop]`` (the
  ``robustness`` table), with each classifier's clean accuracy on the same images as ``<classifier>_top1_clean``.
- ``seconds_<part>`` are the seconds a trial spent training and in each evaluation (``EVAL_PARTS``).
- Static keys are constant per trial (sizes, placement of the run); they are not curves.
"""

from __future__ import annotations

import re

STEP_METRICS = ("loss", "loss_mim", "loss_cl")
POOLS = ("gap", "cls")  # features: mean of the patch tokens, or the CLS token (both always probed)
# Last-layer probe summaries: per pooling (``linear_top1_cls``), and unsuffixed for ``eval.pool``.
POOLED_PROBES = ("linear_top1", "knn_top1", "shape_bias", "cue_match")
PROBE_METRICS = ("linear_top1", "knn_top1", "shape_bias",
                 *(f"{m}_{p}" for m in POOLED_PROBES for p in POOLS), "finetune_top1")
LAYER_PROBES = ("attn_distance", "attn_nmi", "fourier_dlogamp_pi", "token_cossim", "effective_rank",
                *(f"{m}_{p}" for m in ("knn_top1", "linear_top1") for p in POOLS), "dense_miou", "cka_untrained")
LAYER_METRIC = re.compile(r"layer/\d+/(h\d+/)?(" + "|".join(LAYER_PROBES) + ")")
NOISE_CLASSIFIERS = ("linear", "finetune")  # the last layer's linear probe; the fine-tuned model
NOISE_METRIC = re.compile(r"noise/(\d+)/((?:" + "|".join(NOISE_CLASSIFIERS) + r")_top1(?:_drop)?)")
EVAL_PARTS = ("train", "probes", "dense", "cka", "noise", "finetune")  # seconds_<part>: where a trial's time went
# Final scalars kept as columns of the trials table.
FINAL_KEYS = (*STEP_METRICS, *PROBE_METRICS, "images_per_s", "finetune_steps",
              *(f"{c}_top1_clean" for c in NOISE_CLASSIFIERS), *(f"seconds_{p}" for p in EVAL_PARTS))
# Scalars a trial reports that are not curves (constant per trial or bookkeeping).
STATIC_KEYS = frozenset({"params", "train_flops_per_image", "total_steps", "world_size", "device", "resumed_from",
                         "replicas_in_sync", "train_images", "finetune_steps",
                         *(f"seconds_{p}" for p in EVAL_PARTS)})
# Keys Ray Tune adds to every result.
TUNE_KEYS = frozenset({"timestamp", "checkpoint_dir_name", "done", "training_iteration", "trial_id", "date",
                       "time_this_iter_s", "time_total_s", "pid", "hostname", "node_ip", "config",
                       "time_since_restore", "iterations_since_restore", "experiment_tag", "checkpoint_path",
                       "should_checkpoint"})
# Columns the console summary shows per trial.
SUMMARY_METRICS = ("step", "loss", "knn_top1", "linear_top1", "shape_bias")
# Metrics where larger is better (accuracies, fractions); the rest (losses) are minimised.
HIGHER_IS_BETTER = frozenset(PROBE_METRICS)


def objective_group(lam: float) -> str:
    """'mim' (lam = 0: pure SimMIM), 'cl' (lam = 1: pure MoCo v3) or 'hybrid'."""
    return "mim" if lam == 0 else "cl" if lam == 1 else "hybrid"


def objective_label(lam: float) -> str:
    """A human label of an objective: 'MIM (lam=0)', 'CL (lam=1)' or 'hybrid lam=0.25'."""
    return "MIM (lam=0)" if lam == 0 else "CL (lam=1)" if lam == 1 else f"hybrid lam={lam:g}"


def reports_metric(metric: str, lam: float) -> bool:
    """False if a trial at ``lam`` never reports ``metric`` (its branch is not computed)."""
    return not ((metric == "loss_mim" and lam == 1) or (metric == "loss_cl" and lam == 0))


def is_known_metric(metric) -> bool:
    """True for a step metric, a probe summary metric, or a per-layer probe key."""
    return isinstance(metric, str) and (metric in STEP_METRICS + PROBE_METRICS or bool(LAYER_METRIC.fullmatch(metric)))


def is_table_key(key: str) -> bool:
    """True for a reported key that goes to a long table of its own (``layers``, ``robustness``), not ``curves``."""
    return key.startswith(("layer/", "noise/"))
