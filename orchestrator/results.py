"""The results store: Parquet files per trial attempt, their manifest and their compaction; the only writer of the
tables (the driver's ``callbacks.Tables`` and ``rebuild.py`` call it). Reading is ``query.py``'s.

Layout (schema version ``SCHEMA_VERSION``; columns documented in the README)::

    <results>/<sweep>/trials/<trial>.<attempt>.parquet   one row per trial attempt
    <results>/<sweep>/curves/<trial>.<attempt>.parquet   long: step, epoch, metric, value
    <results>/<sweep>/layers/<trial>.<attempt>.parquet   long: step (0 = untrained), layer, head, metric, value
    <results>/<sweep>/robustness/<trial>.<attempt>.parquet   long: step (0 = untrained), band, freq_lo, freq_hi,
                                                         metric, value (accuracy under band-passed noise)
    <results>/<sweep>/lineage/<trial>.<attempt>.parquet  long: a PBT trial's exploits (exploit, exploit_id, step,
                                                         parent, exploited_at, key, before, after), from its
                                                         ``lineage.json``; only for attempts that have any
    <results>/<sweep>/manifest.json                      the current files of each table

Every file is written under a temporary name and renamed into place, so readers never see a partial file and
concurrent writers never clobber each other (attempt ids are unique). The views keep only the latest attempt of
each (sweep, trial), so a re-run attempt supersedes the earlier one.

Consistent reads: writers add files to the sweep's manifest (under a file lock, replaced atomically) only once
they are complete; merging files replaces them in the manifest in one step and deletes the originals only
``GRACE_S`` seconds later. A reader reads each manifest once and hands DuckDB that explicit list, so one query
sees one snapshot: no file vanishes under it and no row appears twice. Files in a table folder that are not the
product's (name pattern, schema version) are skipped with a warning naming them.

"""

from __future__ import annotations

import bisect
import fcntl
import functools
import itertools
import math
import os
import re
import time
import uuid
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from trainables import migrate
from trainables.config import flatten
from trainables.files import DamagedFile, read_json, write_json_atomic
from trainables.vocab import (
    NOISE_METRIC,
    STATIC_KEYS,
    TUNE_KEYS,
    band_edges,
    final_keys,
    is_table_key,
    mix_lam,
    objective_group,
    objective_label,
    objective_names,
    weights_of,
)

from .layout import SweepLayout, list_sweeps

# 2: layers has a step column (0 = the untrained encoder); 3: the long tables have a stage column; 4: one name per
# objective (loss_simmim, objective.simmim.*, the objective column's 'simmim' / 'mix'; ``trainables/migrate.py``)
SCHEMA_VERSION = 4
READABLE_VERSIONS = (b"1", b"2", b"3", b"4")  # files of these versions are read (v1 layers: step null; v1-2: stage
# null; v1-3 through ``read_table``, which migrates them to today's vocabulary)
TABLES = ("trials", "curves", "layers", "robustness", "lineage")
LONG_TABLES = TABLES[1:]
GRACE_S = 60.0  # merged-away files stay readable this long after they leave the manifest
MERGED_PREFIX = "_merged."
BATCH_PREFIX = "_batch."  # the rows of several trials the driver wrote at once
COMPACT_BATCH = 64  # per-attempt files merged at a time while a sweep runs (~sqrt of a big sweep)
# <trial>.<attempt>.parquet or _merged.<attempt>.parquet; attempt = 20-digit ns time, '-', 8 hex digits
FILE_NAME = re.compile(r"(?P<trial>_merged|_batch|[A-Za-z0-9_-][A-Za-z0-9_.-]*)\.\d{20}-[0-9a-f]{8}\.parquet")

CURVE_SCHEMA = pa.schema([("schema_version", pa.int32()), ("sweep", pa.string()), ("trial", pa.string()),
                          ("attempt", pa.string()), ("step", pa.int64()), ("epoch", pa.float64()),
                          ("metric", pa.string()), ("value", pa.float64()), ("stage", pa.int32())])
LAYER_SCHEMA = pa.schema([("schema_version", pa.int32()), ("sweep", pa.string()), ("trial", pa.string()),
                          ("attempt", pa.string()), ("step", pa.int64()), ("layer", pa.int32()), ("head", pa.int32()),
                          ("metric", pa.string()), ("value", pa.float64()), ("stage", pa.int32())])
