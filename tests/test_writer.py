"""The driver's writers (``orchestrator/writer.py``): threads and processes, bounded, batched, flushed at close."""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from orchestrator.writer import ProcessWriter, Writer


class SlowPart:
    def __init__(self, seconds):
        self.seconds, self.seen, self.flushes, self.gate = seconds, [], 0, threading.Event()

    def handle(self, event):
        self.gate.wait(self.seconds)
        self.seen.append(event)

    def flush(self):
        self.flushes += 1


def test_a_slow_part_drops_results_instead_of_making_the_event_loop_wait():
    """A tracking server that takes a second per event: 1,000 results arrive in well under a second, the queue
    holds at most its capacity (memory stays flat), the extra results are dropped and counted, and the trial's
    end still arrives."""
    part = SlowPart(1.0)
    w = Writer("slow", part.handle, part.flush, lambda event, e: None, capacity=50, interval=0.0)
    t = time.perf_counter()
    for i in range(1000):
        w.put(("reported", "t1", {}, {"step": i}), droppable=True)
    spent = time.perf_counter() - t
    # (accepted: what the queue holds plus the batch the writer took from it, at most twice its capacity)
    assert spent < 0.5 and w.stats.max_queued <= 50 and w.stats.dropped >= 1000 - (2 * 50 + 1)
    part.gate.set()  # the server recovers
    assert w.put(("ended", "t1"))  # never dropped
    w.close()
    assert part.seen[-1] == ("ended", "t1") and w.stats.waited_s < 0.5


def test_events_are_applied_in_order_in_batches_and_flushed_at_close():
    part = SlowPart(0.0)
    w = Writer("fast", part.handle, part.flush, lambda event, e: None, interval=0.2)
    for i in range(100):
        w.put(("reported", "t1", {}, {"step": i}))
    w.close()
    assert [e[3]["step"] for e in part.seen] == list(range(100))
    assert 1 <= part.flushes <= 3  # (a hundred events in a few batches, not a hundred writes)


def test_a_failing_event_is_reported_and_the_writer_goes_on():
    failed = []

    def handle(event):
        if event[1] == "bad":
            raise OSError("disk full")

    w = Writer("w", handle, lambda: None, lambda event, e: failed.append((event[1], str(e))), interval=0.0)
    for tid in ("a", "bad", "c"):
        w.put(("ended", tid))
    w.close()
    assert failed == [("bad", "disk full")] and w.stats.events == 3


class FilePart:
    """A part whose every event and flush lands in a file (what a writer process did, seen from the test)."""

    def __init__(self, path, seconds=0.0):
        self.path, self.seconds = str(path), seconds

    def flush(self):
        with open(self.path, "a") as f:
            f.write("flush\n")

    def in_process(self):
        with open(self.path, "a") as f:
            f.write("in_process\n")


def apply_to_file(part, event):
    time.sleep(part.seconds)
    with open(part.path, "a") as f:
        f.write(f"{event[0]} {event[1]}\n")


def no_error(event, e):
    raise AssertionError(f"{event}: {e}")


def test_a_process_writer_applies_events_in_order_drains_on_request_and_returns_its_stats(tmp_path):
    out = tmp_path / "events"
    w = ProcessWriter("p", FilePart(out), apply_to_file, no_error, interval=0.1)
    for i in range(50):
        w.put(("reported", i))
    w.drain()
    lines = out.read_text().splitlines()
    assert lines[0] == "in_process"  # (the part's hook, in its process, before any event)
    assert [x for x in lines[1:] if x != "flush"] == [f"reported {i}" for i in range(50)] and "flush" in lines
    w.put(("ended", "t1"))
    w.close()
    lines = out.read_text().splitlines()
    assert [x for x in lines if x != "flush"][-1] == "ended t1" and lines[-1] == "flush"
    assert w.stats.events == 51 and w.stats.flushes >= 2 and w.stats.by_hook["reported"] > 0
    assert not w.put(("ended", "t2"))  # closed


def test_a_process_writers_full_queue_drops_results_not_ends(tmp_path):
    out = tmp_path / "events"
    w = ProcessWriter("p", FilePart(out, seconds=0.05), apply_to_file, no_error, capacity=5, interval=0.0)
    t = time.perf_counter()
    sent = sum(w.put(("reported", i), droppable=True) for i in range(200))
    assert time.perf_counter() - t < 1.0 and w.stats.dropped == 200 - sent > 0
    w.put(("ended", "t1"))
    w.close()
    lines = out.read_text().splitlines()
    assert [x for x in lines if x != "flush"][-1] == "ended t1" and lines[-1] == "flush"  # never dropped, flushed


DRIVER = """
import os, sys, time
sys.path[:0] = {path!r}
from test_writer import FilePart, apply_to_file, no_error
from orchestrator.writer import ProcessWriter
w = ProcessWriter("p", FilePart({out!r}, seconds=0.2), apply_to_file, no_error, interval=0.0)
for i in range(1000):
    w.put(("reported", i))
print(w._proc.pid, flush=True)
time.sleep(60)
"""


def test_a_process_writer_ignores_ctrl_c_and_stops_writing_when_its_driver_is_sigkilled(tmp_path):
    out = tmp_path / "events"
    code = DRIVER.format(path=[str(Path(__file__).parent), str(Path(__file__).parents[1])], out=str(out))
    driver = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    pid = int(driver.stdout.readline())
    deadline = time.monotonic() + 60
    while not (out.is_file() and len(out.read_text().splitlines()) >= 3) and time.monotonic() < deadline:
        time.sleep(0.1)  # (a spawned process imports for a second or two before it writes)
    os.kill(pid, signal.SIGINT)  # (a terminal's Ctrl-C reaches the whole process group)
    time.sleep(1.0)
    assert Path(f"/proc/{pid}").exists()  # still writing: the driver's close() would flush it
    driver.kill()
    driver.wait()
    deadline = time.monotonic() + 10
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]
    written = len(out.read_text().splitlines())
    time.sleep(0.5)
    assert len(out.read_text().splitlines()) == written < 1000  # nothing more after the driver was gone
