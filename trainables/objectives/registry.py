"""The objective registry: everything about a training objective, declared once by its own module and found here
by name. The vocabulary (``vocab.py``), the config's sections, weights and placement keys (``config.py``), the
FLOPs model, the trainer's per-step schedules, the mixture's heads, the tables' loss columns and the report's
colours are all derived from it, so a new objective is one module that calls ``register`` (see ARCHITECTURE.md).

Torch-free on purpose: the config is validated before torch is imported (``clmim train`` answers a bad key in a
fraction of a second), so a declaration names its head by import path (``"package.module:Class"``), resolved only
when a model is built; a head class itself works too (an objective declared beside its head, as in a test).
"""

from __future__ import annotations

import dataclasses
import importlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

FAMILIES = ("mim", "cl")  # masked image modelling, contrastive / self-distillation learning


@dataclass(frozen=True)
class FlopsView:
    """What an objective's FLOPs function needs to count one training step per image (``config.
    train_flops_per_image``): the encoder's shape, the block its head reads, and ``view(layer, block, embed, head,
    cl)``, the cost of one view with gradient (embedding, blocks 1..layer, head; backward at twice the forward; a
    hard graft's CL rows run blocks below the graft forward only)."""

    spec: Any  # scale.VariantSpec
    img_size: int
    tokens: int  # patches per image, N
    embed: float  # forward FLOPs of the patch embedding of one image
    block: float  # forward FLOPs of one block on 1 + N tokens
    layer: int  # the block this objective's head reads
    view: Callable[..., float]


@dataclass(frozen=True)
class Objective:
    """One training objective. ``name`` is its one name everywhere: the config's ``objective.<name>.*`` section
    (``settings``) and ``objective.weights.<name>``, the placement key ``objective.placement.<name>_layer``, the
    loss column ``loss_<name>``, the head's submodule (checkpoint keys ``<name>.*``)."""

    name: str
    family: str  # "mim" or "cl" (FAMILIES)
    label: str  # for people: tables' mix column, legends, claims
    settings: type  # a dataclass of ``setting`` fields: objective.<name>.*
    recipe: dict  # the official recipe's optimiser defaults (the keys ``config.recipe`` mixes)
    head: str | type  # "module:Class" (resolved when a model is built) or the class; Class.from_config(...)
    flops: Callable[[Any, FlopsView], float]  # (its settings, FlopsView) -> training FLOPs per image
    validate: Callable[[Any, Any, bool], None] | None = None  # (config, VariantSpec, in the mix) -> raise
    schedules: Callable[[Any, int, Any, int], dict] | None = None  # (settings, steps, to_one, per_epoch) -> arrays
    step_inputs: tuple[str, ...] = ()  # schedule values its ``draws`` read from the step's batch
    target: str | None = None  # the EMA copy of the encoder ``eval.encoder`` may name (head attribute of that name)
    pos_embed: str = "learned"  # its recipe's position embedding: "sincos" or "learned"
    patch_embed: str = "trained"  # its recipe's patch projection: "frozen" or "trained"
    color: str = "#7f7f7f"  # its colour in the report's figures

    @property
    def layer_key(self) -> str:
        return f"{self.name}_layer"

    @property
    def loss_key(self) -> str:
        return f"loss_{self.name}"

    def head_class(self) -> type:
        """The head's class (imported now if named by path)."""
        if not isinstance(self.head, str):
            return self.head
        module, _, attr = self.head.partition(":")
        return getattr(importlib.import_module(module), attr)


_REGISTRY: dict[str, Objective] = {}
_VERSION = [0]  # bumped by every change: the config's derived classes are rebuilt when it moves


class RegistryError(ValueError):
    """An objective declaration that cannot be registered (a programming error, not a user's input)."""


def register(obj: Objective) -> Objective:
    """Add ``obj`` to the registry (in registration order: the order of tables, labels and the config)."""
    if not re.fullmatch(r"[a-z][a-z0-9]*", obj.name):
        raise RegistryError(f"objective name {obj.name!r}: lower-case letters and digits, starting with a letter")
    if obj.family not in FAMILIES:
        raise RegistryError(f"objective {obj.name}: family {obj.family!r} is not one of {FAMILIES}")
    if not dataclasses.is_dataclass(obj.settings):
        raise RegistryError(f"objective {obj.name}: settings must be a dataclass")
    if obj.name in _REGISTRY and _REGISTRY[obj.name] is not obj:
        raise RegistryError(f"objective {obj.name!r} is already registered")
    _REGISTRY[obj.name] = obj
    _VERSION[0] += 1
    return obj


def unregister(name: str) -> None:
    """Remove an objective (tests that register a toy one clean up with this)."""
    _REGISTRY.pop(name, None)
    _VERSION[0] += 1


def version() -> int:
    return _VERSION[0]


def get(name: str) -> Objective:
    return _REGISTRY[name]


def names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def objectives() -> tuple[Objective, ...]:
    return tuple(_REGISTRY.values())
