"""The sweep driver's Tune callback, composed of small parts, each with one job and each tested alone:

- ``Tables``: the trial's rows in the Parquet tables (``results.write_attempts``): a running trial's reports within
  a second or two of arriving (live rows), its final rows when it ends; compacted as they grow;
- ``tracking.MlflowLog``: its MLflow run;
- ``Retention``: its full checkpoints beyond the kept ones (``stored_checkpoints.prune``).

(The console's progress line is Tune's reporter, ``console.make_reporter``.) ``SweepCallback`` runs on Tune's event
loop and does only what is common and cheap there: it keeps the reports it receives and hands events to each part's
``writer.Writer``, a thread with a bounded queue that applies them in batches. When a trial ends, a records writer
records how it ended first (a resume then never runs it again), gathers its reports, config and error (``Ended``;
from what the driver received when that is all of them, else from the trial's own log in the storage) and hands
them to each part.

A part that fails (a full disk, a tracking server gone) does not stop the sweep or the parts after it: it is
reported on stderr once per trial and part with what to run after fixing it (``clmim results rebuild NAME``); the
trial's own records stay, so nothing is lost.
"""

from __future__ import annotations

import functools
import re
import socket
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from ray.tune import Callback

from trainables.config import to_dict
from trainables.vocab import SUMMARY_METRICS, TUNE_KEYS

from . import records, stored_checkpoints
from .layout import SweepLayout
from .query import recorded_trials
from .records import Status, merge_reports, read_reports, sampled_values, stored_config, trial_id_of
from .results import COMPACT_BATCH, Attempt, compact, latest_values, new_attempt_id, write_attempts
from .space import EVOLVING, Space, trial_config
from .writer import ProcessWriter, Writer

CAPACITY = 10_000  # events queued per part at most (a result is a few kB: tens of MB at most)
INTERVAL_S = 1.0  # a part writes at most this often: live rows are this many seconds behind, plus the write


@dataclass
class Ended:
    """An ended trial as every part sees it: how it ended, every report (its own log, and what the driver received
    after its last checkpoint), its config (as it wrote it, else resolved from the space) and its error."""

    trial: str
    values: dict
    status: Status
    reports: list[dict]
    config: dict
    stored_config: dict | None  # the file the trial wrote, if it got that far
    error: str | None
    lineage: list[dict] = field(default_factory=list)  # a PBT trial's exploits (``records.read_lineage``)


@dataclass
class TrialSummary:
    """What a part's ``sweep_ended`` sees of each of Tune's trials (Tune's ``Trial`` does not travel to a writer
    process): its Tune id and config, its status, its last result."""

    trial_id: str
    config: dict
    status: str
    last_result: dict

    @classmethod
    def of(cls, trial) -> TrialSummary:
        return cls(trial.trial_id, dict(trial.config), str(trial.status), dict(trial.last_result or {}))


class Part:
    """One job of the driver's callback, run on its own writer (a thread, or a process when ``process``): the hooks
    take events in order, ``flush`` writes what they gathered (once per batch). ``what`` names it in a failure's
    warning."""

    what = "record it"
    interval: float | None = None  # seconds between its writes (None: the callback's)
    process = False  # True: on a writer process of its own (``writer.ProcessWriter``: the part must pickle)

    def start(self) -> None:
        """Before any trial (a failure here is the caller's to report: ``sweep.check_tracking``)."""

    def in_process(self) -> None:
        """In its writer process, before the first event (``process`` parts)."""

    def recorded(self) -> set[str] | None:
        """The trials this part holds as ended (a resume hands it those it lacks: a driver killed before this part
        wrote them); None: nothing to catch up."""
        return None

    def trial_started(self, tid: str, values: dict, reports: list[dict]) -> None:
        """``reports``: what the driver already holds of the trial (it restarted, or a resume read its log)."""

    def trial_reported(self, tid: str, values: dict, result: dict) -> None:
        pass

    def trial_ended(self, e: Ended) -> None:
        pass

    def sweep_ended(self, trials) -> None:
        pass

    def flush(self) -> None:
        pass


