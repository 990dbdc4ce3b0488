"""A trial's checkpoints in its sweep's storage: the one module that stores, keeps, prunes and picks them.

Retention, every policy in one place:
- the trainer keeps its last ``trainables.checkpoints.KEEP_LOCAL`` in the trial's scratch folder;
- a running one-worker trial keeps its newest ``max(1, checkpoints.keep)`` in the storage (``store``: the new one is
  uploaded before older ones go, so a kill never leaves none);
- Ray Train (multi-worker trials) keeps one (``CheckpointConfig(num_to_keep=1)``: registered once complete);
- an ended trial keeps its newest ``checkpoints.keep`` (``prune``; at least one if it has no ``run/model.pt``).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from trainables.checkpoints import load_weights

from .layout import SweepLayout


def store(layout: SweepLayout, trial: str, local: Path, step: int, keep: int) -> str:
    """Upload a running trial's new checkpoint, then delete older ones beyond the newest ``max(1, keep)``."""
    stored = f"{layout.trial_path(trial)}/checkpoint_{step:07d}"
    layout.store.upload(local, stored)
    older = [p for p in layout.checkpoint_paths(trial) if p != stored]
    for old in older[:max(0, len(older) - (max(1, keep) - 1))]:
        layout.store.delete(old)
    return stored


def prune(layout: SweepLayout, trial: str, keep: int) -> None:
    """Delete an ended trial's full checkpoints beyond the newest ``keep``. Its final weights (``run/model.pt``)
    stay; a trial without them (stopped early by a scheduler) keeps its last checkpoint whatever ``keep`` says."""
    if not layout.store.exists(f"{layout.run_path(trial)}/model.pt"):
        keep = max(keep, 1)
    paths = layout.checkpoint_paths(trial)
    for p in paths[:len(paths) - keep] if keep else paths:
        layout.store.delete(p)



def resume_point(layout: SweepLayout, trial: str, local: Path) -> str | None:
    """The checkpoint a (re)started one-worker trial continues from, downloaded to ``local``: the newest one in the
    trial's storage folder that loads, else None (a fresh start). A damaged one (torn by a killed process, truncated)
    is skipped with a one-line warning naming it and the step the trial falls back to."""
    store = layout.store
    prefix = layout.trial_path(trial) + "/"
    damaged: list[tuple[str, str]] = []
    found, step = None, 0
    for path in reversed([p for p in layout.checkpoint_paths(trial) if p.startswith(prefix)]):
        name = path.rsplit("/", 1)[-1]
        f = store.download(path, local / name) / "checkpoint.pt"
        try:
            step = int(load_weights(f)["step"])
            found = str(f)
            break
        except Exception as e:  # noqa: BLE001 - torn, truncated or missing: try the one before
            damaged.append((store.display(f"{path}/checkpoint.pt"), type(e).__name__))
            shutil.rmtree(local / name, ignore_errors=True)
    for where, why in damaged:
        print(f"clmim: warning: trial {trial}: checkpoint {where} is damaged ({why}); resuming from "
              + (f"step {step}" if found else "step 0 (no other checkpoint loads)"), file=sys.stderr, flush=True)
    return found