NOISE_SCHEMA = pa.schema([("schema_version", pa.int32()), ("sweep", pa.string()), ("trial", pa.string()),
                          ("attempt", pa.string()), ("step", pa.int64()), ("band", pa.int32()),
                          ("freq_lo", pa.float64()), ("freq_hi", pa.float64()), ("metric", pa.string()),
                          ("value", pa.float64()), ("stage", pa.int32())])
# One row per mutated key per exploit (``records.append_lineage``): ``exploit`` its order in the trial's lineage
# (0 first), ``step`` where the trial continued (its parent's checkpoint step), ``exploited_at`` the exploit's wall
# time (s since the epoch), before / after the key's values.
LINEAGE_SCHEMA = pa.schema([("schema_version", pa.int32()), ("sweep", pa.string()), ("trial", pa.string()),
                            ("attempt", pa.string()), ("exploit", pa.int32()), ("exploit_id", pa.string()),
                            ("step", pa.int64()), ("parent", pa.string()), ("exploited_at", pa.float64()),
                            ("key", pa.string()),
                            ("before", pa.float64()), ("after", pa.float64())])
SCHEMAS = {"curves": CURVE_SCHEMA, "layers": LAYER_SCHEMA, "robustness": NOISE_SCHEMA, "lineage": LINEAGE_SCHEMA}


class ResultsWarning(UserWarning):
    """A file in the results that is skipped (not the product's, or damaged)."""


def new_attempt_id() -> str:
    """Sortable and unique across processes: nanosecond time, then random bits."""
    return f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}"


