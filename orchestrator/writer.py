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

A thread still shares the driver's GIL: a part that spends its time in Python (MLflow's SQLAlchemy store, HTTP
clients) slows Tune's loop even off it; with SQLite MLflow that part took 47 % of the driver's samples in a 300-trial
profile. Such a part runs on a ``ProcessWriter``: the same writer in a process of its own (spawned: forking a driver
full of Ray's threads is unsafe), fed through a bounded queue. It ignores Ctrl-C (the driver's ``close`` flushes
it) and stops writing the moment the driver is gone (a SIGKILLed driver's writer process writes at most the one
event it is in, as a thread would).
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import queue
import signal
import threading
import time
from dataclasses import dataclass, field

STOP = object()
_STOP, _DRAIN = "__stop__", "__drain__"  # (a ProcessWriter's control events: tuples survive pickling, STOP does not)


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


def _offer(q, stats: WriterStats, event: tuple, droppable: bool, wait) -> bool:
    """Put ``event`` into ``q``; when it is full, drop a ``droppable`` one (counted) or ``wait(event)`` for room
    (timed). Whether it went in."""
    try:
        q.put_nowait(event)
        return True
    except queue.Full:
        if droppable:
            stats.dropped += 1
            return False
        t = time.perf_counter()
        ok = wait(event)
        stats.waited_s += time.perf_counter() - t
        return ok


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
        if self._closed or not _offer(self._q, self.stats, event, droppable, lambda e: self._q.put(e) or True):
            return False
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


class ProcessWriter:
    """``Writer``'s interface with the part in a spawned process (see the module docstring). ``part`` is pickled
    into it once, its ``in_process()`` is called there first, and each event goes to ``apply(part, event)`` there
    (``part.flush()`` after each batch, as on a thread); ``on_error(event, exc)`` runs there too (it must be
    picklable: a module-level function or a partial of one). Drops and waits are counted here, the rest of
    ``stats`` comes back when it closes."""

    def __init__(self, name: str, part, apply, on_error, capacity: int = 10_000, interval: float = 1.0):
        ctx = multiprocessing.get_context("spawn")
        self.name, self.capacity, self.interval = name, capacity, interval
        self.stats = WriterStats()
        self._q = ctx.Queue(maxsize=capacity)
        self._replies, reply_end = ctx.Pipe(duplex=False)  # the process's answers: drained, its final stats
        self._proc = ctx.Process(target=_serve, name=f"clmim-writer-{name}", daemon=True,
                                 args=(name, part, apply, on_error, capacity, interval, self._q, reply_end))
        self._proc.start()
        reply_end.close()
        self._closed = False
        self._drains = 0

    def _alive(self) -> bool:
        return self._proc.is_alive()

    def put(self, event: tuple, droppable: bool = False) -> bool:
        return not self._closed and _offer(self._q, self.stats, event, droppable, self._wait_for_room)

    def _wait_for_room(self, event: tuple) -> bool:
        while True:
            try:
                self._q.put(event, timeout=1.0)
                return True
            except queue.Full:
                if not self._alive():  # (its failure was reported there)
                    return False

    def queued(self) -> int:
        return self._q.qsize()

    def _reply(self, kind: str):
        """The process's next answer of ``kind``; None if it died first."""
        while True:
            if self._replies.poll(1.0):
                try:
                    msg = self._replies.recv()
                except EOFError:
                    return None
                if msg[0] == kind:
                    return msg[1]
            elif not self._alive():
                return None

    def drain(self) -> None:
        if self._closed or not self._alive():
            return
        self._drains += 1
        self._q.put((_DRAIN, self._drains))
        while (n := self._reply("drained")) is not None and n < self._drains:
            pass

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._alive():
            self._q.put((_STOP,))
            done = self._reply("stats")
            if done is not None:
                mine = self.stats
                self.stats = WriterStats(**done)
                self.stats.dropped += mine.dropped
                self.stats.waited_s += mine.waited_s
        self._proc.join()
        self._q.close()
        self._replies.close()


def _serve(name, part, apply, on_error, capacity, interval, q, replies) -> None:
    """A ``ProcessWriter``'s process: a ``Writer`` over ``part``, fed from ``q`` until told to stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the driver's: it flushes this writer with close()
    parent = multiprocessing.parent_process()
    part.in_process()

    def handle(event):
        if not parent.is_alive():  # the driver was killed: write nothing more (a resume catches up)
            os._exit(0)
        apply(part, event)

    w = Writer(name, handle, part.flush, on_error, capacity, interval)
    while True:
        try:
            event = q.get(timeout=0.5)
        except queue.Empty:
            if not parent.is_alive():
                os._exit(0)
            continue
        if event[0] == _DRAIN:
            w.drain()
            replies.send(("drained", event[1]))
        elif event[0] == _STOP:
            w.close()
            replies.send(("stats", dataclasses.asdict(w.stats)))
            return
        else:
            w.put(event)
