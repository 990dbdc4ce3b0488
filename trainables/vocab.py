"""One vocabulary: the names of what trials report and the objective groups, used by the trainer, the space
validator, the results tables, MLflow, the console and the report.

- Objectives: the registry's (``objectives.registry``: simmim, mocov3, mae, dino and any other registered one), each
  in its family (MIM or CL); a trial's mix (``objective.weights``) names its group: ``objective_group`` (the
  ``objective`` column: the objective's name, or 'mix') and ``objective_label`` (the ``mix`` column, one label per
  weight vector).
- Step metrics are reported at every log step (and are the curves' main content): ``loss`` and each objective's
  own (``loss_<name>``).
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

import math
import re

from .objectives import registry

# The objectives are the registry's (``objectives.registry``: the built-in SimMIM, MoCo v3, MAE, DINO and any other
# registered one), in registration order, the order used everywhere (config, tables, labels); ``objective.weights``
# mixes any subset; ``objective.lam`` is the shorthand for {simmim: 1 - lam, mocov3: lam}. They are read through
# functions, not copied into constants, so an objective registered after this module loads is in every list.


def objective_names() -> tuple[str, ...]:
    """The registered objectives' names, in registration order."""
    return registry.names()


def family(name: str) -> str:
    """'mim' (masked image modelling) or 'cl' (contrastive / self-distillation)."""
    return registry.get(name).family


def label(name: str) -> str:
    """An objective's name for people ('MoCo v3')."""
    return registry.get(name).label


def loss_keys() -> dict[str, str]:
    """{objective: its own loss's metric name at log steps} ('loss_<name>')."""
    return {o.name: o.loss_key for o in registry.objectives()}


def layer_keys() -> dict[str, str]:
    """{objective: its placement key, objective.placement.<name>_layer}."""
    return {o.name: o.layer_key for o in registry.objectives()}


def target_encoders() -> dict[str, str]:
    """The EMA copies of the encoder an evaluation may read instead of the trained one (``eval.encoder``) and the
    objective that owns each: {"momentum": "mocov3", "teacher": "dino"}."""
    return {o.target: o.name for o in registry.objectives() if o.target}


def step_metrics() -> tuple[str, ...]:
    """Reported at every log step: the loss and each objective's own."""
    return ("loss", *loss_keys().values())


def held_out_losses() -> tuple[str, ...]:
    """The pre-training losses on the validation split's images, reported at every evaluation (``val_loss`` and each
    objective's ``val_loss_<name>``; ``trainer.held_out_loss``)."""
    return tuple(f"val_{k}" for k in step_metrics())


POOLS = ("gap", "cls")  # features: mean of the patch tokens, or the CLS token (both always probed)
# Last-layer probe summaries: per pooling (``linear_top1_cls``), and unsuffixed for ``eval.pool``.
POOLED_PROBES = ("linear_top1", "knn_top1", "shape_bias", "cue_match")
# The validation split's (``val_``): the last layer's kNN / linear probe per pooling, fine-tuning and the dense
# probe, what every selection (search metric, scheduler, best lr per objective) reads; the unprefixed are the
# evaluation split's.
VAL_METRICS = ("val_linear_top1", "val_knn_top1", *(f"val_{m}_{p}" for m in ("linear_top1", "knn_top1")
                                                     for p in POOLS), "val_finetune_top1", "val_dense_miou")
# Label-free signals on the validation split's images at every evaluation (no label read): RankMe of the last
# layer's features (higher is better, Garrido et al. 2023) and the pre-training loss on those held-out images (each
# objective's too, ``val_loss_<objective>``; lower is better). What a search can stop on before any probe is fit.
LABEL_FREE = ("val_rankme", *(f"val_rankme_{p}" for p in POOLS))
HELD_OUT_LOSS = "val_loss"
# What ``orchestrator.early_signals`` ranks trials by early in their runs: label-free first, then the validation
# linear probe itself read as early (what labels would buy).
EARLY_SIGNALS = ("val_rankme", HELD_OUT_LOSS, "val_linear_top1")
PROBE_METRICS = ("linear_top1", "knn_top1", "shape_bias",
                 *(f"{m}_{p}" for m in POOLED_PROBES for p in POOLS), "finetune_top1", *VAL_METRICS, *LABEL_FREE)
