"""What a sweep prints: a header saying where results go, a compact progress line while it runs, the summary
table, and the commands to run next. Lines are plain text, so a log file reads as well as a terminal."""

from __future__ import annotations

import heapq
import json
import os
import shlex
import shutil
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from trainables.storage import Storage

from .layout import SweepLayout
from .records import Status, trial_id_of


def fmt(v) -> str:
    """A table cell: '-' for missing, 4 significant digits for floats."""
    if v is None or (isinstance(v, float) and v != v):
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def duration(seconds: float) -> str:
    """'45s', '3m05s', '2h04m'."""
    s = int(round(max(0.0, seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def program(name: str = "clmim") -> str:
    """How to run ``name`` (``clmim``, ``mlflow``) verbatim from this shell: the bare name if that is on PATH and is
    this installation's, else its path beside this Python (``.venv/bin/clmim`` after ``make demo``, which does not
    put the virtual environment on PATH), relative to the current folder when it is inside it."""
    here = Path(sys.executable).parent / name
    found = shutil.which(name)
    if found and (not here.exists() or Path(found).resolve() == here.resolve()):
        return name
    if not here.exists():
        return name if name != "clmim" else f"{shlex.quote(sys.executable)} -m orchestrator.cli"
    rel = os.path.relpath(here, Path.cwd())
    return shlex.quote(rel if not rel.startswith("..") else str(here))


def sweep_flags(results_arg: str | None, address: str | None = None, storage: Storage | None = None) -> str:
    """The flags that find a sweep again from another shell: its results root (when given), and for a resume the
    cluster (``--address``: without it a resume starts a private Ray) and the storage."""
    out = f" --results {shlex.quote(results_arg)}" if results_arg else ""
    if address:
        out += f" --address {shlex.quote(address)}"
    if storage is not None:
        out += f" --storage {shlex.quote(storage.uri)}"
        if storage.endpoint:
            out += f" --storage-endpoint {shlex.quote(storage.endpoint)}"
    return out


def resume_command(name: str, results_arg: str | None, address: str | None, storage: Storage | None = None) -> str:
    return f"{program()} resume {name}{sweep_flags(results_arg, address, storage)}"


def mlflow_ui(uri: str, experiment_id: str | None) -> str:
    """The MLflow UI command for a local store (one worker: MLflow's default four did not serve on a loaded
    machine) and where the runs are; for a tracking server, its address."""
    if uri.startswith(("http://", "https://")):
        at = f"{uri.rstrip('/')}/#/experiments/{experiment_id}/runs" if experiment_id else uri
        return f"open {at}"
    where = f" then open http://127.0.0.1:5000/#/experiments/{experiment_id}/runs" if experiment_id else ""
    return f"{program('mlflow')} ui --backend-store-uri {shlex.quote(uri)} --workers 1{where}"


def print_header(layout: SweepLayout, n_trials: int, mlflow_uri: str, resumed: bool = False,
                 results_arg: str | None = None, address: str | None = None,
                 experiment_id: str | None = None) -> None:
    """Where this sweep's results go and how to look at them while it runs; every command runs as printed."""
    verb = "resuming" if resumed else "starting"
    print(f"clmim: {verb} sweep {layout.name} ({n_trials} trial(s))", flush=True)
    print(f"  results: {layout.sweep_dir}", flush=True)
    if layout.storage:
        print(f"  storage: {layout.store.display(layout.experiment_path)}  (trial files and checkpoints)", flush=True)
    if experiment_id is None:
        print("  MLflow:  off (--mlflow-uri off); the tables hold every result", flush=True)
    else:
        print(f"  MLflow:  {mlflow_uri}", flush=True)
        print(f"    browse: {mlflow_ui(mlflow_uri, experiment_id)}", flush=True)
    resume = resume_command(layout.name, results_arg, address, layout.storage)
    print(f"  Ctrl-C stops cleanly; continue with: {resume}", flush=True)


def print_next_steps(layout: SweepLayout, results_arg: str | None) -> None:
    """The commands that look at a finished sweep, runnable as printed."""
    extra = sweep_flags(results_arg)
    clmim = program()
    print("next:", flush=True)
    for cmd in (f"{clmim} results show {layout.name}{extra}", f"{clmim} report {layout.name}{extra}",
                f"{clmim} results query \"SELECT * FROM trials WHERE sweep = '{layout.name}'\"{extra}"):
        print(f"  {cmd}", flush=True)


ENDED = (Status.TERMINATED, Status.ERROR)
CHANGED_EVERY_S = 10.0  # a changed progress line is printed at most this often
UNCHANGED_EVERY_S = 300.0  # an unchanged one (only the clock moved) at most this often, as a heartbeat
LOOK_EVERY_S = 1.0  # Tune asks for a line many times a second: the trials are looked at at most this often


@dataclass
class _TrialClock:
    """What the progress reports showed of one trial, with the driver's clock (seconds)."""

    start: float  # first seen running
    total: int | None = None  # its total_steps (a probe report lacks it: kept from a log report)
    first: tuple[float, int] | None = None  # (when, step) the first step > 0 was seen
    last: tuple[float, int] | None = None  # (when, step) the newest step was first seen
    at_total: float | None = None  # when its last step was first seen (the final evaluation starts)
    end: float | None = None

    def sec_per_step(self) -> float | None:
        if self.first and self.last and self.last[1] > self.first[1]:
            return (self.last[0] - self.first[0]) / (self.last[1] - self.first[1])
        return None


class SweepClock:
    """The sweep's ETA from measured rates: each trial's start-up and untrained-encoder evaluation (``head``: from
    when it runs to its first step, less those steps), its seconds per step, and its final evaluation and export
    (``tail``: from its last step to its end; until one trial has ended, taken equal to the head). A running trial
    needs its remaining steps at its own rate plus a tail; a pending one a whole trial (head + steps + tail); trials
    fill as many slots as ran at once. No ETA until one step rate is measured."""

    def __init__(self, total: int, ended_before: int = 0):
        self.total = total
        self.ended_before = ended_before
        self.trials: dict[str, _TrialClock] = {}
        self.slots = 1

    def observe(self, now: float, trials) -> None:
        """``trials``: (id, status, step, total_steps) of every trial of this run, as the reports show them now."""
        running = 0
        for tid, status, step, total in trials:
            c = self.trials.get(tid)
            if c is None:
                if status != Status.RUNNING and status not in ENDED:
                    continue  # not started
                c = self.trials[tid] = _TrialClock(start=now)
            running += status == "RUNNING"
            if isinstance(total, (int, float)) and total > 0:
                c.total = int(total)
            if isinstance(step, (int, float)) and step > 0 and (c.last is None or step > c.last[1]):
                c.last = (now, int(step))
                c.first = c.first or c.last
                if c.total and step >= c.total and c.at_total is None:
                    c.at_total = now
            if status in ENDED and c.end is None:
                c.end = now
        self.slots = max(self.slots, running)

    def _head(self) -> float | None:
        heads = []
        for c in self.trials.values():
            sps = c.sec_per_step()
            if c.first and sps is not None:
                heads.append(max(0.0, c.first[0] - c.start - c.first[1] * sps))
        return sum(heads) / len(heads) if heads else None

    def eta(self, now: float) -> float | None:
        rates = [r for c in self.trials.values() if (r := c.sec_per_step()) is not None]
        head = self._head()
        if not rates or head is None:
            return None
        sps = sum(rates) / len(rates)
        tails = [c.end - (c.at_total or c.last[0]) for c in self.trials.values() if c.end and c.last]
        tail = sum(tails) / len(tails) if tails else head
        totals = [c.total for c in self.trials.values() if c.total]
        steps = sum(totals) / len(totals) if totals else 0
        left = []
        for c in self.trials.values():
            if c.end is not None:
                continue
            n = c.total or steps
            if c.last is None:  # starting, evaluating the untrained encoder, or before its first log step
                left.append(max(0.0, head + n * sps + tail - (now - c.start)))
            elif c.last[1] < n:
                own = c.sec_per_step() or sps
                left.append(max(0.0, (n - c.last[1]) * own - (now - c.last[0])) + tail)
            else:  # its final evaluation
                left.append(max(0.0, tail - (now - (c.at_total or c.last[0]))))
        ended = self.ended_before + sum(c.end is not None for c in self.trials.values())
        pending = max(0, self.total - ended - len(left))
        slots = sorted(left + [0.0] * max(0, self.slots - len(left)))
        for _ in range(pending):  # each pending trial takes the slot that frees first
            heapq.heapreplace(slots, slots[0] + head + steps * sps + tail)
        return max(slots) if slots else 0.0


def trial_progress(status: str, last: dict) -> float:
    """Fraction of a trial done: 1 once it ended, else step / total_steps of its last report."""
    if status in ENDED:
        return 1.0
    step, total = last.get("step"), last.get("total_steps")
    if isinstance(step, (int, float)) and isinstance(total, (int, float)) and total > 0:
        return min(1.0, step / total)
    return 0.0


def progress_line(statuses: list[str], fractions: list[float], best: tuple[str, float, str] | None) -> str:
    """``trials 2/4 done (0 errored), 1 running (56% of its steps), 1 pending | best linear_top1 0.44 (trial x)``:
    the part of a progress line that changes only when the sweep moves (the clock is added by ``with_clock``)."""
    n = len(statuses)
    by = Counter(statuses)
    finished = by[Status.TERMINATED.value] + by[Status.ERROR.value]
    running = [f for s, f in zip(statuses, fractions, strict=True) if s == "RUNNING"]
    share = f" ({100 * sum(running) / len(running):.0f}% of {'its' if len(running) == 1 else 'their'} steps)" \
        if running else ""
    parts = [f"trials {finished}/{n} done ({by[Status.ERROR.value]} errored), {len(running)} running{share}, "
             f"{n - finished - len(running)} pending"]
    if best is not None:
        parts.append(f"best {best[0]} {fmt(best[1])} ({best[2]})")
    return " | ".join(parts)


def with_clock(line: str, elapsed: float, eta: float | None) -> str:
    return f"{line} | {duration(elapsed)} elapsed" + (f", ETA {duration(eta)}" if eta is not None else "")


class ProgressPrinter:
    """Turns snapshots of the sweep's trials into progress lines: a changed line at most every
    ``CHANGED_EVERY_S``, an unchanged one (only elapsed and ETA moved) at most every ``UNCHANGED_EVERY_S``.
    Independent of Ray, so a recorded trace replays through it (``CLMIM_PROGRESS_TRACE``: a JSON-lines file of
    the snapshots, written when set)."""

    def __init__(self, total: int = 0, ended: list[str] | None = None, labels: dict[str, str] | None = None,
                 metric: str | None = None, mode: str | None = None, start: float | None = None):
        self.total, self.ended, self.labels = total, list(ended or []), labels or {}
        self.metric, self.mode = metric, mode
        self.start = time.time() if start is None else start
        self.clock = SweepClock(total, len(self.ended))
        self._done: dict[str, float] = {}  # trial -> largest fraction done seen (a probe report has no total)
        self._seen: dict[str, tuple[float, str]] = {}  # trial -> latest probed value of the metric (step > 0)
        self._printed: tuple[str | None, float] = (None, -1e18)  # (content, when)
        self._trace = os.environ.get("CLMIM_PROGRESS_TRACE")  # a path (Tune pickles the reporter: no open file)
        self._traced = None

    def _best(self, snapshot) -> tuple[str, float, str] | None:
        if not self.metric:
            return None
        for tid, label, _, last in snapshot:  # (Tune id, clmim id, status, last result)
            if isinstance(last.get(self.metric), (int, float)) and last.get("step") != 0:  # 0: untrained
                self._seen[tid] = (float(last[self.metric]), label)
        if not self._seen:
            return None
        v, label = (max if self.mode == "max" else min)(self._seen.values(), key=lambda x: x[0])
        return self.metric, v, self.labels.get(label, label)

    def update(self, snapshot, now: float | None = None, force: bool = False) -> str | None:
        """``snapshot``: (Tune id, clmim id, status, last result) per trial of this run. Returns the line to print
        now, or None."""
        now = time.time() if now is None else now
        obs = [(tid, status, last.get("step"), last.get("total_steps")) for tid, _, status, last in snapshot]
        self.clock.observe(now, obs)
        if self._trace and obs != self._traced:  # (Tune asks many times a second; write changes only)
            self._traced = obs
            with open(self._trace, "a") as f:
                f.write(json.dumps({"t": round(now - self.start, 3), "trials": [list(o) for o in obs]}) + "\n")
        for tid, _, status, last in snapshot:
            self._done[tid] = max(self._done.get(tid, 0.0), trial_progress(status, last))
        statuses = [status for _, _, status, _ in snapshot] + self.ended
        fractions = [self._done[tid] for tid, *_ in snapshot] + [1.0] * len(self.ended)
        waiting = max(0, self.total - len(statuses))  # not created by Tune yet
        content = progress_line(statuses + [Status.PENDING] * waiting, fractions + [0.0] * waiting,
                                self._best(snapshot))
        last_content, last_when = self._printed
        wait = CHANGED_EVERY_S if content != last_content else UNCHANGED_EVERY_S
        if not force and now - last_when < wait:
            return None
        self._printed = (content, now)
        return with_clock(content, now - self.start, self.clock.eta(now))


def make_reporter(total: int = 0, ended: list[str] | None = None, labels: dict[str, str] | None = None):
    """A Ray Tune progress reporter printing ``ProgressPrinter``'s lines. ``total``: the sweep's trials; ``ended``:
    statuses of those that ended before this Tune run (a resume); trials Tune has not created yet count as
    pending. ``labels`` maps clmim trial ids to short descriptions."""
    from ray.tune import ProgressReporter  # (Ray Tune: a sweep's, not every console line's)

    class LineReporter(ProgressReporter):
        def __init__(self):
            self.printer = ProgressPrinter(total, ended, labels)
            self._line: str | None = None
            self._looked = 0.0

        def setup(self, start_time=None, total_samples=None, metric=None, mode=None, **kwargs):
            self.printer.metric, self.printer.mode = metric, mode

        @staticmethod
        def _snapshot(trials):
            return [(t.trial_id, trial_id_of(t.config, t.trial_id), t.status, t.last_result or {}) for t in trials]

        def should_report(self, trials, done=False):
            # (a look costs a pass over every trial: at most once a second, so the console's work per result
            # stays flat however many trials the sweep has)
            now = time.monotonic()
            if trials and (done or now - self._looked >= LOOK_EVERY_S):
                self._looked = now
                self._line = self.printer.update(self._snapshot(trials), force=done)
            return self._line is not None

        def report(self, trials, done, *sys_info):
            line, self._line = self._line, None
            if line is None and trials:
                line = self.printer.update(self._snapshot(trials), force=True)
            if line:
                print(f"[{time.strftime('%H:%M:%S')}] {line}", file=sys.stdout, flush=True)

    return LineReporter()


def print_summary(summary: dict, title: str, counts: bool = True) -> None:
    """A table of rows (dicts; columns in first-seen order) and, with ``counts``, the status counts."""
    rows = summary["rows"]
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    table = Table(title=title)
    for c in cols:
        table.add_column(c, overflow="fold")
    for r in rows:
        table.add_row(*[fmt(r.get(c)) for c in cols])
    Console(width=max(120, min(220, 14 * len(cols)))).print(table)
    if counts:
        by = Counter(r["status"] for r in rows)
        print(", ".join(f"{v} {k.lower()}" for k, v in sorted(by.items())))
