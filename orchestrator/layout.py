"""Where a sweep's files live: the results root, sweep names, and one ``SweepLayout`` owning a sweep's paths.

    <results>/<sweep>/sweep.json                 the resolved space, CLI arguments, code version
    <results>/<sweep>/manifest.json              the current Parquet files of each table (readers' snapshot)
    <results>/<sweep>/{trials,curves,layers}/    Parquet files (see ``results.py``)
    <results>/<sweep>/tune/<trial>/              Ray Tune's trial dirs: result.json, checkpoints, run/, error.json
    <results>/<sweep>/train/                     Ray Train storage of multi-worker trials
    <results>/<sweep>/report/                    ``clmim report`` output
"""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass
from pathlib import Path

from trainables.errors import UserError, excerpt

# A sweep name is one plain path component: it names a folder under the results root and an MLflow experiment.
SWEEP_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
LATEST = "latest"  # `clmim results show latest`: the most recently started sweep


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
    """Every path of one sweep under a results root."""

    root: Path
    name: str

    @property
    def sweep_dir(self) -> Path:
        return self.root / self.name

    @property
    def sweep_json(self) -> Path:
        return self.sweep_dir / "sweep.json"

    @property
    def manifest(self) -> Path:
        return self.sweep_dir / "manifest.json"

    @property
    def tune_dir(self) -> Path:
        return self.sweep_dir / "tune"

    @property
    def train_storage(self) -> Path:
        return self.sweep_dir / "train"

    @property
    def report_dir(self) -> Path:
        return self.sweep_dir / "report"

    def table_dir(self, table: str) -> Path:
        return self.sweep_dir / table

    def trial_dir(self, trial: str) -> Path:
        return self.tune_dir / trial

    def error_file(self, trial: str) -> Path:
        return self.trial_dir(trial) / "error.json"

    def run_dir(self, trial: str) -> Path:
        return self.trial_dir(trial) / "run"


def _is_sweep(d: Path) -> bool:
    return d.is_dir() and SWEEP_NAME.fullmatch(d.name) is not None and (
        (d / "sweep.json").is_file() or (d / "tune").is_dir() or (d / "trials").is_dir())


def list_sweeps(root: Path) -> list[Path]:
    """Sweep folders under ``root``, oldest first (by when their sweep.json was written)."""
    if not root.is_dir():
        return []

    def started(d: Path) -> float:
        f = d / "sweep.json"
        return (f if f.is_file() else d).stat().st_mtime

    return sorted((d for d in root.iterdir() if _is_sweep(d)), key=started)


def check_root(root: Path) -> Path:
    """``root`` if it is an existing folder; else a ``UserError`` (a query over nothing is a mistake)."""
    if not root.exists():
        raise UserError(f"--results: results root {str(root)!r} does not exist (no sweep has written there; "
                        "pass --results or set CLMIM_RESULTS)")
    if not root.is_dir():
        raise UserError(f"--results: {str(root)!r} is a file, not a results folder")
    return root


def find_sweep(name: str, root: Path, need: str | None = None) -> SweepLayout:
    """The layout of an existing sweep ``name`` (or ``latest``); a ``UserError`` that lists the closest names.

    ``need`` names a part the caller requires (``"tune"``: a Tune experiment to resume)."""
    check_root(root)
    sweeps = list_sweeps(root)
    if name == LATEST:
        if not sweeps:
            raise UserError(f"sweep {LATEST!r}: no sweeps under {root}")
        name = sweeps[-1].name
    else:
        validate_sweep_name(name, "sweep")
    layout = SweepLayout(root, name)
    if not _is_sweep(layout.sweep_dir):
        names = [d.name for d in sweeps]
        close = difflib.get_close_matches(name, names, n=3, cutoff=0.4) or [
            n for n in names if n.startswith(name)][-3:]
        hint = (f"; closest: {', '.join(close)}" if close else
                f"; sweeps there: {', '.join(names[-5:])}" if names else "; there are no sweeps there yet")
        raise UserError(f"sweep {name!r} not found under {root}{hint} (list them: clmim results list)")
    if need == "tune" and not layout.tune_dir.is_dir():
        raise UserError(f"sweep {name!r}: no Tune experiment in {layout.sweep_dir} (it never started trials)")
    return layout