@dataclass
class _Live:
    """A running trial's live rows: one attempt id for them, the reports not written yet, every report so far (to
    write them all again under a new attempt id if a step repeats: a retried trial), and the latest values."""

    config: dict
    attempt: str = field(default_factory=new_attempt_id)
    pending: list[dict] = field(default_factory=list)
    every: list[dict] = field(default_factory=list)
    seen: set = field(default_factory=set)
    latest: dict = field(default_factory=dict)


def _signature(result: dict) -> tuple:
    return result.get("step"), hash(frozenset(k for k in result if k not in TUNE_KEYS))


class Tables(Part):
    """The trials' rows in the Parquet tables: a running trial's reports as ``RUNNING`` rows of a live attempt
    (queryable a second or two after they arrive), an ended trial's final rows under a newer attempt that supersedes
    them; everything of a batch in one file per table and one manifest change. Small files are compacted as they
    accumulate (queries over a running sweep stay fast) and all of them when the sweep ends."""

    what = "write its tables"

    def __init__(self, layout: SweepLayout, space: Space):
        self.layout, self.sweep_dir, self.space = layout, layout.sweep_dir, space
        self._live: dict[str, _Live] = {}
        self._ended: list[Ended] = []
        self._unmerged = 0  # files written since the last compaction

    def recorded(self) -> set[str]:
        return recorded_trials(self.layout)

    def trial_started(self, tid: str, values: dict, reports: list[dict]) -> None:
        live = self._live[tid] = _Live(to_dict(trial_config(self.space, values)))
        for r in reports:
            self._add(live, r)

    def trial_reported(self, tid: str, values: dict, result: dict) -> None:
        live = self._live.get(tid)
        if live is None:
            live = self._live[tid] = _Live(to_dict(trial_config(self.space, values)))
        if _signature(result) in live.seen:  # a step again (a retry from a checkpoint): rewrite all, once each
            live.attempt, live.pending = new_attempt_id(), list(live.every)
        self._add(live, result)

    @staticmethod
    def _add(live: _Live, result: dict) -> None:
        live.pending.append(result)
        live.every.append(result)
        live.seen.add(_signature(result))
        latest_values([result], live.latest)

    def trial_ended(self, e: Ended) -> None:
        self._live.pop(e.trial, None)
        self._ended.append(e)

    def flush(self) -> None:
        attempts = [Attempt(tid, Status.RUNNING.value, live.config, live.pending, attempt=live.attempt,
                            final=dict(live.latest)) for tid, live in self._live.items() if live.pending]
        attempts += [Attempt(e.trial, e.status.value, e.config, e.reports, error=e.error, lineage=e.lineage)
                     for e in self._ended]
        if not attempts:
            return
        write_attempts(self.sweep_dir, attempts)
        for live in self._live.values():
            live.pending = []
        self._ended = []
        self._unmerged += 1
        if self._unmerged >= COMPACT_BATCH:  # (amortised: one compaction per COMPACT_BATCH writes)
            compact(self.sweep_dir, batch=COMPACT_BATCH)
            self._unmerged = 0

    def sweep_ended(self, trials) -> None:
        self.flush()
        compact(self.sweep_dir)


class Retention(Part):
    """A finished trial's full checkpoints beyond the newest ``keep`` go (``stored_checkpoints.prune``)."""

    what = "prune its checkpoints"

    def __init__(self, layout: SweepLayout, keep: int):
        self.layout, self.keep = layout, keep

    def trial_ended(self, e: Ended) -> None:
        if e.status == Status.TERMINATED:
            stored_checkpoints.prune(self.layout, e.trial, self.keep)


def _timed(hook):
    """Count a Tune hook's calls and seconds in ``SweepCallback.hook_s`` (what the driver costs Tune's loop)."""
    @functools.wraps(hook)
    def timed(self, *args, **kwargs):
        t = time.perf_counter()
        try:
            return hook(self, *args, **kwargs)
        finally:
            n = self.hook_s.setdefault(hook.__name__, [0, 0.0])
            n[0] += 1
            n[1] += time.perf_counter() - t
    return timed


