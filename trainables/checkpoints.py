"""A run's checkpoint files, and the encoder a clmim file holds: the one module that writes, finds, loads and
exports them (the trainer, ``clmim analyze``, ``clmim compare`` and the sweep's trials all come through here).

    <out_dir>/checkpoints/step_NNNNNNN/checkpoint.pt   a complete checkpoint: step, model, optimiser, config, RNG
                                                       (and a fine-tuning phase's extra state); written atomically
    <out_dir>/model.pt                                 an export: the evaluated encoder, its step and config

Retention: a run keeps its last ``KEEP_LOCAL`` checkpoints (a damaged newest one falls back to the one before,
``newest_loadable``). A sweep's copies in its storage are kept by ``orchestrator/trial_checkpoints.py``.
Every file loads with ``weights_only=True`` (never code) and comes back in today's vocabulary (``migrate``).
"""

from __future__ import annotations

import os
import pickle
import random
import shutil
import sys
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

from . import migrate
from .config import Config, ConfigError, load_config, to_dict
from .data import DataBundle, build_data
from .errors import UserError
from .objectives.mixture import Mixture, build_objective
from .rng import rng_state, set_rng_state
from .vocab import target_encoders

KEEP_LOCAL = 2


def initial_state(cfg: Config) -> tuple[DataBundle, Mixture]:
    """The seeded construction every run starts from: seeds, then the data (its draws come first), then the
    objective. A run's untrained encoder is rebuilt by calling this again with the run's config."""
    torch.manual_seed(cfg.run.seed)
    np.random.seed(cfg.run.seed)
    random.seed(cfg.run.seed)
    data = build_data(cfg)
    return data, build_objective(cfg)


def load_weights(path: str | Path | BinaryIO):
    """``torch.load`` that never runs code from the file (``weights_only=True``): tensors and plain values only.
    A file that needs more (a pickle with arbitrary objects) raises ``pickle.UnpicklingError``. A file an earlier
    version wrote comes back in today's vocabulary (``migrate.checkpoint``)."""
    return migrate.checkpoint(torch.load(path, map_location="cpu", weights_only=True))


def save_checkpoint(out_dir: Path, step: int, objective: torch.nn.Module, opt: torch.optim.Optimizer, cfg: Config,
                    extra: dict | None = None) -> Path:
    """Write a complete checkpoint atomically to out_dir/checkpoints/step_NNNNNNN/; keep the last ``KEEP_LOCAL``.
    ``extra`` (tensors and plain values) is stored beside (a fine-tuning checkpoint: its phase and the pre-trained
    encoder)."""
    root = out_dir / "checkpoints"
    final = root / f"step_{step:07d}"
    tmp = root / f".tmp_step_{step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch.save({
        "step": step,
        "model": objective.state_dict(),
        "optimizer": opt.state_dict(),
        "config": to_dict(cfg),
        "rng": rng_state(),
        **(extra or {}),
    }, tmp / "checkpoint.pt")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in sorted(root.glob("step_*"))[:-KEEP_LOCAL]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def keep_stable(checkpoint: Path, out_dir: Path) -> Path:
    """Copy a WSD run's last stable-phase checkpoint to ``out_dir/stable/`` (atomically; ``save_checkpoint``'s
    rotation never removes it): resumed with another ``optim.steps`` it extends the run, or cools it down at another
    budget, exactly as a straight run of that length (``schedule.decay_shape``)."""
    final, tmp = out_dir / "stable", out_dir / ".tmp_stable"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(checkpoint, tmp)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final


def export_weights(checkpoint: Path, out: Path) -> Path:
    """Write the weights of the encoder a full checkpoint's evaluations read (``eval.encoder``: DINO's teacher by
    default; no heads, other encoders, optimiser or RNG state) with its step and config to ``out``: what ``clmim
    analyze`` reads, a fraction of the checkpoint's size."""
    ckpt = load_weights(checkpoint)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    torch.save({"step": ckpt.get("pretrain_step", ckpt["step"]), "config": ckpt["config"],
                "model": pretrained_encoder(ckpt)}, tmp)  # the encoder the config's eval.encoder names
    os.replace(tmp, out)
    return out


def encoder_prefix(which: str) -> str:
    """Where an ``eval.encoder`` lives in a pre-training checkpoint's state dict (``Mixture``'s submodule names):
    ``encoder.`` for the student, ``<objective>.<target>.encoder.`` for an EMA copy (``dino.teacher.encoder.``)."""
    return "encoder." if which == "student" else f"{target_encoders()[which]}.{which}.encoder."


