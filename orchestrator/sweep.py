"""Running a sweep on Ray Tune: resource checks, the Tuner, resume, and the summary.

Paths of a sweep are owned by ``layout.SweepLayout``. Statuses shown to the user come from one place: the
``trials`` Parquet table the driver writes when a trial ends (TERMINATED / ERROR), and Tune's saved state for
trials that have not ended (PENDING / RUNNING), so the console, the tables and MLflow agree.

Storage (``--storage``, see ``storage.py``): trial files, checkpoints and Tune's state live where every node reaches
them; the Parquet tables and MLflow's SQLite stay under the driver's results root.

Ray: with ``--address`` (or ``$RAY_ADDRESS``) the sweep connects to that cluster (``auto`` finds one started with
``ray start`` on this machine); without either it always starts a private local instance on 127.0.0.1, even if a
``ray start`` cluster is running on this host.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import ray
from ray import tune
from ray.tune.logger import JsonLoggerCallback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, HyperBandForBOHB, HyperBandScheduler
from ray.tune.search import ConcurrencyLimiter

from trainables.errors import UserError
from trainables.files import write_json_atomic
from trainables.objectives import PLUGINS_ENV
from trainables.storage import Storage
from trainables.vocab import SUMMARY_METRICS

from . import sweep_record
from .callbacks import Retention, SweepCallback, Tables
from .console import make_reporter, print_header
from .layout import SweepLayout, find_sweep, results_root, validate_sweep_name
from .pbt import TrialOwnedPB2, TrialOwnedPBT
from .query import query
from .ray_private import keep_cluster_on_loopback, oom_is_a_lost_trial, refresh_auth_mode
from .records import (
    DriverLease,
    Plan,
    Status,
    lineage_values,
    plan_path,
    read_final,
    read_lineage,
    read_plan,
    read_reports,
    retire_error,
    scan,
    trial_id_of,
    trial_record,
    write_plan,
)
from .searcher import TrialSearcher, model_searcher, reward, search_target, warm_start
from .space import EVOLVING, PAUSING, Space, SpaceError, plan_values
from .tracking import MLFLOW_OFF, MlflowLog, default_mlflow_uri
from .trial import TrialSpec, run_trial

TRIAL_CPU_SLIVER = 0.01


def check_results_root(root: Path) -> None:
    """The results root must be a folder this process can write (created if missing); else a ``UserError``
    before Ray starts."""
    if root.exists() and not root.is_dir():
        raise UserError(f"--results: {str(root)!r} is a file, not a folder")
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=root, prefix=".clmim-write-test-"):
            pass
    except OSError as e:
        raise UserError(f"--results: cannot write to {str(root)!r} ({e.strerror or type(e).__name__})") from None


# ------------------------------------------------------------------------------------------- resources
def trial_bundles(space: Space) -> list[dict[str, float]]:
    """Resource bundles one trial occupies: the trial process itself, plus one per Ray Train worker."""
    r = space.resources
    if r.in_process:
        return [{"CPU": r.cpus_per_worker, "GPU": r.gpus_per_worker}]
    return [{"CPU": TRIAL_CPU_SLIVER, "GPU": 0.0}] + [{"CPU": r.cpus_per_worker, "GPU": r.gpus_per_worker}] * r.workers


def check_schedulable(space: Space, nodes: list[dict[str, float]]) -> None:
    """Raise ``SpaceError`` if one trial's bundles can never be placed on these nodes (first-fit packing)."""
    bundles = trial_bundles(space)
    need = {k: sum(b[k] for b in bundles) for k in ("CPU", "GPU")}
    have = {k: sum(n.get(k, 0.0) for n in nodes) for k in ("CPU", "GPU")}
    r = space.resources
    how = (f"{r.workers} worker(s) x {r.cpus_per_worker} CPU" + (f" + {r.gpus_per_worker} GPU" if r.gpus_per_worker
                                                                   else "")
           + ("" if r.in_process else f", plus {TRIAL_CPU_SLIVER} CPU for the trial itself"))
    for k in ("GPU", "CPU"):
        if need[k] > have[k] + 1e-9:
            raise SpaceError(
                f"resources: one trial needs {need[k]:g} {k} ({how}) but the cluster has {have[k]:g} {k}; "
                f"it could never be scheduled (lower resources.workers or resources.{k.lower()}s_per_worker)")
    free = [{k: n.get(k, 0.0) for k in ("CPU", "GPU")} for n in nodes]
    for b in sorted(bundles, key=lambda b: (-b["GPU"], -b["CPU"])):
        node = next((f for f in free if all(f[k] + 1e-9 >= b[k] for k in b)), None)
        if node is None:
            largest = max(free, key=lambda f: (f["GPU"], f["CPU"]), default={"CPU": 0, "GPU": 0})
            raise SpaceError(
                f"resources: a worker needs {b['CPU']:g} CPU and {b['GPU']:g} GPU on one node, but no node has that "
                f"left for one trial ({how}; largest node free: {largest['CPU']:g} CPU, {largest['GPU']:g} GPU); "
                "it could never be scheduled")
        for k in b:
            node[k] -= b[k]


