"""Results tables: Parquet files per trial attempt, and read-only SQL views over every sweep (DuckDB).

Layout (schema version ``SCHEMA_VERSION``; columns documented in the README)::

    <results>/<sweep>/trials/<trial>.<attempt>.parquet   one row per trial attempt
    <results>/<sweep>/curves/<trial>.<attempt>.parquet   long: step, epoch, metric, value
    <results>/<sweep>/layers/<trial>.<attempt>.parquet   long: layer, head (nullable), metric, value

Every file is written under a temporary name and renamed into place, so readers never see a partial file and
concurrent writers never clobber each other (attempt ids are unique). The views keep only the latest attempt of
each (sweep, trial), so a re-run attempt supersedes the earlier one.
"""

from __future__ import annotations

import json
import math
import os
import time
import uuid
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from trainables.config import flatten

SCHEMA_VERSION = 1
TABLES = ("trials", "curves", "layers")
# Scalars a trial reports that are not curves (constant per trial or evaluation-only).
STATIC_KEYS = {"params", "train_flops_per_image", "total_steps", "world_size", "device", "resumed_from",
               "replicas_in_sync"}
FINAL_KEYS = ["loss", "loss_mim", "loss_cl", "knn_top1", "linear_top1", "shape_bias", "images_per_s"]
TUNE_KEYS = {"timestamp", "checkpoint_dir_name", "done", "training_iteration", "trial_id", "date", "time_this_iter_s",
             "time_total_s", "pid", "hostname", "node_ip", "config", "time_since_restore", "iterations_since_restore",
             "experiment_tag", "checkpoint_path", "should_checkpoint"}

CURVE_SCHEMA = pa.schema([("schema_version", pa.int32()), ("sweep", pa.string()), ("trial", pa.string()),
                          ("attempt", pa.string()), ("step", pa.int64()), ("epoch", pa.float64()),
                          ("metric", pa.string()), ("value", pa.float64())])
LAYER_SCHEMA = pa.schema([("schema_version", pa.int32()), ("sweep", pa.string()), ("trial", pa.string()),
                          ("attempt", pa.string()), ("layer", pa.int32()), ("head", pa.int32()),
                          ("metric", pa.string()), ("value", pa.float64())])


def objective_group(lam: float) -> str:
    """'mim' (lam = 0), 'cl' (lam = 1) or 'hybrid'."""
    return "mim" if lam == 0 else "cl" if lam == 1 else "hybrid"


def new_attempt_id() -> str:
    """Sortable and unique across processes: nanosecond time, then random bits."""
    return f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}"


