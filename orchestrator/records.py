"""A sweep's own records in its storage: everything a resume, a rebuild or a summary needs, as plain JSON.

Tune saves its state as pickles (``tuner.pkl``, ``CLOUDPICKLE_FALLBACK`` values inside ``experiment_state-*.json``)
that run code when read, and a results root or bucket is shared by a team: a file in it is another person's input.
So no command reads Tune's state; each record below has this module as its one owner, and every reader parses JSON
(or the trial's YAML with ``safe_load``) and checks its shape:

    <storage>/<sweep>/plan.json                    the sweep's trials: id prefix, and each planned trial's id and
                                                   sampled values (grid and random search; optuna adds as it goes)
    <storage>/<sweep>/driver.json                  the lease of the one driver running the sweep (``DriverLease``)
    <storage>/<sweep>/tune/<trial>/values.json     the trial's sampled values (the trial writes it when it starts)
    <storage>/<sweep>/tune/<trial>/status.json     how it ended (the driver writes it): TERMINATED or ERROR
    <storage>/<sweep>/tune/<trial>/error.json      why it failed: type, message, traceback
    <storage>/<sweep>/tune/<trial>/run/config.yaml the resolved config (the trial writes it before training)
    <storage>/<sweep>/tune/<trial>/run/final_metrics.json   the trainer's final metrics (read here only)
    <storage>/<sweep>/tune/<trial>/run/reports.jsonl         every report of the trial, in order (at its end)
    <storage>/<sweep>/.../checkpoint_<step>/reports.jsonl    every report up to that checkpoint: a resumed trial
                                                   continues from it, so no step reported before is ever lost

A trial's id travels in its Tune config under ``TRIAL_KEY`` (``trial_id_of``): a resumed sweep is a new Tune run
over the trials that have not ended, each keeping its id, its folder and its checkpoints.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from enum import Enum

import yaml

from trainables import migrate
from trainables.config import Config, config_yaml
from trainables.errors import UserError

from .layout import SweepLayout

TRIAL_KEY = "_trial"  # the clmim trial id inside a Tune trial's config
EXPLOIT_KEY = "_exploit"  # PBT: {"id", "donor"} of the exploit a trial is restarted for (``trial.exploit``)
PLAN_VERSION = 1
REPORTS = "reports.jsonl"


class Status(str, Enum):
    """A trial's status as every view shows it (the string values are what the tables hold)."""

    TERMINATED = "TERMINATED"
    ERROR = "ERROR"
    RUNNING = "RUNNING"
    PENDING = "PENDING"

    @property
    def ended(self) -> bool:
        return self in (Status.TERMINATED, Status.ERROR)


class RecordError(UserError):
    """A record in the storage that is damaged or not the product's: named by its path."""


def _read_json(layout: SweepLayout, path: str, what: type = dict):
    """The parsed JSON at ``path`` in the storage (None if missing); a ``RecordError`` naming the file if it is not
    JSON of type ``what``."""
    text = layout.store.read_text(path)
    if text is None:
        return None
    try:
        obj = json.loads(text)
    except ValueError:
        raise RecordError(f"{layout.store.display(path)}: not valid JSON ({len(text)} bytes)") from None
    if not isinstance(obj, what):
        raise RecordError(f"{layout.store.display(path)}: not a clmim record (expected a JSON {what.__name__})")
    return obj


def _write_json(layout: SweepLayout, path: str, obj) -> None:
    layout.store.write_text(path, json.dumps(obj, sort_keys=True, default=str))


# ------------------------------------------------------------------------------------------- trial ids
def trial_id_of(config: dict | None, fallback: str) -> str:
    """The clmim id of a Tune trial with this config (``fallback``, Tune's own id, for a config without one)."""
    tid = (config or {}).get(TRIAL_KEY)
    return tid if isinstance(tid, str) else fallback


def sampled_values(config: dict | None) -> dict:
    """A Tune trial's sampled dotted keys, without the clmim id or a PBT exploit."""
    return {k: v for k, v in (config or {}).items() if k not in (TRIAL_KEY, EXPLOIT_KEY)}


