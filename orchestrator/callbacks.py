"""The sweep driver's Tune callback, composed of small parts, each with one job and each tested alone:

- ``Tables``: the trial's rows in the Parquet tables (``results.write_trial_tables``), compacted as they grow;
- ``tracking.MlflowLog``: its MLflow run;
- ``Retention``: its full checkpoints beyond the kept ones (``stored_checkpoints.prune``).

(The console's progress line is Tune's reporter, ``console.make_reporter``.) ``SweepCallback`` does what is
common once: it keeps the reports it receives and, when a trial ends, records how it ended first (a resume then
never runs it again), gathers its reports, config and error (``Ended``) and hands them to each part in order.

A part that fails (a full disk, a tracking server gone) does not stop the sweep or the parts after it: it is
reported on stderr once per trial and part with what to run after fixing it (``clmim results rebuild NAME``); the
trial's own records stay, so nothing is lost.
"""

from __future__ import annotations

import re
import socket
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path

from ray.tune import Callback

from trainables.config import to_dict

from . import records, stored_checkpoints
from .layout import SweepLayout
from .records import Status, merge_reports, read_reports, sampled_values, stored_config, trial_id_of
from .results import COMPACT_BATCH, compact, write_trial_tables
from .space import Space, trial_config


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


class Part:
    """One job of the driver's callback. ``what`` names it in a failure's warning."""

    what = "record it"

    def start(self) -> None:
        """Before any trial (a failure here is the caller's to report: ``sweep.check_tracking``)."""

    def trial_started(self, tid: str, values: dict) -> None:
        pass

    def trial_reported(self, tid: str, values: dict, result: dict) -> None:
        pass

    def trial_ended(self, e: Ended) -> None:
        pass

    def sweep_ended(self, trials) -> None:
        pass


class Tables(Part):
    """The ended trial's rows in the Parquet tables; small files compacted as they accumulate (queries over a
    running sweep stay fast) and all of them when the sweep ends."""

    what = "write its tables"

    def __init__(self, layout: SweepLayout):
        self.sweep_dir = layout.sweep_dir

    def trial_ended(self, e: Ended) -> None:
        write_trial_tables(self.sweep_dir, e.trial, e.status.value, e.config, e.reports, error=e.error)
        compact(self.sweep_dir, batch=COMPACT_BATCH)

    def sweep_ended(self, trials) -> None:
        compact(self.sweep_dir)


class Retention(Part):
    """A finished trial's full checkpoints beyond the newest ``keep`` go (``stored_checkpoints.prune``)."""

    what = "prune its checkpoints"

    def __init__(self, layout: SweepLayout, keep: int):
        self.layout, self.keep = layout, keep

    def trial_ended(self, e: Ended) -> None:
        if e.status == Status.TERMINATED:
            stored_checkpoints.prune(self.layout, e.trial, self.keep)


