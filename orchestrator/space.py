"""Search spaces as YAML files: loading, validation of every trial config they can produce, and conversion to
Ray Tune's param space.

A space file::

    name: lambda                      # default sweep name
    base: {optim: {steps: 200}}       # a config tree (or a path to a YAML config), only what differs
    space:                            # dotted config keys -> sampling spec or a fixed value
      objective.lam: {grid: [0, 0.2, 0.4, 0.6, 0.8, 1]}
      optim.blr: {loguniform: [1e-4, 1e-2]}
      model.variant: {choice: [micro/4]}
      run.seed: 3                     # fixed
    seeds: 3                          # shorthand for run.seed: {grid: [0, 1, 2]}: every point, 3 seeds
    search: {algorithm: grid, metric: linear_top1, mode: max, seed: 0}   # grid | random | optuna
    scheduler: {type: fifo}           # fifo | asha | hyperband | bohb (on scheduler.metric, default the search
                                      # metric, in epochs: grace_period, reduction_factor, max_t)
    num_samples: 1
    resources: {workers: 1, cpus_per_worker: 1, gpus_per_worker: 0}
    max_concurrent: null              # default: as many as the cluster's resources allow
    failure: {max_failures: 2}        # retries after a lost worker process (from the last checkpoint)
    checkpoints: {keep: 0}            # full checkpoints kept once a trial ends (it always keeps run/model.pt)
    max_trials: 10000                 # a larger space is an error unless raised here on purpose

Spec kinds: ``grid`` and ``choice`` (lists), ``uniform``, ``loguniform`` ([lo, hi]), ``randint`` ([lo, hi),
hi exclusive). For ``objective.weights`` (loss mixing over any set of objectives) also ``simplex`` (a grid on the
simplex: ``{objectives: [simmim, mae, dino], step: 0.5}``: every mix whose weights are multiples of ``step``) and
``dirichlet`` (``{objectives: [...], alpha: 1.0, samples: 8}``: that many mixes drawn from a Dirichlet(alpha)
with ``search.seed``); both become a ``grid`` of weight mappings when the space is read, so a dry run lists them.
A ``grid`` of mappings works too: ``objective.weights: {grid: [{simmim: 1}, {mae: 0.5, dino: 0.5}]}``.
Any problem raises ``SpaceError`` naming the key, before Ray starts.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import itertools
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from trainables import migrate
from trainables.config import Config, ConfigError, build_section, load_config, parse_override, read_yaml
from trainables.errors import UserError, excerpt
from trainables.settings import setting as _f
from trainables.vocab import (
    LABEL_FREE,
    LAYER_CLASSIFIERS,
    PROBE_METRICS,
    VAL_METRICS,
    held_out_losses,
    is_known_metric,
    metric_mode,
    objective_names,
    reports_metric,
    step_metrics,
)

SPEC_KINDS = ("grid", "choice", "uniform", "loguniform", "randint", "simplex", "dirichlet")
SIMPLEX_KINDS = ("simplex", "dirichlet")  # expanded into a grid of objective.weights mappings
TOP_KEYS = {"name", "description", "base", "space", "search", "scheduler", "num_samples", "resources",
            "max_concurrent", "failure", "max_trials", "seeds", "checkpoints"}
# Metrics that read labels of the images the claims and reported numbers are read on (the last layer's and every
# layer's kNN / linear probes, fine-tuning, every layer's dense probe on the eval images' masks, shape bias and cue
# match on the cue-conflict images): never what a search or a scheduler selects on. ``_refuse_eval_split`` names
# what to select on instead.
EVAL_SPLIT = re.compile(r"(layer/\d+/)?((" + "|".join(LAYER_CLASSIFIERS) + r")_top1(_gap|_cls)?|dense_miou)"
                        r"|finetune_top1|(shape_bias|cue_match)(_gap|_cls)?")
MAX_VALIDATED = 1024  # combinations checked in full up to here; beyond, each axis alone plus the corners
SEARCHED = ("optuna", "nsga2")  # a model proposes the trials as results arrive: no plan drawn up front
MAX_TRIALS = 10_000  # default cap on a sweep's trials (``max_trials:`` in the space file raises it)


class SpaceError(UserError):
    """A search space is malformed or can produce an invalid trial config."""


# The space file's sections, typed as the config's are (``trainables.config.build_section``: every key, type,
# choice and range checked, errors naming the dotted key).
@dataclass
class SearchSection:
    algorithm: str = _f("grid", choices=["grid", "random", "optuna", "nsga2"],
                        doc="optuna: TPE on search.metric; nsga2: optuna's NSGA-II on search.objectives together "
                            "(a Pareto front)")
    metric: str = _f("loss", doc="what trials report (a validation-split metric for probes, or a label-free one: "
                                 "val_rankme, val_loss)")
    mode: str = _f("auto", choices=["auto", "min", "max"],
                   doc="auto: max for accuracies and fractions, min for losses (decided here, once)")
    seed: int = _f(0, lo=0, doc="seeds random search, optuna and Dirichlet draws")
    objectives: list[str] = _f([], doc="nsga2: two or more metrics optimised together, each in its own direction (e.g. "
                                  "val_linear_top1, val_rankme, train_flops); search.metric defaults to the first")
    warm_start: list[str] = _f([], doc="optuna, nsga2: earlier sweeps under the results root whose finished trials the "
                                  "search is told first (those whose values lie in this space)")


@dataclass
class SchedulerSection:
    type: str = _f("fifo", choices=["fifo", "asha", "hyperband", "bohb", "pbt", "pb2"],
                   doc="asha stops trials; hyperband and bohb pause them at each rung and resume the best from "
                       "their checkpoints (bohb: hyperband's brackets with optuna's TPE proposing the trials); pbt: "
                       "population-based training, the worst trials continue from the best ones' checkpoints with "
                       "their mutations perturbed; pb2: the same, with a Gaussian-process bandit choosing the new "
                       "values (Parker-Holder et al. 2020)")
    metric: str = _f("", doc="what the scheduler compares trials on (default: search.metric); a probe metric or a "
                             "label-free one (val_rankme, val_loss)")
    mode: str = _f("auto", choices=["auto", "min", "max"], doc="auto: the metric's own direction")
    grace_period: int = _f(1, lo=1, doc="ASHA: epochs a trial runs before it may be stopped")
    reduction_factor: float = _f(2.0, lo=1.01, hi=100.0, doc="keep 1 / factor of the trials at each rung")
    max_t: int = _f(1000, lo=1, doc="epochs of the longest trial (hyperband, bohb: the bracket's budget)")
    perturbation_interval: float = _f(1.0, lo=1e-6, doc="pbt, pb2: epochs between a trial's exploit / explore steps")
    quantile_fraction: float = _f(0.25, lo=0.0, hi=0.5, doc="pbt, pb2: the bottom share exploits the top share")
    resample_probability: float = _f(0.25, lo=0.0, hi=1.0, doc="pbt: chance a mutated value is drawn afresh "
                                                                "rather than perturbed (x 0.8 or 1.2)")
    mutations: dict = _f({}, doc="pbt: dotted keys -> uniform / loguniform [lo, hi] or choice [...]; pb2: "
                                   "uniform [lo, hi] only (its model's bounds); each an axis of the space (the "
                                   "population's first values)")


@dataclass
class FailureSection:
    max_failures: int = _f(2, lo=0, doc="retries of a lost trial process, from its last checkpoint")


@dataclass
class CheckpointsSection:
    keep: int = _f(0, lo=0, doc="full checkpoints kept once a trial ends (run/model.pt always stays)")


@dataclass
class Resources:
    workers: int = _f(1, lo=1)
    cpus_per_worker: float = _f(1.0, lo=1e-6, doc="more than 0")
    gpus_per_worker: float = _f(0.0, lo=0.0)
    mode: str = _f("auto", choices=["auto", "inprocess", "train"],
                   doc="auto: one-worker trials run in the Tune trial process; train: always Ray Train")

    @property
    def in_process(self) -> bool:
        return self.mode == "inprocess" or (self.mode == "auto" and self.workers == 1)


@dataclass
class Space:
    path: str
    name: str
    base: dict
    space: dict[str, Any]
    search: SearchSection = field(default_factory=lambda: SearchSection(mode="min"))
    scheduler: SchedulerSection = field(default_factory=SchedulerSection)
    num_samples: int = 1
    resources: Resources = field(default_factory=Resources)
    max_concurrent: int | None = None
    failure: FailureSection = field(default_factory=FailureSection)
    checkpoints: CheckpointsSection = field(default_factory=CheckpointsSection)
    description: str = ""
    max_trials: int = MAX_TRIALS
    overrides: tuple[str, ...] = ()  # keys fixed by --set (named as such in errors)

    def to_dict(self) -> dict:
        """The resolved space as a mapping ``space_from_dict`` accepts (base given as a tree)."""
        asdict = dataclasses.asdict
        return {"name": self.name, "description": self.description, "base": self.base, "space": self.space,
                "search": asdict(self.search), "scheduler": asdict(self.scheduler), "num_samples": self.num_samples,
                "resources": asdict(self.resources), "max_concurrent": self.max_concurrent,
                "failure": asdict(self.failure), "checkpoints": asdict(self.checkpoints),
                "max_trials": self.max_trials}

    def axes(self) -> dict[str, tuple[str, Any]]:
        """Non-fixed dimensions: dotted key -> (kind, values or bounds)."""
        return {k: next(iter(v.items())) for k, v in self.space.items() if _is_spec(v)}

    def fixed(self) -> dict[str, Any]:
        return {k: v for k, v in self.space.items() if not _is_spec(v)}

    def n_trials(self) -> int:
        """Trials Tune will create: grid points x num_samples."""
        n = 1
        for kind, vals in self.axes().values():
            if kind == "grid":
                n *= len(vals)
        return n * self.num_samples


def _is_spec(v) -> bool:
    return isinstance(v, dict) and len(v) == 1 and next(iter(v)) in SPEC_KINDS


def _check_keys(where: str, got: dict, allowed: set[str]) -> None:
    if not isinstance(got, dict):
        raise SpaceError(f"{where}: expected a mapping, got {got!r}")
    unknown = sorted(set(got) - allowed)
    if unknown:
        raise SpaceError(f"{where}.{unknown[0]}: unknown key; allowed: {', '.join(sorted(allowed))}")


def _check_spec(key: str, spec: Any) -> None:
    where = f"space.{key}"
    if isinstance(spec, dict) and not _is_spec(spec):
        raise SpaceError(f"{where}: expected one of {', '.join(SPEC_KINDS)} or a fixed value, got {spec!r}")
    if not _is_spec(spec):
        return
    kind, vals = next(iter(spec.items()))
    if kind in SIMPLEX_KINDS:
        _check_simplex(where, key, kind, vals)
        return
    if kind in ("grid", "choice"):
        if not isinstance(vals, list):
            raise SpaceError(f"{where}.{kind}: expected a list, got {vals!r}")
        if not vals:
            raise SpaceError(f"{where}.{kind}: empty {kind}; give at least one value")
        return
    if not (isinstance(vals, list) and len(vals) == 2):
        raise SpaceError(f"{where}.{kind}: expected [low, high], got {vals!r}")
    try:
        lo, hi = float(vals[0]), float(vals[1])
    except (TypeError, ValueError):
        raise SpaceError(f"{where}.{kind}: bounds must be numbers, got {vals!r}") from None
    if not lo < hi:
        raise SpaceError(f"{where}.{kind}: low {vals[0]} must be below high {vals[1]}")
    if kind == "loguniform" and lo <= 0:
        raise SpaceError(f"{where}.loguniform: low must be > 0, got {vals[0]}")
    if kind == "randint" and not all(isinstance(v, int) for v in vals):
        raise SpaceError(f"{where}.randint: bounds must be integers, got {vals!r}")


def _check_simplex(where: str, key: str, kind: str, vals) -> None:
    if key != "objective.weights":
        raise SpaceError(f"{where}.{kind}: samples objective.weights only (mixing coefficients on the simplex)")
    allowed = {"simplex": {"objectives", "step"}, "dirichlet": {"objectives", "alpha", "samples"}}[kind]
    _check_keys(f"{where}.{kind}", vals, allowed)
    objs = vals.get("objectives")
    if not (isinstance(objs, list) and len(objs) >= 2 and len(set(objs)) == len(objs)
            and all(o in objective_names() for o in objs)):
        raise SpaceError(f"{where}.{kind}.objectives: expected a list of two or more distinct objectives of "
                         f"{', '.join(objective_names())}, got {excerpt(objs, 60)}")
    if kind == "simplex":
        step = vals.get("step")
        ok = isinstance(step, (int, float)) and not isinstance(step, bool) and 0 < step <= 1
        if not ok or abs(1 / step - round(1 / step)) > 1e-9:
            raise SpaceError(f"{where}.simplex.step: expected 1/k for a whole k (e.g. 0.5, 0.25, 0.1), got "
                             f"{excerpt(step, 20)}")
        return
    _int(f"{where}.dirichlet.samples", vals.get("samples"), 1)
    _number(f"{where}.dirichlet.alpha", vals.get("alpha", 1.0), 0, strict=True)


def simplex_points(kind: str, vals: dict, seed: int = 0) -> list[dict[str, float]]:
    """The weight mappings a ``simplex`` or ``dirichlet`` spec stands for (zero weights left out). Dirichlet draws
    are rounded to 4 decimals, the last weight taking the rest so every point sums to 1."""
    objs = vals["objectives"]
    if kind == "simplex":
        k = round(1 / vals["step"])
        points = [c for c in itertools.product(range(k + 1), repeat=len(objs)) if sum(c) == k]
        return [{o: round(n / k, 10) for o, n in zip(objs, c, strict=True) if n} for c in sorted(points, reverse=True)]

    draws = np.random.default_rng(seed).dirichlet([float(vals.get("alpha", 1.0))] * len(objs), vals["samples"])
    out = []
    for d in draws:
        w = [round(float(x), 4) for x in d[:-1]]
        w.append(round(1.0 - sum(w), 4))
        out.append({o: x for o, x in zip(objs, w, strict=True) if x})
    return out


def _corners(kind: str, vals) -> list:
    """Values that stand for an axis when validating: every listed value, or both ends of a range."""
    if kind in ("grid", "choice"):
        return list(vals)
    if kind == "randint":
        return [int(vals[0]), int(vals[1]) - 1]
    return [float(vals[0]), float(vals[1])]


def load_space(path: str | Path, overrides: list[str] | None = None) -> Space:
    """Read and validate a space file; ``overrides`` (``dotted.key=value``) fix config keys for every trial."""
    p = Path(path)
    shipped = Path(__file__).resolve().parents[1] / "search_spaces" / f"{path}.yaml"
    if not p.is_file() and shipped.is_file():  # a shipped space by name: `clmim sweep lambda`
        p = shipped
    raw = read_yaml(p, "space file", SpaceError)
    if raw is None:
        raise SpaceError(f"space file {str(p)!r} is empty; it needs at least a `space:` or `base:` section")
    return space_from_dict(raw, p, overrides)


def space_from_dict(raw: dict, p: Path, overrides: list[str] | None = None) -> Space:
    """Validate a parsed space mapping (``p`` names it in messages and anchors a relative ``base`` path)."""
    _check_keys("space file", raw, TOP_KEYS)
    base = raw.get("base") or {}
    if isinstance(base, str):
        bp = (p.parent / base) if not Path(base).is_absolute() else Path(base)
        base = read_yaml(bp, "base: config file", SpaceError) or {}
        if not isinstance(base, dict):
            raise SpaceError(f"base: config file {str(bp)!r} is not a config mapping (got {excerpt(base, 40)})")
    if not isinstance(base, dict):
        raise SpaceError(f"base: expected a config mapping or a path, got {excerpt(base, 60)}")
    space = raw.get("space") or {}
    if not isinstance(space, dict):
        raise SpaceError(f"space: expected a mapping of dotted keys, got {excerpt(space, 60)}")
    space = {migrate.dotted_key(k) if isinstance(k, str) else k: v for k, v in space.items()}  # (earlier names)
    base = migrate.config_tree(base)
    if raw.get("seeds") is not None:
        n_seeds = _int("seeds", raw["seeds"], 1)
        if "run.seed" in space:
            raise SpaceError("seeds: set, but space also sets run.seed; keep one of them")
        space["run.seed"] = {"grid": list(range(n_seeds))}
    search = _typed(SearchSection, raw, "search")
    _check_objectives(search, raw.get("search") or {})
    search.metric = migrate.metric(search.metric)
    for key, spec in space.items():
        _check_spec(key, spec)
        if _is_spec(spec) and next(iter(spec)) in SIMPLEX_KINDS:
            kind, vals = next(iter(spec.items()))
            space[key] = {"grid": simplex_points(kind, vals, search.seed)}
    if search.algorithm in SEARCHED:
        if importlib.util.find_spec("optuna") is None:
            raise SpaceError(f"search.algorithm: {search.algorithm} needs optuna, which is not installed here "
                             "(pip install optuna), or use grid / random")
    metric = search.metric
    if not is_known_metric(metric):
        raise SpaceError(f"search.metric: {excerpt(metric, 60)} is not a metric trials report; choose one of "
                         f"{', '.join(step_metrics() + PROBE_METRICS)} or layer/<L>/<probe metric>")
    _refuse_eval_split("search.metric", metric)
    if search.mode == "auto":  # the one place a metric's direction is decided
        search.mode = metric_mode(metric)
        if search.mode is None:
            raise SpaceError(f"search.mode: {metric} has no better direction; say mode: min or mode: max")
    scheduler = _typed(SchedulerSection, raw, "scheduler")
    _resolve_scheduler(scheduler, search)
    res = _typed(Resources, raw, "resources")
    if res.mode == "inprocess" and res.workers > 1:
        raise SpaceError("resources.mode: inprocess runs one worker; use workers: 1 or mode: train")
    num_samples = _int("num_samples", raw.get("num_samples", 1), 1)
    max_conc = raw.get("max_concurrent")
    if max_conc is not None:
        _int("max_concurrent", max_conc, 1)
    max_trials = _int("max_trials", raw.get("max_trials", MAX_TRIALS), 1)
    name = raw.get("name") or p.stem
    if not isinstance(name, str):
        raise SpaceError(f"name: expected a sweep name, got {excerpt(name, 40)}")
    sp = Space(path=str(p), name=name, base=base, space=dict(space), search=search,
               scheduler=scheduler, num_samples=num_samples, resources=res, max_concurrent=max_conc,
               failure=_typed(FailureSection, raw, "failure"),
               checkpoints=_typed(CheckpointsSection, raw, "checkpoints"), description=raw.get("description", ""),
               max_trials=max_trials)
    if scheduler.type in EVOLVING:
        if search.algorithm in SEARCHED:
            raise SpaceError(f"search.algorithm: {scheduler.type} evolves a population drawn once (grid or "
                             "random); a searcher learning from results would fight its exploits")
        _check_mutations(sp)
    if scheduler.type == "bohb" and search.algorithm != "optuna":
        raise SpaceError("scheduler.type: bohb needs a model proposing the trials; set search.algorithm: optuna "
                         "(or use hyperband with grid / random search)")
    if scheduler.type in PAUSING and max_conc is not None:
        raise SpaceError(f"max_concurrent: {scheduler.type} pauses trials at each rung until the rest of their "
                         "bracket gets there; a cap on live trials can leave every slot to a paused one. Remove "
                         "max_concurrent")
    if search.algorithm in SEARCHED and any(k == "grid" for k, _ in sp.axes().values()):
        raise SpaceError(f"search.algorithm: {search.algorithm} cannot search a grid; use choice instead of grid")
    for o in overrides or []:
        try:
            k, v = parse_override(o)
        except ConfigError as e:
            raise SpaceError(str(e)) from None
        k = migrate.dotted_key(k)  # (an earlier name)
        sp.space[k] = v
        sp.overrides += (k,)
    if sp.n_trials() > sp.max_trials:
        raise SpaceError(f"space: {sp.n_trials():,} trials ({_grid_shape(sp)}) is more than max_trials "
                         f"({sp.max_trials:,}); shrink the grid, or set `max_trials: N` in the space file if you "
                         "mean it")
    validate_space(sp)
    return sp


EVOLVING = ("pbt", "pb2")  # schedulers whose trials take over each other's checkpoints (``pbt.py``, a lineage)
PAUSING = ("hyperband", "bohb", *EVOLVING)  # schedulers that pause trials and resume them from their checkpoints
MUTABLE = re.compile(r"optim\.(blr|lr_scale|weight_decay|min_lr_ratio|beta1|beta2)|objective\.lam|"
                     r"objective\.\w+\.mask_ratio")  # pbt: changing them keeps every weight's shape


def _check_objectives(search: SearchSection, given: dict) -> None:
    """nsga2's objectives: two or more distinct metrics trials report, none read on the evaluation split, each with a
    direction; ``search.metric`` (the best trial's, a resume's) defaults to the first. Warm-start sweeps are names;
    only a model-based search reads them."""
    objectives = [migrate.metric(m) for m in search.objectives]
    if search.algorithm != "nsga2":
        if objectives:
            raise SpaceError(f"search.objectives: a multi-objective search is search.algorithm: nsga2 (this one is "
                             f"{search.algorithm}, on search.metric alone)")
    else:
        if len(objectives) < 2 or len(set(objectives)) != len(objectives):
            raise SpaceError("search.objectives: nsga2 optimises two or more distinct metrics together, e.g. "
                             "[val_linear_top1, train_flops]")
        for m in objectives:
            if not is_known_metric(m):
                raise SpaceError(f"search.objectives: {excerpt(m, 60)} is not a metric trials report; e.g. "
                                 "val_linear_top1, val_rankme, val_loss, train_flops")
            _refuse_eval_split("search.objectives", m)
            if metric_mode(m) is None:
                raise SpaceError(f"search.objectives: {m} has no better direction to optimise")
        search.objectives = objectives
        if "metric" not in given:
            search.metric = objectives[0]
    if search.warm_start:
        if search.algorithm not in SEARCHED:
            raise SpaceError(f"search.warm_start: only a search that learns from results (optuna, nsga2) can start "
                             f"from earlier trials; this one is {search.algorithm}")
        if not all(search.warm_start):
            raise SpaceError("search.warm_start: an empty sweep name")


def _refuse_eval_split(key: str, metric: str) -> None:
    """A selection never reads the labels of the images the claims and reported numbers are read on (a SpaceError
    naming ``key`` and what to select on instead)."""
    if not EVAL_SPLIT.fullmatch(metric):
        return
    base = metric.split("/")[-1]
    if base.startswith(("shape_bias", "cue_match")):
        raise SpaceError(f"{key}: {metric} is read on the cue-conflict images the reports read, which have no "
                         "validation twin; select on val_linear_top1 or a label-free signal (val_rankme)")
    twin = f"val_{base}" if f"val_{base}" in VAL_METRICS else "val_linear_top1"
    raise SpaceError(f"{key}: {metric} is read on the evaluation split the claims are read on; select on the "
                     f"validation split: {twin}" + (" (the last layer's)" if "/" in metric else ""))


def objective_modes(search: SearchSection) -> list[str]:
    """The direction of each of ``search.objectives`` (min or max), decided here, once."""
    return [metric_mode(m) for m in search.objectives]


def _resolve_scheduler(scheduler: SchedulerSection, search: SearchSection) -> None:
    """Fill the scheduler's metric (default: the search metric) and its direction, in place; the same rules as
    the search metric: a metric trials report, never one read on the evaluation split."""
    if scheduler.type == "fifo":
        scheduler.metric, scheduler.mode = "", "auto"
        return
    metric = migrate.metric(scheduler.metric) if scheduler.metric else search.metric
    if not is_known_metric(metric):
        raise SpaceError(f"scheduler.metric: {excerpt(metric, 60)} is not a metric trials report; e.g. "
                         f"val_linear_top1, val_rankme or val_loss")
    _refuse_eval_split("scheduler.metric", metric)
    scheduler.metric = metric
    if scheduler.mode == "auto":
        scheduler.mode = search.mode if metric == search.metric else metric_mode(metric)
        if scheduler.mode is None:
            raise SpaceError(f"scheduler.mode: {metric} has no better direction; say mode: min or mode: max")


def _check_mutations(sp: Space) -> None:
    """PBT / PB2 copy one trial's weights into another: the population may differ only in the mutated keys (each an
    axis of the space, the first values) and run.seed; each mutation is a spec the space could sample, within the
    axis's own range of configs that load (``validate_space`` checks the ends). PB2's Gaussian process models each
    key on its [lo, hi] bounds, on a linear scale: uniform specs only."""
    kind = sp.scheduler.type
    muts, axes = sp.scheduler.mutations, sp.axes()
    if not isinstance(muts, dict) or not muts:
        raise SpaceError(f"scheduler.mutations: {kind} needs the keys it mutates, e.g. {{optim.lr_scale: "
                         "{uniform: [0.3, 3]}, objective.lam: {uniform: [0.1, 0.9]}}")
    allowed = ("uniform",) if kind == "pb2" else ("uniform", "loguniform", "choice")
    for key, spec in muts.items():
        where = f"scheduler.mutations.{key}"
        if not isinstance(key, str) or not MUTABLE.fullmatch(key):
            raise SpaceError(f"{where}: {kind} mutates hyperparameters that keep every weight's shape (optim.blr, "
                             "optim.lr_scale, optim.weight_decay, objective.lam, objective.<name>.mask_ratio, ...)")
        if not (_is_spec(spec) and next(iter(spec)) in allowed):
            expected = ("{uniform: [lo, hi]} (pb2's model searches the bounds on a linear scale; pbt also takes "
                        "loguniform and choice)" if kind == "pb2" else
                        "{uniform: [lo, hi]}, {loguniform: [lo, hi]} or {choice: [...]}")
            raise SpaceError(f"{where}: expected {expected}, got {excerpt(spec, 60)}")
        _check_spec(key, spec)
        if key not in axes:
            raise SpaceError(f"{where}: also give it as an axis of the space (the population's first values), e.g. "
                             f"space.{key}: {excerpt(spec, 60)}")
    fixed_axes = sorted(k for k in axes if k not in muts and k != "run.seed")
    if fixed_axes:
        raise SpaceError(f"space.{fixed_axes[0]}: {kind} copies one trial's weights into another, so the population "
                         "may differ only in the mutated keys and run.seed; fix it (base:) or sweep it in a sweep of "
                         "its own")
    if not sp.resources.in_process:
        raise SpaceError(f"resources.workers: {kind} runs one-worker trials (a trial takes over another's "
                         "checkpoint in its own process)")


def _typed(cls, raw: dict, key: str):
    """A top-level section of a space file as its typed dataclass (defaults where absent); a ``SpaceError``
    naming the dotted key where a value is unknown, of the wrong type or out of range."""
    try:
        return build_section(cls, _section(raw, key), key)
    except ConfigError as e:
        raise SpaceError(str(e)) from None


def _section(raw: dict, key: str) -> dict:
    """A top-level section of a space file: a mapping (empty if absent); else a ``SpaceError`` naming it."""
    v = raw.get(key)
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise SpaceError(f"{key}: expected a mapping of settings, got {excerpt(v, 60)}")
    return v


def _grid_shape(sp: Space) -> str:
    sizes = [f"{len(v)} {k}" for k, (kind, v) in sp.axes().items() if kind == "grid"]
    return " x ".join(sizes + ([f"{sp.num_samples} samples"] if sp.num_samples > 1 else [])) or "num_samples"


def _int(where: str, v, lo: int) -> int:
    """``v`` if it is an integer >= lo (booleans and floats are not); else a ``SpaceError`` naming ``where``."""
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise SpaceError(f"{where}: expected an integer >= {lo}, got {excerpt(v, 40)}")
    return v


def _number(where: str, v, lo: float, strict: bool = False) -> float:
    """``v`` if it is a finite number >= lo (> lo if strict); else a ``SpaceError`` naming ``where``."""
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and (v > lo if strict
                                                                                          else v >= lo)
    if not ok:
        raise SpaceError(f"{where}: expected a finite number {'>' if strict else '>='} {lo:g}, got {excerpt(v, 40)}")
    return float(v)


def resolve_config(base: dict, fixed: dict[str, Any], values: dict[str, Any]) -> Config:
    """The config of one trial: ``base`` tree, then the space's ``fixed`` values, then the sampled ``values``.
    The one function that resolves a trial's config: for validation, in the trial, and on the driver."""
    return load_config(base, {**fixed, **values})


