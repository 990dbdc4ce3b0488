"""Running a sweep on Ray Tune: resource checks, the Tuner, resume, and the summary table.

Layout of one sweep under the results root::

    <results>/<sweep>/sweep.json        the space file's text, overrides, CLI arguments, code version
    <results>/<sweep>/tune/             Ray Tune's experiment (trial dirs: run/, checkpoints, result.json)
    <results>/<sweep>/train/            Ray Train storage of multi-worker trials
"""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Any

from .space import Space, SpaceError, space_from_dict

METRIC_COLUMNS = ["step", "epoch", "loss", "knn_top1", "linear_top1", "shape_bias"]
TRIAL_CPU_SLIVER = 0.01


def results_root(arg: str | None = None) -> Path:
    """--results, else $CLMIM_RESULTS, else ./clmim-results."""
    return Path(arg or os.environ.get("CLMIM_RESULTS") or "clmim-results").expanduser().resolve()


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
    """Connect to ``address`` / $RAY_ADDRESS, or start a local instance (dashboard on, everything on 127.0.0.1).

    Token authentication stays on: a local instance creates ~/.ray/auth_token, and a driver connecting to a
    cluster sends that token (RAY_AUTH_MODE=token) when the file exists.
    """
    address = address or os.environ.get("RAY_ADDRESS")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # the classic trial table (CLIReporter)
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")  # probe metrics arrive at the end only
    loopback = not address or address.split(":")[0] in ("127.0.0.1", "localhost")
    if loopback:
        # A one-machine cluster: keep node addresses on the loopback interface. Ray reads this when it is
        # imported; if it already was, set its constant too, or "127.0.0.1" resolves to the machine's address.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    if loopback and os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0":
        from ray._private import ray_constants

        ray_constants.ENABLE_RAY_CLUSTER = False
    if ray.is_initialized():
        return
    if address:
        if "RAY_AUTH_MODE" not in os.environ and (Path.home() / ".ray" / "auth_token").is_file():
            os.environ["RAY_AUTH_MODE"] = "token"
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(num_cpus=os.cpu_count(), include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=True)


# ------------------------------------------------------------------------------------------- tuner
def _param_space(space: Space) -> dict[str, Any]:
    from ray import tune

    make = {"grid": tune.grid_search, "choice": tune.choice, "uniform": lambda v: tune.uniform(*v),
            "loguniform": lambda v: tune.loguniform(*map(float, v)), "randint": lambda v: tune.randint(*v)}
    return {k: make[kind](vals) for k, (kind, vals) in space.axes().items()}


def _sweep_params(space: Space, sweep_dir: Path) -> dict:
    r = space.resources
    return {"base": space.base, "fixed": space.fixed(), "max_failures": space.max_failures,
            "sweep_dir": str(sweep_dir),
            "train_storage": str(sweep_dir / "train"),
            "resources": {"workers": r.workers, "cpus_per_worker": r.cpus_per_worker,
                          "gpus_per_worker": r.gpus_per_worker, "in_process": r.in_process}}


def _trainable(space: Space, sweep_dir: Path):
    from ray import tune

    from trainables.tune_trainable import run_trial

    bundle = trial_bundles(space)[0]
    resources = {"cpu": bundle["CPU"], "gpu": bundle["GPU"]}
    return tune.with_resources(tune.with_parameters(run_trial, sweep=_sweep_params(space, sweep_dir)), resources)


def _run_config(space: Space, sweep_dir: Path, mlflow_uri: str):
    from ray import tune

    from .tracking import ResultsCallback

    reporter = tune.CLIReporter(
        metric_columns=METRIC_COLUMNS, parameter_columns=list(space.axes()), max_report_frequency=10,
        sort_by_metric=False)
    return tune.RunConfig(name="tune", storage_path=str(sweep_dir),
                          failure_config=tune.FailureConfig(max_failures=space.max_failures),
                          checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
                          progress_reporter=reporter, verbose=1,
                          callbacks=[ResultsCallback(sweep_dir, space, mlflow_uri)])


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