def _write_atomic(table: pa.Table, path: Path) -> None:
    """Write ``table`` with the schema version in its metadata, under a temporary name renamed into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        pq.write_table(table.replace_schema_metadata({"clmim_schema_version": str(SCHEMA_VERSION)}), tmp)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# ------------------------------------------------------------------------------------------- manifest
@contextmanager
def _locked(sweep_dir: Path):
    """An exclusive lock on the sweep's manifest (held only while it is read, changed and replaced)."""
    sweep_dir.mkdir(parents=True, exist_ok=True)
    with open(sweep_dir / ".manifest.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _plain_schema(schema: pa.Schema) -> list[tuple[str, pa.DataType]]:
    return [(f.name, f.type) for f in schema]


def _without(schema: pa.Schema, *names: str) -> pa.Schema:
    return pa.schema([f for f in schema if f.name not in names])


# Earlier versions' long tables: v2 without the stage column, v1 layers also without step.
LONG_SCHEMAS = {"curves": [CURVE_SCHEMA, _without(CURVE_SCHEMA, "stage")],
                "layers": [LAYER_SCHEMA, _without(LAYER_SCHEMA, "stage"), _without(LAYER_SCHEMA, "stage", "step")],
                "robustness": [NOISE_SCHEMA, _without(NOISE_SCHEMA, "stage")], "lineage": [LINEAGE_SCHEMA]}
# the trials table's own columns and their types (config columns vary with the config)
TRIAL_TYPES = {"schema_version": (pa.int32(), pa.int64()), "sweep": (pa.string(),), "trial": (pa.string(),),
               "attempt": (pa.string(),), "status": (pa.string(),)}
TRIAL_NUMERIC = ("lam", "params", "train_flops_per_image", "samples_seen", "train_images", "train_flops",
                 "wall_time_s", "step", "epoch")  # and vocab.final_keys()


def file_version(path: Path) -> int:
    """The schema version in a product file's Parquet footer (read once per file: a file never changes once it is
    renamed into place, so every later query reuses it)."""
    st = os.stat(path)
    return _footer_version(str(path), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=65536)
def _footer_version(path: str, mtime_ns: int, size: int) -> int:
    return int((pq.read_schema(path).metadata or {}).get(b"clmim_schema_version", b"0"))


def migrate_table(table: str, t: pa.Table) -> pa.Table:
    """An earlier version's table in today's vocabulary and columns (``trainables/migrate.py``): trials' columns
    renamed and their objective / mix values mapped; a long table's metric names mapped and its columns those of
    today's schema (a column it lacks is null)."""
    if table == "trials":
        rows = t.to_pylist()
        for r in rows:
            r["objective"] = migrate.objective_value(r.get("objective"))
            r["mix"] = migrate.mix_label(r.get("mix"))
        return pa.Table.from_pylist([{migrate.trial_column(k): v for k, v in r.items()} for r in rows])
    schema = SCHEMAS[table]
    if "metric" not in schema.names:  # (lineage: written from version 4 on, nothing to map)
        return t
    metric = pa.array([migrate.metric(m) for m in t.column("metric").to_pylist()], pa.string())
    cols = {f.name: (metric if f.name == "metric" else t.column(f.name).cast(f.type) if f.name in t.column_names
                     else pa.nulls(len(t), f.type)) for f in schema}
    return pa.table(cols, schema=schema)


def read_table(table: str, path: Path) -> pa.Table:
    """One product file of ``table``, in today's vocabulary (an earlier version's migrated: ``migrate_table``)."""
    t = pq.read_table(path)
    return t if file_version(path) >= SCHEMA_VERSION else migrate_table(table, t)


def _is_product_file(path: Path, table: str | None = None, sweep: str | None = None) -> bool:
    """A name the product writes and a Parquet footer carrying our schema version; given ``table`` and ``sweep``
    (a sweep read without a valid manifest, so without its list of files), also the table's schema, and rows of
    that sweep only (and of the trial the file is named for)."""
    if not FILE_NAME.fullmatch(path.name):
        return False
    try:
        schema = pq.read_schema(path)
    except Exception:  # noqa: BLE001 - not Parquet, truncated, unreadable
        return False
    if (schema.metadata or {}).get(b"clmim_schema_version") not in READABLE_VERSIONS:
        return False
    if table is None:
        return True
    if table in LONG_SCHEMAS:
        if _plain_schema(schema) not in [_plain_schema(x) for x in LONG_SCHEMAS[table]]:
            return False
    else:
        types = {f.name: f.type for f in schema}
        if any(types.get(k) not in ok for k, ok in TRIAL_TYPES.items()):
            return False
        if any(k in types and not (pa.types.is_floating(types[k]) or pa.types.is_integer(types[k])
                                   or pa.types.is_null(types[k])) for k in (*TRIAL_NUMERIC, *final_keys())):
            return False
    try:
        ids = pq.read_table(path, columns=["sweep", "trial"])
    except Exception:  # noqa: BLE001
        return False
    if set(ids.column("sweep").to_pylist()) - {sweep}:
        return False
    named = FILE_NAME.fullmatch(path.name).group("trial")
    return path.name.startswith((MERGED_PREFIX, BATCH_PREFIX)) or not set(ids.column("trial").to_pylist()) - {named}


def _scan(sweep_dir: Path) -> dict:
    """A manifest built from what is on disk (a sweep written before manifests, or with a damaged one): only files
    named, typed and filled as the product writes them; each other file is skipped with a warning naming it."""
    current = {}
    for t in TABLES:
        d = sweep_dir / t
        current[t] = []
        for f in sorted(d.glob("*.parquet")) if d.is_dir() else []:
            if _is_product_file(f, t, sweep_dir.name):
                current[t].append(f.name)
            elif not f.name.startswith(MERGED_PREFIX):  # (a merge interrupted before it was listed: harmless)
                warnings.warn(f"skipped {f}: not a clmim results file of sweep {sweep_dir.name}", ResultsWarning,
                              stacklevel=3)
    return {"schema_version": SCHEMA_VERSION, "current": current, "retired": {}, "scanned": True}


def _entry_ok(table: str, name) -> bool:
    """A manifest entry is a plain file name of the product's pattern inside its table folder; nothing else is ever
    read or deleted (a listed ``../x`` or ``/abs/x`` could reach any file)."""
    return table in TABLES and isinstance(name, str) and FILE_NAME.fullmatch(name) is not None


def read_manifest(sweep_dir: Path) -> dict | None:
    """The sweep's manifest ({"current": {table: [file names]}, "retired": {"table/name": time}}), or None (missing
    or not a manifest: read the files on disk). Entries that are not plain product file names inside their table
    folder are dropped with a warning naming them."""
    path = Path(sweep_dir) / "manifest.json"
    try:
        m = read_json(path)
    except DamagedFile as e:
        warnings.warn(f"{e}; reading the files on disk instead", ResultsWarning, stacklevel=2)
        return None
    if m is None:
        return None
    if not (isinstance(m, dict) and isinstance(m.get("current"), dict)
            and all(isinstance(m["current"].get(t, []), list) for t in TABLES)
            and isinstance(m.get("retired", {}), dict)):
        warnings.warn(f"{path}: not a clmim manifest; reading the files on disk instead", ResultsWarning,
                      stacklevel=2)
        return None
    bad = []
    current = {}
    for t, names in m["current"].items():
        if t not in TABLES:
            bad.append(repr(t))
            continue
        current[t] = [n for n in names if _entry_ok(t, n)]
        bad += [repr(n) for n in names if not _entry_ok(t, n)]
    retired = {}
    for key, when in m.get("retired", {}).items():
        t, _, n = key.partition("/") if isinstance(key, str) else ("", "", "")
        if _entry_ok(t, n) and isinstance(when, (int, float)):
            retired[key] = when
        else:
            bad.append(repr(key))
    if bad:
        warnings.warn(f"{path}: ignored {len(bad)} entr{'y' if len(bad) == 1 else 'ies'} that are not clmim file "
                      f"names in their table folder ({', '.join(b[:60] for b in bad[:3])})", ResultsWarning,
                      stacklevel=2)
    return {"schema_version": m.get("schema_version"), "current": current, "retired": retired}


def _change_manifest(sweep_dir: Path, add: dict[str, list[str]] | None = None,
                     retire: dict[str, list[str]] | None = None) -> dict:
    """Add files to and retire files from the manifest, atomically; delete files retired over GRACE_S ago, and
    merged files no manifest lists (a merge killed before it listed its file). Call with the lock held."""
    m = read_manifest(sweep_dir) or _scan(sweep_dir)
    m.pop("scanned", None)
    now = time.time()
    for t, names in (add or {}).items():
        cur = m["current"].setdefault(t, [])
        cur += [n for n in names if n not in cur]
    for t, names in (retire or {}).items():
        gone = set(names)
        m["current"][t] = [n for n in m["current"].get(t, []) if n not in gone]
        m["retired"].update({f"{t}/{n}": now for n in names})
    for key, when in list(m["retired"].items()):
        if now - when > GRACE_S:
            (sweep_dir / key).unlink(missing_ok=True)  # (a validated table/name: see read_manifest)
            del m["retired"][key]
    known = {f"{t}/{n}" for t in TABLES for n in m["current"].get(t, [])} | set(m["retired"])
    for t in TABLES:
        d = sweep_dir / t
        for f in d.glob("*.parquet") if d.is_dir() else []:
            if f"{t}/{f.name}" in known or not FILE_NAME.fullmatch(f.name):
                continue
            # left by a write killed before it listed its files: merges run under this lock (nobody is writing
            # one now); an attempt's writer lists its files within seconds
            if f.name.startswith(MERGED_PREFIX) or now - f.stat().st_mtime > GRACE_S:
                f.unlink(missing_ok=True)
    write_json_atomic(sweep_dir / "manifest.json", m)
    return m


def snapshot(root: Path) -> dict[str, list[Path]]:
    """Current Parquet files of each table over every sweep under ``root``: one manifest read per sweep.

    Files in a table folder that are neither current, retired nor temporary are not the product's: each is
    skipped with a ``ResultsWarning`` naming it. A listed file that is missing (deleted by hand) is skipped with a
    warning naming the sweep and the file; the other files and sweeps still answer."""
    files: dict[str, list[Path]] = {t: [] for t in TABLES}
    for sweep_dir in list_sweeps(root):
        m = read_manifest(sweep_dir)
        if m is None:
            m = _scan(sweep_dir)
        known = {f"{t}/{n}" for t in TABLES for n in m["current"].get(t, [])} | set(m["retired"])
        missing, unlisted = [], []
        for t in TABLES:
            for n in m["current"].get(t, []):
                f = sweep_dir / t / n
                if f.is_file():
                    files[t].append(f)
                else:
                    missing.append(f"{t}/{n}")
            d = sweep_dir / t
            for f in (d.iterdir() if d.is_dir() and not m.get("scanned") else []):
                if f.name.startswith(".") or f"{t}/{f.name}" in known:
                    continue
                if FILE_NAME.fullmatch(f.name) and _is_product_file(f):
                    # being written (listed within seconds), or left by a write that was killed: never read; the
                    # next change of the sweep's tables removes it
                    if f.name.startswith(MERGED_PREFIX) or time.time() - f.stat().st_mtime <= GRACE_S:
                        continue
                    unlisted.append(f"{t}/{f.name}")
                    continue
                warnings.warn(f"skipped {f}: not a clmim results file", ResultsWarning, stacklevel=2)
        if unlisted:
            warnings.warn(f"sweep {sweep_dir.name}: skipped {len(unlisted)} file(s) a killed write left unlisted "
                          f"({', '.join(unlisted[:2])}); `clmim results rebuild {sweep_dir.name}` removes them",
                          ResultsWarning, stacklevel=2)
        if missing:
            warnings.warn(f"sweep {sweep_dir.name}: {len(missing)} listed file(s) missing ({', '.join(missing[:3])}); "
                          f"their rows are left out (restore them, or run: clmim results rebuild {sweep_dir.name})",
                          ResultsWarning, stacklevel=2)
    return files


# ------------------------------------------------------------------------------------------- rows
def _num(v) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v) if math.isfinite(float(v)) else None


