"""One typed config tree for a clmim run.

A run is described by nested dataclasses (``Config`` below). YAML files and ``--set dotted.key=value`` overrides
are merged into a plain dict, then ``load_config`` turns it into the typed tree, checking every key, type and
range. Any problem raises ``ConfigError`` whose message starts with the dotted path of the offending key, before
any expensive work starts. ``to_dict`` gives back the resolved tree (saved next to every run).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from . import migrate
from .errors import ConfigError, UserError, excerpt
from .files import write_text_atomic
from .objectives import registry
from .objectives.registry import FlopsView
from .scale import block_flops, embed_flops, encoder_params, parse_variant
from .schedule import phase_steps
from .settings import setting as _f
from .vocab import family, label, layer_keys, objective_names, target_encoders

__all__ = ["Config", "ConfigError", "load_config", "parse_override", "resolve_placement", "to_dict"]


@dataclass
class ModelConfig:
    variant: str = _f("micro/4", doc="scale/patch, e.g. micro/4, Ti/16, S/16, B/16, L/16")
    img_size: int = _f(32, lo=8, hi=1024)
    drop_path: float | None = _f(None, lo=0.0, hi=0.9, doc="stochastic depth (default: the objective's recipe)")
    pos_embed: str = _f("auto", choices=["auto", "learned", "sincos"],
                        doc="auto: MoCo v3's fixed 2-D sin-cos at lam = 1, learned otherwise")
    patch_embed: str = _f("auto", choices=["auto", "trained", "frozen"],
                          doc="auto: MoCo v3's frozen random patch projection at lam = 1, trained otherwise")


@dataclass
class DataConfig:
    dataset: str = _f("synthetic", choices=["synthetic", "digits", "imagefolder", "cifar10", "cifar100", "store"])
    path: str | None = _f(None, doc="root folder for imagefolder / cifar10 / cifar100 (never downloaded); for store, "
                                    "what `clmim data prepare` wrote (a path or s3://...)")
    batch_size: int = _f(64, lo=2, hi=65536, doc="global batch over all workers")
    num_classes: int = _f(8, lo=2, hi=8, doc="synthetic set only: number of shape/texture classes")
    train_size: int = _f(2048, lo=16, hi=1_000_000, doc="synthetic set only: training images")
    eval_size: int = _f(512, lo=16, hi=100_000, doc="synthetic set only: eval and cue-conflict images")
    workers: int = _f(2, lo=0, hi=64, doc="imagefolder decode processes")
    fraction: float = _f(1.0, lo=1e-6, hi=1.0, doc="train on this nested, class-balanced share of the training "
                                                   "split (the same images for every trial)")


GRAFT_DOCS = {
    "graft_layer": "g: blocks 1..g learn only from MIM (SimMIM / MAE), g+1..depth only from CL (MoCo v3 / DINO)",
    "graft_lr_ratio": "with graft_layer: CL reaches every block and blocks 1..g (and the embedding) train at this "
                      "fraction of the lr (Layer Grafted Pre-training)"}


def _mix(self) -> dict[str, float]:
    """The non-zero weights of the resolved config, in registration order."""
    return {k: getattr(self.weights, k) for k in objective_names() if getattr(self.weights, k)}


_DERIVED: dict = {}


def objective_config_class() -> type:
    """The ``objective`` section's class, derived from the objective registry (rebuilt when it changes): ``weights``
    (one weight per objective, on the simplex), ``lam`` (the SimMIM / MoCo v3 shorthand), ``placement`` (each
    objective's ``<name>_layer``, ``graft_layer``, ``graft_lr_ratio``) and one settings section per objective
    (``objective.<name>.*``, its declaration's dataclass)."""
    if _DERIVED.get("version") == registry.version():
        return _DERIVED["objective"]
    objs = registry.objectives()
    weights = dataclasses.make_dataclass("WeightsConfig", [
        (o.name, float | None, _f(None, lo=0.0, hi=1.0, doc=f"{o.label}'s weight")) for o in objs])
    weights.__doc__ = "Loss mixing coefficients over the registered objectives, on the simplex: L = sum_k w_k L_k."
    reads = {"mim": "decoder", "cl": "head"}
    placement = dataclasses.make_dataclass("PlacementConfig", [
        *((o.layer_key, int | None, _f(None, lo=1, doc=f"block whose output feeds the {o.label} "
                                                       f"{reads[o.family]} (default: last)")) for o in objs),
        ("graft_layer", int | None, _f(None, lo=1, doc=GRAFT_DOCS["graft_layer"])),
        ("graft_lr_ratio", float | None, _f(None, lo=0.0, hi=1.0, doc=GRAFT_DOCS["graft_lr_ratio"]))])
    objective = dataclasses.make_dataclass("ObjectiveConfig", [
        ("weights", weights, field(default_factory=weights)),
        ("lam", float | None, _f(None, lo=0.0, hi=1.0, doc="shorthand for weights {simmim: 1 - lam, mocov3: lam}: "
                                                            "L = (1 - lam) * L_SimMIM + lam * L_MoCoV3 (default 0.5 "
                                                            "without weights)")),
        ("placement", placement, field(default_factory=placement)),
        *((o.name, o.settings, field(default_factory=o.settings)) for o in objs)], namespace={"mix": _mix})
    for cls in (weights, placement, objective):
        cls.__module__ = __name__
    _DERIVED.update(version=registry.version(), objective=objective)
    return objective


@dataclass
class OptimConfig:
    steps: int | None = _f(None, lo=1, doc="total optimiser steps (or give epochs)")
    epochs: float | None = _f(None, lo=0.01)
    flops_budget: float | None = _f(None, lo=1.0, doc="train until this many FLOPs (forward + backward, all "
                                                           "images): objectives of different cost stop at equal "
                                                           "compute; instead of steps / epochs")
    blr: float | None = _f(None, lo=0.0, hi=1.0, doc="base lr per 256 images: lr = blr * lr_scale * batch / 256 "
                                                       "(default: the objective's recipe)")
    lr_scale: float = _f(1.0, lo=0.0, hi=1e4, doc="multiplies blr; sweep it to tune lr per objective around each "
                                                   "objective's own recipe")
    min_lr_ratio: float = _f(0.0, lo=0.0, hi=1.0)
    schedule: str | None = _f(None, choices=["cosine", "multistep", "wsd"],
                              doc="lr after warmup: cosine decay (MoCo v3, MAE, DINO), multistep (SimMIM: constant, "
                                  "then x decay_gamma from decay_at of the run) or wsd (constant, then a 1 - sqrt "
                                  "cooldown over the last cooldown_frac: trials stopped or compared at any budget "
                                  "have cooled down; with warmup_steps, a stable-phase checkpoint extends or cools "
                                  "down exactly); default: the recipe's, multistep only where every objective of the "
                                  "mix uses it (pure SimMIM)")
    cooldown_frac: float = _f(0.2, lo=0.0, hi=0.9, doc="wsd: the share of the run that cools down (Hägele et al. "
                                                        "2024: 20 % matches cosine)")
    decay_at: float = _f(700 / 800, lo=0.0, hi=1.0, doc="multistep: the share of the run at which the lr drops "
                                                         "(SimMIM's ViT-B: epoch 700 of 800)")
    decay_gamma: float = _f(0.1, lo=0.0, hi=1.0, doc="multistep: the lr's factor after decay_at (SimMIM: 0.1)")
    warmup_frac: float | None = _f(None, lo=0.0, hi=0.9, doc="default: the objective's recipe")
    warmup_steps: int | None = _f(None, lo=0, doc="warmup length in steps, instead of warmup_frac: runs of different "
                                                  "lengths then share their first steps (wsd: extend or cool down "
                                                  "from a checkpoint)")
    weight_decay: float | None = _f(None, lo=0.0, hi=10.0, doc="default: the objective's recipe")
    weight_decay_end: float | None = _f(None, lo=0.0, hi=10.0, doc="cosine wd schedule end (default: constant)")
    beta1: float = _f(0.9, lo=0.0, hi=0.99999)
    beta2: float | None = _f(None, lo=0.0, hi=0.99999, doc="AdamW's beta2 (default: the objective's recipe)")
    clip_grad: float | None = _f(None, lo=0.0, doc="max gradient norm, 0 = off (default: the objective's recipe)")
    clip_mode: str | None = _f(None, choices=["global", "per_tensor"],
                               doc="clip_grad on the norm of all gradients together (SimMIM) or of each parameter "
                                   "tensor's gradient alone (DINO's clip_gradients); default: the recipe whose "
                                   "clip_grad the mix uses")


@dataclass
class FinetuneConfig:
    """End-to-end fine-tuning after pre-training (the BEiT / MAE / SimMIM recipe, defaults from MAE's ViT-B/16:
    blr 5e-4 per 256 images, layer-wise lr decay 0.65, wd 0.05, drop path 0.1, label smoothing 0.1, 5 of 100
    epochs warmup; no mixup / cutmix / RandAugment)."""

    steps: int | None = _f(None, lo=1, doc="fine-tuning optimiser steps (or give epochs; neither: off)")
    epochs: float | None = _f(None, lo=0.01, doc="fine-tuning epochs of the labelled train split")
    batch_size: int | None = _f(None, lo=2, hi=65536, doc="global batch (default: data.batch_size)")
    blr: float = _f(5e-4, lo=0.0, hi=1.0, doc="base lr per 256 images")
    layer_decay: float = _f(0.65, lo=0.0, hi=1.0, doc="lr of block k = lr * layer_decay^(depth + 1 - k)")
    weight_decay: float = _f(0.05, lo=0.0, hi=10.0)
    drop_path: float = _f(0.1, lo=0.0, hi=0.9)
    label_smoothing: float = _f(0.1, lo=0.0, hi=0.9)
    warmup_frac: float = _f(0.05, lo=0.0, hi=0.9)
    pool: str = _f("gap", choices=["gap", "cls"], doc="features the head reads (MAE / BEiT: gap)")
    crop_min: float | None = _f(None, lo=0.01, hi=1.0, doc="random resized crop's smallest area (default: 0.08, "
                                                         "0.2 below 64 px)")
    flip: bool = _f(True, doc="random horizontal flips (off for data whose classes are not mirror-symmetric)")
    eval_every: int | None = _f(None, lo=1, doc="measure finetune_top1 every N fine-tuning steps (always at the end)")

    @property
    def enabled(self) -> bool:
        return self.steps is not None or self.epochs is not None


@dataclass
class NoiseConfig:
    """Robustness to frequency-filtered noise: Gaussian noise band-passed to ``bands`` equal-width rings of
    frequency (L-infinity radius, 0 to pi) and added to eval images, at RMS ``rms`` (of the [0, 1] pixel range) in
    every band, or (``amplitude: fixed``, Park & Kim's convention) as white noise of standard deviation ``scale``
    in the normalised input space, band-passed and not rescaled (``trainables/robustness.py``)."""

    bands: int = _f(8, lo=0, hi=64, doc="frequency bands (0: off)")
    amplitude: str = _f("rms", choices=["rms", "fixed"],
                        doc="rms: every band at RMS eval.noise.rms in pixel space; fixed: Park & Kim's white noise "
                            "of std eval.noise.scale in normalised space, band-passed (high bands carry more)")
    rms: float = _f(0.1, lo=0.0, hi=10.0, doc="noise RMS per image, in units of the [0, 1] pixel range")
    scale: float = _f(0.1, lo=0.0, hi=10.0, doc="amplitude fixed: the white noise's std, normalised units")
    images: int = _f(128, lo=1, hi=100_000, doc="a fixed, seeded N of the eval subset (eval.samples)")


@dataclass
class EvalConfig:
    every: int | None = _f(None, lo=1, doc="run the probes every N epochs (always at the end)")
    samples: int = _f(512, lo=16, hi=1_000_000, doc="fixed, seeded eval subset size")
    val_samples: int = _f(512, lo=0, hi=1_000_000,
                          doc="validation images held out of the training split's labels (at most a quarter of "
                              "it; 0: none) for the val_* metrics every selection reads")
    probe_images: int = _f(64, lo=2, hi=4096, doc="images of that subset for the attention / token probes")
    pool: str = _f("gap", choices=["gap", "cls"],
                   doc="pooling of the unsuffixed linear_top1 / knn_top1 / shape_bias (both are always measured)")
    knn_k: int = _f(20, lo=1, hi=1000)
    dense_images: int = _f(64, lo=0, hi=100_000, doc="images (train and eval each) of the per-layer dense probe "
                                                       "(synthetic set only; 0: off)")
    cka: bool = _f(True, doc="per-layer linear CKA of the encoder against its untrained self (cka_untrained)")
    lowshot: bool = _f(True, doc="per-layer linear probes fit on 10 % and 1 % of the labels (linear10pct_top1_*, "
                                 "linear1pct_top1_*)")
    attentive_steps: int = _f(300, lo=0, hi=100_000, doc="training steps of the last layer's attentive probe "
                                                         "(attentive_top1; 0: off)")
    grad_cosine: bool = _f(True, doc="in a mix: per-block cosine between the objectives' gradients (grad_cosine)")
    encoder: str = _f("auto",
                      doc="the encoder every evaluation, export and fine-tuning reads: student (the trained one), "
                          "teacher (DINO's EMA teacher) or momentum (MoCo v3's momentum encoder); auto: the teacher "
                          "when the mix has DINO (as DINO's own evaluations read it), else the student")
    noise: NoiseConfig = field(default_factory=NoiseConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)


@dataclass
class SimulateConfig:
    """A simulated trial (``trainables/simulate.py``), for measuring the sweep driver at scale: no model is built,
    each step sleeps, and the trial reports what the trainer would report for this config, at the same steps, with
    random values. A benchmarking mode: never for results."""

    seconds_per_step: float | None = _f(None, lo=0.0, hi=3600.0, doc="sleep per optimiser step (None: off, train)")
    seconds_per_eval: float = _f(0.0, lo=0.0, hi=3600.0, doc="sleep per evaluation (step 0, eval.every, the end)")
    checkpoint_mb: float = _f(1.0, lo=0.0, hi=100_000.0, doc="size of each simulated checkpoint file")


@dataclass
class RunConfig:
    seed: int = _f(0, lo=0)
    out_dir: str | None = _f(None, doc="where config, checkpoints and metrics go")
    device: str = _f("auto", choices=["auto", "cpu", "cuda"])
    precision: str = _f("auto", choices=["auto", "fp32", "bf16"], doc="auto: bf16 autocast on GPU, fp32 on CPU")
    compile: bool = _f(False, doc="torch.compile the training step (each transformer block under DDP)")
    log_every: int = _f(10, lo=1)
    ckpt_every: int = _f(0, lo=0, doc="checkpoint every N steps (0: only at the end)")
    resume: str | None = _f(None, doc="checkpoint file to resume from, or 'auto' (latest in out_dir)")
    threads: int | None = _f(None, lo=1, hi=512, doc="torch CPU threads")
    simulate: SimulateConfig = field(default_factory=SimulateConfig)


# What a stage may set (``StageConfig.set``); the model's architecture, the data, the evaluations and the run are
# the trial's, so one encoder carries over from stage to stage and every stage is read the same way.
STAGE_KEYS = ("objective.", "optim.", "model.drop_path", "eval.encoder")


@dataclass
class StageConfig:
    """One stage of a staged run (``stages``): its own objective mix, placement and optimiser settings on the
    trial's model and data for ``steps`` steps, starting from the previous stage's encoder (the one its
    ``eval.encoder`` names) with new heads and a new optimiser and lr schedule; its recipe defaults follow its own
    mix. Layer Grafted Pre-training: MAE on the whole network, then MoCo v3 with blocks 1..g at a lower lr."""

    steps: int | None = _f(None, lo=1, doc="this stage's optimiser steps")
    name: str | None = _f(None, doc="a label (default: its objective's)")
    set: dict = field(default_factory=dict, metadata={"doc": "dotted keys of objective.*, optim.*, "
                                                             "model.drop_path or eval.encoder for this stage"})
    resolved: dict | None = field(default=None, metadata={"doc": "filled when the config loads: the stage's whole "
                                                                 "resolved config (what it ran)"})


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    objective: Any = field(default_factory=lambda: objective_config_class()(),
                           metadata={"section": objective_config_class})
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)
    stages: list[StageConfig] = field(default_factory=list, metadata={
        "doc": "a staged run: each stage's mix, placement and optimiser in turn, on one encoder (empty: one stage)"})


# A mix's optimiser defaults come from its objectives' official recipes (each declaration's ``recipe``: blr per 256
# images, weight decay (start and end of its cosine schedule), warmup share, gradient clipping and its mode, drop
# path, AdamW's beta2, the lr schedule). A mix interpolates with its weights: blr geometrically (lrs compare on a log
# scale), wd / warmup / drop path / beta2 linearly, and clips at the smallest clipping any of its objectives uses, in
# that objective's mode (at lam < 1, SimMIM's global 5.0; with DINO, DINO's per-tensor 3.0); the schedule is
# multistep only where every objective of the mix uses it (pure SimMIM), else cosine.
def recipe(mix: dict[str, float] | float) -> dict[str, float]:
    """The default optimiser settings and drop path of a mix (weights, or lam for the SimMIM / MoCo v3 line)."""
    if not isinstance(mix, dict):
        mix = {"simmim": 1.0 - mix, "mocov3": mix}
    rec = {o: registry.get(o).recipe for o, w in mix.items() if w}
    mix = {k: w for k, w in mix.items() if w}
    out = {k: sum(w * rec[o][k] for o, w in mix.items())
           for k in ("weight_decay", "weight_decay_end", "warmup_frac", "drop_path", "beta2")}
    out["beta2"] = round(out["beta2"], 6)  # (0.5 * 0.999 + 0.5 * 0.999 is 0.9990000000000001)
    out["blr"] = float(f'{math.exp(sum(w * math.log(rec[o]["blr"]) for o, w in mix.items())):.4g}')
    clips = sorted((rec[o]["clip_grad"], rec[o].get("clip_mode", "global")) for o in mix if rec[o]["clip_grad"] > 0)
    out["clip_grad"], out["clip_mode"] = clips[0] if clips else (0.0, "global")
    schedules = {rec[o].get("schedule", "cosine") for o in mix}  # one schedule: SimMIM's only if it is alone
    out["schedule"] = schedules.pop() if len(schedules) == 1 else "cosine"
    return out


def _resolve_weights(cfg: Config) -> None:
    """Fill ``objective.weights`` (every objective, 0 where unset) and ``objective.lam`` (MoCo v3's weight on the
    SimMIM / MoCo v3 line, else null) in place; weights must lie on the simplex."""
    o = cfg.objective
    given = {k: getattr(o.weights, k) for k in objective_names() if getattr(o.weights, k) is not None}
    if not given:
        lam = 0.5 if o.lam is None else o.lam
        given = {"simmim": 1.0 - lam, "mocov3": lam}
    else:
        total = sum(given.values())
        shown = ", ".join(f"{k}: {v:g}" for k, v in given.items())
        if abs(total - 1.0) > 1e-6:
            raise ConfigError(f"objective.weights: {{{shown}}} sum to {total:.6g}; the weights lie on the simplex "
                              "(non-negative, summing to 1)")
        if o.lam is not None:
            line = set(k for k, v in given.items() if v) <= {"simmim", "mocov3"}
            if not (line and abs(given.get("mocov3", 0.0) - o.lam) < 1e-9
                    and abs(given.get("simmim", 0.0) - (1.0 - o.lam)) < 1e-9):
                raise ConfigError(f"objective.lam: {o.lam:g} disagrees with objective.weights {{{shown}}}; give only "
                                  "one of them (lam is the shorthand for {simmim: 1 - lam, mocov3: lam})")
    for k in objective_names():
        setattr(o.weights, k, float(given.get(k, 0.0)))
    mix = o.mix()
    o.lam = mix.get("mocov3", 0.0) if set(mix) <= {"simmim", "mocov3"} else None


def _resolve_defaults(cfg: Config) -> None:
    """Fill every per-objective default (None / "auto") in place, so the saved config holds what ran."""
    mix = cfg.objective.mix()
    r = recipe(mix)
    if cfg.optim.weight_decay is None and cfg.optim.weight_decay_end is None and \
            r["weight_decay_end"] != r["weight_decay"]:
        cfg.optim.weight_decay_end = r["weight_decay_end"]  # DINO's rising wd, unless the user set a wd
    for section, key in (("optim", "blr"), ("optim", "weight_decay"), ("optim", "warmup_frac"),
                         ("optim", "clip_grad"), ("optim", "clip_mode"), ("optim", "beta2"), ("optim", "schedule"),
                         ("model", "drop_path")):
        node = getattr(cfg, section)
        if getattr(node, key) is None:
            setattr(node, key, r[key])
    objs = [registry.get(o) for o in mix]
    if cfg.model.pos_embed == "auto":  # each recipe's: fixed sin-cos (MoCo v3, MAE) or learned (SimMIM, DINO)
        cfg.model.pos_embed = "sincos" if all(o.pos_embed == "sincos" for o in objs) else "learned"
    if cfg.model.patch_embed == "auto":  # frozen random (MoCo v3's) only where every objective of the mix freezes it
        cfg.model.patch_embed = "frozen" if all(o.patch_embed == "frozen" for o in objs) else "trained"
    if cfg.eval.encoder == "auto":  # an EMA teacher where the mix has one (DINO's evaluations read it)
        cfg.eval.encoder = "teacher" if "teacher" in target_encoders() and target_encoders()["teacher"] in mix \
            else "student"


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp)).replace("NoneType", "null")


