"""The one migration step from the lam-era vocabulary (results schema 3 and before) to one name per objective.

Until schema 3, SimMIM and MoCo v3 had the names they had when lam mixed exactly these two: flat settings
(``objective.mask_ratio``, ``objective.temperature``, ...), the placement keys ``mim_layer`` / ``cl_layer``, the
losses ``loss_mim`` / ``loss_cl``, the head submodules ``mim.*`` / ``cl.*`` in checkpoints, and the objective
column's 'mim' / 'cl' / 'hybrid' (a family's name used as an objective's). Every reader of something an earlier
version wrote passes it through here, as timm's ``checkpoint_filter_fn`` does for old weights: config trees and
dotted keys (configs, spaces, ``--set``, checkpoints' configs), metric names, checkpoints' state dicts, and the rows
of the results tables (``orchestrator/results.py`` applies ``trial_column``, ``objective_value`` and ``mix_label`` to
older files).
Nothing else in the package knows the old names.
"""

from __future__ import annotations

import copy
import re

from .errors import ConfigError

# dotted config key then -> now
KEYS = {
    "objective.mask_ratio": "objective.simmim.mask_ratio",
    "objective.mask_unit": "objective.simmim.mask_unit",
    "objective.temperature": "objective.mocov3.temperature",
    "objective.momentum": "objective.mocov3.momentum",
    "objective.proj_dim": "objective.mocov3.proj_dim",
    "objective.proj_hidden": "objective.mocov3.proj_hidden",
    "objective.placement.mim_layer": "objective.placement.simmim_layer",
    "objective.placement.cl_layer": "objective.placement.mocov3_layer",
}
METRICS = {"loss_mim": "loss_simmim", "loss_cl": "loss_mocov3"}
STATE_PREFIXES = {"mim.": "simmim.", "cl.": "mocov3."}  # head submodules in a checkpoint's state dict
OBJECTIVE_VALUES = {"mim": "simmim", "cl": "mocov3", "hybrid": "mix"}  # the trials table's objective column
MIX_LABELS = {"MIM (lam=0)": "SimMIM", "CL (lam=1)": "MoCo v3"}  # and 'hybrid lam=X' -> 'lam=X'


def dotted_key(key: str) -> str:
    """A dotted config key in today's vocabulary."""
    return KEYS.get(key, key)


def metric(name: str) -> str:
    """A reported metric's name in today's vocabulary (``loss_mim`` -> ``loss_simmim``)."""
    return METRICS.get(name, name)


def _pop(tree: dict, dotted: str):
    node = tree
    keys = dotted.split(".")
    for k in keys[:-1]:
        node = node.get(k) if isinstance(node, dict) else None
        if not isinstance(node, dict):
            return False, None
    return (True, node.pop(keys[-1])) if keys[-1] in node else (False, None)


def _put(tree: dict, dotted: str, value, old: str) -> None:
    node = tree
    keys = dotted.split(".")
    for k in keys[:-1]:
        nxt = node.setdefault(k, {})
        if nxt is None:
            nxt = node[k] = {}
        if not isinstance(nxt, dict):
            return
        node = nxt
    if keys[-1] in node and node[keys[-1]] != value and value is not None and node[keys[-1]] is not None:
        raise ConfigError(f"{old}: the earlier name of {dotted}, which is also given ({value!r} against "
                          f"{node[keys[-1]]!r}); give only {dotted}")
    if keys[-1] not in node or node[keys[-1]] is None:
        node[keys[-1]] = value


def config_tree(tree):
    """A config tree (nested mappings, as a YAML file or a saved config holds it) in today's vocabulary: a new tree;
    anything that is not a mapping is returned as it is (the loader reports it). A staged run's stages (their
    ``set`` keys and resolved configs) are migrated too."""
    if not isinstance(tree, dict):
        return tree
    out = copy.deepcopy(tree)
    for old, new in KEYS.items():
        found, value = _pop(out, old)
        if found:
            _put(out, new, value, old)
    stages = out.get("stages")
    if isinstance(stages, list):
        for stage in stages:
            if isinstance(stage, dict):
                if isinstance(stage.get("set"), dict):
                    stage["set"] = {dotted_key(k): v for k, v in stage["set"].items()}
                if isinstance(stage.get("resolved"), dict):
                    stage["resolved"] = config_tree(stage["resolved"])
    return out


def state_dict(state: dict) -> dict:
    """A pre-training checkpoint's model state dict with today's head names (``mim.*`` -> ``simmim.*``)."""
    def key(k: str) -> str:
        for old, new in STATE_PREFIXES.items():
            if k.startswith(old):
                return new + k[len(old):]
        return k
    return {key(k): v for k, v in state.items()}


def checkpoint(ckpt):
    """A loaded clmim checkpoint or export (a mapping) with its config and state dict in today's vocabulary."""
    if not isinstance(ckpt, dict):
        return ckpt
    if not isinstance(ckpt.get("config"), dict):  # not clmim's (a released checkpoint's 'model' is left alone)
        return ckpt
    ckpt["config"] = config_tree(ckpt["config"])
    if isinstance(ckpt.get("model"), dict) and ckpt.get("phase") != "finetune":
        ckpt["model"] = state_dict(ckpt["model"])
    if isinstance(ckpt.get("log"), dict):  # the last log step's metrics
        ckpt["log"] = report(ckpt["log"])
    return ckpt


def report(result: dict) -> dict:
    """One reported result (metric name -> value) with today's metric names."""
    return {metric(k): v for k, v in result.items()}


def trial_column(name: str) -> str:
    """A column of an earlier trials table, renamed: losses, and config columns named by their dotted keys."""
    return metric(dotted_key(name))


def mix_label(label):
    """An earlier ``mix`` label in today's words ('MIM (lam=0)' -> 'SimMIM', 'hybrid lam=0.25' -> 'lam=0.25')."""
    if not isinstance(label, str):
        return label
    if label in MIX_LABELS:
        return MIX_LABELS[label]
    return re.sub(r"^hybrid (lam=)", r"\1", label)


def objective_value(value):
    """An earlier ``objective`` column value in today's words ('mim' -> 'simmim', 'hybrid' -> 'mix')."""
    return OBJECTIVE_VALUES.get(value, value) if isinstance(value, str) else value
