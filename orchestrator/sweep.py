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

import logging
import os
import platform
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from trainables.errors import UserError
from trainables.files import DamagedFile, read_json, write_json_atomic
from trainables.storage import Storage
from trainables.vocab import SUMMARY_METRICS

from .console import print_header
from .layout import SweepLayout, find_sweep, results_root, validate_sweep_name
from .space import Space, SpaceError, space_from_dict

TRIAL_CPU_SLIVER = 0.01


def code_version() -> str:
    here = Path(__file__).resolve().parents[1]
    try:
        out = subprocess.run(["git", "-C", str(here), "describe", "--always", "--dirty"], capture_output=True,
                             text=True, timeout=5)
        if out.returncode == 0:
            return out.stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        pass
    from importlib.metadata import version

    return version("clmim")


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
    import ray

    return [n["Resources"] for n in ray.nodes() if n.get("Alive")]


def init_ray(address: str | None) -> None:
    """Connect to ``address`` / $RAY_ADDRESS, or start a private local instance (dashboard on, everything on
    127.0.0.1), never silently joining a cluster that happens to run on this host.

    Token authentication stays on: a local instance creates ~/.ray/auth_token, and a driver connecting to a
    cluster sends that token (RAY_AUTH_MODE=token) when the file exists.
    """
    address = address or os.environ.get("RAY_ADDRESS")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # the classic output path, which takes our progress reporter
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")  # probe metrics arrive at the end only
    loopback = not address or address == "auto" or address.split(":")[0] in ("127.0.0.1", "localhost")
    if loopback:
        # A one-machine cluster: keep node addresses on the loopback interface. Ray reads this when it is
        # imported; if it already was, set its constant too, or "127.0.0.1" resolves to the machine's address.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    if loopback and os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0":
        from .ray_private import keep_cluster_on_loopback

        keep_cluster_on_loopback()
    if ray.is_initialized():
        return
    if address:
        if "RAY_AUTH_MODE" not in os.environ and (Path.home() / ".ray" / "auth_token").is_file():
            os.environ["RAY_AUTH_MODE"] = "token"
        ray.init(address=address, log_to_driver=True)
        print(f"Ray: connected to the cluster at {address}", flush=True)
    else:
        # address="local": a new instance even when `ray start` left a cluster running here (plain ray.init()
        # would join that one, and then reject num_cpus).
        ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=True, dashboard_host="127.0.0.1",
                 log_to_driver=True)
        print("Ray: started a private local instance (pass --address to use a cluster)", flush=True)