def _coerce(value: Any, tp, path: str):
    """Check ``value`` against the annotated type ``tp``; ints are accepted where floats are expected."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, path)
            except ConfigError:
                pass
        raise ConfigError(f"{path}: expected {' or '.join(_type_name(a) for a in args)}, got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None:
            if not math.isfinite(number):
                raise ConfigError(f"{path}: expected a finite number, got {value!r}")
            return number
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is dict:
        if isinstance(value, dict):
            return copy.deepcopy(value)
    elif origin is list and typing.get_args(tp) == (str,):  # (names: sweeps, metrics)
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return list(value)
    elif origin is list and dataclasses.is_dataclass(typing.get_args(tp)[0]):
        if isinstance(value, list):
            return [_build(typing.get_args(tp)[0], v, f"{path}[{i}]") for i, v in enumerate(value)]
    raise ConfigError(f"{path}: expected {_type_name(tp)}, got {excerpt(value, 60)} ({type(value).__name__})")


def build_section(cls, data: dict, prefix: str):
    """A typed section (a dataclass of ``setting`` fields) from a mapping, every key, type, choice and range checked;
    a ``ConfigError`` names the dotted key (``prefix.key``). The space loader reads its sections with it too."""
    return _build(cls, data, prefix)


@functools.lru_cache(maxsize=256)
def _hints(cls) -> dict:
    """A section's field types, resolved once per class (resolving them compiles every annotation: the sweep
    driver builds a config per trial)."""
    return typing.get_type_hints(cls)


def _build(cls, data: dict, prefix: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {excerpt(data, 60)}")
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        raise ConfigError(f"{where}: unknown key; allowed keys here: {', '.join(sorted(fields))}")
    kwargs = {}
    for name, f in fields.items():
        path = f"{prefix}.{name}" if prefix else name
        tp = f.metadata["section"]() if "section" in f.metadata else hints[name]  # (derived from the registry)
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, data.get(name) or {}, path)
            continue
        if name not in data:
            continue
        value = _coerce(data[name], tp, path)
        meta = f.metadata
        if value is not None:
            if meta.get("choices") and value not in meta["choices"]:
                raise ConfigError(f"{path}: {value!r} is not allowed; choose one of {meta['choices']}")
            lo, hi = meta.get("lo"), meta.get("hi")
            if (lo is not None and value < lo) or (hi is not None and value > hi):
                rng = f"[{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
                raise ConfigError(f"{path}: {value!r} is out of range {rng}")
        kwargs[name] = value
    return cls(**kwargs)


def _check_simulated(cfg: Config) -> None:
    """What ``trainables/simulate.py`` does not reproduce is refused."""
    if cfg.stages:
        raise ConfigError("run.simulate: staged runs (stages) are not simulated")
    if cfg.eval.finetune.enabled:
        raise ConfigError("run.simulate: fine-tuning (eval.finetune) is not simulated")
    if cfg.data.dataset != "synthetic":
        raise ConfigError(f"run.simulate: only data.dataset synthetic is simulated (got {cfg.data.dataset!r})")


def _validate(cfg: Config) -> None:
    """Cross-field checks: variant, patch size vs image size, layer indices vs depth, placement rules."""
    try:
        spec = parse_variant(cfg.model.variant)
    except ValueError as e:
        raise ConfigError(f"model.variant: {e}") from None
    if cfg.model.img_size % spec.patch:
        raise ConfigError(
            f"model.img_size: {cfg.model.img_size} is not divisible by the patch size {spec.patch} "
            f"of model.variant {cfg.model.variant!r}"
        )
    depth = spec.depth
    _check_placement(cfg, depth)
    targets = target_encoders()
    if cfg.eval.encoder not in ("auto", "student", *targets):
        raise ConfigError(f"eval.encoder: {cfg.eval.encoder!r} is not allowed; choose one of "
                          f"{['auto', 'student', *targets]}")
    owner = targets.get(cfg.eval.encoder)
    if owner and owner not in cfg.objective.mix():
        raise ConfigError(f"eval.encoder: {cfg.eval.encoder} needs {owner} in the mix, which trains "
                          f"{', '.join(cfg.objective.mix())}")
    _check_every_block_trained(cfg, depth)
    mix = cfg.objective.mix()
    for o in registry.objectives():  # each objective's own checks (its settings against the model)
        if o.validate is not None:
            o.validate(cfg, spec, o.name in mix)
    if cfg.eval.noise.bands > cfg.model.img_size // 2:
        raise ConfigError(f"eval.noise.bands: {cfg.eval.noise.bands} bands of a {cfg.model.img_size}-pixel image "
                          f"leave some without a frequency (at most {cfg.model.img_size // 2})")
    if cfg.eval.finetune.steps is not None and cfg.eval.finetune.epochs is not None:
        raise ConfigError("eval.finetune.steps: give only one of eval.finetune.steps and eval.finetune.epochs")
    budgets = [k for k in ("steps", "epochs", "flops_budget") if getattr(cfg.optim, k) is not None]
    if len(budgets) > 1:
        raise ConfigError(f"optim.{budgets[0]}: give only one of optim.steps, optim.epochs, optim.flops_budget "
                          f"(got {' and '.join(budgets)})")
    if cfg.run.simulate.seconds_per_step is not None:
        _check_simulated(cfg)
    if cfg.data.dataset in ("imagefolder", "cifar10", "cifar100", "store") and not cfg.data.path:
        raise ConfigError(f"data.path: required for data.dataset = {cfg.data.dataset!r} (nothing is downloaded)")
    if cfg.data.path and cfg.data.dataset in ("imagefolder", "cifar10", "cifar100", "store"):
        local = not cfg.data.path.startswith("s3://")  # (an object store is checked when the trial opens it)
        if local and not Path(cfg.data.path).expanduser().exists():
            raise ConfigError(f"data.path: {cfg.data.path!r} does not exist")
        if local and cfg.data.dataset == "store" and not (Path(cfg.data.path).expanduser() / "index.json").is_file():
            raise ConfigError(f"data.path: {cfg.data.path!r} is not a prepared store (no index.json; run `clmim data "
                              "prepare SOURCE DEST` first, or it was interrupted: run it again)")


def _check_placement(cfg: Config, depth: int) -> None:
    """Layer indices within the depth, placement keys only for objectives in the mix, the graft's rules."""
    p, mix = cfg.objective.placement, cfg.objective.mix()
    for name in (*layer_keys().values(), "graft_layer"):
        v = getattr(p, name)
        if v is not None and v > depth:
            raise ConfigError(
                f"objective.placement.{name}: {v} is beyond the depth of {cfg.model.variant} (blocks 1..{depth})"
            )
    for obj, key in layer_keys().items():
        if obj not in mix and getattr(p, key) is not None and getattr(p, key) != depth:
            lam = cfg.objective.lam
            how = f"objective.lam = {lam:g}" if lam is not None else f"objective.weights.{obj} is 0"
            raise ConfigError(f"objective.placement.{key}: set, but {label(obj)} is not in the mix ({how}), so no "
                              f"{label(obj)} loss is computed")
    if p.graft_layer is not None:
        g = p.graft_layer
        if g >= depth:
            raise ConfigError(f"objective.placement.graft_layer: {g} leaves no block for CL (must be < {depth})")
        families = {family(o) for o in mix}
        staged_cl = families == {"cl"} and p.graft_lr_ratio is not None  # Layer Grafting's CL stage, after MIM's
        if families != {"mim", "cl"} and not staged_cl:
            raise ConfigError(
                f"objective.placement.graft_layer: needs a MIM objective (SimMIM, MAE) and a CL objective (MoCo v3, "
                f"DINO), but the mix is {', '.join(label(o) for o in mix)} (with lam: use 0 < lam < 1; a CL "
                f"objective alone takes it with graft_lr_ratio, as Layer Grafting's CL stage after a MIM stage)"
            )
        for o in mix:
            v = getattr(p, layer_keys()[o])
            if v is None:
                continue
            if family(o) == "mim" and v > g:
                raise ConfigError(f"objective.placement.{layer_keys()[o]}: {v} is above graft_layer {g}; MIM may only "
                                  f"read blocks 1..{g}")
            if family(o) == "cl" and v <= g:
                raise ConfigError(f"objective.placement.{layer_keys()[o]}: {v} is at or below graft_layer {g}; CL must "
                                  f"read a block in {g + 1}..{depth}")
    if p.graft_lr_ratio is not None and p.graft_layer is None:
        raise ConfigError("objective.placement.graft_lr_ratio: set, but objective.placement.graft_layer is not "
                          "(the ratio applies to blocks 1..graft_layer)")
    if p.graft_lr_ratio == 0:
        raise ConfigError("objective.placement.graft_lr_ratio: 0 leaves the embedding and blocks 1..graft_layer "
                          "untrained; give a ratio in (0, 1], or drop it for hard grafting (those blocks from MIM "
                          "only)")