def trial_row(sweep: str, trial: str, attempt: str, status: str, config: dict, final: dict,
              error: str | None = None, wall_time_s: float | None = None,
              source: dict | None = None) -> dict[str, Any]:
    """The one-row summary of a trial attempt: ids, status, flattened config, size, final metrics.
    A config value the trial's config does not hold is null, never a default. ``source``: an analysed checkpoint's
    ``source`` (path or URI), ``source_layout`` (clmim, moco_v3, simmim, ...) and ``source_arch`` columns; one
    trained with an objective clmim does not register (no ``objective.weights``) is grouped by its layout."""
    flat = flatten(config)
    weights = weights_of(flat)
    step = int(final["step"]) if _num(final.get("step")) is not None else None
    batch = flat.get("data.batch_size")
    samples = step * int(batch) if step is not None and _num(batch) is not None else None
    flops_per_image = _num(final.get("train_flops_per_image"))
    staged = config.get("stages") if isinstance(config, dict) else None
    if staged:  # a staged run is none of its stages' objectives: its own group
        weights = None
    row = {"schema_version": SCHEMA_VERSION, "sweep": sweep, "trial": trial, "attempt": attempt,
           "written_at": time.time_ns(), "status": status, "error": error,
           "variant": flat.get("model.variant"), "lam": mix_lam(weights) if weights else None,
           "objective": "staged" if staged else objective_group(weights) if weights else None,
           "mix": staged_label(staged) if staged else objective_label(weights) if weights else None,
           **{f"w_{k}": (weights or {}).get(k, 0.0) if weights else None for k in objective_names()},
           "params": final.get("params"), "train_flops_per_image": flops_per_image, "samples_seen": samples,
           "train_images": _num(final.get("train_images")),
           "train_flops": flops_per_image * samples if flops_per_image and samples is not None else None,
           "wall_time_s": wall_time_s, "step": step, "epoch": _num(final.get("epoch"))}
    if source:
        row.update(source)
        if weights is None and not staged:  # e.g. iBOT: its own group, in no claim (no registered family)
            row.update(objective=source.get("source_layout"), mix=f"{source.get('source_layout')} (released)")
    for k in final_keys():
        row[k] = _num(final.get(k))
    for k, v in flat.items():
        row[k] = None if v is None else str(v) if isinstance(v, (list, dict)) else v
    return row