class _NoTuneRestoreHint(logging.Filter):
    """Tune's own closing lines point at ``Tuner.restore(...)`` and list unfinished trials; clmim prints its
    own (``clmim resume NAME``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return "Tuner.restore" not in msg and "Trials did not complete" not in msg


def _quiet_tune() -> None:
    logger = logging.getLogger("ray.tune.tune")
    if not any(isinstance(f, _NoTuneRestoreHint) for f in logger.filters):
        logger.addFilter(_NoTuneRestoreHint())


# ------------------------------------------------------------------------------------------- tuner
def _param_space(space: Space) -> dict[str, Any]:
    from ray import tune

    make = {"grid": tune.grid_search, "choice": tune.choice, "uniform": lambda v: tune.uniform(*v),
            "loguniform": lambda v: tune.loguniform(*map(float, v)), "randint": lambda v: tune.randint(*v)}
    return {k: make[kind](vals) for k, (kind, vals) in space.axes().items()}


def _trainable(space: Space, layout: SweepLayout):
    from ray import tune

    from .trial import TrialSpec, run_trial

    bundle = trial_bundles(space)[0]
    resources = {"cpu": bundle["CPU"], "gpu": bundle["GPU"]}
    return tune.with_resources(tune.with_parameters(run_trial, spec=TrialSpec.from_space(space, layout)), resources)


def _run_config(space: Space, layout: SweepLayout, mlflow_uri: str):
    from ray import tune

    from .console import make_reporter
    from .tracking import ResultsCallback

    # (no CheckpointConfig: trials keep their own checkpoints in the storage, see trial.py)
    return tune.RunConfig(name="tune", storage_path=layout.experiment_path, storage_filesystem=layout.store.fs,
                          failure_config=tune.FailureConfig(max_failures=space.max_failures),
                          progress_reporter=make_reporter(), verbose=1,
                          callbacks=[ResultsCallback(layout, space, mlflow_uri)])


def _tune_config(space: Space, max_concurrent: int | None):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter

    s, sch = space.search, space.scheduler
    conc = max_concurrent or space.max_concurrent
    if s["algorithm"] == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        alg = OptunaSearch(seed=s["seed"])
        if conc:
            alg = ConcurrencyLimiter(alg, max_concurrent=conc)
    else:
        # max_concurrent_trials is ignored for a BasicVariantGenerator: give the cap to the generator itself
        alg = BasicVariantGenerator(max_concurrent=conc or 0, random_state=s["seed"])
    if sch["type"] == "asha":
        scheduler = ASHAScheduler(time_attr="epoch", max_t=sch.get("max_t", 1000),
                                  grace_period=sch.get("grace_period", 1),
                                  reduction_factor=sch.get("reduction_factor", 2))
    else:
        scheduler = FIFOScheduler()
    return tune.TuneConfig(metric=s["metric"], mode=s["mode"], search_alg=alg, scheduler=scheduler,
                           num_samples=space.num_samples,
                           reuse_actors=space.resources.in_process,
                           trial_dirname_creator=lambda t: t.trial_id)


def _write_sweep_json(layout: SweepLayout, space: Space, overrides: list[str], cli_args: dict) -> None:
    """The sweep's record, under the results root and (when they differ) in its storage, so that ``clmim resume
    NAME --storage URI`` works from any machine."""
    info = {"name": layout.name, "space_path": space.path, "space_text": Path(space.path).read_text(),
            "space": space.to_dict(), "overrides": overrides, "cli_args": cli_args, "code_version": code_version(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": socket.gethostname(),
            "python": platform.python_version(), "n_trials": space.n_trials(),
            "storage": layout.storage.to_dict() if layout.storage else None}
    write_json_atomic(layout.sweep_json, info, indent=2)
    if layout.storage:
        import json

        layout.store.write_text(layout.stored_sweep_json, json.dumps(info, indent=2))


def parse_storage(storage: str | None, endpoint: str | None, root: Path) -> Storage | None:
    """``--storage`` / ``--storage-endpoint`` as a checked ``Storage``; None (the results root) when not given."""
    if not storage:
        if endpoint:
            raise UserError("--storage-endpoint: given without --storage s3://BUCKET/PREFIX")
        return None
    st = Storage.parse(storage, endpoint, root)
    st.check_writable()
    return st


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
    layout = SweepLayout(root, sweep_name, parse_storage(storage, storage_endpoint, root))
    if layout.store.exists(layout.tune_path):  # (a sweep.json alone: a start that failed before any trial)
        where = root if not layout.storage else f"{root} or {layout.storage.uri}"
        raise UserError(f"--name: sweep {layout.name!r} already exists in {where}; "
                        f"continue it with `clmim resume {layout.name}` or pick another --name")
    from .tracking import default_mlflow_uri

    uri = default_mlflow_uri(root, mlflow_uri)
    init_ray(address)
    check_schedulable(space, ray_nodes())
    _write_sweep_json(layout, space, overrides or [], cli_args or {})
    from ray import tune

    _quiet_tune()
    run_config = _run_config(space, layout, uri)
    check_tracking(run_config.callbacks[0], uri)
    print_header(layout, space.n_trials(), uri)
    tuner = tune.Tuner(_trainable(space, layout), param_space=_param_space(space),
                       tune_config=_tune_config(space, max_concurrent), run_config=run_config)
    tuner.fit()
    return summarize(layout, space)


def check_tracking(callback, uri: str) -> None:
    """Create the sweep's MLflow parent run now, so an unreachable tracking server fails before any trial."""
    try:
        callback.parent_run()
    except Exception as e:  # noqa: BLE001 - any tracking failure is a usage error here
        raise SpaceError(f"--mlflow-uri: cannot use MLflow at {uri} ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None


def load_sweep_space(layout: SweepLayout) -> tuple[Space, dict]:
    """The space a sweep was started with (from its sweep.json), and that record; a damaged record is a
    ``UserError`` naming the file."""
    try:
        info = read_json(layout.sweep_json)
    except DamagedFile as e:
        raise UserError(f"sweep {layout.name!r}: {e}; it cannot be resumed") from None
    if info is None:
        raise UserError(f"sweep {layout.name!r}: no sweep.json in {layout.sweep_dir}; it cannot be resumed")
    if not (isinstance(info, dict) and isinstance(info.get("space"), dict) and info.get("space_path")):
        raise UserError(f"sweep {layout.name!r}: {layout.sweep_json} lacks the sweep's space; it cannot be resumed")
    space = space_from_dict(info["space"], Path(info["space_path"]))
    return space, info


def retire_errors(layout: SweepLayout) -> list[str]:
    """Move each trial's ``error.json`` aside (``error.prev.json``) so a retried trial really runs again;
    return the trial ids."""
    moved = []
    for trial in layout.trials():
        f = layout.error_path(trial)
        if layout.store.exists(f):
            layout.store.rename(f, f.rsplit("/", 1)[0] + "/error.prev.json")
            moved.append(trial)
    return moved


def _adopt_stored_sweep(layout: SweepLayout) -> None:
    """A sweep this results root has not seen (resumed on a fresh machine): copy its record from the storage."""
    if layout.sweep_json.exists():
        return
    text = layout.store.read_text(layout.stored_sweep_json)
    if text is None:
        return
    import json

    try:
        info = json.loads(text)
    except ValueError:
        raise UserError(f"sweep {layout.name!r}: {layout.store.display(layout.stored_sweep_json)} is damaged; "
                        "it cannot be resumed") from None
    check_results_root(layout.root)
    write_json_atomic(layout.sweep_json, info, indent=2)


def resume_sweep(name: str, results: str | None = None, address: str | None = None,
                 retry_errored: bool = False, mlflow_uri: str | None = None, storage: str | None = None,
                 storage_endpoint: str | None = None) -> dict:
    """Continue an interrupted sweep: finished trials stay, unfinished ones resume from their checkpoints;
    with ``retry_errored`` errored trials run again too (from their last checkpoint). Trials that ended while no
    driver was recording (or before this results root knew the sweep) are written to the tables and MLflow first.
    """
    root = results_root(results)
    st = Storage.parse(storage, storage_endpoint, root) if storage else None
    layout = find_sweep(name, root, need="tune", storage=st)
    _adopt_stored_sweep(layout)
    space, info = load_sweep_space(layout)
    from .tracking import default_mlflow_uri

    uri = default_mlflow_uri(layout.root, mlflow_uri or (info.get("cli_args") or {}).get("mlflow_uri"))
    init_ray(address)
    check_schedulable(space, ray_nodes())
    if retry_errored:
        retire_errors(layout)
    from ray import tune

    _quiet_tune()
    print_header(layout, space.n_trials(), uri, resumed=True)
    run_config = _run_config(space, layout, uri)
    backfill(run_config.callbacks[0], layout, skip_errored=retry_errored)
    tuner = tune.Tuner.restore(layout.tune_path, trainable=_trainable(space, layout), resume_unfinished=True,
                               resume_errored=retry_errored, storage_filesystem=layout.store.fs)
    from .ray_private import use_callbacks

    use_callbacks(tuner, run_config.callbacks)
    tuner.fit()
    return summarize(layout, space)


def backfill(callback, layout: SweepLayout, skip_errored: bool = False) -> int:
    """Record every trial Tune's saved state says has ended but the ``trials`` table lacks (it ended while the
    driver was dead, or this results root is new); return how many. Errored ones are left to a retry when
    ``skip_errored``."""
    from .results import recorded_trials, tune_trials

    have = recorded_trials(layout)
    n = 0
    for tid, t in tune_trials(layout).items():
        if tid in have or t.status not in ("TERMINATED", "ERROR") or (skip_errored and t.status == "ERROR"):
            continue
        callback.record_ended(t, t.status)
        n += 1
    if n:
        print(f"recorded {n} trial(s) that ended while no driver was recording", flush=True)
    return n


# ------------------------------------------------------------------------------------------- summary
def summarize(layout: SweepLayout, space: Space) -> dict:
    """One row per trial: id, status, sampled values, final (or latest) metrics, error reason.

    Ended trials come from the ``trials`` table (the record every other view uses); trials that have not ended
    from Tune's saved state (PENDING: a resume will run them)."""
    from .results import query, tune_trials

    axes = list(space.axes())
    saved = tune_trials(layout)
    ended = {}
    try:
        df = query("SELECT * FROM trials WHERE sweep = ?", layout.root, [layout.name])
        ended = {r["trial"]: r for r in df.to_dict(orient="records")}
    except UserError:
        pass
    rows = []
    for tid in sorted(set(saved) | set(ended)):
        if tid in ended:
            r = ended[tid]
            # a section axis (objective.weights) is shown as its table column (mix: the objective's label)
            row = {"trial": tid, "status": r["status"],
                   **{k: r.get("mix") if k == "objective.weights" else r.get(k) for k in axes},
                   **{k: r.get(k) for k in SUMMARY_METRICS}}
            if r.get("error"):
                row["error"] = str(r["error"])[:200]
        else:
            t = saved[tid]
            last = t.last_result or {}
            row = {"trial": tid, "status": "RUNNING" if t.status == "RUNNING" else "PENDING",
                   **{k: (t.config or {}).get(k) for k in axes}, **{k: last.get(k) for k in SUMMARY_METRICS}}
        rows.append(row)
    interrupted = any(r["status"] not in ("TERMINATED", "ERROR") for r in rows)
    errored = sum(r["status"] == "ERROR" for r in rows)
    return {"rows": rows, "interrupted": interrupted, "errored": errored, "layout": layout}