POOLED_CLASSIFIERS = ("knn", "linear", "linear10pct", "linear1pct")  # <name>_top1_<pool> at every layer
LAYER_CLASSIFIERS = (*POOLED_CLASSIFIERS, "attentive")  # read on the eval split (attentive_top1: the last layer)
LAYER_PROBES = ("attn_distance", "attn_nmi", "attn_entropy", "attn_head_div", "fourier_dlogamp_pi", "token_cossim",
                "effective_rank", "token_norm_outliers",
                *(f"{m}_top1_{p}" for m in POOLED_CLASSIFIERS for p in POOLS), *(f"rankme_{p}" for p in POOLS),
                "attentive_top1", "grad_cosine", "dense_miou", "cka_untrained")
LAYER_METRIC = re.compile(r"layer/\d+/(h\d+/)?(" + "|".join(LAYER_PROBES) + ")")
NOISE_CLASSIFIERS = ("linear", "finetune")  # the last layer's linear probe; the fine-tuned model
NOISE_METRIC = re.compile(r"noise/(\d+)/((?:" + "|".join(NOISE_CLASSIFIERS) + r")_top1(?:_drop)?)")


def band_edges(band: int, bands: int) -> tuple[float, float]:
    """(low, high) angular frequency of noise ``band`` (0 = lowest) of ``bands`` equal-width bands over [0, pi]
    (``robustness.band_mask``; the ``robustness`` table's freq_lo, freq_hi)."""
    return band * math.pi / bands, (band + 1) * math.pi / bands


EVAL_PARTS = ("train", "probes", "dense", "cka", "noise", "finetune")  # seconds_<part>: where a trial's time went


def final_keys() -> tuple[str, ...]:
    """Final scalars kept as columns of the trials table."""
    return (*step_metrics(), *PROBE_METRICS, *held_out_losses(), "images_per_s", "finetune_steps",
            *(f"{c}_top1_clean" for c in NOISE_CLASSIFIERS), *(f"seconds_{p}" for p in EVAL_PARTS))


# Scalars a trial reports that are not curves (constant per trial or bookkeeping).
STATIC_KEYS = frozenset({"params", "train_flops_per_image", "train_flops", "total_steps", "world_size", "device",
                         "resumed_from", "replicas_in_sync", "train_images", "finetune_steps",
                         *(f"seconds_{p}" for p in EVAL_PARTS)})
# What a trial adds to its results for Tune's scheduler (``trial.SchedulerView``): never written to a table.
SCHED_KEYS = ("sched_epoch", "sched_value")
# Keys Ray Tune adds to every result (and the scheduler's).
TUNE_KEYS = frozenset({*SCHED_KEYS, "timestamp", "checkpoint_dir_name", "done", "training_iteration", "trial_id",
                       "date", "time_this_iter_s", "time_total_s", "pid", "hostname", "node_ip", "config",
                       "time_since_restore", "iterations_since_restore", "experiment_tag", "checkpoint_path",
                       "should_checkpoint"})
# Columns the console summary shows per trial.
SUMMARY_METRICS = ("step", "loss", "knn_top1", "linear_top1", "shape_bias")
# What a trial costs, reported at its end (``config.train_flops``, ``model_stats``): a multi-objective search's
# cheaper-is-better objectives (``search.objectives``).
COST_METRICS = ("train_flops", "params")
# Metrics where larger is better (accuracies, fractions); the rest (losses) are minimised.
HIGHER_IS_BETTER = frozenset(PROBE_METRICS)
_LAYER_ACCURACY = re.compile(r"layer/\d+/(" + "|".join(LAYER_CLASSIFIERS) + r")_top1(_gap|_cls)?|layer/\d+/dense_miou")