def staged_label(stages: list[dict]) -> str:
    """'staged: MAE 400 → MoCo v3 200': each stage's name (or objective) and steps, in order."""
    def one(s: dict) -> str:
        w = weights_of(flatten((s.get("resolved") or {}).get("objective") or {}, "objective"))
        if s.get("name") or not w:
            return s.get("name") or "?"
        return objective_label(w)
    return "staged: " + " → ".join(f"{one(s)} {s.get('steps')}" for s in stages)


def curves_from_results(results: list[dict]) -> list[tuple[int, float | None, str, float]]:
    """(step, epoch, metric, value) from a trial's reports; a step reported twice (a resumed attempt repeats
    the steps after its checkpoint) keeps its last value."""
    seen: dict[tuple[int, str], tuple[int, float | None, str, float]] = {}
    for r in results:
        step = r.get("step")
        if not isinstance(step, (int, float)):
            continue
        summary = "resumed_from" in r  # the final report: its step is pre-training's, fine-tuning's came after
        for k, v in r.items():
            if k in TUNE_KEYS or k in STATIC_KEYS or k in ("step", "epoch") or is_table_key(k):
                continue
            if summary and k.startswith("finetune_"):  # already a curve point at fine-tuning's own last step
                continue
            x = _num(v)
            if x is not None:
                seen[(int(step), k)] = (int(step), _num(r.get("epoch")), k, x)
    return sorted(seen.values(), key=lambda c: (c[0], c[2]))