class SweepCallback(Callback):
    """Tune's view of the driver: cheap bookkeeping on Tune's event loop, the parts on their writers (see the
    module docstring). ``open`` starts the writers, ``close`` flushes and stops them."""

    def __init__(self, layout: SweepLayout, space: Space, parts: list[Part], capacity: int = CAPACITY,
                 interval: float = INTERVAL_S):
        self.layout, self.space, self.parts = layout, space, list(parts)
        self.capacity, self.interval = capacity, interval
        self._results: dict[str, list[dict]] = {}  # running trial -> its reports the driver holds
        self._last: dict[str, dict] = {}  # trial -> the last result received (its summary only, once it ended)
        self._warned: set[tuple[str, str]] = set()
        self._oom = cgroup_memory()  # the kernel's OOM kills on this machine so far, to tell a lost trial's cause
        self._writers: list[Writer] = []
        self._records: Writer | None = None
        self.all_writers: list[Writer] = []  # every writer this driver opened (their stats outlive them)
        self.hook_s: dict[str, list] = {}  # Tune hook -> [calls, seconds] on the event loop

    def __getstate__(self):  # Tune pickles callbacks with the experiment
        return {**self.__dict__, "_results": {}, "_last": {}, "_warned": set(), "_writers": [], "_records": None,
                "all_writers": []}

    def last_results(self) -> dict[str, dict]:
        """The last result this driver received from each trial (of an ended trial: its summary metrics)."""
        return dict(self._last)

    def writers(self) -> list[Writer]:
        return ([self._records] if self._records else []) + self._writers

    def _warn(self, trial_id: str, what: str, e: BaseException) -> None:
        warn_once(self._warned, self.layout.name, trial_id, what, e)

    # ---------------------------------------------------------------------------------- the writers
    def open(self) -> None:
        """Start a writer per part, and the records writer that turns an ended trial into ``Ended`` (idempotent)."""
        if self._records is not None:
            return
        def writer(p: Part):
            interval = self.interval if p.interval is None else min(p.interval, self.interval * 5)
            if p.process:
                return ProcessWriter(p.what, p, _apply, functools.partial(_failed_in_process, self.layout.name, p.what),
                                     self.capacity, interval)
            return Writer(p.what, functools.partial(_apply, p), p.flush, functools.partial(self._part_failed, p.what),
                          self.capacity, interval)

        self._writers = [writer(p) for p in self.parts]
        self._records = Writer("records", self._record, lambda: None,
                               functools.partial(self._part_failed, "record how it ended"), self.capacity, 0.0)
        self.all_writers += [self._records, *self._writers]

    def _part_failed(self, what: str, event: tuple, e: BaseException) -> None:
        self._warn(_about(event), what, e)

    def _each(self, event: tuple, droppable: bool = False) -> None:
        self.open()
        for w in self._writers:
            w.put(event, droppable)

    def drain(self) -> None:
        """Wait until every event so far is written (the records writer first: it hands ended trials on)."""
        for w in self.writers():
            w.drain()

    def close(self, trials=None) -> None:
        """Write everything queued, hand the sweep's end to the parts in order (the MLflow summary reads the tables
        the first part compacted), stop the writers. Idempotent; called at the sweep's end, on Ctrl-C and on
        errors."""
        if self._records is None:
            return
        self._records.close()
        ended = None if trials is None else [TrialSummary.of(t) for t in trials]
        for w in self._writers:
            if ended is not None:
                w.put(("sweep_ended", ended))
            w.close()
        self._records, self._writers = None, []

    def seed(self, tid: str, reports: list[dict]) -> None:
        """A resumed trial's reports before this driver (its newest checkpoint's log): its live rows start from them."""
        self._results[tid] = list(reports)

    # ---------------------------------------------------------------------------------- Tune hooks
    def setup(self, **info):
        self.open()

    @_timed
    def on_trial_start(self, iteration, trials, trial, **info):
        tid, values = trial_id_of(trial.config, trial.trial_id), sampled_values(trial.config)
        self._each(("started", tid, values, list(self._results.setdefault(tid, []))))

    @_timed
    def on_trial_result(self, iteration, trials, trial, result, **info):
        tid, values, result = trial_id_of(trial.config, trial.trial_id), sampled_values(trial.config), dict(result)
        self._results.setdefault(tid, []).append(result)
        self._last[tid] = result
        self._each(("reported", tid, values, result), droppable=True)

    @_timed
    def on_trial_complete(self, iteration, trials, trial, **info):
        self.record_ended(trial_id_of(trial.config, trial.trial_id), sampled_values(trial.config),
                          Status.TERMINATED)

    @_timed
    def on_trial_error(self, iteration, trials, trial, **info):
        self.record_ended(trial_id_of(trial.config, trial.trial_id), sampled_values(trial.config),
                          Status.ERROR, trial.get_error())

    @_timed
    def on_experiment_end(self, trials, **info):
        self.close(trials)

    # ---------------------------------------------------------------------------------- an ended trial
    def record_ended(self, tid: str, values: dict, status: Status | str, lost: str | None = None,
                     parts: set[int] | None = None) -> None:
        """Queue an ended trial for the records writer (``ended``, then each part, or the parts of these indices);
        a failure is reported, never raised. ``lost``: Tune's error text of a trial whose process was lost (no
        ``error.json`` of its own)."""
        self.open()
        received = self._results.pop(tid, [])
        last = self._last.get(tid) or {}
        self._last[tid] = {k: last[k] for k in (*SUMMARY_METRICS, "hostname") if k in last}  # memory stays flat
        self._records.put(("ended", tid, values, Status(status), lost, received, parts))

    def _record(self, event: tuple) -> None:
        _, tid, values, status, lost, received, parts = event
        e = self.ended(tid, values, status, lost, received)
        for i, w in enumerate(self._writers):
            if parts is None or i in parts:
                w.put(("ended", e))

    def ended(self, tid: str, values: dict, status: Status, lost: str | None = None,
              received: list[dict] | None = None) -> Ended:
        """How the trial ended, recorded first (a resume then never runs it again), and what every part needs. The
        reports are what the driver received when they are all of them (from the untrained encoder's, step 0, to
        the final one); else the trial's own log in the storage, merged with them."""
        layout = self.layout
        received = list(received or [])
        err = None
        if status == Status.ERROR:
            err = records.read_error(layout, tid)
            if err is None:  # a lost process out of retries: recorded so a resume does not rerun it
                err = lost_reason(lost, self.space.failure.max_failures, self._kernel_oom(tid))
                records.record_error(layout, tid, "TrialLost", err, lost or "")
        records.write_status(layout, tid, status)
        complete = bool(received) and received[0].get("step") == 0 and any("resumed_from" in r for r in received)
        if complete:
            reports = received
        else:
            reports = merge_reports(read_reports(layout, tid), received)
            if status == Status.TERMINATED and not any("resumed_from" in r for r in reports):
                final = records.read_final(layout, tid)  # (a log lost with its folder: the trial's final record)
                if final is not None:
                    reports.append(final)
        # the config the trial wrote before training; if it never got that far, the same function resolves it
        # from the sweep's space and the trial's sampled values (never defaults for what the space fixed)
        stored = stored_config(layout, tid)
        cfg = stored if stored is not None else to_dict(trial_config(self.space, values))
        # a PBT trial's exploits, as it recorded each once (one read more per trial, in PBT sweeps only)
        lineage = records.read_lineage(layout, tid) if self.space.scheduler.type in EVOLVING else []
        return Ended(tid, values, status, reports, cfg, stored, err, lineage)

    def _kernel_oom(self, tid: str) -> str | None:
        """The cgroup's figures if the kernel's OOM killer killed a process here since this driver last looked and
        the trial ran on this machine (Ray cannot tell that from a ``kill -9``)."""
        now = cgroup_memory()
        before, self._oom = self._oom, now
        here = (self._last.get(tid) or {}).get("hostname") in (None, socket.gethostname())
        if now is None or before is None or now[0] <= before[0] or not here:
            return None
        return f"{now[0] - before[0]} process(es) killed in this machine's memory cgroup; {now[1]}"