def trial_config(space: Space, values: dict[str, Any]) -> Config:
    """The config of one trial of ``space`` (``resolve_config``)."""
    return resolve_config(space.base, space.fixed(), values)


def _combinations(corner_lists: list[list]):
    """Value combinations to validate: all of them for a small space; else each axis's values with the others at
    their first value, then every corner (first or last value of each axis) — never the whole product."""
    total = math.prod(len(c) for c in corner_lists)
    if total <= MAX_VALIDATED:
        yield from itertools.product(*corner_lists)
        return
    for i, values in enumerate(corner_lists):
        for v in values:
            yield tuple(c[0] if j != i else v for j, c in enumerate(corner_lists))
    ends = [sorted({0, len(c) - 1}) for c in corner_lists]
    if math.prod(len(e) for e in ends) <= MAX_VALIDATED:
        for idx in itertools.product(*ends):
            yield tuple(c[k] for c, k in zip(corner_lists, idx, strict=True))


def validate_space(space: Space) -> None:
    """Check the trial configs the space can produce (every combination of listed values and range ends for a
    small space; each axis and the corners for a large one); raise ``SpaceError`` naming the key the user wrote
    (``--set KEY`` or ``space.KEY``) and the config problem."""
    axes = space.axes()
    keys = list(axes)
    for combo in _combinations([_corners(*axes[k]) for k in keys]):
        values = dict(zip(keys, combo, strict=True))
        try:
            cfg = trial_config(space, values)
        except ConfigError as e:
            msg = str(e)
            raise SpaceError(f"{_culprit(space, msg)}: {_which_trial(values)} is invalid: {msg}") from None
        _check_trial_resources(space, cfg)
        _check_metric_reported(space, cfg, values)