def metric_mode(metric: str) -> str | None:
    """The direction a search takes on ``metric`` when its space says ``mode: auto``: ``max`` for accuracies
    and fractions (a probe's top-1, shape bias, a layer's probe accuracy or mIoU), ``min`` for the step metrics
    (losses); None for a per-layer statistic that has no better direction (attention distance, NMI, ...)."""
    if metric in HIGHER_IS_BETTER or _LAYER_ACCURACY.fullmatch(metric):
        return "max"
    return "min" if metric in step_metrics() + held_out_losses() + COST_METRICS else None


def _weights(mix) -> dict[str, float]:
    """Non-zero weights in registration order from a weights mapping, or from lam (a number)."""
    if not isinstance(mix, dict):
        mix = {"simmim": 1.0 - float(mix), "mocov3": float(mix)}
    return {k: float(mix[k]) for k in objective_names() if mix.get(k)}


def mix_lam(mix) -> float | None:
    """lam of a mix on the SimMIM / MoCo v3 line (the weight of MoCo v3), else None."""
    w = _weights(mix)
    return w.get("mocov3", 0.0) if set(w) <= {"simmim", "mocov3"} else None


def objective_group(mix) -> str:
    """The objective column: the objective's name when one trains alone ('simmim', 'mocov3', 'mae', 'dino', ...),
    'mix' for any mix of two or more. ``mix``: a weights mapping or lam."""
    w = _weights(mix)
    return next(iter(w)) if len(w) == 1 else "mix"


def objective_label(mix) -> str:
    """A human label, unique per weight vector: the objective's own ('SimMIM', 'MoCo v3', 'MAE', 'DINO') when one
    trains alone; 'lam=0.25' on the SimMIM / MoCo v3 line (lam, MoCo v3's weight, is the documented shorthand);
    'mix 0.5 SimMIM + 0.5 MAE' otherwise. ``mix``: a weights mapping or lam."""
    lam, w = mix_lam(mix), _weights(mix)
    if len(w) == 1:
        return label(next(iter(w)))
    if lam is not None:
        return f"lam={lam:g}"
    return "mix " + " + ".join(f"{v:.3g} {label(k)}" for k, v in w.items())


def weights_of(flat: dict) -> dict[str, float] | None:
    """The weights of a flattened config: ``objective.weights.*`` where given, else from ``objective.lam`` (configs
    written before weights existed); None if it holds neither."""
    given = {k: flat.get(f"objective.weights.{k}") for k in objective_names()}
    given = {k: v if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v else None
             for k, v in given.items()}  # (a table's null reads as NaN: absent, as in a config that omits it)
    if any(v is not None for v in given.values()):
        return _weights({k: float(v or 0.0) for k, v in given.items()})
    lam = flat.get("objective.lam")
    return _weights(lam) if isinstance(lam, (int, float)) and not isinstance(lam, bool) else None


def reports_metric(metric: str, mix) -> bool:
    """False if a trial with ``mix`` (weights or lam) never reports ``metric`` (its objective is not computed)."""
    w = _weights(mix)
    return all(metric not in (key, f"val_{key}") for k, key in loss_keys().items() if k not in w)


def is_known_metric(metric) -> bool:
    """True for a step metric, a probe summary metric, or a per-layer probe key."""
    return isinstance(metric, str) and (metric in step_metrics() + PROBE_METRICS + held_out_losses() + COST_METRICS
                                        or bool(LAYER_METRIC.fullmatch(metric)))


def is_table_key(key: str) -> bool:
    """True for a reported key that goes to a long table of its own (``layers``, ``robustness``), not ``curves``."""
    return key.startswith(("layer/", "noise/"))
