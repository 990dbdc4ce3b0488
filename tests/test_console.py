"""What a sweep prints: commands that run as printed, the ETA from measured rates, progress lines that repeat
only when something moved."""

import json
import os
import sys
from pathlib import Path

import pytest

from orchestrator.console import UNCHANGED_EVERY_S, ProgressPrinter, SweepClock, program

TRACE = Path(__file__).parent / "data" / "progress_trace_quickstart.jsonl"


def test_program_is_the_bare_name_on_path_else_the_path_beside_this_python(monkeypatch, tmp_path):
    venv_bin = Path(sys.executable).parent
    if not (venv_bin / "clmim").exists():
        pytest.skip("needs clmim installed beside this Python")
    monkeypatch.setenv("PATH", "/usr/bin:/bin")  # a fresh shell after `make demo`: the venv is not on PATH
    monkeypatch.chdir(venv_bin.parent.parent)
    assert program() == os.path.relpath(venv_bin / "clmim")  # e.g. .venv/bin/clmim
    monkeypatch.chdir(tmp_path)  # outside the project: the absolute path
    assert program() == str(venv_bin / "clmim")
    monkeypatch.setenv("PATH", f"{venv_bin}:/usr/bin:/bin")  # an activated venv
    assert program() == "clmim"


def simulate(n=4, slots=2, head=10.0, steps=48, sps=1.0, tail=8.0, log_every=8, dt=1.0):
    """Snapshots (t, [(id, status, step, total)]) of ``n`` equal trials on ``slots`` slots: start-up and the
    untrained evaluation (``head``), steps reported every ``log_every``, a final evaluation (``tail``)."""
    length = head + steps * sps + tail
    starts = [(i // slots) * length for i in range(n)]
    out, t = [], 0.0
    while t <= max(starts) + length + dt:
        snap = []
        for i, s0 in enumerate(starts):
            if t < s0:
                snap.append((f"t{i}", "PENDING", None, None))
            elif t >= s0 + length:
                snap.append((f"t{i}", "TERMINATED", steps, steps))
            else:
                done = int(max(0.0, t - s0 - head) / sps) // log_every * log_every
                snap.append((f"t{i}", "RUNNING", min(done, steps) or None, steps if done else None))
        out.append((t, snap))
        t += dt
    return out, max(starts) + length


def eta_errors(trace, end):
    """Relative ETA errors after the first trial ended (when an ETA was given)."""
    clock = SweepClock(total=len(trace[0][1]))
    errors, first_end = [], None
    for t, snap in trace:
        clock.observe(t, snap)
        if first_end is None and any(s in ("TERMINATED", "ERROR") for _, s, *_ in snap):
            first_end = t
        eta = clock.eta(t)
        if first_end is not None and end - t > 5:
            assert eta is not None
            errors.append((eta - (end - t)) / (end - t))
    return errors


def test_eta_on_equal_trials_is_exact_after_the_first_ends():
    trace, end = simulate()
    errors = eta_errors(trace, end)
    assert errors and max(abs(e) for e in errors) < 0.1, max(errors, key=abs)


def test_eta_within_30_percent_after_the_first_trial_on_a_recorded_quickstart():
    """A real `make demo` (4 trials, the quickstart space, 2 cores): the snapshots Tune's loop showed the reporter
    (recorded with CLMIM_PROGRESS_TRACE), replayed through the same clock."""
    rows = [json.loads(line) for line in TRACE.read_text().splitlines()]
    trace = [(r["t"], [tuple(x) for x in r["trials"]]) for r in rows]
    end = trace[-1][0]
    errors = eta_errors(trace, end)
    assert len(errors) > 5 and max(abs(e) for e in errors) <= 0.3, [round(e, 2) for e in errors]


def test_unchanged_lines_are_printed_at_most_every_few_minutes_and_changes_at_once():
    printer = ProgressPrinter(total=1, start=0.0)
    running = [("a", "a", "RUNNING", {"step": 8, "total_steps": 48})]
    printed = [t for t in range(0, 1200) if printer.update(running, now=float(t))]
    assert printed[0] == 0 and all(b - a >= UNCHANGED_EVERY_S for a, b in zip(printed, printed[1:], strict=False))
    moved = [("a", "a", "RUNNING", {"step": 16, "total_steps": 48})]
    assert printer.update(moved, now=1211.0) and "33% of its steps" in printer.update(moved, now=1211.0, force=True)


def test_progress_line_counts_best_and_running_share():
    from orchestrator.console import progress_line, trial_progress, with_clock

    statuses = ["TERMINATED", "ERROR", "RUNNING", "PENDING"]
    fractions = [trial_progress(s, r) for s, r in zip(statuses, [{}, {}, {"step": 5, "total_steps": 10}, {}],
                                                      strict=True)]
    line = progress_line(statuses, fractions, best=("linear_top1", 0.4453, "lam=0.25"))
    assert line.startswith("trials 2/4 done (1 errored), 1 running (50% of its steps), 1 pending")
    assert "best linear_top1 0.4453 (lam=0.25)" in line
    assert with_clock(line, 100.0, 60.0).endswith("| 1m40s elapsed, ETA 1m00s")