def _culprit(space: Space, msg: str) -> str:
    """Where the user wrote the key a config error is about: ``--set KEY``, ``space.KEY`` or ``base``. Config
    errors start with the dotted key; a cross-field error may instead mention the key the user varied."""
    key = msg.split(":", 1)[0]
    mentioned = [k for k in space.space if re.search(rf"(?<![\w.]){re.escape(k)}(?![\w.])", msg)]
    for k in [key, *mentioned]:
        if k in space.overrides:
            return f"--set {k}"
        if k in space.space:
            return f"space.{k}"
    return "base"


def _which_trial(values: dict[str, Any]) -> str:
    shown = ", ".join(f"{k}={v}" for k, v in values.items())
    return f"the trial with {shown}" if shown else "every trial"


def _check_metric_reported(space: Space, cfg: Config, values: dict[str, Any]) -> None:
    """The search metric (and a multi-objective search's every objective) and the scheduler's must reach the
    searcher / scheduler for every trial, or they silently ignore it."""
    where, sch = _which_trial(values), space.scheduler
    checked = [("search.metric", space.search.metric), *(("search.objectives", m) for m in space.search.objectives)]
    for key, metric in checked + ([("scheduler.metric", sch.metric)] if sch.type != "fifo" else []):
        if metric == "val_dense_miou" and not (cfg.data.dataset == "synthetic" and cfg.eval.dense_images):
            raise SpaceError(f"{key}: val_dense_miou needs the synthetic set's masks and eval.dense_images > 0, but "
                             f"{where} trains on {cfg.data.dataset} with eval.dense_images: {cfg.eval.dense_images}")
        if metric == "val_finetune_top1" and not cfg.eval.finetune.enabled:
            raise SpaceError(f"{key}: {metric} needs fine-tuning, but {where} has no eval.finetune.steps or "
                             "eval.finetune.epochs")
        if _on_validation_split(metric) and not cfg.eval.val_samples:
            raise SpaceError(f"{key}: {metric} is read on the validation split, but {where} has "
                             "eval.val_samples: 0 (none held out)")
        if not reports_metric(metric, cfg.objective.mix()):
            shown = ", ".join(f"{k}: {v:g}" for k, v in cfg.objective.mix().items())
            raise SpaceError(f"{key}: {where} mixes {{{shown}}} and reports no {metric}")
    if sch.type == "fifo":
        return
    if sch.metric not in step_metrics() and not cfg.eval.every:
        raise SpaceError(f"scheduler.type: {sch.type} compares trials on {sch.metric} every epoch, but the probes "
                         "run only at the end of a trial; set eval.every (e.g. --set eval.every=1) or "
                         "scheduler.metric: loss")
    if not cfg.run.ckpt_every:
        raise SpaceError(f"run.ckpt_every: {sch.type} reads each trial's {sch.metric} as of its newest stored "
                         f"checkpoint, but {where} checkpoints only at its end, so it would stop and pause nothing; "
                         "set run.ckpt_every (e.g. the steps between evaluations)")


