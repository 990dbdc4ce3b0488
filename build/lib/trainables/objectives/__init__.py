"""Training objectives. Each one is a package: its declaration (``<name>/__init__.py``: settings section, recipe,
FLOPs, schedules, checks) and its head (``<name>/head.py``, one ``common.Head``: ``draws``, ``prepare``, ``tokens``,
``loss``). Importing this package registers the built-in four, in the order of every table and label, without
importing torch; ``mixture.build_objective`` builds the model of a mix.

Another objective registers itself the same way (``registry.register``) from a module of its own, found by name:
``CLMIM_OBJECTIVES`` (comma-separated module names, imported here; the sweep driver passes it on to its trials) or
an installed package's entry point in the group ``clmim.objectives``. Its module must be importable wherever trials
run. Names come from the user's environment only, never from a config or a results root (reading results never
imports code).
"""

import importlib
import os
from importlib.metadata import entry_points

from . import dino, mae, mocov3, simmim
from .registry import Objective, get, names, objectives, register

for _builtin in (simmim.SIMMIM, mocov3.MOCOV3, mae.MAE, dino.DINO):
    register(_builtin)

PLUGINS_ENV = "CLMIM_OBJECTIVES"


def load_plugins() -> list[str]:
    """Import the objective modules named by ``CLMIM_OBJECTIVES`` and the ``clmim.objectives`` entry points (each
    registers its objective when imported); return their names."""
    loaded = []
    for name in filter(None, (m.strip() for m in os.environ.get(PLUGINS_ENV, "").split(","))):
        importlib.import_module(name)
        loaded.append(name)
    for ep in entry_points(group="clmim.objectives"):
        ep.load()
        loaded.append(ep.value)
    return loaded


load_plugins()

__all__ = ["PLUGINS_ENV", "Objective", "get", "load_plugins", "names", "objectives", "register"]
