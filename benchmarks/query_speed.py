"""Query speed: clmim's SQL views versus mlflow.search_runs, on the same synthetic runs, in one run.

Builds a results root of N trials (default 10,000; 100 curve rows each, so ~1M curve rows) with clmim's own
writer (``--batch`` trials per write, as the driver writes them), and the same N runs (params objective.lam and
model.variant, final linear_top1) in an SQLite MLflow store; then answers "best final linear-probe accuracy per
model variant and lam" both ways.

    python benchmarks/query_speed.py --trials 10000
    python benchmarks/query_speed.py --trials 100000 --no-mlflow
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from orchestrator.query import query
from orchestrator.results import COMPACT_BATCH, Attempt, compact, write_attempts

VARIANTS = ["nano/4", "micro/4", "mini/4", "Ti/16", "S/16", "B/16"]
LAMS = [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
SQL = ("SELECT variant, lam, max(linear_top1) AS best FROM trials WHERE status = 'TERMINATED' "
       "GROUP BY variant, lam ORDER BY variant, lam")


def synthetic_trials(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    for i in range(n):
        variant, lam = VARIANTS[i % len(VARIANTS)], LAMS[(i // len(VARIANTS)) % len(LAMS)]
        acc = float(rng.uniform(0.1, 0.9))
        results = [{"step": s, "epoch": s / 10, "loss": float(2 - s / 60 + rng.normal(0, 0.01)),
                    "lr": 1e-3 * (1 - s / 60)} for s in range(1, 51)]
        results.append({"step": 50, "linear_top1": acc, "knn_top1": acc * 0.9, "params": 1000})
        config = {"model": {"variant": variant, "img_size": 32}, "objective": {"lam": lam},
                  "data": {"batch_size": 64}, "run": {"seed": i}}
        yield f"trial{i:05d}", variant, lam, acc, config, results


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=10_000)
    ap.add_argument("--sweeps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=32,
                    help="trials per write (the driver writes every trial that ended in the last second at once)")
    ap.add_argument("--no-mlflow", action="store_true", help="the SQL side only (100,000 MLflow runs take hours)")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="clmim-query-"))
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = exp = None
    if not args.no_mlflow:
        client = MlflowClient(uri)
        exp = client.create_experiment("bench", artifact_location=(root / "art").as_uri())
    t = time.perf_counter()
    t_parquet = t_mlflow = 0.0
    pending: dict[int, list[Attempt]] = {}
    for i, (trial, variant, lam, acc, config, results) in enumerate(synthetic_trials(args.trials)):
        a = time.perf_counter()
        batch = pending.setdefault(i % args.sweeps, [])
        batch.append(Attempt(trial, "TERMINATED", config, results))
        if len(batch) >= args.batch:
            write_attempts(root / f"sweep{i % args.sweeps}", pending.pop(i % args.sweeps))
        b = time.perf_counter()
        if client is not None:
            run = client.create_run(exp, run_name=trial)
            client.log_batch(run.info.run_id, metrics=[Metric("linear_top1", acc, 0, 50)],
                             params=[Param("model.variant", variant), Param("objective.lam", str(lam))])
            client.set_terminated(run.info.run_id)
        t_parquet += b - a
        t_mlflow += time.perf_counter() - b
        if (i + 1) % 10_000 == 0:
            print(f"built {i + 1} trials ({time.perf_counter() - t:.0f} s)", flush=True)
    for s, batch in pending.items():
        write_attempts(root / f"sweep{s}", batch)
    n_curves = query("SELECT count(*) AS n FROM curves", root).n[0]
    print(f"built: {args.trials} trials, {n_curves} curve rows; writing took parquet {t_parquet:.1f} s, "
          f"mlflow {t_mlflow:.1f} s")

    import mlflow

    times = {}

    def sql(label):
        a = time.perf_counter()
        out = query(SQL, root)
        times.setdefault(label, []).append(time.perf_counter() - a)
        return out

    for _rep in range(3):  # one file per table per batch of trials, as the driver writes them
        sql("sql_unmerged")
    # What the driver leaves while a sweep runs: its files merged COMPACT_BATCH at a time.
    for i in range(args.sweeps):
        compact(root / f"sweep{i}", batch=COMPACT_BATCH)
    for _rep in range(3):
        sql("sql_running")
    a = time.perf_counter()
    merged = sum(compact(root / f"sweep{i}") for i in range(args.sweeps))
    t_compact = time.perf_counter() - a
    for _rep in range(5):  # the first call of a snapshot builds its database; the later ones reuse it
        out = sql("sql")
        if client is not None:
            mlflow.set_tracking_uri(uri)
            a = time.perf_counter()
            runs = mlflow.search_runs(experiment_ids=[exp], max_results=args.trials + 10)
            best = (runs.groupby(["params.model.variant", "params.objective.lam"])["metrics.linear_top1"].max()
                    .reset_index())
            times.setdefault("mlflow", []).append(time.perf_counter() - a)
            assert len(best) == len(out) and np.allclose(sorted(best["metrics.linear_top1"]), sorted(out.best))
    cold = subprocess.run([sys.executable, "-c", COLD, str(root)], capture_output=True, text=True, check=True)
    print(f"\ncompaction at sweep end (as the driver does): {merged} files merged in {t_compact:.1f} s")
    print(f"\n'best linear_top1 per variant and lam' over {args.trials} trials ({len(out)} groups):")

    def med(k):
        return float(np.median(times[k][1:] if len(times[k]) > 1 else times[k]))

    print(f"  clmim SQL, one file per table per {args.batch} trials: first {times['sql_unmerged'][0]:.3f} s, "
          f"then {med('sql_unmerged'):.3f} s")
    print(f"  clmim SQL, running sweep (merged {COMPACT_BATCH} at a time): first {times['sql_running'][0]:.3f} s, "
          f"then {med('sql_running'):.3f} s")
    print(f"  clmim SQL, finished sweep (compacted): first {times['sql'][0]:.3f} s, then {med('sql'):.3f} s "
          f"(median of {len(times['sql']) - 1}); a new process's first query (after imports) {cold.stdout.strip()} s")
    if client is not None:
        m = float(np.median(times["mlflow"]))
        print(f"  mlflow.search_runs + pandas: {m:.3f} s (median of {len(times['mlflow'])})")
        print(f"  ratio mlflow / clmim SQL: {m / med('sql'):.0f}x (a new process's first query: "
              f"{m / float(cold.stdout):.0f}x)")


COLD = f"""
import sys, time
sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
from orchestrator.query import query
t = time.perf_counter()
query({SQL!r}, sys.argv[1])
print(f"{{time.perf_counter() - t:.3f}}")
"""


if __name__ == "__main__":
    main()