def pretrained_encoder(ckpt: dict) -> dict[str, torch.Tensor]:
    """The weights (objective names, ``encoder.*``) of the encoder a clmim file's evaluations read
    (``eval.encoder`` of its config: DINO's teacher by default): from a pre-training checkpoint, the pre-trained
    encoder a fine-tuning checkpoint carries (never the fine-tuned one), or an export (``export_weights``: only
    that encoder, no optimiser state)."""
    if ckpt.get("phase") == "finetune":
        return {f"encoder.{k}": v for k, v in ckpt["pretrained"].items()}
    prefix = encoder_prefix("student")
    if "optimizer" in ckpt:  # a full checkpoint holds every encoder; an export, only the one it exported
        which = load_config(ckpt["config"]).eval.encoder
        prefix = encoder_prefix(which)
    return {f"encoder.{k[len(prefix):]}": v for k, v in ckpt["model"].items() if k.startswith(prefix)}


def find_checkpoint(path: str | Path, weights: bool = False) -> Path | None:
    """A checkpoint file from a file, a step directory, or a run directory (latest step; with ``weights``, else
    the run's final weights export ``model.pt``, which cannot resume training)."""
    p = Path(path)
    if p.is_file():
        return p
    if (p / "checkpoint.pt").is_file():
        return p / "checkpoint.pt"
    steps = sorted((p / "checkpoints").glob("step_*/checkpoint.pt")) if p.is_dir() else []
    if steps:
        return steps[-1]
    return p / "model.pt" if weights and (p / "model.pt").is_file() else None


def newest_loadable(out_dir: Path) -> Path | None:
    """The newest checkpoint under ``out_dir/checkpoints`` that loads (``run.resume: auto``); a damaged newer one
    (truncated, torn by a killed process) is skipped with a one-line warning naming it and the step the run falls
    back to."""
    damaged = []
    for f in sorted(Path(out_dir).glob("checkpoints/step_*/checkpoint.pt"), reverse=True):
        try:
            step = int(load_weights(f)["step"])
        except Exception as e:  # noqa: BLE001 - any unloadable file: the one before
            damaged.append(f"{f} ({type(e).__name__})")
            continue
        for d in damaged:
            print(f"clmim: warning: checkpoint {d} is damaged; resuming from step {step}", file=sys.stderr, flush=True)
        return f
    for d in damaged:
        print(f"clmim: warning: checkpoint {d} is damaged; starting from step 0 (no other checkpoint loads)",
              file=sys.stderr, flush=True)
    return None


def load_checkpoint(path: Path, objective: Mixture, opt: torch.optim.Optimizer | None) -> tuple[int, dict, dict]:
    """Restore model, optimiser and RNG state; return the step to continue from, the last log step's metrics (what
    the run reports as its final loss if it resumes at its last step) and the config tree it trained under. A file
    holding anything but tensors and plain values is refused (``ConfigError``), never unpickled."""
    try:
        ckpt = load_weights(path)
    except pickle.UnpicklingError:
        raise ConfigError(f"run.resume: {str(path)!r} holds Python objects beyond tensors and plain values; "
                          "refused (checkpoints load with weights_only=True)") from None
    if ckpt.get("phase") == "finetune":  # pre-training is over: its encoder only (fine-tuning reloads the rest)
        objective.encoder.load_state_dict(ckpt["pretrained"])
    else:
        objective.load_state_dict(ckpt["model"])
        if opt is not None:
            opt.load_state_dict(ckpt["optimizer"])
    set_rng_state(ckpt["rng"])
    log = ckpt.get("log")
    return int(ckpt["step"]), dict(log) if isinstance(log, dict) else {}, dict(ckpt.get("config") or {})


def load_encoder(ckpt: dict, overrides: list[str] | tuple[str, ...] = (), untrained: bool = False):
    """(encoder, config) of a clmim file (a checkpoint or an export): the encoder its evaluations read
    (``pretrained_encoder``), or with ``untrained`` the one the run started from (``initial_state``). Only the
    encoder is loaded: heads of an older layout may differ without harm. ``overrides``: config keys to change
    (``run.device=cpu``, another data set)."""
    cfg = load_config(ckpt["config"], list(overrides))
    if untrained:
        return initial_state(cfg)[1].encoder, cfg
    objective = build_objective(cfg)
    missing, _ = objective.load_state_dict(pretrained_encoder(ckpt), strict=False)
    if any(k.startswith("encoder.") for k in missing):
        raise UserError(f"checkpoint: its encoder does not fit the config it carries (missing {missing[0]})")
    return objective.encoder, cfg