def _check_every_block_trained(cfg: Config, depth: int) -> None:
    """A placement must give every block a gradient: blocks no objective reaches would stay random, and the
    probes would then read an untrained layer as if it had learned something."""
    p = cfg.objective.placement
    layers, g = resolve_placement(cfg)
    top = max(layers.values())
    if top < depth:
        keys = [f"objective.placement.{k} = {getattr(p, k)}" for k in layer_keys().values()
                if getattr(p, k) is not None]
        blocks = f"block {depth}" if top + 1 == depth else f"blocks {top + 1}..{depth}"
        raise ConfigError(f"{' and '.join(keys)}: {blocks} would get no gradient from any objective "
                          f"(they would stay random); let one objective read block {depth}")
    mim = max((v for o, v in layers.items() if family(o) == "mim"), default=None) if g is not None else None
    if g is not None and p.graft_lr_ratio is None and mim < g:
        keys = " and ".join(f"objective.placement.{layer_keys()[o]} = {v}" for o, v in layers.items()
                            if family(o) == "mim")
        blocks = f"block {g}" if mim + 1 == g else f"blocks {mim + 1}..{g}"
        raise ConfigError(f"{keys} and objective.placement.graft_layer = {g}: "
                          f"{blocks} would get no gradient (CL is detached below the graft, MIM reads block "
                          f"{mim}); let MIM read graft_layer, or set graft_lr_ratio so that CL reaches them")