def warn_once(warned: set, sweep: str, trial_id: str, what: str, e: BaseException) -> None:
    """A part's failure on stderr, once per trial and part, with what to run once it is fixed."""
    if (trial_id, what) in warned:
        return
    warned.add((trial_id, what))
    reason = getattr(e, "strerror", None) or str(e).splitlines()[0][:200] if str(e) else type(e).__name__
    print(f"clmim: could not {what} for trial {trial_id} ({type(e).__name__}: {reason}); the sweep goes on. "
          f"Once fixed, run: clmim results rebuild {sweep}", file=sys.stderr, flush=True)
    if not isinstance(e, OSError):  # not the disk or the network: a bug worth its traceback
        traceback.print_exception(e, limit=5, file=sys.stderr)


def _about(event: tuple) -> str:
    """The trial an event is about, for a failure's warning."""
    about = event[1] if len(event) > 1 else None
    return about if isinstance(about, str) else about.trial if isinstance(about, Ended) else "(sweep)"


_WARNED: set = set()  # (a writer process's own: what it has warned about)


def _failed_in_process(sweep: str, what: str, event: tuple, e: BaseException) -> None:
    warn_once(_WARNED, sweep, _about(event), what, e)


def _apply(part: Part, event: tuple) -> None:
    """One event to one part's hook."""
    kind = event[0]
    if kind == "started":
        part.trial_started(*event[1:])
    elif kind == "reported":
        part.trial_reported(*event[1:])
    elif kind == "ended":
        part.trial_ended(event[1])
    elif kind == "sweep_ended":
        part.sweep_ended(event[1])


