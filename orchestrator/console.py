"""What a sweep prints: a header saying where results go, a compact progress line while it runs, the summary
table, and the commands to run next. Lines are plain text, so a log file reads as well as a terminal."""

from __future__ import annotations

import sys
import time
from collections import Counter

from trainables.vocab import HIGHER_IS_BETTER

from .layout import SweepLayout
from .records import trial_id_of


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


def print_header(layout: SweepLayout, n_trials: int, mlflow_uri: str, resumed: bool = False) -> None:
    """Where this sweep's results go and how to look at them while it runs."""
    verb = "resuming" if resumed else "starting"
    print(f"clmim: {verb} sweep {layout.name} ({n_trials} trial(s))", flush=True)
    print(f"  results: {layout.sweep_dir}", flush=True)
    if layout.storage:
        print(f"  storage: {layout.store.display(layout.experiment_path)}  (trial files and checkpoints)", flush=True)
    print(f"  MLflow:  {mlflow_uri}  (browse: mlflow ui --backend-store-uri {mlflow_uri})", flush=True)
    print(f"  Ctrl-C stops cleanly; `clmim resume {layout.name}` continues.", flush=True)


def print_next_steps(layout: SweepLayout, results_arg: str | None) -> None:
    """The commands that look at a finished sweep."""
    extra = f" --results {results_arg}" if results_arg else ""
    print("next:", flush=True)
    for cmd in (f"clmim results show {layout.name}{extra}", f"clmim report {layout.name}{extra}",
                f"clmim results query \"SELECT * FROM trials WHERE sweep = '{layout.name}'\"{extra}"):
        print(f"  {cmd}", flush=True)


def trial_progress(status: str, last: dict) -> float:
    """Fraction of a trial done: 1 once it ended, else step / total_steps of its last report."""
    if status in ("TERMINATED", "ERROR"):
        return 1.0
    step, total = last.get("step"), last.get("total_steps")
    if isinstance(step, (int, float)) and isinstance(total, (int, float)) and total > 0:
        return min(1.0, step / total)
    return 0.0


def progress_line(statuses: list[str], fractions: list[float], elapsed: float, p0: float,
                  best: tuple[str, float, str] | None) -> str:
    """``trials 2/4 done (0 errored), 1 running, 1 pending | best linear_top1 0.44 (trial x) | 1m10s, ETA 1m05s``.
    ``p0`` is the fraction done when this process started (a resume), so the ETA uses this run's pace only."""
    n = len(statuses)
    by = Counter(statuses)
    finished = by["TERMINATED"] + by["ERROR"]
    parts = [f"trials {finished}/{n} done ({by['ERROR']} errored), {by['RUNNING']} running, "
             f"{n - finished - by['RUNNING']} pending"]
    if best is not None:
        parts.append(f"best {best[0]} {fmt(best[1])} ({best[2]})")
    p = sum(fractions) / n if n else 0.0
    eta = f", ETA {duration(elapsed * (1 - p) / (p - p0))}" if p > p0 and p < 1 else ""
    parts.append(f"{duration(elapsed)} elapsed{eta}")
    return " | ".join(parts)


def make_reporter(total: int = 0, ended: list[str] | None = None, labels: dict[str, str] | None = None):
    """A Ray Tune progress reporter printing ``progress_line`` when something changed (at most every 10 s) and
    at least every 60 s while trials run. ``total``: the sweep's trials; ``ended``: statuses of those that ended
    before this Tune run (a resume); trials Tune has not created yet count as pending. ``labels`` maps trial ids to
    short descriptions."""
    from ray.tune import ProgressReporter

    class LineReporter(ProgressReporter):
        def __init__(self):
            self._start = time.time()
            self._last_print = 0.0
            self._last_state = None
            self._p0 = None
            self._metric, self._mode = None, None
            self._seen: dict = {}  # trial_id -> its latest probed value of the metric (a trained step)
            self._done: dict = {}  # trial_id -> the largest fraction done seen (a probe report has no total_steps)

        def setup(self, start_time=None, total_samples=None, metric=None, mode=None, **kwargs):
            self._start = time.time()
            self._metric, self._mode = metric, mode

        def _best(self, trials):
            metric = self._metric
            if not metric:
                return None
            for t in trials:  # most reports are log steps without probes: remember each trial's last probe
                r = t.last_result or {}
                if isinstance(r.get(metric), (int, float)) and r.get("step") != 0:  # step 0: the untrained encoder
                    self._seen[t.trial_id] = (float(r[metric]), trial_id_of(t.config, t.trial_id))
            vals = list(self._seen.values())
            if not vals:
                return None
            higher = self._mode == "max" if self._mode else metric in HIGHER_IS_BETTER
            v, tid = (max if higher else min)(vals, key=lambda x: x[0])
            return metric, float(v), (labels or {}).get(tid, tid)

        def should_report(self, trials, done=False):
            state = tuple(sorted((t.trial_id, t.status, (t.last_result or {}).get("step")) for t in trials))
            now = time.time()
            changed = state != self._last_state
            if done or (changed and now - self._last_print >= 10) or now - self._last_print >= 60:
                self._last_state = state
                return True
            return False

        def report(self, trials, done, *sys_info):
            if not trials:
                return
            statuses = [t.status for t in trials] + list(ended or [])
            for t in trials:
                self._done[t.trial_id] = max(self._done.get(t.trial_id, 0.0),
                                             trial_progress(t.status, t.last_result or {}))
            fractions = [self._done[t.trial_id] for t in trials] + [1.0] * len(ended or [])
            waiting = max(0, total - len(statuses))  # not created by Tune yet
            statuses += ["PENDING"] * waiting
            fractions += [0.0] * waiting
            if self._p0 is None:
                self._p0 = sum(fractions) / len(fractions)
            self._last_print = time.time()
            line = progress_line(statuses, fractions, self._last_print - self._start, self._p0, self._best(trials))
            print(f"[{time.strftime('%H:%M:%S')}] {line}", file=sys.stdout, flush=True)

    return LineReporter()


def print_summary(summary: dict, title: str, counts: bool = True) -> None:
    """A table of rows (dicts; columns in first-seen order) and, with ``counts``, the status counts."""
    from rich.console import Console
    from rich.table import Table

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