def valid_trial_id(tid) -> bool:
    """A trial id is one plain path component (it names folders in the storage)."""
    return isinstance(tid, str) and 0 < len(tid) <= 100 and tid not in (".", "..") and all(
        c.isalnum() or c in "_-." for c in tid)


# ------------------------------------------------------------------------------------------- the plan
@dataclass
class Plan:
    """The sweep's trials: ``trials`` maps each planned id to its sampled values, in order; ``prefix`` starts every
    id (``<prefix>_<index:05d>``); ``searched`` marks a sweep whose trials a searcher proposes as it goes."""

    prefix: str
    trials: dict[str, dict] = field(default_factory=dict)
    searched: bool = False

    @classmethod
    def new(cls, values: list[dict] | None) -> Plan:
        """A plan over ``values`` (None: a searched sweep), with a fresh id prefix."""
        prefix = uuid.uuid4().hex[:5]
        return cls(prefix, {f"{prefix}_{i:05d}": v for i, v in enumerate(values or [])}, values is None)

    def next_index(self, known: set[str]) -> int:
        """The index of the next new id, past every planned or ``known`` id with this prefix."""
        idx = [int(t.rsplit("_", 1)[1]) for t in set(self.trials) | known
               if t.startswith(f"{self.prefix}_") and t.rsplit("_", 1)[1].isdigit()]
        return max(idx, default=-1) + 1


def plan_path(layout: SweepLayout) -> str:
    return layout.store.path(layout.name, "plan.json")


def write_plan(layout: SweepLayout, plan: Plan) -> None:
    _write_json(layout, plan_path(layout), {"version": PLAN_VERSION, "prefix": plan.prefix, "searched": plan.searched,
                                            "trials": [{"id": t, "values": v} for t, v in plan.trials.items()]})


def read_plan(layout: SweepLayout) -> Plan | None:
    """The sweep's plan; None for a sweep started before plans were recorded; a ``RecordError`` if damaged."""
    raw = _read_json(layout, plan_path(layout))
    if raw is None:
        return None
    trials = raw.get("trials")
    prefix = raw.get("prefix")
    if raw.get("version") != PLAN_VERSION or not isinstance(prefix, str) or not valid_trial_id(prefix) or not (
            isinstance(trials, list) and all(isinstance(t, dict) and valid_trial_id(t.get("id"))
                                             and isinstance(t.get("values"), dict) for t in trials)):
        raise RecordError(f"{layout.store.display(plan_path(layout))}: not a clmim plan (version {PLAN_VERSION})")
    return Plan(prefix, {t["id"]: t["values"] for t in trials}, bool(raw.get("searched")))


# ------------------------------------------------------------------------------------------- per trial
def values_path(layout: SweepLayout, trial: str) -> str:
    return f"{layout.trial_path(trial)}/values.json"


def write_values(layout: SweepLayout, trial: str, values: dict) -> None:
    _write_json(layout, values_path(layout, trial), values)


def read_values(layout: SweepLayout, trial: str) -> dict | None:
    """The sampled values the trial last trained with (``write_values``); None if it never started."""
    return _read_json(layout, values_path(layout, trial))


def lineage_path(layout: SweepLayout, trial: str) -> str:
    return f"{layout.trial_path(trial)}/lineage.json"


def read_lineage(layout: SweepLayout, trial: str) -> list[dict]:
    """The trial's PBT exploits, oldest first (``append_lineage``); [] if it never exploited."""
    return _read_json(layout, lineage_path(layout, trial), list) or []


def append_lineage(layout: SweepLayout, trial: str, row: dict) -> list[dict]:
    """Record one exploit of a PBT trial (``row["exploit"]`` its id; ``step`` where it continues, from the checkpoint
    of ``parent`` at that step; ``at`` its wall time; the mutated hyperparameters ``before`` and ``after``), once:
    a row whose exploit is recorded already is not written again (a retried or resumed trial). The whole list is
    rewritten in one write (atomic in every store)."""
    rows = read_lineage(layout, trial)
    if all(r.get("exploit") != row["exploit"] for r in rows):
        rows.append(row)
        _write_json(layout, lineage_path(layout, trial), rows)
    return rows