# ------------------------------------------------------------------------------------------- a lost trial
CGROUP = Path("/sys/fs/cgroup")


def _cgroup_dir() -> Path | None:
    """This process's memory cgroup folder (v2: the unified hierarchy; v1: the ``memory`` controller's)."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "" and (CGROUP / path.lstrip("/") / "memory.events").is_file():
            return CGROUP / path.lstrip("/")
        if "memory" in controllers.split(",") and (CGROUP / "memory" / path.lstrip("/")).is_dir():
            return CGROUP / "memory" / path.lstrip("/")
    return CGROUP if (CGROUP / "memory.events").is_file() else None


def cgroup_memory() -> tuple[int, str] | None:
    """(the kernel's OOM kills so far, "limit X GB, peak Y GB") of this machine's memory cgroup; None if unknown."""
    d = _cgroup_dir()
    if d is None:
        return None

    def read(*names):
        for n in names:
            try:
                return (d / n).read_text()
            except OSError:
                continue
        return ""

    events = read("memory.events", "memory.oom_control")
    kills = re.search(r"^oom_kill (\d+)$", events, re.M)
    if kills is None:
        return None

    def gb(text):
        text = text.strip()
        return f"{int(text) / 2**30:.2f} GB" if text.isdigit() and int(text) < 2**60 else "none"

    return int(kills.group(1)), (f"cgroup limit {gb(read('memory.max', 'memory.limit_in_bytes'))}, peak "
                                 f"{gb(read('memory.peak', 'memory.max_usage_in_bytes'))}")


def lost_reason(error_text: str | None, max_failures: int, kernel_oom: str | None = None) -> str:
    """Why a trial whose process was lost (out of retries) ended: out of memory, with Ray's memory figures, when
    Ray's memory monitor killed it, or with the cgroup's (``kernel_oom``) when the kernel's OOM killer did; else
    Ray's last line."""
    text = (error_text or "").strip()
    head = f"retries exhausted (failure.max_failures={max_failures})"
    if kernel_oom:
        return f"{head}: out of memory (the kernel's OOM killer; {kernel_oom})"
    if "running low on memory" in text or "OutOfMemoryError" in text:
        used = re.search(r"was ([\d.]+\s*[KMGT]?B\s*/\s*[\d.]+\s*[KMGT]?B\s*\([\d.]+\))", text)
        limit = re.search(r"threshold of ([\d.]+)", text)
        figures = (f": node memory {used.group(1)}" if used else "") + (
            f", above Ray's memory threshold {limit.group(1)}" if limit else "")
        return f"{head}: out of memory (Ray's memory monitor killed the trial process{figures})"
    lines = text.splitlines()
    return f"{head}: {lines[-1][:400] if lines else 'trial process lost'}"
