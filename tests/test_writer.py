"""The driver's writer threads (``orchestrator/writer.py``): bounded, batched, flushed at close."""

import threading
import time

from orchestrator.writer import Writer


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
    assert spent < 0.5 and w.stats.max_queued <= 50 and w.stats.dropped >= 1000 - 51
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