def _write_atomic(table: pa.Table, path: Path) -> None:
    """Write ``table`` with the schema version in its metadata, under a temporary name renamed into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    pq.write_table(table.replace_schema_metadata({"clmim_schema_version": str(SCHEMA_VERSION)}), tmp)
    os.replace(tmp, path)


def _num(v) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v) if math.isfinite(float(v)) else None


def trial_row(sweep: str, trial: str, attempt: str, status: str, config: dict, final: dict,
              error: str | None = None, wall_time_s: float | None = None) -> dict[str, Any]:
    """The one-row summary of a trial attempt: ids, status, flattened config, size, final metrics."""
    flat = flatten(config)
    lam = float(flat.get("objective.lam", 0.0))
    step = int(final["step"]) if isinstance(final.get("step"), (int, float)) else None
    samples = step * int(flat.get("data.batch_size", 0)) if step is not None else None
    flops_per_image = _num(final.get("train_flops_per_image"))
    row = {"schema_version": SCHEMA_VERSION, "sweep": sweep, "trial": trial, "attempt": attempt,
           "written_at": time.time_ns(), "status": status, "error": error,
           "variant": flat.get("model.variant"), "lam": lam, "objective": objective_group(lam),
           "params": final.get("params"), "train_flops_per_image": flops_per_image, "samples_seen": samples,
           "train_flops": flops_per_image * samples if flops_per_image and samples is not None else None,
           "wall_time_s": wall_time_s, "step": step, "epoch": _num(final.get("epoch"))}
    for k in FINAL_KEYS:
        row[k] = _num(final.get(k))
    for k, v in flat.items():
        row[k] = None if v is None else str(v) if isinstance(v, (list, dict)) else v
    return row


def curves_from_results(results: list[dict]) -> list[tuple[int, float | None, str, float]]:
    """(step, epoch, metric, value) from a trial's reports; a step reported twice (a resumed attempt repeats
    the steps after its checkpoint) keeps its last value."""
    seen: dict[tuple[int, str], tuple[int, float | None, str, float]] = {}
    for r in results:
        step = r.get("step")
        if not isinstance(step, (int, float)):
            continue
        for k, v in r.items():
            if k in TUNE_KEYS or k in STATIC_KEYS or k in ("step", "epoch") or k.startswith("layer/"):
                continue
            x = _num(v)
            if x is not None:
                seen[(int(step), k)] = (int(step), _num(r.get("epoch")), k, x)
    return sorted(seen.values(), key=lambda c: (c[0], c[2]))


def layers_from_results(results: list[dict]) -> list[tuple[int, int | None, str, float]]:
    """(layer, head, metric, value) from the last report carrying per-layer keys ``layer/<L>[/h<H>]/<metric>``."""
    last = next((r for r in reversed(results) if any(k.startswith("layer/") for k in r)), None)
    rows = []
    for k, v in (last or {}).items():
        if not k.startswith("layer/") or _num(v) is None:
            continue
        parts = k.split("/")
        head = int(parts[2][1:]) if len(parts) == 4 else None
        rows.append((int(parts[1]), head, parts[-1], _num(v)))
    return sorted(rows, key=lambda r: (r[0], -1 if r[1] is None else r[1], r[2]))


def _long_table(schema: pa.Schema, ids: dict, rows: list[tuple]) -> pa.Table:
    """A long table: the id columns repeated on every row, then one column per tuple position."""
    n = len(rows)
    cols = {k: [v] * n for k, v in ids.items()}
    value_names = [f.name for f in schema][len(ids):]
    cols.update({name: [r[i] for r in rows] for i, name in enumerate(value_names)})
    return pa.table(cols, schema=schema)


def write_trial_tables(sweep_dir: Path, trial: str, status: str, config: dict, results: list[dict],
                       error: str | None = None, wall_time_s: float | None = None,
                       attempt: str | None = None) -> str:
    """Write one attempt of one trial to trials/, curves/ and layers/ (atomically); return the attempt id.

    ``wall_time_s`` defaults to the largest ``time_total_s`` Tune reported."""
    sweep = sweep_dir.name
    attempt = attempt or new_attempt_id()
    final: dict = {}
    for r in results:  # the latest value of every key
        final.update({k: v for k, v in r.items() if v is not None})
    if wall_time_s is None:
        wall_time_s = max((r.get("time_total_s") or 0 for r in results), default=None)
    row = trial_row(sweep, trial, attempt, status, config, final, error, wall_time_s)
    name = f"{trial}.{attempt}.parquet"
    ids = {"schema_version": SCHEMA_VERSION, "sweep": sweep, "trial": trial, "attempt": attempt}
    _write_atomic(_long_table(CURVE_SCHEMA, ids, curves_from_results(results)), sweep_dir / "curves" / name)
    _write_atomic(_long_table(LAYER_SCHEMA, ids, layers_from_results(results)), sweep_dir / "layers" / name)
    # The trials row goes last: a reader that sees it also sees the attempt's curves and layers.
    # A config key that is null in this one-row table is typed by DuckDB from the attempts that set it.
    _write_atomic(pa.Table.from_pylist([row]), sweep_dir / "trials" / name)
    return attempt


def read_result_json(trial_dir: Path) -> list[dict]:
    """Tune's per-trial results (one JSON object per report); a torn last line is skipped."""
    f = trial_dir / "result.json"
    out = []
    if f.is_file():
        for line in f.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def read_error(trial_dir: Path) -> str | None:
    """"Type: message" of the error a trial recorded in its ``error.json``, or None."""
    f = trial_dir / "error.json"
    if not f.is_file():
        return None
    err = json.loads(f.read_text())
    return f"{err['type']}: {err['message']}"