def layers_from_results(results: list[dict]) -> list[tuple[int, int, int | None, str, float]]:
    """(step, layer, head, metric, value) from every report carrying per-layer keys ``layer/<L>[/h<H>]/<metric>``:
    the untrained encoder (step 0), every ``eval.every`` evaluation and the final one. A step reported twice
    (a resumed attempt) keeps its last report."""
    by_step: dict[int, dict] = {}
    for r in results:
        if any(k.startswith("layer/") for k in r) and _num(r.get("step")) is not None:
            by_step[int(r["step"])] = r
    rows = []
    for step, r in by_step.items():
        for k, v in r.items():
            if not k.startswith("layer/") or _num(v) is None:
                continue
            parts = k.split("/")
            head = int(parts[2][1:]) if len(parts) == 4 else None
            rows.append((step, int(parts[1]), head, parts[-1], _num(v)))
    return sorted(rows, key=lambda r: (r[0], r[1], -1 if r[2] is None else r[2], r[3]))


def noise_from_results(results: list[dict], bands: int | None) -> list[tuple[int, int, float, float, str, float]]:
    """(step, band, freq_lo, freq_hi, metric, value) from every report carrying ``noise/<band>/<metric>`` keys (the
    untrained encoder at step 0, the end of pre-training, the fine-tuned model); ``bands`` (``eval.noise.bands``)
    gives each band's angular frequency range. A key reported twice at one step keeps its last value."""
    seen: dict[tuple[int, int, str], tuple] = {}
    for r in results:
        step = _num(r.get("step"))
        for k, v in r.items():
            m = NOISE_METRIC.fullmatch(k) if isinstance(k, str) else None
            if m is None or step is None or _num(v) is None:
                continue
            band = int(m.group(1))
            lo, hi = band_edges(band, bands) if bands else (None, None)
            seen[(int(step), band, m.group(2))] = (int(step), band, lo, hi, m.group(2), _num(v))
    return sorted(seen.values(), key=lambda t: (t[0], t[1], t[4]))


def lineage_from_records(lineage: list[dict]) -> list[tuple]:
    """(exploit, exploit_id, step, parent, exploited_at, key, before, after) from a trial's ``lineage.json``
    (``records.read_lineage``): one row per mutated key of each exploit, in the order they happened."""
    rows = []
    for i, r in enumerate(lineage):
        before, after = r.get("before") or {}, r.get("after") or {}
        for k in sorted(set(before) | set(after)):
            rows.append((i, str(r.get("exploit")), int(r.get("step") or 0), r.get("parent"), _num(r.get("at")), k,
                         _num(before.get(k)), _num(after.get(k))))
    return rows


def with_stage(config: dict):
    """A function adding each long-table row's stage (its first value is the step) of a staged run
    (``config["stages"]``): the stage whose steps hold it, a stage's last step its own, step 0 (the untrained
    encoder) stage 0's, fine-tuning's steps none; every row's stage is None for an unstaged run."""
    stages = config.get("stages") if isinstance(config, dict) else None
    ends = list(itertools.accumulate(int(s["steps"]) for s in stages)) if isinstance(stages, list) else []

    def stage_of(step) -> int | None:
        if not ends or step is None or step > ends[-1]:
            return None
        return bisect.bisect_left(ends, step)  # the first stage whose end is at or after the step

    return lambda rows: [(*r, stage_of(r[0])) for r in rows]