def _on_validation_split(metric: str) -> bool:
    """True for a metric read on the validation split (its probes, RankMe, the held-out pre-training loss)."""
    return metric in (*VAL_METRICS, *LABEL_FREE, *held_out_losses())


def _check_trial_resources(space: Space, cfg: Config) -> None:
    r = space.resources
    if cfg.data.batch_size % r.workers:
        raise SpaceError(f"data.batch_size: {cfg.data.batch_size} is not divisible by resources.workers {r.workers}")
    if cfg.run.device == "cuda" and r.gpus_per_worker <= 0:
        raise SpaceError("resources.gpus_per_worker: run.device is cuda but the trials ask for no GPU")


def iter_plan(space: Space):
    """Every trial's sampled values, in order, for grid and random search: each grid point x ``num_samples``, the
    random axes drawn from ``search.seed`` (the same plan every time the space is read). Optuna has no plan: its
    searcher proposes trials as results come in."""
    axes = space.axes()
    grid_keys = [k for k, (kind, _) in axes.items() if kind == "grid"]
    rng = np.random.default_rng(space.search.seed)
    for combo in itertools.product(*[axes[k][1] for k in grid_keys]):
        point = dict(zip(grid_keys, combo, strict=True))
        for _ in range(space.num_samples):
            yield {k: point[k] if k in point else _draw(kind, vals, rng) for k, (kind, vals) in axes.items()}