def resolve_placement(cfg: Config) -> tuple[dict[str, int], int | None]:
    """({objective: the block its head reads} for the mix's objectives, graft_layer), defaults filled in: blocks
    are numbered 1..depth; a MIM objective reads graft_layer under a graft, else the last block."""
    depth = parse_variant(cfg.model.variant).depth
    p = cfg.objective.placement
    g = p.graft_layer
    layers = {}
    for o in cfg.objective.mix():
        v = getattr(p, layer_keys()[o])
        layers[o] = v if v is not None else (g if g is not None and family(o) == "mim" else depth)
    return layers, g


def objectives_reaching(cfg: Config) -> dict[int, list[str]]:
    """{block: the mix's objectives whose loss reaches its parameters}, blocks 1..depth: an objective reaches the
    blocks up to the one its head reads, except a CL objective detached below ``graft_layer`` (no lr ratio), which
    reaches only the blocks above it. Where two or more reach a block, their gradients there are compared
    (``grad_cosine``)."""
    layers, g = resolve_placement(cfg)
    detached = g is not None and cfg.objective.placement.graft_lr_ratio is None
    depth = parse_variant(cfg.model.variant).depth
    return {k: [n for n, top in layers.items() if k <= top and not (detached and family(n) == "cl" and k <= g)]
            for k in range(1, depth + 1)}