def _long_table(schema: pa.Schema, parts: list[tuple[dict, list[tuple]]]) -> pa.Table:
    """A long table of several attempts' rows, built at once (a table per attempt costs more than its rows): for
    each (ids, rows), the id columns repeated on every row, then one column per tuple position."""
    names = [f.name for f in schema]
    cols: dict[str, list] = {name: [] for name in names}
    for ids, rows in parts:
        n = len(rows)
        for k, v in ids.items():
            cols[k] += [v] * n
        for i, name in enumerate(names[len(ids):]):
            cols[name] += [r[i] for r in rows]
    return pa.table(cols, schema=schema)


@dataclass
class Attempt:
    """One attempt's rows to write: its trial, attempt id, status and config, the reports whose long rows go in
    (``results``: all of a finished trial's, or a running trial's newest), the latest value of every key (``final``;
    default: from ``results``), its error and wall time (default: the largest ``time_total_s`` reported), and an
    analysed checkpoint's source columns."""

    trial: str
    status: str
    config: dict
    results: list[dict]
    attempt: str = field(default_factory=lambda: new_attempt_id())
    final: dict | None = None
    error: str | None = None
    wall_time_s: float | None = None
    source: dict | None = None  # an analysed checkpoint's source columns (``trial_row``)
    lineage: list[dict] = field(default_factory=list)  # a PBT trial's exploits (``records.read_lineage``)


def latest_values(results: list[dict], into: dict | None = None) -> dict:
    """The latest value of every key over ``results`` (added to ``into``)."""
    final = into if into is not None else {}
    for r in results:
        final.update({k: v for k, v in r.items() if v is not None})
    return final


def write_attempts(sweep_dir: Path, attempts: list[Attempt]) -> list[str]:
    """Write attempts of trials to trials/, curves/, layers/, robustness/ and, where any attempt has exploits,
    lineage/ (atomically; one file per table for all of them: the driver writes every trial that reported or ended
    in the last second at once), then add the files to the manifest in one step; return the attempt ids.

    Several files may hold rows of one attempt (a running trial's rows arrive batch by batch; the ``trials`` view
    keeps its latest row by ``written_at``), but never the same row twice."""
    if not attempts:
        return []
    sweep_dir = Path(sweep_dir)
    sweep = sweep_dir.name
    rows, long = [], {t: [] for t in LONG_TABLES}
    for a in attempts:
        final = a.final if a.final is not None else latest_values(a.results)
        wall = a.wall_time_s
        if wall is None:
            wall = max((r.get("time_total_s") or 0 for r in a.results), default=None)
        rows.append(trial_row(sweep, a.trial, a.attempt, a.status, a.config, final, a.error, wall, a.source))
        ids = {"schema_version": SCHEMA_VERSION, "sweep": sweep, "trial": a.trial, "attempt": a.attempt}
        staged = with_stage(a.config)
        bands = flatten(a.config).get("eval.noise.bands")
        long["curves"].append((ids, staged(curves_from_results(a.results))))
        long["layers"].append((ids, staged(layers_from_results(a.results))))
        long["robustness"].append((ids, staged(noise_from_results(a.results, bands if isinstance(bands, int)
                                                                   else None))))
        if a.lineage:
            long["lineage"].append((ids, lineage_from_records(a.lineage)))
    # (a new id in the name: a running trial's attempt is written batch by batch, each batch its own file)
    name = (f"{attempts[0].trial}." if len(attempts) == 1 else BATCH_PREFIX) + f"{new_attempt_id()}.parquet"
    written = ["trials", *(t for t, parts in long.items() if parts or t != "lineage")]
    for t, parts in long.items():
        if t in written:
            _write_atomic(_long_table(SCHEMAS[t], parts), sweep_dir / t / name)
    # A config key that is null in every row here is typed by DuckDB from the files that set it.
    keys = list(dict.fromkeys(k for r in rows for k in r))  # (from_pylist reads the first row's keys only)
    _write_atomic(pa.Table.from_pylist([{k: r.get(k) for k in keys} for r in rows]), sweep_dir / "trials" / name)
    with _locked(sweep_dir):  # readers see every file of the batch, or none
        _change_manifest(sweep_dir, add={t: [name] for t in written})
    return [a.attempt for a in attempts]