def _draw(kind: str, vals, rng) -> Any:
    """One value of a random axis (plain Python types, so a plan is JSON)."""
    if kind == "choice":
        return vals[int(rng.integers(len(vals)))]
    if kind == "randint":
        return int(rng.integers(int(vals[0]), int(vals[1])))
    lo, hi = float(vals[0]), float(vals[1])
    if kind == "loguniform":
        return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))
    return float(rng.uniform(lo, hi))


def plan_values(space: Space) -> list[dict] | None:
    """``iter_plan`` as a list; None for a searched (optuna, nsga2) sweep."""
    return None if space.search.algorithm in SEARCHED else list(iter_plan(space))


def sample_table(space: Space, limit: int | None = None) -> list[dict[str, Any]]:
    """The trials a dry run shows, the first ``limit``: the planned values (random axes as drawn), or for optuna
    every grid point x num_samples with the searched axes shown as their distribution."""
    axes = space.axes()
    if space.search.algorithm not in SEARCHED:
        rows = []
        for i, values in enumerate(itertools.islice(iter_plan(space), limit)):
            rows.append({"#": i + 1, **values, **({"sample": i % space.num_samples} if space.num_samples > 1
                                                   else {})})
        return rows
    rows = []
    for s in range(space.num_samples):
        if limit is not None and len(rows) >= limit:
            break
        row = {"#": len(rows) + 1}
        for k, (kind, vals) in axes.items():
            row[k] = f"{kind}{list(vals)}"
        if space.num_samples > 1:
            row["sample"] = s
        rows.append(row)
    return rows