class SweepCallback(Callback):
    """Tune's view of the driver: the parts, in order, around what is common to them."""

    def __init__(self, layout: SweepLayout, space: Space, parts: list[Part]):
        self.layout, self.space, self.parts = layout, space, list(parts)
        self._results: dict[str, list[dict]] = {}  # trial -> the reports received since it (re)started
        self._last: dict[str, dict] = {}  # trial -> the last result received
        self._warned: set[tuple[str, str]] = set()
        self._oom = cgroup_memory()  # the kernel's OOM kills on this machine so far, to tell a lost trial's cause

    def __getstate__(self):  # Tune pickles callbacks with the experiment
        return {**self.__dict__, "_results": {}, "_last": {}, "_warned": set()}

    def last_results(self) -> dict[str, dict]:
        """The last result this driver received from each trial."""
        return dict(self._last)

    def _warn(self, trial_id: str, what: str, e: BaseException) -> None:
        if (trial_id, what) in self._warned:
            return
        self._warned.add((trial_id, what))
        reason = getattr(e, "strerror", None) or str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        print(f"clmim: could not {what} for trial {trial_id} ({type(e).__name__}: {reason}); the sweep goes on. "
              f"Once fixed, run: clmim results rebuild {self.layout.name}", file=sys.stderr, flush=True)
        if not isinstance(e, OSError):  # not the disk or the network: a bug worth its traceback
            traceback.print_exception(e, limit=5, file=sys.stderr)

    def _each(self, tid: str, call) -> None:
        for part in self.parts:
            try:
                call(part)
            except Exception as e:  # noqa: BLE001 - one part's failure must not stop the sweep or the others
                self._warn(tid, part.what, e)

    # ---------------------------------------------------------------------------------- Tune hooks
    def setup(self, **info):
        for part in self.parts:
            part.start()

    def on_trial_start(self, iteration, trials, trial, **info):
        tid, values = trial_id_of(trial.config, trial.trial_id), sampled_values(trial.config)
        self._each(tid, lambda p: p.trial_started(tid, values))

    def on_trial_result(self, iteration, trials, trial, result, **info):
        tid, values, result = trial_id_of(trial.config, trial.trial_id), sampled_values(trial.config), dict(result)
        self._results.setdefault(tid, []).append(result)
        self._last[tid] = result
        self._each(tid, lambda p: p.trial_reported(tid, values, result))

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.record_ended(trial_id_of(trial.config, trial.trial_id), sampled_values(trial.config),
                          Status.TERMINATED)

    def on_trial_error(self, iteration, trials, trial, **info):
        self.record_ended(trial_id_of(trial.config, trial.trial_id), sampled_values(trial.config),
                          Status.ERROR, trial.get_error())

    def on_experiment_end(self, trials, **info):
        self._each("(sweep)", lambda p: p.sweep_ended(trials))

    # ---------------------------------------------------------------------------------- an ended trial
    def record_ended(self, tid: str, values: dict, status: Status | str, lost: str | None = None) -> None:
        """Record an ended trial (``ended``), then hand it to each part; a failure is reported, never raised.
        ``lost``: Tune's error text of a trial whose process was lost (no ``error.json`` of its own)."""
        try:
            e = self.ended(tid, values, Status(status), lost)
        except Exception as err:  # noqa: BLE001 - a full disk or a lost storage must not kill the driver
            self._warn(tid, "record how it ended", err)
            return
        self._each(tid, lambda p: p.trial_ended(e))

    def ended(self, tid: str, values: dict, status: Status, lost: str | None = None) -> Ended:
        """How the trial ended, recorded first (a resume then never runs it again), and what every part needs."""
        layout = self.layout
        err = None
        if status == Status.ERROR:
            err = records.read_error(layout, tid)
            if err is None:  # a lost process out of retries: recorded so a resume does not rerun it
                err = lost_reason(lost, self.space.failure.max_failures, self._kernel_oom(tid))
                records.record_error(layout, tid, "TrialLost", err, lost or "")
        records.write_status(layout, tid, status)
        reports = merge_reports(read_reports(layout, tid), self._results.pop(tid, []))
        if status == Status.TERMINATED and not any("resumed_from" in r for r in reports):
            final = records.read_final(layout, tid)  # (a log lost with its folder: the trial's final record)
            if final is not None:
                reports.append(final)
        # the config the trial wrote before training; if it never got that far, the same function resolves it
        # from the sweep's space and the trial's sampled values (never defaults for what the space fixed)
        stored = stored_config(layout, tid)
        cfg = stored if stored is not None else to_dict(trial_config(self.space, values))
        return Ended(tid, values, status, reports, cfg, stored, err)

    def _kernel_oom(self, tid: str) -> str | None:
        """The cgroup's figures if the kernel's OOM killer killed a process here since this driver last looked and
        the trial ran on this machine (Ray cannot tell that from a ``kill -9``)."""
        now = cgroup_memory()
        before, self._oom = self._oom, now
        here = (self._last.get(tid) or {}).get("hostname") in (None, socket.gethostname())
        if now is None or before is None or now[0] <= before[0] or not here:
            return None
        return f"{now[0] - before[0]} process(es) killed in this machine's memory cgroup; {now[1]}"


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
