"""Where a sweep's files live: the results root, sweep names, and one ``SweepLayout`` owning a sweep's paths.

    <results>/<sweep>/sweep.json                 the resolved space, CLI arguments, code version
    <results>/<sweep>/manifest.json              the current Parquet files of each table (readers' snapshot)
    <results>/<sweep>/{trials,curves,layers}/    Parquet files (see ``results.py``)
    <results>/<sweep>/report/                    ``clmim report`` output
    <results>/mlflow.db, <results>/mlartifacts/<sweep>/   the default MLflow store

and in the sweep's storage (``storage.py``; by default the results root, so the same folder):

    <storage>/<sweep>/sweep.json                 a copy, so ``clmim resume`` works from any machine
    <storage>/<sweep>/tune/<trial>/              Tune's trial dirs: result.json, checkpoint_<step>/, error.json
    <storage>/<sweep>/tune/<trial>/run/          the trial's own files: config.yaml, final_metrics.json, model.pt
    <storage>/<sweep>/train/<trial>/             Ray Train checkpoints of multi-worker trials

Every path a trial, the driver, the tables or MLflow use comes from ``SweepLayout``.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from trainables.errors import UserError, excerpt
from trainables.storage import Storage

from . import sweep_record

# A sweep name is one plain path component: it names a folder under the results root and an MLflow experiment.
SWEEP_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
# `clmim results show latest`: the most recently started sweep with finished trials (one still running, or
# interrupted before any trial ended, has nothing to show); `clmim resume latest`: the most recently started one.
LATEST = "latest"


def results_root(arg: str | None = None) -> Path:
    """--results, else $CLMIM_RESULTS, else ./clmim-results (absolute)."""
    return Path(arg or os.environ.get("CLMIM_RESULTS") or "clmim-results").expanduser().resolve()


def validate_sweep_name(name, flag: str = "--name") -> str:
    """``name`` if it is a plain name (letters, digits, '.', '_', '-'; no path); else a ``UserError``."""
    if not isinstance(name, str) or not SWEEP_NAME.fullmatch(name) or name in (".", "..") or name == LATEST:
        raise UserError(f"{flag}: {excerpt(name, 60)} is not a sweep name; use up to 100 letters, digits, '.', '_' "
                        f"or '-', starting with a letter or digit (and not {LATEST!r})")
    return name


@dataclass(frozen=True)
class SweepLayout:
    """Every path of one sweep: on the driver under ``root``; trial files in ``storage`` (None: ``root``).
    Paths in the storage are ``Storage`` paths (strings, no scheme); read and write them through ``store``."""

    root: Path
    name: str
    storage: Storage | None = None

    @property
    def store(self) -> Storage:
        return self.storage or Storage(str(self.root))

    @property
    def sweep_dir(self) -> Path:
        return self.root / self.name

    @property
    def manifest(self) -> Path:
        return self.sweep_dir / "manifest.json"

    @property
    def report_dir(self) -> Path:
        return self.sweep_dir / "report"

    def table_dir(self, table: str) -> Path:
        return self.sweep_dir / table

    @property
    def mlflow_artifacts(self) -> Path:
        """Artifacts of the sweep's MLflow runs with the default SQLite store (a server keeps its own)."""
        return self.root / "mlartifacts" / self.name

    # ---------------------------------------------------------------------------------- in the storage
    @property
    def experiment_path(self) -> str:
        """The sweep's folder in its storage (Tune's ``storage_path``; the experiment is named ``tune``)."""
        return self.store.path(self.name)

    @property
    def tune_path(self) -> str:
        return self.store.path(self.name, "tune")

    @property
    def train_path(self) -> str:
        """Ray Train's storage for multi-worker trials (one run per trial id)."""
        return self.store.path(self.name, "train")

    def trial_path(self, trial: str) -> str:
        return self.store.path(self.name, "tune", trial)

    def run_path(self, trial: str) -> str:
        return self.store.path(self.name, "tune", trial, "run")

    def error_path(self, trial: str) -> str:
        return self.store.path(self.name, "tune", trial, "error.json")

    def trials(self) -> list[str]:
        """Ids of the trials that have a folder in the storage."""
        return self.store.listdir(self.tune_path)

    def checkpoint_paths(self, trial: str) -> list[str]:
        """The trial's full checkpoints in the storage, oldest first (Tune's, or Ray Train's for multi-worker)."""
        out = []
        for base in (self.trial_path(trial), f"{self.train_path}/{trial}"):
            out += [f"{base}/{d}" for d in self.store.listdir(base) if d.startswith("checkpoint_")]
        return sorted(out, key=lambda p: p.rsplit("_", 1)[1])