def write_trial_tables(sweep_dir: Path, trial: str, status: str, config: dict, results: list[dict],
                       error: str | None = None, wall_time_s: float | None = None,
                       attempt: str | None = None, lineage: list[dict] | None = None) -> str:
    """Write one attempt of one trial (``write_attempts``); return its attempt id."""
    a = Attempt(trial, status, config, results, error=error, wall_time_s=wall_time_s, lineage=list(lineage or []))
    if attempt:
        a.attempt = attempt
    return write_attempts(sweep_dir, [a])[0]


def write_scaling(sweep_dir: Path, table: Any, x: str, y: str, fitted: str) -> Path:
    """Save a sweep's power-law fits (``scaling.scaling_table``) as ``scaling_<x>_<y>.parquet`` beside its tables."""
    path = Path(sweep_dir) / f"scaling_{x}_{y}.parquet"
    _write_atomic(pa.Table.from_pandas(table.assign(x=x, y=y, fitted=fitted), preserve_index=False), path)
    return path


def compact(sweep_dir: Path, batch: int | None = None) -> int:
    """Merge a sweep's Parquet files, per table, so that queries read few files; return the number merged.

    ``batch=None`` (the driver, when a sweep ends): every current file of a table, merged files included, into
    one. ``batch=N`` (the driver, whenever a trial finishes): only per-attempt files, N at a time, each group
    into a new merged file, leaving fewer than N; merged files are never rewritten. A running sweep of n trials
    then has at most N + n / N files per table instead of n.

    The merged files replace their originals in the manifest in one step; the originals are deleted by a later
    manifest change once ``GRACE_S`` has passed, so a reader holding an older snapshot can still read them.
    """
    sweep_dir = Path(sweep_dir)
    merged_files = 0
    with _locked(sweep_dir):
        m = read_manifest(sweep_dir) or _scan(sweep_dir)
        add: dict[str, list[str]] = {}
        retire: dict[str, list[str]] = {}
        for table in TABLES:
            files = sorted(m["current"].get(table, []))
            if batch is None:
                groups = [files] if len(files) > 1 else []
            else:
                small = [f for f in files if not f.startswith(MERGED_PREFIX)]
                groups = [small[i:i + batch] for i in range(0, len(small) - batch + 1, batch)]
            for group in groups:
                merged = pa.concat_tables([read_table(table, sweep_dir / table / f) for f in group],
                                          promote_options="permissive")
                name = f"{MERGED_PREFIX}{new_attempt_id()}.parquet"
                _write_atomic(merged, sweep_dir / table / name)
                add.setdefault(table, []).append(name)
                retire.setdefault(table, []).extend(group)
                merged_files += len(group)
        _change_manifest(sweep_dir, add, retire)
    return merged_files


def _dir_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in d.rglob("*") if f.is_file() and not f.is_symlink())


def storage_bytes(layout: SweepLayout) -> dict[str, int]:
    """Bytes the sweep takes: on the driver (tables, reports; the trial files too when the storage is the results
    root), in its separate storage, and of its trials' checkpoints (full ones and the final weights exports)."""
    local = _dir_bytes(layout.sweep_dir) if layout.sweep_dir.is_dir() else 0
    try:
        trials = layout.trials()  # one listing of the storage, used for both sums
        stored = layout.store.size(layout.experiment_path) if layout.storage else 0
        ckpt = sum(layout.store.size(p) for t in trials for p in layout.checkpoint_paths(t))
        ckpt += sum(layout.store.size(f"{layout.run_path(t)}/model.pt") for t in trials)
    except OSError:  # storage unreachable right now: show what is known
        trials, stored, ckpt = [], 0, 0
    return {"driver": local, "storage": stored, "checkpoints": ckpt, "trials": len(trials)}


def total_bytes(layout: SweepLayout) -> int:
    b = storage_bytes(layout)
    return b["driver"] + b["storage"]