def ray_nodes() -> list[dict[str, float]]:
    return [n["Resources"] for n in ray.nodes() if n.get("Alive")]


class ClusterError(UserError):
    """Ray could not be started or reached: one line saying what happened and what to do (exit code 2)."""


def auth_token_source() -> str:
    """Where this driver's Ray token comes from, as Ray looks for it: $RAY_AUTH_TOKEN, the file
    $RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return "$RAY_AUTH_TOKEN"
    return os.environ.get("RAY_AUTH_TOKEN_PATH") or str(Path.home() / ".ray" / "auth_token")


def _has_token() -> bool:
    src = auth_token_source()
    return src == "$RAY_AUTH_TOKEN" or Path(src).is_file()


def init_ray(address: str | None) -> None:
    """Connect to ``address`` / $RAY_ADDRESS, or start a private local instance (dashboard on, everything on
    127.0.0.1), never silently joining a cluster that happens to run on this host.

    Token authentication stays on: a local instance creates ~/.ray/auth_token, and a driver connecting to a
    cluster sends its token (``auth_token_source``; RAY_AUTH_MODE=token, set before Ray reads its settings) when
    it has one. A refused token, a cluster that does not answer or a local instance that does not start is a
    one-line ``ClusterError``.
    """
    address = address or os.environ.get("RAY_ADDRESS")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # the classic output path, which takes our progress reporter
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")  # probe metrics arrive at the end only
    loopback = not address or address == "auto" or address.split(":")[0] in ("127.0.0.1", "localhost")
    if loopback:
        # A one-machine cluster: keep node addresses on the loopback interface. Ray reads this when it is
        # imported; if it already was, set its constant too, or "127.0.0.1" resolves to the machine's address.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    set_auth = bool(address) and "RAY_AUTH_MODE" not in os.environ and _has_token()
    if set_auth:  # before Ray reads its settings (on import); `ray start` clusters keep token auth on
        os.environ["RAY_AUTH_MODE"] = "token"

    if set_auth:
        refresh_auth_mode()  # (Ray was imported earlier in this process: its cached settings must see the mode)
    if loopback and os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0":
        keep_cluster_on_loopback()
    if ray.is_initialized():
        return
    with _stderr_held() as held:  # Ray's C++ client logs a line per retry while it is refused: kept if it fails
        try:
            if address:
                ray.init(address=address, log_to_driver=True, runtime_env=plugin_env())
            else:
                # address="local": a new instance even when `ray start` left a cluster running here (plain
                # ray.init() would join that one, and then reject num_cpus).
                ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=True,
                         dashboard_host="127.0.0.1", log_to_driver=True, runtime_env=plugin_env())
        except Exception as e:  # noqa: BLE001 - whatever Ray raised, the user gets one line and what to do
            held.failed = True
            raise _cluster_error(address, e, held.text()) from None
    print(f"Ray: connected to the cluster at {address}" if address else
          "Ray: started a private local instance (pass --address to use a cluster)", flush=True)


def plugin_env() -> dict | None:
    """The job's runtime environment when objectives come from modules named in ``CLMIM_OBJECTIVES`` (see
    ``trainables/objectives``): that variable and the driver's PYTHONPATH, so that trials on any node register the
    objectives the driver validated the space with (the modules must be importable there)."""
    names = os.environ.get(PLUGINS_ENV)
    if not names:
        return None
    env = {PLUGINS_ENV: names}
    if os.environ.get("PYTHONPATH"):
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    return {"env_vars": env}


class _stderr_held:
    """Holds what is written to file descriptor 2 (Ray's C++ core writes there directly) while Ray starts; written
    out afterwards unless the start failed (``failed``), when ``text()`` is read instead."""

    def __enter__(self):
        sys.stderr.flush()
        self.failed = False
        self._file = tempfile.TemporaryFile()
        self._saved = os.dup(2)
        os.dup2(self._file.fileno(), 2)
        return self

    def text(self) -> str:
        sys.stderr.flush()
        self._file.seek(0)
        return self._file.read().decode(errors="replace")

    def __exit__(self, *exc):
        text = self.text()
        os.dup2(self._saved, 2)
        os.close(self._saved)
        self._file.close()
        if not self.failed and text:
            sys.stderr.write(text)
            sys.stderr.flush()


def _cluster_error(address: str | None, e: BaseException, logged: str = "") -> ClusterError:
    text = " ".join(str(e).split())
    why = f"{type(e).__name__}: {text[:200]}" if text else type(e).__name__
    refused = "InvalidAuthToken" in logged or "auth" in text.lower() or "token" in text.lower()
    if address and refused:
        return ClusterError(f"--address {address}: the cluster refused this driver's Ray token (read from "
                            f"{auth_token_source()}, RAY_AUTH_MODE={os.environ.get('RAY_AUTH_MODE', 'unset')}); "
                            f"copy the head node's ~/.ray/auth_token here or set RAY_AUTH_TOKEN_PATH ({why})")
    if address:
        return ClusterError(f"--address {address}: cannot connect to the Ray cluster ({why}); check the address "
                            "(`ray status` on the head node) and that it is running")
    return ClusterError(f"Ray: the local instance did not start ({why}); the machine may be overloaded: try again, "
                        "or start Ray once with `ray start --head --node-ip-address 127.0.0.1` and pass "
                        "--address 127.0.0.1:6379")


class _NoTuneRestoreHint(logging.Filter):
    """Tune's own closing lines point at ``Tuner.restore(...)`` and list unfinished trials; clmim prints its
    own (``clmim resume NAME``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return "Tuner.restore" not in msg and "Trials did not complete" not in msg


class _OneLine(logging.Filter):
    """Tune's failure messages, as one line each: a failed trial (its error and traceback are in its error.json),
    a failed sync of the storage (an S3 endpoint down for two minutes printed 26 multi-line tracebacks)."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if record.exc_info and record.exc_info[1] is not None:
            e = record.exc_info[1]
            first = next((line for line in str(e).splitlines() if line.strip()), "")
            msg = f"{msg.rstrip(': ')} ({type(e).__name__}: {first[:300]})"
        elif "Traceback (most recent call last)" in msg:
            head, _, tb = msg.partition("Traceback (most recent call last)")
            last = next((line for line in reversed(tb.splitlines()) if line.strip()), "")
            msg = f"{head.strip()} {last.strip()[:300]}"
        record.msg, record.args = " ".join(msg.split()), ()
        record.exc_info = record.exc_text = None
        return True


TUNE_FAILURE_LOGGERS = ("ray.tune.execution.tune_controller", "ray.tune.execution.experiment_state",
                        "ray.train._internal.syncer")


def _quiet_tune() -> None:
    logger = logging.getLogger("ray.tune.tune")
    if not any(isinstance(f, _NoTuneRestoreHint) for f in logger.filters):
        logger.addFilter(_NoTuneRestoreHint())
    for name in TUNE_FAILURE_LOGGERS:
        lg = logging.getLogger(name)
        if not any(isinstance(f, _OneLine) for f in lg.filters):
            lg.addFilter(_OneLine())


# ------------------------------------------------------------------------------------------- tuner
def _param_space(space: Space) -> dict[str, Any]:
    make = {"grid": tune.grid_search, "choice": tune.choice, "uniform": lambda v: tune.uniform(*v),
            "loguniform": lambda v: tune.loguniform(*map(float, v)), "randint": lambda v: tune.randint(*v)}
    return {k: make[kind](vals) for k, (kind, vals) in space.axes().items()}


def _trainable(space: Space, layout: SweepLayout):
    bundle = trial_bundles(space)[0]
    resources = {"cpu": bundle["CPU"], "gpu": bundle["GPU"]}
    return tune.with_resources(tune.with_parameters(run_trial, spec=TrialSpec.from_space(space, layout)), resources)


def _run_config(space: Space, layout: SweepLayout, callback, total: int, ended: list[str]):
    # (no CheckpointConfig: trials keep their own checkpoints in the storage, see trial.py)
    # Of Tune's own per-result loggers only result.json stays (what a sweep older than the trials' own logs is read
    # from): TensorBoard event files and progress.csv repeat the tables, and TensorBoardX alone took 10-12 % of
    # the driver's samples in 300-trial profiles. TUNE_DISABLE_AUTO_CALLBACK_LOGGERS=0 brings them back.
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    return tune.RunConfig(name="tune", storage_path=layout.experiment_path, storage_filesystem=layout.store.fs,
                          failure_config=tune.FailureConfig(max_failures=space.failure.max_failures),
                          progress_reporter=make_reporter(total, ended), verbose=1,
                          callbacks=[callback, JsonLoggerCallback()])


def _tune_config(space: Space, searcher, max_concurrent: int | None):
    """Tune's settings: the sweep's ``TrialSearcher`` (capped at ``max_concurrent`` live trials when given), the
    scheduler, and trial folders named by clmim trial ids."""
    sch = space.scheduler
    total = searcher.total
    alg = ConcurrencyLimiter(searcher, max_concurrent=max_concurrent) if max_concurrent else searcher
    # Tune keeps one trial pending at a time for a custom searcher unless told otherwise; as many as could start
    # at once (as for its own grid search) keeps a big cluster busy
    os.environ.setdefault("TUNE_MAX_PENDING_TRIALS_PG", str(max(16, min(total, 1000))))
    # Schedulers read what each trial adds for them (``trial.SchedulerView``): the scheduler metric as of the
    # trial's newest stored checkpoint and the epoch it was measured at. The searcher has its own metric (set on
    # ``TrialSearcher``), so Tune is given none.
    by = {"time_attr": "sched_epoch", "metric": "sched_value", "mode": sch.mode}
    if sch.type == "asha":
        scheduler = ASHAScheduler(**by, max_t=sch.max_t, grace_period=sch.grace_period,
                                  reduction_factor=sch.reduction_factor)
    elif sch.type == "hyperband":
        scheduler = HyperBandScheduler(**by, max_t=sch.max_t, reduction_factor=sch.reduction_factor)
    elif sch.type == "bohb":
        scheduler = HyperBandForBOHB(**by, max_t=sch.max_t, reduction_factor=sch.reduction_factor)
    elif sch.type == "pbt":
        scheduler = TrialOwnedPBT(**by, perturbation_interval=sch.perturbation_interval,
                                  quantile_fraction=sch.quantile_fraction,
                                  resample_probability=sch.resample_probability,
                                  hyperparam_mutations={k: _domain(v) for k, v in sch.mutations.items()})
    elif sch.type == "pb2":  # (mutations are uniform [lo, hi]: ``space._check_mutations``)
        scheduler = TrialOwnedPB2(**by, perturbation_interval=sch.perturbation_interval,
                                  quantile_fraction=sch.quantile_fraction,
                                  hyperparam_bounds={k: list(v["uniform"]) for k, v in sch.mutations.items()})
    else:
        scheduler = FIFOScheduler()
    return tune.TuneConfig(search_alg=alg, scheduler=scheduler, num_samples=total,
                           reuse_actors=space.resources.in_process and sch.type not in PAUSING,
                           trial_dirname_creator=lambda t: trial_id_of(t.config, t.trial_id))


def _domain(spec: dict):
    """A space spec (``uniform`` / ``loguniform`` [lo, hi], ``choice`` [...]) as Tune's search domain."""
    kind, vals = next(iter(spec.items()))
    return {"uniform": tune.uniform, "loguniform": tune.loguniform}[kind](*vals) if kind != "choice" \
        else list(vals)


def parse_storage(storage: str | None, endpoint: str | None, root: Path) -> Storage | None:
    """``--storage`` / ``--storage-endpoint`` as a checked ``Storage``; None (the results root) when not given."""
    if not storage:
        if endpoint:
            raise UserError("--storage-endpoint: given without --storage s3://BUCKET/PREFIX")
        return None
    st = Storage.parse(storage, endpoint, root)
    st.check_writable()
    return st


RESERVED_NAMES = ("mlflow.db", "mlartifacts")  # files of the results root itself


def check_sweep_name_free(root: Path, name: str) -> None:
    """A new sweep's folder must not be a file of the results root (``mlflow.db``) or something else already there;
    a ``UserError`` before Ray starts."""
    d = root / name
    if name in RESERVED_NAMES or name.endswith((".db", ".db-journal", ".db-wal")):
        raise UserError(f"--name: {name!r} is reserved for the results root's own files; pick another --name")
    if d.exists() and not d.is_dir():
        raise UserError(f"--name: {str(d)!r} is a file, not a sweep folder; pick another --name")


def run_sweep(space: Space, name: str | None = None, results: str | None = None, address: str | None = None,
              max_concurrent: int | None = None, overrides: list[str] | None = None,
              cli_args: dict | None = None, mlflow_uri: str | None = None, storage: str | None = None,
              storage_endpoint: str | None = None) -> dict:
    """Run every trial of ``space``; return the summary (rows per trial, whether the sweep was interrupted).
    ``storage``: where trial files go (a path every node mounts, or ``s3://bucket/prefix``); default the results
    root."""
    root = results_root(results)
    sweep_name = validate_sweep_name(name or space.name, "--name" if name else "name")
    check_results_root(root)
    check_sweep_name_free(root, sweep_name)
    layout = SweepLayout(root, sweep_name, parse_storage(storage, storage_endpoint, root))
    _refuse_existing(layout)
    evaluated = warm_start(root, space, sweep_name)  # (a SpaceError before Ray starts)

    uri = default_mlflow_uri(root, mlflow_uri)
    with DriverLease(layout, "clmim sweep"):
        _refuse_existing(layout)  # (another driver may have started it while this one waited for the lease)
        init_ray(address)
        check_schedulable(space, ray_nodes())
        sweep_record.write(layout.sweep_dir, space, overrides or [], cli_args or {}, layout.storage)
        plan = Plan.new(plan_values(space))
        write_plan(layout, plan)
        return _drive(layout, space, uri, plan, queue=list(plan.trials.items()),
                      extra=space.num_samples if plan.searched else 0, max_concurrent=max_concurrent
                      or space.max_concurrent, evaluated=evaluated, results_arg=results, address=address)


def _refuse_existing(layout: SweepLayout) -> None:
    # (a sweep.json alone: a start that failed before it planned any trial)
    if layout.store.exists(layout.tune_path) or layout.store.exists(plan_path(layout)):
        where = layout.root if not layout.storage else f"{layout.root} or {layout.storage.uri}"
        raise UserError(f"--name: sweep {layout.name!r} already exists in {where}; "
                        f"continue it with `clmim resume {layout.name}` or pick another --name")


def _drive(layout: SweepLayout, space: Space, uri: str, plan, queue: list[tuple[str, dict]], extra: int,
           max_concurrent: int | None, evaluated: list | None = None, ended: list[str] | None = None,
           results_arg: str | None = None, address: str | None = None) -> dict:
    """The one start path of a sweep and of its resume: the callback (checked against MLflow before any trial),
    the header, Tune over ``queue`` (id, values) and ``extra`` searched trials, then the summary. ``ended``:
    statuses of the trials that ended before (a resume)."""
    _quiet_tune()
    oom_is_a_lost_trial()
    mlflow = MlflowLog(layout, space, uri) if uri != MLFLOW_OFF else None
    if mlflow is not None:
        check_tracking(mlflow, uri)
    parts = [Tables(layout, space), *([mlflow] if mlflow else []), Retention(layout, space.checkpoints.keep)]
    callback = SweepCallback(layout, space, parts)
    resumed = ended is not None
    try:
        if resumed:
            backfill(callback, layout, plan)
            seed_running(callback, layout)
        print_header(layout, space.n_trials(), uri, resumed=resumed, results_arg=results_arg, address=address,
                     experiment_id=mlflow.experiment_id() if mlflow else None)
        inner = model_searcher(space.search, space.num_samples) if extra else None
        searcher = TrialSearcher(queue, *search_target(space.search), inner=inner, extra=extra,
                                 prefix=plan.prefix, next_index=plan.next_index({t for t, _ in queue} |
                                                                                 set(layout.trials())),
                                 evaluated=evaluated)
        if searcher.total:
            tuner = tune.Tuner(_trainable(space, layout), param_space=_param_space(space) if inner else {},
                               tune_config=_tune_config(space, searcher, max_concurrent),
                               run_config=_run_config(space, layout, callback, len(ended or []) + searcher.total,
                                                      list(ended or [])))
            tuner.fit()
    finally:  # (Tune ends the experiment on Ctrl-C; an error or a second Ctrl-C still gets what was queued)
        callback.close()
        report_driver_stats(callback)
    return summarize(layout, space, callback.last_results())


def seed_running(callback: SweepCallback, layout: SweepLayout) -> None:
    """Trials that were running when the last driver stopped (live rows in the tables) continue from their newest
    checkpoint: their live rows start again from that checkpoint's log, so none of their reports leave the tables
    while they run again."""
    try:
        running = query("SELECT trial FROM trials WHERE sweep = ? AND status = ?", layout.root,
                        [layout.name, Status.RUNNING.value]).trial
    except UserError:
        return
    for tid in running:
        callback.seed(tid, read_reports(layout, tid))


def report_driver_stats(callback: SweepCallback) -> None:
    """With ``$CLMIM_DRIVER_STATS`` set to a file: what each writer did (``writer.WriterStats``), as JSON, for
    ``benchmarks/sweep_scale.py``."""
    path = os.environ.get("CLMIM_DRIVER_STATS")
    if path:
        write_json_atomic(Path(path), {"event_loop": callback.hook_s,
                                       "writers": {w.name: dataclasses.asdict(w.stats) for w in callback.all_writers}})


def check_tracking(mlflow, uri: str) -> None:
    """Create the sweep's MLflow parent run now, so an unreachable tracking server fails before any trial."""
    try:
        mlflow.start()
    except Exception as e:  # noqa: BLE001 - any tracking failure is a usage error here
        raise SpaceError(f"--mlflow-uri: cannot use MLflow at {uri} ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None


def retire_errors(layout: SweepLayout) -> list[str]:
    """Move each trial's ``error.json`` aside (``error.prev.json``) so a retried trial really runs again;
    return the trial ids."""
    return [t for t in layout.trials() if retire_error(layout, t)]


def sweep_plan(layout: SweepLayout, space: Space):
    """The sweep's plan; for a sweep started before plans were recorded, one rebuilt from its space with the ids its
    trials already have (matched by their sampled values; their Tune ``params.json`` is plain JSON)."""
    plan = read_plan(layout)
    if plan is not None:
        return plan
    fresh = Plan.new(plan_values(space))
    have = {t: trial_record(layout, t, None).values for t in layout.trials()}
    trials: dict[str, dict] = {t: v for t, v in have.items() if v is not None}
    unmatched = list(fresh.trials.values())
    for v in have.values():
        if v in unmatched:
            unmatched.remove(v)
    prefix = next(iter(trials), f"{fresh.prefix}_0").rsplit("_", 1)[0]
    plan = Plan(prefix, trials, fresh.searched)
    n = plan.next_index(set(trials))
    for i, v in enumerate(unmatched):
        plan.trials[f"{prefix}_{n + i:05d}"] = v
    return plan


def resume_sweep(name: str, results: str | None = None, address: str | None = None,
                 retry_errored: bool = False, mlflow_uri: str | None = None, storage: str | None = None,
                 storage_endpoint: str | None = None, max_concurrent: int | None = None) -> dict:
    """Continue an interrupted sweep: finished trials stay, unfinished ones resume from their checkpoints, planned
    ones that never started start; with ``retry_errored`` errored trials run again too (from their last
    checkpoint). Trials that ended while no driver was recording (or before this results root knew the sweep) are
    written to the tables and MLflow first. A new Tune run does it: Tune's saved state (pickles) is never read."""
    root = results_root(results)
    layout = find_sweep(name, root, need="tune", storage=parse_storage(storage, storage_endpoint, root))
    if layout.storage:
        check_results_root(layout.root)
        sweep_record.adopt(layout.sweep_dir, layout.storage)
    record = sweep_record.read(layout.sweep_dir)
    space, cli = record.space(), record.cli_args

    uri = default_mlflow_uri(layout.root, mlflow_uri or cli.get("mlflow_uri"))
    with DriverLease(layout, "clmim resume"):
        plan = sweep_plan(layout, space)  # (a damaged record is an error before Ray starts)
        scan(layout, plan)
        init_ray(address)
        check_schedulable(space, ray_nodes())
        if retry_errored:
            retire_errors(layout)
        write_plan(layout, plan)
        recs = scan(layout, plan)
        queue = resume_queue(layout, space, recs)
        evaluated = warm_start(layout.root, space, layout.name) if plan.searched else []
        if plan.searched:
            for t, r in recs.items():
                final = read_final(layout, t) if r.status == Status.TERMINATED else None
                told = reward(space.search, final) if final is not None else None
                if told is not None and r.values is not None:
                    evaluated.append((r.values, told))
        extra = max(0, space.num_samples - len(recs)) if plan.searched else 0
        return _drive(layout, space, uri, plan, queue, extra, max_concurrent or cli.get("max_concurrent")
                      or space.max_concurrent, evaluated=evaluated,
                      ended=[r.status.value for r in recs.values() if r.status is not None],
                      results_arg=results, address=address)


def resume_queue(layout: SweepLayout, space: Space, recs: dict) -> list[tuple[str, dict]]:
    """What a resume queues: every trial that has not ended and whose values are known, with its values; a PBT
    trial's as of its newest exploit (``records.lineage_values``), so that Tune's view of it, which a later exploit
    copies from, is what it trains with."""
    queue = [(t, r.values) for t, r in recs.items() if r.status is None and r.values is not None]
    if space.scheduler.type in EVOLVING:
        queue = [(t, lineage_values(v, read_lineage(layout, t))) for t, v in queue]
    return queue


def backfill(callback, layout: SweepLayout, plan) -> int:
    """Hand every trial the storage says has ended to each part that lacks it (it ended while no driver was
    recording, the driver was killed before that part wrote it, or this results root is new); return how many
    trials."""
    have = {i: part.recorded() for i, part in enumerate(callback.parts)}
    n = 0
    for tid, r in scan(layout, plan).items():
        lacking = {i for i, done in have.items() if done is not None and tid not in done}
        if r.status is None or not lacking:
            continue
        callback.record_ended(tid, r.values or {}, r.status, parts=lacking)
        n += 1
    callback.drain()
    if n:
        print(f"recorded {n} trial(s) that ended while no driver was recording", flush=True)
    return n


# ------------------------------------------------------------------------------------------- summary
def summarize(layout: SweepLayout, space: Space, last: dict[str, dict] | None = None) -> dict:
    """One row per trial: id, status, sampled values, final (or latest) metrics, error reason.

    Ended trials come from the ``trials`` table (the record every other view uses); the others from the sweep's
    records (PENDING: a resume will run them), with the last metrics this driver received (``last``)."""
    axes = list(space.axes())
    ended = {}
    try:
        df = query("SELECT * FROM trials WHERE sweep = ?", layout.root, [layout.name])
        ended = {r["trial"]: r for r in df.to_dict(orient="records") if Status(r["status"]).ended}
    except UserError:
        pass
    try:
        recs = scan(layout, read_plan(layout))
    except (UserError, OSError):
        recs = {}
    rows = []
    for tid in sorted(set(recs) | set(ended)):
        if tid in ended:
            r = ended[tid]
            # a section axis (objective.weights) is shown as its table column (mix: the objective's label)
            row = {"trial": tid, "status": r["status"],
                   **{k: r.get("mix") if k == "objective.weights" else r.get(k) for k in axes},
                   **{k: r.get(k) for k in SUMMARY_METRICS}}
            if r.get("error"):
                row["error"] = str(r["error"])[:200]
        else:
            values = recs[tid].values or {}
            got = (last or {}).get(tid, {})
            row = {"trial": tid, "status": Status.PENDING.value, **{k: values.get(k) for k in axes},
                   **{k: got.get(k) for k in SUMMARY_METRICS}}
        rows.append(row)
    finished = sum(Status(r["status"]).ended for r in rows)
    interrupted = finished < max(len(rows), space.n_trials())
    errored = sum(r["status"] == Status.ERROR.value for r in rows)
    return {"rows": rows, "interrupted": interrupted, "errored": errored, "layout": layout}