def trial_config_from_dir(trial_dir: Path) -> dict:
    """The resolved config the trial saved (run/config.yaml), else Tune's params.json values."""
    import yaml

    f = trial_dir / "run" / "config.yaml"
    if f.is_file():
        return yaml.safe_load(f.read_text())
    p = trial_dir / "params.json"
    return json.loads(p.read_text()) if p.is_file() else {}


def rebuild(sweep_dir: Path) -> int:
    """Rebuild the Parquet tables of a sweep from Tune's trial directories; return the number of trials.

    Status comes from Tune's saved experiment state when present; a trial with an ``error.json`` is ERROR.
    """
    tune_dir = sweep_dir / "tune"
    if not tune_dir.is_dir():
        raise FileNotFoundError(f"no Tune experiment under {sweep_dir}")
    statuses = {}
    try:
        from ray.tune import ExperimentAnalysis

        statuses = {t.trial_id: t.status for t in ExperimentAnalysis(str(tune_dir)).trials}
    except Exception:  # noqa: BLE001 - state file missing or unreadable: fall back to the trial dirs
        pass
    n = 0
    for d in sorted(p for p in tune_dir.iterdir() if p.is_dir()):
        results, err = read_result_json(d), read_error(d)
        if not results and not err:
            continue
        done = any(r.get("done") for r in results)
        status = "ERROR" if err else statuses.get(d.name, "TERMINATED" if done else "PENDING")
        write_trial_tables(sweep_dir, d.name, status, trial_config_from_dir(d), results, error=err)
        n += 1
    compact(sweep_dir)
    return n


MERGED_PREFIX = "_merged."
COMPACT_BATCH = 64  # per-attempt files merged at a time while a sweep runs (~sqrt of a big sweep)


def compact(sweep_dir: Path, batch: int | None = None) -> int:
    """Merge a sweep's Parquet files, per table, so that queries read few files; return the number merged.

    ``batch=None`` (the driver, when a sweep ends): every file of a table, merged files included, into one.
    ``batch=N`` (the driver, whenever a trial finishes): only per-attempt files, N at a time, each group into a
    new merged file, leaving fewer than N; merged files are never rewritten. A running sweep of n trials then has
    at most N + n / N files per table instead of n.

    Each merged file is written atomically before its originals are removed, so no row is ever missing (for a
    moment a reader may see a row twice).
    """
    merged_files = 0
    for table in TABLES:
        files = sorted((Path(sweep_dir) / table).glob("*.parquet"))
        if batch is None:
            groups = [files] if len(files) > 1 else []
        else:
            small = [f for f in files if not f.name.startswith(MERGED_PREFIX)]
            groups = [small[i:i + batch] for i in range(0, len(small) - batch + 1, batch)]
        for group in groups:
            merged = pa.concat_tables([pq.read_table(f) for f in group], promote_options="permissive")
            _write_atomic(merged, Path(sweep_dir) / table / f"{MERGED_PREFIX}{new_attempt_id()}.parquet")
            for f in group:
                f.unlink()
            merged_files += len(group)
    return merged_files


# ------------------------------------------------------------------------------------------- queries
def _glob(root: Path, table: str) -> str:
    return str(root / "*" / table / "*.parquet")