def _is_sweep(d: Path) -> bool:
    return d.is_dir() and SWEEP_NAME.fullmatch(d.name) is not None and (
        (d / sweep_record.FILE).is_file() or (d / "tune").is_dir() or (d / "trials").is_dir())


def list_sweeps(root: Path) -> list[Path]:
    """Sweep folders under ``root``, oldest first (by when their sweep.json was written)."""
    if not root.is_dir():
        return []

    return sorted((d for d in root.iterdir() if _is_sweep(d)), key=sweep_record.started)


def has_results(d: Path) -> bool:
    """True if the sweep folder ``d`` has rows in its trials table (its manifest lists a trials file, or without a
    manifest a trials file is on disk): at least one trial has ended."""
    try:
        m = json.loads((d / "manifest.json").read_text())
        return bool(isinstance(m, dict) and isinstance(m.get("current"), dict) and m["current"].get("trials"))
    except FileNotFoundError:
        return any((d / "trials").glob("*.parquet"))
    except (OSError, ValueError):
        return False


def resolve_latest(root: Path, with_results: bool) -> tuple[str, str | None]:
    """The sweep ``latest`` names: the newest started (``with_results`` False) or the newest with finished trials;
    and a note saying which and why when that is not simply the newest folder (None otherwise)."""
    sweeps = list_sweeps(root)
    if not sweeps:
        raise UserError(f"sweep {LATEST!r}: no sweeps under {root}")
    if not with_results:
        return sweeps[-1].name, None
    done = [d for d in sweeps if has_results(d)]
    if not done:
        raise UserError(f"sweep {LATEST!r}: no sweep under {root} has finished trials yet (newest: "
                        f"{sweeps[-1].name}; see clmim results list)")
    newer = [d.name for d in sweeps[sweeps.index(done[-1]) + 1:]]
    if not newer:
        return done[-1].name, None
    return done[-1].name, (f"latest: {done[-1].name}, the newest sweep with finished trials (newer, with none yet: "
                           f"{', '.join(newer[-3:])}; see clmim results list)")


def check_root(root: Path) -> Path:
    """``root`` if it is an existing folder; else a ``UserError`` (a query over nothing is a mistake)."""
    if not root.exists():
        raise UserError(f"--results: results root {str(root)!r} does not exist (no sweep has written there; "
                        "pass --results or set CLMIM_RESULTS)")
    if not root.is_dir():
        raise UserError(f"--results: {str(root)!r} is a file, not a results folder")
    return root


def find_sweep(name: str, root: Path, need: str | None = None, storage: Storage | None = None) -> SweepLayout:
    """The layout of an existing sweep ``name`` (or ``latest``: see ``LATEST``; a note on stderr says which when
    it is not the newest folder); a ``UserError`` that lists the closest names.

    The layout's storage is ``storage`` if given, else the one the sweep recorded. A sweep this results root has
    never seen is found in ``storage`` (``clmim resume NAME --storage URI`` on a fresh machine). ``need`` names a
    part the caller requires (``"tune"``: a Tune experiment to resume or rebuild from)."""
    if storage is None or root.exists():
        check_root(root)
    sweeps = list_sweeps(root)
    if name == LATEST:
        name, note = resolve_latest(root, with_results=need != "tune")
        if note:
            print(note, file=sys.stderr)
    else:
        validate_sweep_name(name, "sweep")
    layout = SweepLayout(root, name, storage or sweep_record.read(root / name).storage)
    if not _is_sweep(layout.sweep_dir) and not (storage and _stored_sweep(layout)):
        names = [d.name for d in sweeps]
        close = difflib.get_close_matches(name, names, n=3, cutoff=0.4) or [
            n for n in names if n.startswith(name)][-3:]
        hint = (f"; closest: {', '.join(close)}" if close else
                f"; sweeps there: {', '.join(names[-5:])}" if names else "; there are no sweeps there yet")
        where = f"{root} or in --storage {storage.uri}" if storage else str(root)
        raise UserError(f"sweep {name!r} not found under {where}{hint} (list them: clmim results list)")
    record = sweep_record.read(layout.sweep_dir)
    if need == "tune" and record.analysis is not None:
        record.space()  # (raises: an analysis sweep is run again, not resumed)
    if need == "tune" and not (_stored_sweep(layout, "tune") or _stored_sweep(layout, "plan.json")):
        raise UserError(f"sweep {name!r}: no Tune experiment in {layout.store.display(layout.tune_path)} "
                        "(it never started trials, or pass the --storage it ran with)")
    return layout


def _stored_sweep(layout: SweepLayout, part: str = sweep_record.FILE) -> bool:
    try:
        return layout.store.exists(layout.store.path(layout.name, part))
    except OSError as e:
        raise UserError(f"--storage: cannot read {layout.store.uri} ({str(e).splitlines()[0][:200]})") from None
