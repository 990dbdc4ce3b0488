"""Recovery: a sweep's Parquet tables rebuilt from its own records in the storage (``clmim results rebuild``), the
store's only writer besides the driver. Tune's saved state (pickles) is never read."""

from __future__ import annotations

import warnings

from trainables.config import to_dict
from trainables.errors import UserError

from . import records, sweep_record
from .layout import SweepLayout
from .results import ResultsWarning, compact, write_trial_tables
from .space import resolve_config


def rebuild(layout: SweepLayout) -> int:
    """Rebuild the Parquet tables of a sweep from its own records in the storage (``records.py``; Tune's saved
    state, pickles, is never read); return the number of trials.

    A trial's status is how it ended (its ``status.json``, ``error.json`` or final metrics), else PENDING (a resume
    runs it); its reports are its own log (or, for a sweep older than logs, Tune's ``result.json`` as JSON); its
    config is the one it wrote, else the one its sampled values resolve to in the sweep's space (from sweep.json);
    a value neither holds stays null; a PBT trial's exploits are its ``lineage.json``."""
    sweep_dir = layout.sweep_dir
    if not (layout.store.exists(layout.tune_path) or layout.store.exists(records.plan_path(layout))):
        raise UserError(f"sweep {layout.name!r}: no trials in {layout.store.display(layout.experiment_path)}")
    try:
        space = sweep_record.read(sweep_dir).space()
    except UserError:  # no usable record: configs come from the trials' own files only
        space = None
    try:
        plan = records.read_plan(layout)
    except records.RecordError as e:
        warnings.warn(f"{e}; reading the trial folders only", ResultsWarning, stacklevel=2)
        plan = None
    n = 0
    for tid, rec in records.scan(layout, plan).items():
        results = records.read_reports(layout, tid)
        if not results and rec.error is None:
            continue
        cfg = records.stored_config(layout, tid)
        if cfg is None and space is not None and rec.values is not None:
            try:
                cfg = to_dict(resolve_config(space.base, space.fixed(), rec.values))
            except UserError:
                cfg = None
        # (Tune's "done" flag: a trial of a sweep older than status records that finished)
        status = rec.status or (records.Status.TERMINATED if any(r.get("done") is True for r in results)
                                else records.Status.PENDING)
        status = status.value
        write_trial_tables(sweep_dir, tid, status, cfg or {}, results, error=rec.error,
                           lineage=records.read_lineage(layout, tid))
        n += 1
    compact(sweep_dir)
    return n