def connect(root: str | Path):
    """A DuckDB connection with views ``trials``, ``curves``, ``layers`` over every sweep under ``root``."""
    import duckdb

    root = Path(root)
    con = duckdb.connect(":memory:")
    has = {t: any(root.glob(f"*/{t}/*.parquet")) for t in TABLES}
    if has["trials"]:
        con.execute(f"""CREATE VIEW trials AS
            SELECT * EXCLUDE (rn) FROM (
              SELECT *, row_number() OVER (PARTITION BY sweep, trial ORDER BY attempt DESC) AS rn
              FROM read_parquet('{_glob(root, 'trials')}', union_by_name = true)) WHERE rn = 1""")
    else:
        con.execute("CREATE VIEW trials AS SELECT NULL::INTEGER AS schema_version, NULL::VARCHAR AS sweep, "
                    "NULL::VARCHAR AS trial, NULL::VARCHAR AS attempt, NULL::VARCHAR AS status WHERE false")
    for t, schema in (("curves", CURVE_SCHEMA), ("layers", LAYER_SCHEMA)):
        if has[t] and has["trials"]:
            con.execute(f"""CREATE VIEW {t} AS SELECT x.* FROM read_parquet('{_glob(root, t)}') x
                JOIN (SELECT sweep, trial, attempt FROM trials) USING (sweep, trial, attempt)""")
        else:
            cols = ", ".join(f"NULL::{_duck(f.type)} AS {f.name}" for f in schema)
            con.execute(f"CREATE VIEW {t} AS SELECT {cols} WHERE false")
    return con


def _duck(t: pa.DataType) -> str:
    return {pa.int32(): "INTEGER", pa.int64(): "BIGINT", pa.float64(): "DOUBLE"}.get(t, "VARCHAR")


class QueryError(ValueError):
    """A query that is not a single read-only SELECT, or that DuckDB rejects."""


def query(sql: str, root: str | Path, params: list | None = None):
    """Run one read-only SQL statement over the views (``?`` placeholders bound to ``params``); return a pandas
    DataFrame."""
    import duckdb

    con = connect(root)
    try:
        statements = con.extract_statements(sql)
    except duckdb.Error as e:
        raise QueryError(f"query: {str(e).splitlines()[0]}") from None
    if len(statements) != 1 or statements[0].type != duckdb.StatementType.SELECT:
        raise QueryError("query: only a single SELECT statement is allowed (results are read-only)")
    try:
        return con.execute(sql, params).df()
    except duckdb.Error as e:
        raise QueryError(f"query: {str(e).splitlines()[0]}") from None


def relation(table: str, root: str | Path):
    """A DuckDB relation for one view (``trials``, ``curves`` or ``layers``)."""
    if table not in TABLES:
        raise QueryError(f"table: {table!r} is not one of {TABLES}")
    return connect(root).table(table)


def show(name: str, root: str | Path) -> list[tuple[str, object]]:
    """Summary tables of one sweep: status counts, best trial per objective and variant, failed trials."""
    root = Path(root)
    if not (root / name).is_dir():
        raise QueryError(f"sweep {name!r} not found under {root}")
    con = connect(root)
    if not con.execute("SELECT count(*) FROM trials WHERE sweep = ?", [name]).fetchone()[0]:
        raise QueryError(f"sweep {name!r} has no results yet (try `clmim results rebuild {name}`)")
    out = [("status", con.execute("SELECT status, count(*) AS trials FROM trials WHERE sweep = ? "
                                  "GROUP BY status ORDER BY status", [name]).df())]
    cols = {r[0] for r in con.execute("DESCRIBE trials").fetchall()}
    metric = "linear_top1" if "linear_top1" in cols else "loss"
    order = "DESC" if metric != "loss" else "ASC"
    out.append((f"best {metric} per objective and variant", con.execute(f"""
        SELECT objective, variant, lam, trial, {metric}, knn_top1, step, wall_time_s FROM (
          SELECT *, row_number() OVER (PARTITION BY objective, variant ORDER BY {metric} {order} NULLS LAST) AS r
          FROM trials WHERE sweep = ? AND status = 'TERMINATED') WHERE r = 1 ORDER BY variant, lam""",
                                                                   [name]).df()))
    failed = con.execute("SELECT trial, status, error FROM trials WHERE sweep = ? AND status <> 'TERMINATED' "
                         "ORDER BY trial", [name]).df()
    if len(failed):
        out.append(("failed or unfinished trials", failed))
    return out
