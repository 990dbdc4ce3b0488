"""``sweep.json``, a sweep's record: the resolved space it was started with, the CLI values, the code version, the
storage. This module is the file's only reader and writer (the layout only names its paths).

The record is written once, when a sweep starts, under the results root and, when the trials write elsewhere, in
the sweep's storage too, so ``clmim resume NAME --storage URI`` works from a machine that never saw the sweep
(``adopt`` copies it back). Readers that only need a fact of it (how many trials were planned, when it started,
its storage) get an empty record for a damaged file; ``SweepRecord.space`` (what a resume needs) names the damage.
"""

from __future__ import annotations

import json
import platform
import socket
import subprocess
import time
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path

from trainables.errors import UserError
from trainables.files import DamagedFile, read_json, write_json_atomic
from trainables.storage import Storage

from .space import Space, space_from_dict

FILE = "sweep.json"


def code_version() -> str:
    """The code a sweep ran: ``git describe --always --dirty`` of this checkout, else the installed version."""
    here = Path(__file__).resolve().parents[1]
    try:
        out = subprocess.run(["git", "-C", str(here), "describe", "--always", "--dirty"], capture_output=True,
                             text=True, timeout=5)
        if out.returncode == 0:
            return out.stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        pass
    return version("clmim")


@dataclass(frozen=True)
class SweepRecord:
    """What ``sweep.json`` holds (``info``: the parsed mapping; empty for a missing or damaged file)."""

    sweep_dir: Path
    info: dict = field(default_factory=dict)
    damage: str | None = None  # why the file could not be read, if it could not

    @property
    def name(self) -> str:
        return self.sweep_dir.name

    @property
    def n_trials(self) -> int | None:
        n = self.info.get("n_trials")
        return n if isinstance(n, int) and not isinstance(n, bool) else None

    @property
    def created(self) -> str:
        return str(self.info.get("created", "?"))

    @property
    def cli_args(self) -> dict:
        return self.info.get("cli_args") if isinstance(self.info.get("cli_args"), dict) else {}

    @property
    def code_version(self) -> str:
        return str(self.info.get("code_version"))

    @property
    def storage(self) -> Storage | None:
        st = self.info.get("storage")
        if isinstance(st, dict) and isinstance(st.get("uri"), str) and st["uri"]:
            return Storage(st["uri"], st.get("endpoint"))
        return None

    @property
    def analysis(self) -> dict | None:
        """An analysis sweep's inputs (``write_analysis``), or None for a training sweep."""
        a = self.info.get("analysis")
        return a if isinstance(a, dict) else None

    def space(self) -> Space:
        """The space the sweep was started with; a ``UserError`` naming the file when it cannot give one."""
        what = f"sweep {self.name!r}"
        if self.analysis is not None:
            raise UserError(f"{what} is an analysis sweep (clmim analyze --sweep): run that command again; it "
                            "skips the checkpoints already analysed")
        if self.damage:
            raise UserError(f"{what}: {self.damage}; it cannot be resumed")
        if not self.info:
            raise UserError(f"{what}: no {FILE} in {self.sweep_dir}; it cannot be resumed")
        if not (isinstance(self.info.get("space"), dict) and self.info.get("space_path")):
            raise UserError(f"{what}: {self.sweep_dir / FILE} lacks the sweep's space; it cannot be resumed")
        return space_from_dict(self.info["space"], Path(self.info["space_path"]))


def read(sweep_dir: Path) -> SweepRecord:
    """The record of the sweep in ``sweep_dir`` (empty if there is none; ``damage`` says why if unreadable)."""
    try:
        info = read_json(Path(sweep_dir) / FILE)
    except DamagedFile as e:
        return SweepRecord(Path(sweep_dir), {}, str(e))
    return SweepRecord(Path(sweep_dir), info if isinstance(info, dict) else {},
                       None if info is None or isinstance(info, dict) else f"{Path(sweep_dir) / FILE}: not a mapping")


def started(sweep_dir: Path) -> float:
    """When the sweep started (its record's modification time; the folder's for a sweep without one)."""
    f = Path(sweep_dir) / FILE
    return (f if f.is_file() else Path(sweep_dir)).stat().st_mtime


def write(sweep_dir: Path, space: Space, overrides: list[str], cli_args: dict, storage: Storage | None) -> SweepRecord:
    """Write a new sweep's record under the results root and, when the trials write elsewhere, in its storage."""
    info = {"name": Path(sweep_dir).name, "space_path": space.path, "space_text": Path(space.path).read_text(),
            "space": space.to_dict(), "overrides": overrides, "cli_args": cli_args, "code_version": code_version(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": socket.gethostname(),
            "python": platform.python_version(), "n_trials": space.n_trials(),
            "storage": storage.to_dict() if storage else None}
    write_json_atomic(Path(sweep_dir) / FILE, info, indent=2)
    if storage:
        storage.write_text(storage.path(Path(sweep_dir).name, FILE), json.dumps(info, indent=2))
    return SweepRecord(Path(sweep_dir), info)


def write_analysis(sweep_dir: Path, checkpoints: list[str], datasets: list[str], settings: dict,
                   cli_args: dict) -> SweepRecord:
    """Write an analysis sweep's record (``orchestrator/analysis.py``): its checkpoints and data sets so far (a
    later run of the command adds to them) and the settings every trial of it is probed with (``settings``:
    overrides, image size, network), which a later run must repeat."""
    info = {"name": Path(sweep_dir).name, "analysis": {"checkpoints": checkpoints, "datasets": datasets, **settings},
            "cli_args": cli_args, "code_version": code_version(), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "host": socket.gethostname(), "python": platform.python_version(),
            "n_trials": len(checkpoints) * max(1, len(datasets)), "storage": None}
    write_json_atomic(Path(sweep_dir) / FILE, info, indent=2)
    return SweepRecord(Path(sweep_dir), info)


def adopt(sweep_dir: Path, storage: Storage) -> None:
    """A sweep this results root has not seen (resumed on a fresh machine): copy its record from the storage."""
    sweep_dir = Path(sweep_dir)
    if (sweep_dir / FILE).exists():
        return
    where = storage.path(sweep_dir.name, FILE)
    text = storage.read_text(where)
    if text is None:
        return
    try:
        info = json.loads(text)
    except ValueError:
        raise UserError(f"sweep {sweep_dir.name!r}: {storage.display(where)} is damaged; it cannot be resumed") \
            from None
    write_json_atomic(sweep_dir / FILE, info, indent=2)
