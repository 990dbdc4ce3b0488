"""Sweep scale: the real driver (``clmim sweep``: Ray Tune, the callback and its writers, MLflow, the Parquet
tables and their manifest, the console) over N simulated trials (``run.simulate``: the product's trial entry
point, the training replaced by sleeps, reporting what a real trial reports), against Ray Tune alone running the
same trials with no clmim callback.

    python benchmarks/sweep_scale.py --trials 1000 --concurrent 200 --mlflow sqlite off tune-alone

Ray: a head node started here with ``--num-cpus`` logical CPUs (default 256: a simulated cluster), plus
``--nodes`` worker nodes (``ray start`` in their own mount namespace, as the tests start them), all on 127.0.0.1.
Each trial reports ``--results`` times (the untrained evaluation, ``results - 2`` log steps, the final one) over
``--trial-seconds``. Per run it prints and writes (``--json``): wall time against the ideal (trials x trial seconds
/ concurrency), the driver's CPU seconds per result and per trial and its peak RSS (``getrusage`` of the driver
process), seconds in each Tune hook on the event loop and in each writer, results dropped by a writer, and the rows
of every table and of MLflow against what the trials reported (exactly once).

``--mlflow postgres`` runs an MLflow tracking server over PostgreSQL (``benchmarks/mlflow_postgres.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
from mlflow_postgres import MlflowServer  # noqa: E402

from orchestrator.results import curves_from_results, layers_from_results, noise_from_results  # noqa: E402
from orchestrator.tracking import _metric_items  # noqa: E402
from trainables.config import load_config  # noqa: E402
from trainables.simulate import simulate  # noqa: E402

BIN = Path(sys.executable).parent


def space(trials: int, results: int, trial_seconds: float, checkpoint_mb: float, concurrent: int,
          cpus: float = 1.0) -> dict:
    """N trials (one per seed) of a micro/4 config whose simulated trial reports ``results`` times."""
    steps = results - 2  # + the untrained evaluation + the final report
    return {"name": "scale",
            "base": {"model": {"variant": "micro/4", "img_size": 32},
                     "data": {"dataset": "synthetic", "batch_size": 64, "train_size": 1024, "eval_size": 256},
                     "optim": {"steps": steps},
                     "eval": {"samples": 128, "probe_images": 16, "dense_images": 0, "noise": {"bands": 4}},
                     "run": {"log_every": 1, "ckpt_every": max(1, steps // 2),
                             "simulate": {"seconds_per_step": trial_seconds / steps, "checkpoint_mb": checkpoint_mb}}},
            "space": {"run.seed": {"grid": list(range(trials))}},
            "search": {"algorithm": "grid", "metric": "val_linear_top1", "mode": "max"},
            "resources": {"workers": 1, "cpus_per_worker": cpus}, "max_concurrent": concurrent}


def expected_rows(raw: dict) -> dict[str, int]:
    """Rows one trial puts in each table and MLflow metrics (run, key, step) it logs: from the same simulated
    reports the trials make."""
    reports = []
    simulate(load_config(raw["base"], {"run.simulate.checkpoint_mb": 0}), lambda m, checkpoint=None:
             reports.append(m), sleep=lambda s: None)
    mlflow = {(k, int(r["step"])) for r in reports for k in _metric_items(r)}
    return {"curves": len(curves_from_results(reports)), "layers": len(layers_from_results(reports)),
            "robustness": len(noise_from_results(reports, 4)), "mlflow": len(mlflow), "results": len(reports)}


def start_ray(num_cpus: int, nodes: int, env: dict) -> tuple[str, list]:
    from conftest import _free_port
    from raynodes import kill_tree, start_node  # (the tests' node starter: worker nodes in mount namespaces)

    port = _free_port()
    procs = [start_node(["--head", f"--port={port}", f"--num-cpus={num_cpus}", "--include-dashboard=true",
                         "--dashboard-host=127.0.0.1", f"--dashboard-port={_free_port()}"], env, namespace=False)]
    for _ in range(nodes):
        procs.append(start_node([f"--address=127.0.0.1:{port}", f"--num-cpus={num_cpus // max(1, nodes)}"], env,
                                namespace=True))
    return f"127.0.0.1:{port}", [lambda p=p: kill_tree(p) for p in procs]


def run_driver(cmd: list[str], env: dict, log: Path) -> dict:
    """Run the driver as a child process; its wall time, CPU seconds and peak RSS (``wait4``)."""
    t = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t
    return {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime, "peak_rss_mb": usage.ru_maxrss / 1024,
            "exit": os.waitstatus_to_exitcode(status)}


def count_rows(results: Path, uri: str | None) -> dict:
    from orchestrator.query import query

    got = query("SELECT (SELECT count(*) FROM trials) AS trials, (SELECT count(*) FROM trials WHERE status = "
                "'TERMINATED') AS terminated, (SELECT count(*) FROM curves) AS curves, (SELECT count(*) FROM "
                "(SELECT DISTINCT trial, step, metric FROM curves)) AS curves_distinct, (SELECT count(*) FROM layers)"
                " AS layers, (SELECT count(*) FROM robustness) AS robustness", results).iloc[0].to_dict()
    got = {k: int(v) for k, v in got.items()}
    if uri:
        import sqlalchemy

        db = uri if not uri.startswith("http") else os.environ["CLMIM_BENCH_MLFLOW_DB"]
        with sqlalchemy.create_engine(db).connect() as c:
            q = ("SELECT count(*) , count(DISTINCT (m.run_uuid || m.key || CAST(m.step AS VARCHAR))) FROM metrics m "
                 "JOIN tags t ON t.run_uuid = m.run_uuid AND t.key = 'clmim.role' AND t.value = 'trial'")
            n, distinct = c.execute(sqlalchemy.text(q)).one()
            runs = c.execute(sqlalchemy.text("SELECT count(*) FROM runs r JOIN tags t ON t.run_uuid = r.run_uuid "
                                             "AND t.key = 'clmim.role' AND t.value = 'trial' WHERE r.status = "
                                             "'FINISHED'")).scalar()
        got.update(mlflow_metrics=int(n), mlflow_distinct=int(distinct), mlflow_finished_runs=int(runs))
    return got


def one_run(mode: str, args, raw: dict, expect: dict, work: Path, address: str, env: dict) -> dict:
    results = work / f"results-{mode}"
    shutil.rmtree(results, ignore_errors=True)
    space_file = work / "scale.yaml"
    space_file.write_text(yaml.safe_dump(raw))
    stats = work / f"stats-{mode}.json"
    env = {**env, "CLMIM_DRIVER_STATS": str(stats)}
    server = None
    if mode == "tune-alone":
        cmd = [sys.executable, str(Path(__file__).resolve().parent / "tune_alone.py"), str(space_file), str(results),
               address]
        uri = None
    else:
        uri = {"sqlite": f"sqlite:///{results / 'mlflow.db'}", "off": "off"}.get(mode)
        if mode == "postgres":
            server = MlflowServer(work / "pg")
            uri = server.start()
            env["CLMIM_BENCH_MLFLOW_DB"] = server.db_uri
        cmd = [str(BIN / "clmim"), "sweep", str(space_file), "--results", str(results), "--address", address,
               "--mlflow-uri", uri]
        if args.profile:  # the event loop's (main thread's) profile
            cmd = [sys.executable, "-m", "cProfile", "-o", str(work / f"driver-{mode}.prof"), *cmd]
    try:
        print(f"[{mode}] {args.trials} trials, {args.concurrent} at a time ...", flush=True)
        out = run_driver(cmd, env, work / f"driver-{mode}.log")
        n_results = args.trials * expect["results"]
        ideal = args.trials * args.trial_seconds / args.concurrent
        row = {"mode": mode, "trials": args.trials, "concurrent": args.concurrent, "results": n_results,
               "ideal_s": ideal, **out, "wall_vs_ideal": out["wall_s"] / ideal,
               "cpu_ms_per_result": 1000 * out["cpu_s"] / n_results,
               "cpu_ms_per_trial": 1000 * out["cpu_s"] / args.trials,
               "results_per_s": n_results / out["wall_s"], "trials_per_s": args.trials / out["wall_s"]}
        if mode != "tune-alone":
            got = count_rows(results, env.get("CLMIM_BENCH_MLFLOW_DB") or (uri if mode == "sqlite" else None))
            want = {"trials": args.trials, "terminated": args.trials, "curves": args.trials * expect["curves"],
                    "curves_distinct": args.trials * expect["curves"], "layers": args.trials * expect["layers"],
                    "robustness": args.trials * expect["robustness"]}
            if "mlflow_metrics" in got:
                n = args.trials * expect["mlflow"]
                want.update(mlflow_metrics=n, mlflow_distinct=n, mlflow_finished_runs=args.trials)
            row["rows"] = got
            row["exactly_once"] = all(got[k] == v for k, v in want.items())
            row["rows_wanted"] = want
            if stats.is_file():
                row["driver"] = json.loads(stats.read_text())
        return row
    finally:
        if server is not None:
            server.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=1000)
    ap.add_argument("--concurrent", type=int, default=200)
    ap.add_argument("--results", type=int, default=10, help="reports per trial (>= 3)")
    ap.add_argument("--trial-seconds", type=float, default=10.0)
    ap.add_argument("--checkpoint-mb", type=float, default=0.05)
    ap.add_argument("--num-cpus", type=int, default=256)
    ap.add_argument("--cpus-per-trial", type=float, default=1.0, help="logical CPUs each trial asks for")
    ap.add_argument("--nodes", type=int, default=0, help="worker nodes besides the head")
    ap.add_argument("--mlflow", nargs="+", default=["sqlite", "off", "tune-alone"],
                    choices=["sqlite", "postgres", "off", "tune-alone"])
    ap.add_argument("--profile", action="store_true", help="run the driver under cProfile (driver-MODE.prof)")
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="clmim-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    raw = space(args.trials, args.results, args.trial_seconds, args.checkpoint_mb, args.concurrent,
                args.cpus_per_trial)
    expect = expected_rows(raw)
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "token",
           "PYTHONPATH": str(ROOT)}
    address, stops = start_ray(args.num_cpus, args.nodes, env)
    rows = []
    try:
        for mode in args.mlflow:
            rows.append(one_run(mode, args, raw, expect, work, address, env))
            r = rows[-1]
            print(json.dumps({k: v for k, v in r.items() if k not in ("driver", "rows_wanted")}, default=str),
                  flush=True)
            if args.json:
                args.json.write_text(json.dumps(rows, indent=1, default=str))
    finally:
        for stop in stops:
            stop()
    print(f"work folder: {work}")


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(1))
    main()
