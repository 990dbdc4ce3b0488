"""The query layer: read-only SQL over the results tables (DuckDB), and the frames the analysis reads.

``connect`` opens a locked-down DuckDB connection with views ``trials``, ``curves``, ``layers``, ``robustness`` and
``lineage`` over every sweep under a results root, reading one snapshot of the store's files (``results.snapshot``:
no file vanishes under a query and no row appears twice). File access is limited to the sweeps' table folders, no
extension is installed or loaded, the configuration is locked, and paths never go into SQL text. Nothing here writes.
``sweep_frames`` is the one place the analysis's inputs are selected (what ``clmim results show``, ``clmim report``
and ``benchmarks/repro_claims.py`` read).
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import duckdb
import pandas as pd
import pyarrow as pa

from trainables import migrate
from trainables.errors import UserError
from trainables.vocab import EARLY_SIGNALS as SIGNALS
from trainables.vocab import metric_mode

from . import records, sweep_record
from .layout import SweepLayout, check_root, list_sweeps
from .results import (
    SCHEMA_VERSION,
    SCHEMAS,
    TABLES,
    file_version,
    read_table,
    snapshot,
    total_bytes,
)
from .scaling import with_mix


class QueryError(UserError):
    """A query that is not a single read-only SELECT, or that DuckDB rejects; a sweep without results."""




def _empty_view(con, name: str, schema: pa.Schema) -> None:
    cols = ", ".join(f"NULL::{_duck(f.type)} AS {f.name}" for f in schema)
    con.execute(f"CREATE VIEW {name} AS SELECT {cols} WHERE false")


TRIALS_EMPTY = pa.schema([("schema_version", pa.int32()), ("sweep", pa.string()), ("trial", pa.string()),
                          ("attempt", pa.string()), ("status", pa.string())])


@dataclass
class _Db:
    con: duckdb.DuckDBPyConnection
    kept: bool = False  # ``trials`` copied into a table (done when a second query reads the same snapshot)


_OPEN: OrderedDict[tuple, _Db] = OrderedDict()  # snapshot -> its database (most recently used last)
_OPEN_MAX = 4
_OPEN_LOCK = threading.Lock()
_INHERITED: list = []


def _forget_after_fork() -> None:
    """A forked child starts with no database: its parent's DuckDB threads did not come along, so it must neither
    use nor destroy (a destructor would wait for them) the instances it inherited; they are kept, unused."""
    global _OPEN, _OPEN_LOCK
    _INHERITED.append(_OPEN)
    _OPEN, _OPEN_LOCK = OrderedDict(), threading.Lock()


os.register_at_fork(after_in_child=_forget_after_fork)


def connect(root: str | Path):
    """A locked-down DuckDB connection with views ``trials``, ``curves``, ``layers``, ``robustness``, ``lineage``
    over every sweep under ``root``, reading one consistent snapshot of the files (see the module docstring).

    The database of a snapshot is kept (the last few): the next query of an unchanged root (a finished sweep;
    ``results show`` and the report ask several) gets a new cursor on it instead of a new DuckDB instance and the
    files' footers again, and from that second query on ``trials`` (one row per trial: small, read by nearly every
    query and join) is a table in memory rather than a view over the files. Product files never change once
    listed (a write or a merge lists new names), so the snapshot's file names are the key. A one-off query
    (``clmim results query``) pays for neither."""
    root = check_root(Path(root))
    files = snapshot(root)
    key = (str(root), tuple((t, tuple(str(f) for f in fs)) for t, fs in sorted(files.items())))
    with _OPEN_LOCK:
        db = _OPEN.get(key)
        if db is not None:
            _OPEN.move_to_end(key)
            if not db.kept and files["trials"]:
                _keep_trials(db.con, root)
                db.kept = True
            return db.con.cursor()
    con = _open(root, files)
    with _OPEN_LOCK:
        _OPEN[key] = _Db(con)
        while len(_OPEN) > _OPEN_MAX:  # (a dropped database closes once no cursor of it is left)
            _OPEN.popitem(last=False)
    return con.cursor()


def _open(root: Path, files: dict[str, list[Path]]):
    """The snapshot's database: ``trials`` a view of each trial's latest attempt, the long tables views over their
    files joined to it."""
    # no temp directory: DuckDB would otherwise allow reading its default one (<cwd>/.tmp) whatever the settings
    con = duckdb.connect(":memory:", config={"autoinstall_known_extensions": False,
                                             "autoload_known_extensions": False, "temp_directory": ""})
    try:
        if files["trials"]:
            _view(con, "trials_all", "trials", files["trials"])
            con.execute("""CREATE VIEW trials_latest AS SELECT * EXCLUDE (rn) FROM (
                  SELECT *, row_number() OVER (PARTITION BY sweep, trial ORDER BY attempt DESC, written_at DESC) AS rn
                  FROM trials_all) WHERE rn = 1""")
            con.execute("CREATE VIEW trials AS SELECT * FROM trials_latest")
        else:
            _empty_view(con, "trials", TRIALS_EMPTY)
        for t, schema in SCHEMAS.items():
            if files[t] and files["trials"]:
                _view(con, f"{t}_all", t, files[t])
                con.execute(f"""CREATE VIEW {t} AS SELECT x.* FROM {t}_all x
                    JOIN (SELECT sweep, trial, attempt FROM trials) USING (sweep, trial, attempt)""")
            else:
                _empty_view(con, t, schema)
    except duckdb.Error as e:  # a file that vanished or broke after the snapshot was taken
        raise _unreadable(root, e) from None
    # From here on, DuckDB may read only the table folders of these sweeps: no other file, no network, no
    # extension, and the settings cannot be changed back by a query.
    dirs = sorted({str(f.parent) + "/" for fs in files.values() for f in fs})  # (validated names: table folders)
    con.execute("SET allowed_directories = ?", [dirs])
    con.execute("SET enable_external_access = false")
    con.execute("SET lock_configuration = true")
    return con


def _keep_trials(con, root: Path) -> None:
    """``trials`` from a view over the files to a table (the views over it follow: they name it)."""
    try:
        con.execute("CREATE TABLE trials_kept AS SELECT * FROM trials_latest")
        con.execute("CREATE OR REPLACE VIEW trials AS SELECT * FROM trials_kept")
    except duckdb.Error as e:
        raise _unreadable(root, e) from None


def _unreadable(root: Path, e: Exception) -> QueryError:
    """A file that vanished or broke after the snapshot was taken."""
    return QueryError(f"results: cannot read the tables under {root} ({str(e).splitlines()[0][:300]}); "
                      "try again, or run: clmim results rebuild SWEEP")


def _view(con, name: str, table: str, files: list[Path]) -> None:
    """A view ``name`` over ``table``'s files: today's read by DuckDB as they are, an earlier version's migrated
    (``read_table``) and copied in (a registered Arrow table would be seen by this connection alone, not by the
    cursors of later queries)."""
    old = [f for f in files if file_version(f) < SCHEMA_VERSION]
    earlier = set(old)
    new = [str(f) for f in files if f not in earlier]
    parts = []
    if new:
        con.read_parquet(new, union_by_name=table == "trials").create_view(f"{name}_new")
        parts.append(f"SELECT * FROM {name}_new")
    if old:
        con.register(f"{name}_arrow", pa.concat_tables([read_table(table, f) for f in old],
                                                      promote_options="permissive"))
        con.execute(f"CREATE TABLE {name}_old AS SELECT * FROM {name}_arrow")
        con.unregister(f"{name}_arrow")
        parts.append(f"SELECT * FROM {name}_old")
    con.execute(f"CREATE VIEW {name} AS " + " UNION ALL BY NAME ".join(parts))


def _duck(t: pa.DataType) -> str:
    return {pa.int32(): "INTEGER", pa.int64(): "BIGINT", pa.float64(): "DOUBLE"}.get(t, "VARCHAR")


QUERY_TIMEOUT_S = 60.0  # `clmim results query --timeout` raises it


def query(sql: str, root: str | Path, params: list | None = None, timeout: float | None = QUERY_TIMEOUT_S):
    """Run one read-only SQL statement over the views (``?`` placeholders bound to ``params``); return a pandas
    DataFrame. A query still running after ``timeout`` seconds (None: no limit) is stopped: a ``QueryError``."""
    con = connect(root)
    try:
        statements = con.extract_statements(sql)
    except duckdb.Error as e:
        raise QueryError(f"query: {str(e).splitlines()[0]}") from None
    if len(statements) != 1 or statements[0].type != duckdb.StatementType.SELECT:
        raise QueryError("query: only a single SELECT statement is allowed (results are read-only)")
    timer = threading.Timer(timeout, con.interrupt) if timeout else None
    if timer is not None:
        timer.daemon = True
        timer.start()
    try:
        return con.execute(sql, params).df()
    except duckdb.InterruptException:
        raise QueryError(f"query: stopped after {timeout:g} s (raise the limit with --timeout SECONDS)") from None
    except duckdb.Error as e:
        raise QueryError(f"query: {str(e).splitlines()[0]}") from None
    finally:
        if timer is not None:  # joined: a daemon thread still holding the connection at exit aborts the process
            timer.cancel()
            timer.join()


def relation(table: str, root: str | Path):
    """A DuckDB relation for one view (``trials``, ``curves`` or ``layers``)."""
    if table not in TABLES:
        raise QueryError(f"table: {table!r} is not one of {TABLES}")
    return connect(root).table(table)




def recorded_trials(layout: SweepLayout) -> set[str]:
    """Ids of the sweep's trials the ``trials`` table holds as ended (a running trial's live rows do not count)."""
    try:
        return set(query("SELECT DISTINCT trial FROM trials WHERE sweep = ? AND status IN (?, ?)", layout.root,
                         [layout.name, records.Status.TERMINATED.value, records.Status.ERROR.value]).trial)
    except UserError:
        return set()


def list_table(root: str | Path):
    """One row per sweep under ``root``: name, started, planned trials, its state (running, finished, interrupted
    (resumable): ``records.sweep_state``), status counts in the tables, storage bytes."""
    root = check_root(Path(root))
    counts = query("SELECT sweep, status, count(*) AS n FROM trials GROUP BY ALL", root)
    rows = []
    for d in list_sweeps(root):
        record = sweep_record.read(d)
        c = counts[counts.sweep == d.name]
        by = dict(zip(c.status, c.n, strict=True))
        layout = SweepLayout(root, d.name, record.storage)
        planned = record.n_trials
        done, failed = records.Status.TERMINATED.value, records.Status.ERROR.value
        rows.append({"sweep": d.name, "started": record.created, "planned": planned,
                     "state": records.sweep_state(layout, planned).state,
                     "terminated": int(by.get(done, 0)), "error": int(by.get(failed, 0)),
                     "other": int(sum(v for k, v in by.items() if k not in (done, failed))),
                     "storage_mb": round(total_bytes(layout) / 1e6, 1)})
    return pd.DataFrame(rows)


def no_results(layout: SweepLayout) -> QueryError:
    """The error for a sweep without rows: running, interrupted before any trial ended, or tables to rebuild."""
    state = records.sweep_state(layout, sweep_record.read(layout.sweep_dir).n_trials)
    if state.state == "running" or (state.state.startswith("interrupted") and not state.ended):
        return QueryError(state.describe(layout.name))
    return QueryError(f"sweep {layout.name!r} has no results yet (try `clmim results rebuild {layout.name}`)")


@dataclass
class SweepFrames:
    """What the analysis reads of one or more sweeps (``summary.sections``, the report's figures): DataFrames, no
    connection. ``trials``: every trial's latest attempt, with its ``mix`` (``scaling.with_mix``: tables older
    than weights get it from lam); ``done``: the finished ones; ``layers``: their per-layer
    probes at every probed step (step 0: the untrained encoder), mean over heads, with ``lam``; ``robustness``:
    their accuracies under band-passed noise; ``curves``: their loss curves (trial, step, value); ``signals``: the
    finished trials' early signals at every evaluation (``early_signals.SIGNALS``: sweep, trial, step, metric,
    value); ``lineage``: the trials' PBT exploits (the ``lineage`` table: one row per mutated key per exploit);
    ``objectives``: what a multi-objective (nsga2) search among them optimised, metric -> min / max (its Pareto
    front: ``pareto.pareto_front``)."""

    trials: pd.DataFrame
    done: pd.DataFrame
    layers: pd.DataFrame
    robustness: pd.DataFrame
    curves: pd.DataFrame
    signals: pd.DataFrame = field(default_factory=pd.DataFrame)  # early signals per evaluation (``early_signals``)
    lineage: pd.DataFrame = field(default_factory=pd.DataFrame)  # PBT exploits (``lineage`` table)
    objectives: dict[str, str] = field(default_factory=dict)  # nsga2's objectives and directions


def sweep_frames(root: str | Path, names: list[str], where: str = "true") -> SweepFrames:
    """The frames of sweeps ``names`` under ``root``; ``where``: an extra SQL condition on the trials (``t.``), as
    ``benchmarks/repro_claims.py --where`` takes it (the connection is read-only)."""
    con = connect(root)
    keep = f"t.sweep IN ({', '.join('?' * len(names))}) AND ({where})"
    done = f"{keep} AND t.status = '{records.Status.TERMINATED.value}'"
    try:
        trials = con.execute(f"SELECT * FROM trials t WHERE {keep} ORDER BY sweep, trial", names).df()
        if trials.empty:  # (no table files yet: the empty views lack the columns the joins below name)
            empty = pd.DataFrame()
            return SweepFrames(trials, trials, empty, empty, empty)
        layers = con.execute("SELECT l.*, t.lam FROM layers l JOIN trials t USING (sweep, trial) "
                             f"WHERE {done} AND l.head IS NULL", names).df()
        robustness = con.execute(f"SELECT r.* FROM robustness r JOIN trials t USING (sweep, trial) WHERE {done}",
                                 names).df()
        curves = con.execute("SELECT c.sweep, c.trial, c.step, c.value FROM curves c JOIN trials t USING (sweep, "
                             f"trial) WHERE {keep} AND c.metric = 'loss'", names).df()
        signals = con.execute("SELECT c.sweep, c.trial, c.step, c.metric, c.value FROM curves c JOIN trials t "
                              f"USING (sweep, trial) WHERE {done} AND c.metric IN "
                              f"({', '.join('?' * len(SIGNALS))})", [*names, *SIGNALS]).df()
        lineage = con.execute(f"SELECT x.* FROM lineage x JOIN trials t USING (sweep, trial) WHERE {keep} "
                              "ORDER BY sweep, trial, exploit, key", names).df()
    except duckdb.Error as e:
        raise QueryError(f"query: {str(e).splitlines()[0]}") from None
    trials = with_mix(trials)
    return SweepFrames(trials, trials[trials.status == records.Status.TERMINATED.value], layers, robustness, curves,
                       signals, lineage, search_objectives(Path(root), names))


def search_objectives(root: Path, names: list[str]) -> dict[str, str]:
    """The objectives (metric -> direction) the first of sweeps ``names`` searched with nsga2 optimised, from its
    record's space (checked when it started: read, not validated again); {} when none did."""
    for name in names:
        space = sweep_record.read(root / name).info.get("space")
        search = space.get("search") if isinstance(space, dict) else None
        if isinstance(search, dict) and search.get("algorithm") == "nsga2":
            return {m: metric_mode(m) for m in map(migrate.metric, search.get("objectives") or [])}
    return {}