def lineage_values(values: dict, lineage: list[dict]) -> dict:
    """A trial's hyperparameters as of its newest exploit: its sampled ``values`` with every exploit's ``after``."""
    out = dict(values)
    for r in lineage:
        out.update(r.get("after") or {})
    return out


def status_path(layout: SweepLayout, trial: str) -> str:
    return f"{layout.trial_path(trial)}/status.json"


def write_status(layout: SweepLayout, trial: str, status: Status) -> None:
    _write_json(layout, status_path(layout, trial), {"status": status.value, "ended_at": time.time()})


def final_path(layout: SweepLayout, trial: str) -> str:
    return f"{layout.run_path(trial)}/final_metrics.json"


def read_final(layout: SweepLayout, trial: str) -> dict | None:
    """The trial's final metrics (it finished training); None if it has none. In today's metric names
    (``migrate.report``: a trial of an earlier version's sweep)."""
    final = _read_json(layout, final_path(layout, trial))
    return migrate.report(final) if isinstance(final, dict) else final


UNREADABLE_ERROR = "unreadable error file"


def record_error(layout: SweepLayout, trial: str, kind: str, message: str, tb: str = "") -> None:
    _write_json(layout, layout.error_path(trial), {"type": kind, "message": message, "traceback": tb})


def read_error(layout: SweepLayout, trial: str) -> str | None:
    """"Type: message" of the trial's recorded error; None if there is none; a damaged file (empty after a full
    disk, truncated) counts as an error: ``"unreadable error file"``."""
    try:
        err = _read_json(layout, layout.error_path(trial))
    except RecordError:
        return UNREADABLE_ERROR
    if err is None:
        return None
    if not isinstance(err.get("type"), str):
        return UNREADABLE_ERROR
    return f"{err['type']}: {err.get('message', '')}"


def retire_error(layout: SweepLayout, trial: str) -> bool:
    """Move the trial's error record aside (``error.prev.json``) and forget how it ended, so a retry really runs it
    again; True if it had one."""
    f = layout.error_path(trial)
    if not layout.store.exists(f):
        return False
    layout.store.rename(f, f.rsplit("/", 1)[0] + "/error.prev.json")
    layout.store.delete_file(status_path(layout, trial))
    return True


def config_path(layout: SweepLayout, trial: str) -> str:
    return f"{layout.run_path(trial)}/config.yaml"


def write_config(layout: SweepLayout, trial: str, cfg: Config) -> None:
    """The trial's resolved config, written before it trains: the driver reads its true config from here, whatever
    happens next (the run folder uploaded at the end leaves this file to this function)."""
    layout.store.write_text(config_path(layout, trial), config_yaml(cfg))


def stored_config(layout: SweepLayout, trial: str) -> dict | None:
    """The resolved config the trial wrote (``run/config.yaml``) before it trained, in today's vocabulary
    (``migrate.config_tree``); None if it never did (it failed before, or the file is damaged)."""
    try:
        text = layout.store.read_text(config_path(layout, trial))
        cfg = yaml.safe_load(text) if text is not None else None
    except (OSError, yaml.YAMLError):
        return None
    return migrate.config_tree(cfg) if isinstance(cfg, dict) else None


# ------------------------------------------------------------------------------------------- reports
def parse_reports(text: str | None) -> list[dict]:
    """The JSON objects of a reports log, one per line, in today's metric names (``migrate.report``: a log an
    earlier version wrote); torn or damaged lines are skipped."""
    out = []
    for line in (text or "").splitlines():
        try:
            r = json.loads(line)
        except ValueError:
            continue
        if isinstance(r, dict):
            out.append(migrate.report(r))
    return out


def read_reports(layout: SweepLayout, trial: str) -> list[dict]:
    """Every report the trial made, in order, from its own records: ``run/reports.jsonl`` once it finished, else the
    newest checkpoint's log (what a resume continues from); for a trial of an older sweep without logs, Tune's
    ``result.json`` (one JSON object per line)."""
    text = layout.store.read_text(f"{layout.run_path(trial)}/{REPORTS}")
    if text is None:
        for ckpt in reversed(layout.checkpoint_paths(trial)):
            text = layout.store.read_text(f"{ckpt}/{REPORTS}")
            if text is not None:
                break
    if text is None:
        text = layout.store.read_text(f"{layout.trial_path(trial)}/result.json")
    return parse_reports(text)


