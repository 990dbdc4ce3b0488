"""The driver's writers: every part's disk, database and network work off Ray Tune's event loop.

Tune calls the sweep's callback on the one thread that also schedules trials and fetches their results; a
callback that waits on SQLite, a tracking server or S3 makes every trial wait (a function trainable's ``report``
returns only once the driver has taken its result). So the callback only hands events to a ``Writer`` per part: a
thread with a bounded queue that takes whatever has arrived, hands it to the part, then asks the part to
``flush`` it all at once (one Parquet file per table and one manifest change for every trial of the batch, one
MLflow ``log_batch`` per run), at most every ``interval`` seconds.

The queue is bounded (``capacity`` events), so the driver's memory stays flat whatever a part's speed. When it is
full, a trial's intermediate result is dropped for that part (counted in ``dropped``), never waited for: a slow
tracking server slows logging, not training. Nothing is lost by that: when the trial ends, its part receives every
report (``callbacks.Ended``) and writes what it lacks. Start, end and sweep-end events are never dropped: when
the queue is full of them the callback waits (``waited_s``).

``close`` (at the sweep's end, on Ctrl-C and when the driver exits) flushes what is queued. A driver killed with
SIGKILL loses its queues; ``clmim resume`` records every trial that ended meanwhile and trials continue from their
checkpoints, whose report logs hold everything they reported (tested).
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field

STOP = object()


@dataclass
class WriterStats:
    """What a writer did: events taken, flushes, seconds in its part's hooks and flushes, dropped results, and
    seconds the callback waited for room in its queue."""

    events: int = 0
    flushes: int = 0
    busy_s: float = 0.0
    dropped: int = 0
    waited_s: float = 0.0
    max_queued: int = 0
    by_hook: dict[str, float] = field(default_factory=dict)


class Writer:
    """One part's thread (see the module docstring). ``handle(event)`` applies one event to the part (in order),
    ``flush()`` writes what the part holds; an exception in either goes to ``on_error(event, exc)`` and the
    writer goes on."""

    def __init__(self, name: str, handle, flush, on_error, capacity: int = 10_000, interval: float = 1.0):
        self.name, self._handle, self._flush, self._on_error = name, handle, flush, on_error
        self.capacity, self.interval = capacity, interval
        self._q: queue.Queue = queue.Queue(maxsize=capacity)
        self.stats = WriterStats()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=f"clmim-writer-{name}", daemon=True)
        self._thread.start()

    def put(self, event: tuple, droppable: bool = False) -> bool:
        """Queue ``event`` (a tuple whose first item names the hook); a ``droppable`` one is dropped when the queue
        is full (False returned), any other waits for room."""
        if self._closed:
            return False
        try:
            self._q.put_nowait(event)
        except queue.Full:
            if droppable:
                self.stats.dropped += 1
                return False
            t = time.perf_counter()
            self._q.put(event)
            self.stats.waited_s += time.perf_counter() - t
        self.stats.max_queued = max(self.stats.max_queued, self._q.qsize())
        return True

    def queued(self) -> int:
        return self._q.qsize()

    def _run(self) -> None:
        last_flush = 0.0
        while True:
            first = self._q.get()
            batch = [first]
            # let a batch gather: at most one flush per interval
            wait = self.interval - (time.monotonic() - last_flush)
            if first is not STOP and wait > 0:
                time.sleep(wait)
            while len(batch) < self.capacity:
                try:
                    batch.append(self._q.get_nowait())
                except queue.Empty:
                    break
            stop = any(e is STOP for e in batch)
            t = time.perf_counter()
            for event in batch:
                if event is STOP:
                    continue
                t_e = time.perf_counter()
                try:
                    self._handle(event)
                except Exception as e:  # noqa: BLE001 - the part's failure is reported, the writer goes on
                    self._on_error(event, e)
                self.stats.by_hook[event[0]] = self.stats.by_hook.get(event[0], 0.0) + time.perf_counter() - t_e
                self.stats.events += 1
            t_f = time.perf_counter()
            try:
                self._flush()
            except Exception as e:  # noqa: BLE001
                self._on_error(("flush",), e)
            self.stats.by_hook["flush"] = self.stats.by_hook.get("flush", 0.0) + time.perf_counter() - t_f
            self.stats.flushes += 1
            self.stats.busy_s += time.perf_counter() - t
            last_flush = time.monotonic()
            for _ in batch:
                self._q.task_done()
            if stop:
                return

    def drain(self) -> None:
        """Wait until every queued event is handled and flushed."""
        self._q.join()

    def close(self) -> None:
        """Flush what is queued and stop the thread (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._q.put(STOP)
        self._thread.join()