def set_dotted(tree: dict, dotted: str, value: Any) -> None:
    """Set ``tree['a']['b'] = value`` for ``dotted = 'a.b'``, creating mappings on the way."""
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        nxt = node.get(k)
        if nxt is None:
            nxt = node[k] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"{dotted}: {k!r} is a value, not a section")
        node = nxt
    node[keys[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """Parse ``dotted.key=value``; the value is read as YAML (so 0.5 is a float, null is None)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected dotted.key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"--set {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    yaml_size(value, f"--set {key}")
    return key, value


def deep_merge(base: dict, extra: dict) -> dict:
    """A new dict with ``extra`` merged into ``base`` (nested mappings merged, other values replaced)."""
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


MAX_YAML_VALUES = 100_000  # values a config or space file may hold once its aliases are expanded
MAX_YAML_DEPTH = 64


def yaml_size(obj, what: str, error: type[UserError] = ConfigError) -> int:
    """The number of values ``obj`` holds with YAML aliases expanded (each shared mapping or list counted every time
    it is used), computed once per distinct node: an alias bomb (9 levels of 9 aliases: 387 million values) is an
    ``error`` in microseconds, never expanded. A recursive alias, or nesting deeper than ``MAX_YAML_DEPTH``, is an
    error too."""
    sizes: dict[int, int] = {}
    open_: set[int] = set()

    def size(o, depth: int) -> int:
        if not isinstance(o, (list, dict)):
            return 1
        k = id(o)
        if k in sizes:
            return sizes[k]
        if k in open_:
            raise error(f"{what}: a YAML alias refers to itself (a recursive structure)")
        if depth > MAX_YAML_DEPTH:
            raise error(f"{what}: nested deeper than {MAX_YAML_DEPTH} levels")
        open_.add(k)
        items = [*o.keys(), *o.values()] if isinstance(o, dict) else o
        n = 1 + sum(size(x, depth + 1) for x in items)
        open_.discard(k)
        sizes[k] = n
        return n

    n = size(obj, 0)
    if n > MAX_YAML_VALUES:
        raise error(f"{what}: holds {n:,} values once its YAML aliases are expanded (more than {MAX_YAML_VALUES:,}); "
                    "write the values out, or use fewer aliases")
    return n


def read_yaml(path: str | Path, what: str, error: type[UserError] = ConfigError):
    """Parse a YAML file; a missing file or a syntax error is ``error`` naming the file, line and column; a file
    whose aliases expand beyond ``MAX_YAML_VALUES`` values is an ``error`` too (``yaml_size``)."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{what} {str(path)!r} does not exist")
    try:
        tree = yaml.safe_load(path.read_text())
        yaml_size(tree, f"{what} {str(path)!r}", error)
        return tree
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise error(f"{what} {str(path)!r} is not valid YAML{where}: {e.problem or e.context}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise error(f"{what} {str(path)!r} is not valid YAML: {str(e).splitlines()[0]}") from None


def load_config(source: dict | str | Path | None = None, overrides: list[str] | dict | None = None) -> Config:
    """Build and validate a ``Config`` from a YAML path or dict plus overrides.

    ``overrides`` is a list of ``dotted.key=value`` strings or a ``{dotted.key: value}`` dict.
    Raises ``ConfigError`` naming the dotted path of the first problem.
    """
    if source is None:
        tree: dict = {}
    elif isinstance(source, dict):
        tree = copy.deepcopy(source)  # overrides must not reach into the caller's nested mappings
    else:
        tree = read_yaml(source, "config file")
        if tree is None:
            tree = {}
        if not isinstance(tree, dict):
            raise ConfigError(f"config file {str(source)!r}: expected a mapping of sections, got {excerpt(tree, 60)}")
    items = overrides.items() if isinstance(overrides, dict) else (parse_override(o) for o in overrides or [])
    tree = migrate.config_tree(tree)  # (a file an earlier version wrote)
    for key, value in items:
        set_dotted(tree, migrate.dotted_key(key), value)
    if tree.get("stages"):
        _resolve_stages(tree)
    cfg = _build(Config, tree, "")
    _resolve_weights(cfg)
    _validate(cfg)
    _resolve_defaults(cfg)
    _check_flops_budget(cfg)
    return cfg


def _resolve_stages(tree: dict) -> None:
    """Resolve a staged run in place: each stage's whole config (the trial's tree, its ``set`` keys and its steps,
    with the recipe defaults of its own mix) into ``stages[i].resolved``; the run's length is the sum of the
    stages' steps and its objective the last stage's (what it ends as). Errors name ``stages[i]``."""
    stages = tree["stages"]
    if not isinstance(stages, list):
        raise ConfigError(f"stages: expected a list of stages, got {excerpt(stages, 60)}")
    base = {k: v for k, v in tree.items() if k != "stages"}
    for key in ("steps", "epochs", "flops_budget"):
        if (base.get("optim") or {}).get(key) is not None:
            raise ConfigError(f"optim.{key}: a staged run is as long as its stages' steps together; set "
                              "stages[i].steps instead")
    resolved = []
    for i, raw in enumerate(stages):
        stage = _build(StageConfig, raw, f"stages[{i}]")
        if stage.steps is None:
            raise ConfigError(f"stages[{i}].steps: required (each stage's optimiser steps)")
        t = copy.deepcopy(base)
        for key, value in stage.set.items():
            if key in ("optim.steps", "optim.epochs", "optim.flops_budget"):
                raise ConfigError(f"stages[{i}].set.{key}: a stage's length is stages[{i}].steps")
            if not key.startswith(STAGE_KEYS):
                raise ConfigError(f"stages[{i}].set.{key}: a stage may set objective.*, optim.*, model.drop_path "
                                  "and eval.encoder; the model, data, evaluations and run are the trial's")
            set_dotted(t, key, value)
        set_dotted(t, "optim.steps", stage.steps)
        try:
            done = to_dict(load_config(t))
        except ConfigError as e:
            raise ConfigError(f"stages[{i}].set: {e}") from None
        del done["stages"]
        resolved.append({"steps": stage.steps, "name": stage.name, "set": stage.set, "resolved": done})
    tree["stages"] = resolved
    set_dotted(tree, "optim.steps", sum(s["steps"] for s in resolved))
    last = resolved[-1]["resolved"]
    tree["objective"] = copy.deepcopy(last["objective"])  # the trial is labelled by what it ends as
    set_dotted(tree, "eval.encoder", last["eval"]["encoder"])


def stage_bounds(cfg: Config) -> list[int]:
    """The global step at which each stage starts, and the end: [0, s1, s1 + s2, ..., total]."""
    bounds = [0]
    for s in cfg.stages:
        bounds.append(bounds[-1] + s.steps)
    return bounds


def stage_config(cfg: Config, i: int) -> Config:
    """Stage ``i``'s config: its resolved config with the trial's run section (out_dir, resume, device, ... as the
    trial sets them at run time)."""
    return load_config({**cfg.stages[i].resolved, "run": dataclasses.asdict(cfg.run)})


def total_steps(cfg: Config, n_train: int) -> int:
    """optim.steps, optim.epochs converted with the global batch, or the steps that fit in optim.flops_budget
    (training FLOPs of all images; see ``train_flops_per_image``); default: 100 steps."""
    if cfg.optim.steps is not None:
        return cfg.optim.steps
    if cfg.optim.flops_budget is not None:
        return int(cfg.optim.flops_budget // (train_flops_per_image(cfg) * cfg.data.batch_size))  # >= 1: config
    return phase_steps(None, cfg.optim.epochs, n_train, cfg.data.batch_size) or 100


def model_stats(cfg: Config) -> dict[str, float]:
    """Encoder parameter count and training FLOPs per image (analytic; see ``scale.py``)."""
    spec = parse_variant(cfg.model.variant)
    return {"params": encoder_params(spec, cfg.model.img_size), "train_flops_per_image": train_flops_per_image(cfg)}


def train_flops(info: dict, steps: int, cfg: Config) -> float | None:
    """A run's training FLOPs: ``info``'s ``train_flops_per_image`` (``model_stats``) times the images its ``steps``
    saw at ``data.batch_size`` (the trials table's ``samples_seen``); a final report's ``train_flops``, what a
    multi-objective search can minimise."""
    per_image = info.get("train_flops_per_image")
    return float(per_image) * steps * cfg.data.batch_size if per_image else None


def train_flops_per_image(cfg: Config) -> float:
    """The training cost of a config (here, beside the config, so that ``optim.flops_budget`` is checked when the config
    loads, before torch or any objective is imported). Matmul FLOPs of one training step per image (forward +
    backward of every objective in the mix, the momentum encoder's / teacher's forward), counted as
    ``torch.utils.flop_counter`` does: backward costs twice the forward, except the patch embedding whose input (the
    image) needs no gradient, and none at all when it is frozen, and blocks below a hard graft_layer, which the CL
    rows only run forward. A staged run's: each stage's own, averaged over the run's steps."""
    if cfg.stages:
        costs = [(train_flops_per_image(load_config(s.resolved)), s.steps) for s in cfg.stages]
        return sum(c * n for c, n in costs) / sum(n for _, n in costs)
    spec = parse_variant(cfg.model.variant)
    size, o = cfg.model.img_size, cfg.objective
    p = spec.patch
    fe, fb = embed_flops(spec, size), block_flops(spec, size)
    layers, g = resolve_placement(cfg)
    n = (size // p) ** 2
    frozen_patch = cfg.model.patch_embed == "frozen"
    hard = g is not None and o.placement.graft_lr_ratio is None

    def view(layer: int, block: float, embed: float, head: float, cl: bool) -> float:
        """One view with gradient: embedding (+ its weight gradient unless frozen), blocks 1..layer and head at 3x
        the forward; CL rows run blocks 1..g of a hard graft forward only (and send no gradient to the embedding)."""
        frozen = g if hard and cl else 0
        wgrad = 0.0 if frozen or frozen_patch else embed
        return embed + wgrad + frozen * block + 3 * ((layer - frozen) * block + head)

    return sum(registry.get(name).flops(getattr(o, name), FlopsView(spec, size, n, fe, fb, layer, view))
               for name, layer in layers.items())


def _check_flops_budget(cfg: Config) -> None:
    """optim.flops_budget must buy at least one step (checked here, before any data or model is built)."""
    if cfg.optim.flops_budget is None:
        return
    per_step = train_flops_per_image(cfg) * cfg.data.batch_size
    if cfg.optim.flops_budget < per_step:
        raise ConfigError(f"optim.flops_budget: {cfg.optim.flops_budget:.3g} FLOPs is less than one step "
                          f"({per_step:.3g} FLOPs at data.batch_size {cfg.data.batch_size})")


def to_dict(cfg: Config) -> dict:
    """The resolved config as a plain nested dict (what gets saved with every run)."""
    return dataclasses.asdict(cfg)


def flatten(tree: dict, prefix: str = "") -> dict:
    """``{'a': {'b': 1}} -> {'a.b': 1}``."""
    out = {}
    for k, v in tree.items():
        key = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict):
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


def config_yaml(cfg: Config) -> str:
    """The resolved config as the YAML a run folder holds (``run/config.yaml``)."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically)."""
    write_text_atomic(path, config_yaml(cfg))