def merge_reports(stored: list[dict], received: list[dict]) -> list[dict]:
    """The stored reports, then those a driver received that they lack (each once, in order)."""
    seen = {json.dumps(r, sort_keys=True, default=str) for r in stored}
    out = list(stored)
    for r in received:
        key = json.dumps(r, sort_keys=True, default=str)
        if key not in seen:
            seen.add(key)
            out.append(r)
    return out


# ------------------------------------------------------------------------------------------- every trial
@dataclass
class TrialRecord:
    """What the storage says of one trial."""

    id: str
    values: dict | None  # its sampled values (None: unknown)
    status: Status | None  # how it ended (None: it has not)
    error: str | None = None


def _legacy_values(layout: SweepLayout, trial: str) -> dict | None:
    """A trial of a sweep started before values.json: Tune's ``params.json`` (plain JSON; never its pickle)."""
    try:
        raw = _read_json(layout, f"{layout.trial_path(trial)}/params.json")
    except RecordError:
        return None
    return sampled_values(raw) if raw is not None else None


def trial_record(layout: SweepLayout, trial: str, plan: Plan | None) -> TrialRecord:
    values = plan.trials.get(trial) if plan else None
    if values is None:
        try:
            values = _read_json(layout, values_path(layout, trial))
        except RecordError:
            values = None
    if values is None:
        values = _legacy_values(layout, trial)
    error = read_error(layout, trial)
    try:
        st = _read_json(layout, status_path(layout, trial))
    except RecordError:
        st = None
    status = None
    if error is not None:
        status = Status.ERROR
    elif isinstance(st, dict) and st.get("status") == Status.TERMINATED.value:
        status = Status.TERMINATED
    elif layout.store.exists(final_path(layout, trial)):  # it finished while no driver was recording
        status = Status.TERMINATED
    return TrialRecord(trial, values, status, error)


def scan(layout: SweepLayout, plan: Plan | None) -> dict[str, TrialRecord]:
    """Every trial the storage has a folder for, and every planned one (planned trials that never started have no
    folder), by id, in plan order then by id."""
    ids = list(plan.trials) if plan else []
    ids += [t for t in layout.trials() if valid_trial_id(t) and t not in set(ids)]
    have = set(layout.trials())
    out = {}
    for t in ids:
        out[t] = trial_record(layout, t, plan) if t in have else TrialRecord(t, plan.trials[t], None)
    return out


# ------------------------------------------------------------------------------------------- the driver's lease
LEASE_TTL_S = 60.0  # a driver that has not renewed its lease for this long is gone
LEASE_RENEW_S = 10.0
LEASE_SETTLE_S = 0.3  # after writing, read back once this much later: two drivers starting at once, one wins