def _write_sweep_json(sweep_dir: Path, space: Space, overrides: list[str], cli_args: dict) -> None:
    sweep_dir.mkdir(parents=True, exist_ok=True)
    info = {"name": sweep_dir.name, "space_path": space.path, "space_text": Path(space.path).read_text(),
            "space": space.to_dict(), "overrides": overrides, "cli_args": cli_args, "code_version": code_version(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": socket.gethostname(),
            "python": platform.python_version(), "n_trials": space.n_trials()}
    tmp = sweep_dir / "sweep.json.tmp"
    tmp.write_text(json.dumps(info, indent=2))
    os.replace(tmp, sweep_dir / "sweep.json")


def run_sweep(space: Space, name: str | None = None, results: str | None = None, address: str | None = None,
              max_concurrent: int | None = None, overrides: list[str] | None = None,
              cli_args: dict | None = None, mlflow_uri: str | None = None) -> dict:
    """Run every trial of ``space``; return the summary (rows per trial and whether the sweep was interrupted)."""
    name = name or space.name
    sweep_dir = results_root(results) / name
    if (sweep_dir / "tune").exists():
        raise SpaceError(f"--name: sweep {name!r} already exists in {sweep_dir.parent}; "
                         f"continue it with `clmim resume {name}` or pick another --name")
    init_ray(address)
    check_schedulable(space, ray_nodes())
    _write_sweep_json(sweep_dir, space, overrides or [], cli_args or {})
    from ray import tune

    from .tracking import default_mlflow_uri

    uri = default_mlflow_uri(sweep_dir.parent, mlflow_uri)
    run_config = _run_config(space, sweep_dir, uri)
    check_tracking(run_config.callbacks[0], uri)
    tuner = tune.Tuner(_trainable(space, sweep_dir), param_space=_param_space(space),
                       tune_config=_tune_config(space, max_concurrent), run_config=run_config)
    grid = tuner.fit()
    return summarize(grid, space, sweep_dir)


def check_tracking(callback, uri: str) -> None:
    """Create the sweep's MLflow parent run now, so an unreachable tracking server fails before any trial."""
    try:
        callback.parent_run()
    except Exception as e:  # noqa: BLE001 - any tracking failure is a usage error here
        raise SpaceError(f"--mlflow-uri: cannot use MLflow at {uri} ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None


def load_sweep_space(sweep_dir: Path) -> tuple[Space, dict]:
    """The space a sweep was started with (from its sweep.json), and that record."""
    info_path = sweep_dir / "sweep.json"
    if not info_path.is_file():
        raise SpaceError(f"sweep {sweep_dir.name!r}: no sweep.json in {sweep_dir}")
    info = json.loads(info_path.read_text())
    space = space_from_dict(info["space"], Path(info["space_path"]))
    return space, info


def resume_sweep(name: str, results: str | None = None, address: str | None = None,
                 retry_errored: bool = False) -> dict:
    """Continue an interrupted sweep: finished trials stay, unfinished ones resume from their checkpoints."""
    sweep_dir = results_root(results) / name
    if not (sweep_dir / "tune").is_dir():
        raise SpaceError(f"sweep {name!r} not found under {sweep_dir.parent}")
    space, _ = load_sweep_space(sweep_dir)
    init_ray(address)
    check_schedulable(space, ray_nodes())
    from ray import tune

    tuner = tune.Tuner.restore(str(sweep_dir / "tune"), trainable=_trainable(space, sweep_dir),
                               resume_unfinished=True, resume_errored=retry_errored)
    return summarize(tuner.fit(), space, sweep_dir)


# ------------------------------------------------------------------------------------------- summary
def summarize(grid, space: Space, sweep_dir: Path) -> dict:
    """One row per trial: id, status, sampled values, latest metrics, error reason.

    Statuses come from the experiment state Tune saved (what a resume would see): after an interrupt, unfinished
    trials are PENDING there even though the in-memory ones were stopped.
    """
    from ray.tune import ExperimentAnalysis

    statuses = {t.trial_id: t.status for t in ExperimentAnalysis(str(sweep_dir / "tune")).trials}
    rows = []
    for r in grid:
        m = r.metrics or {}
        tid = m.get("trial_id") or Path(r.path).name
        row = {"trial": tid, "status": statuses.get(tid, "ERROR" if r.error else "TERMINATED")}
        row.update({k: r.config.get(k) for k in space.axes()})
        row.update({k: m.get(k) for k in METRIC_COLUMNS if k in m})
        if r.error:
            row["error"] = str(r.error).strip().splitlines()[-1][:200]
        rows.append(row)
    rows.sort(key=lambda x: x["trial"])
    interrupted = any(r["status"] not in ("TERMINATED", "ERROR") for r in rows)
    return {"rows": rows, "interrupted": interrupted}


def print_summary(summary: dict, title: str, counts: bool = True) -> None:
    from rich.console import Console
    from rich.table import Table

    rows = summary["rows"]
    cols = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    table = Table(title=title)
    for c in cols:
        table.add_column(c, overflow="fold")
    for r in rows:
        table.add_row(*[_fmt(r.get(c)) for c in cols])
    Console(width=max(120, min(220, 14 * len(cols)))).print(table)
    if counts:
        by = Counter(r["status"] for r in rows)
        print(", ".join(f"{v} {k.lower()}" for k, v in sorted(by.items())))


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
