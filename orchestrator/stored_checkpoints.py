"""A trial's checkpoints in its sweep's storage: the one module that stores and prunes them (the trial picks the
one it resumes from: ``trial.resume_point``). No torch here: the driver prunes.

Retention, every policy in one place:
- the trainer keeps its last ``trainables.checkpoints.KEEP_LOCAL`` in the trial's scratch folder;
- a running one-worker trial keeps its newest ``max(1, checkpoints.keep)`` in the storage (``store``: the new one is
  uploaded before older ones go, so a kill never leaves none);
- Ray Train (multi-worker trials) keeps one (``CheckpointConfig(num_to_keep=1)``: registered once complete);
- an ended trial keeps its newest ``checkpoints.keep`` (``prune``; at least one if it has no ``run/model.pt``).
"""

from __future__ import annotations

from pathlib import Path

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


def drop_from(layout: SweepLayout, trial: str, step: int) -> None:
    """Delete the trial's stored checkpoints at ``step`` or later (PBT: the donor's checkpoint it takes over is to be
    its newest, the one a restart resumes from)."""
    for p in layout.checkpoint_paths(trial):
        if int(p.rsplit("_", 1)[1]) >= step:
            layout.store.delete(p)