class DriverLease:
    """One driver per sweep, across machines: a lease file in the sweep's storage, renewed every ``LEASE_RENEW_S``
    by a background thread and removed when the driver ends. A lease not renewed for ``LEASE_TTL_S`` (or, on the
    same host, whose process is gone) belongs to a dead driver and is taken over. Works on any storage that gives
    read-after-write consistency (local folders, NFS, S3); clocks of the machines are assumed to agree within
    seconds."""

    def __init__(self, layout: SweepLayout, command: str):
        self.layout = layout
        self.path = layout.store.path(layout.name, "driver.json")
        self.token = uuid.uuid4().hex
        self.info = {"token": self.token, "host": socket.gethostname(), "pid": os.getpid(), "command": command,
                     "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "renewed": time.time()}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _holder(self) -> dict | None:
        try:
            return _read_json(self.layout, self.path)
        except RecordError:
            return None  # a damaged lease protects nothing

    @staticmethod
    def alive(lease: dict, now: float | None = None) -> bool:
        """True if the lease's driver may still run: renewed within the TTL and, on this host, its process exists."""
        renewed = lease.get("renewed")
        if not isinstance(renewed, (int, float)) or (now or time.time()) - renewed > LEASE_TTL_S:
            return False
        if lease.get("host") == socket.gethostname() and isinstance(lease.get("pid"), int):
            try:
                os.kill(lease["pid"], 0)
            except ProcessLookupError:
                return False
            except PermissionError:
                return True
        return True

    def _refuse(self, holder: dict) -> UserError:
        age = time.time() - holder.get("renewed", 0)
        return UserError(
            f"sweep {self.layout.name!r} is being run by another driver ({holder.get('command', 'clmim')} on host "
            f"{holder.get('host', '?')}, pid {holder.get('pid', '?')}, started {holder.get('started', '?')}, last "
            f"seen {age:.0f}s ago); wait for it to end or stop it (a driver that died frees the sweep "
            f"{LEASE_TTL_S:.0f}s after it was last seen)")

    def acquire(self) -> DriverLease:
        holder = self._holder()
        if holder is not None and holder.get("token") != self.token and self.alive(holder):
            raise self._refuse(holder)
        self._write()
        time.sleep(LEASE_SETTLE_S)
        holder = self._holder()
        if holder is None or holder.get("token") != self.token:
            raise self._refuse(holder or {})
        self._thread = threading.Thread(target=self._renew, name="clmim-lease", daemon=True)
        self._thread.start()
        return self

    def _write(self) -> None:
        self.info["renewed"] = time.time()
        _write_json(self.layout, self.path, self.info)

    def _renew(self) -> None:
        while not self._stop.wait(LEASE_RENEW_S):
            try:
                self._write()
            except Exception:  # noqa: BLE001 - storage down for a moment: the next renewal tries again
                pass

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            holder = self._holder()
            if holder is not None and holder.get("token") == self.token:
                self.layout.store.delete_file(self.path)
        except OSError:
            pass

    def __enter__(self) -> DriverLease:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# ------------------------------------------------------------------------------------------- the sweep's state
@dataclass
class SweepState:
    """Where a sweep stands: ``state`` is "running" (a live driver holds its lease), "finished" (every planned
    trial ended), "interrupted (resumable)" (no driver, trials left: ``clmim resume``) or "unknown" (storage
    unreadable or a sweep without records); ``ended`` / ``planned`` count its trials (``planned`` None: unknown)."""

    state: str
    ended: int
    planned: int | None
    driver: dict | None = None

    def describe(self, name: str) -> str:
        """One line for a user: the state, the counts, and what to do."""
        counts = f"{self.ended} of {self.planned if self.planned is not None else '?'} trials ended"
        if self.state == "running":
            d = self.driver or {}
            return (f"sweep {name!r} is running ({counts}; driver pid {d.get('pid', '?')} on {d.get('host', '?')}): "
                    "its results appear as trials end")
        if self.state.startswith("interrupted"):
            return f"sweep {name!r} was interrupted ({counts}); continue it with: clmim resume {name}"
        return f"sweep {name!r}: {self.state} ({counts})"


def sweep_state(layout: SweepLayout, planned: int | None = None) -> SweepState:
    """The state of a sweep from its records (``planned``: the trial count its sweep.json recorded, for sweeps
    whose plan a searcher extends as it goes)."""
    try:
        lease = _read_json(layout, layout.store.path(layout.name, "driver.json"))
    except (RecordError, OSError):
        lease = None
    try:
        plan = read_plan(layout)
        recs = scan(layout, plan)
    except (RecordError, OSError):
        return SweepState("unknown", 0, planned, lease if lease and DriverLease.alive(lease) else None)
    ended = sum(r.status is not None for r in recs.values())
    if plan is not None and not plan.searched:
        planned = len(plan.trials)
    if lease is not None and DriverLease.alive(lease):
        return SweepState("running", ended, planned, lease)
    if plan is None and not recs:
        return SweepState("unknown", ended, planned)
    if planned is None:  # a searched sweep of unknown size: finished only if nothing is left running
        return SweepState("finished" if ended == len(recs) else "unknown", ended, planned)
    if planned is not None and ended >= planned:
        return SweepState("finished", ended, planned)
    return SweepState("interrupted (resumable)", ended, planned)
