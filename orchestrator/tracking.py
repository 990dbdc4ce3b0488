"""The sweep driver's Tune callback: MLflow runs and Parquet tables, written by one process.

All trials report to the driver, so this callback is the only writer of the MLflow store (an SQLite file is
safe with a single writer) and of the Parquet tables. Each sweep is one MLflow experiment with a parent run for
the sweep and a child run per trial (found again by its ``clmim.trial_id`` tag, so a retried or resumed trial
continues its child run).
"""

from __future__ import annotations

import json
from pathlib import Path

from ray.tune import Callback

from trainables.config import flatten, to_dict

from .results import (
    COMPACT_BATCH,
    TUNE_KEYS,
    compact,
    read_error,
    read_result_json,
    trial_config_from_dir,
    write_trial_tables,
)
from .space import Space, trial_config


def default_mlflow_uri(results_root: Path, uri: str | None = None) -> str:
    """--mlflow-uri, else $MLFLOW_TRACKING_URI, else an SQLite file under the results root."""
    import os

    return uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{results_root / 'mlflow.db'}"


def _metric_items(result: dict) -> dict[str, float]:
    return {k: float(v) for k, v in result.items()
            if k not in TUNE_KEYS and isinstance(v, (int, float)) and not isinstance(v, bool) and v == v}


class ResultsCallback(Callback):
    """Logs trials to MLflow as they report and writes their Parquet tables when they end."""

    def __init__(self, sweep_dir: Path, space: Space, mlflow_uri: str):
        self.sweep_dir = Path(sweep_dir)
        self.space = space
        self.mlflow_uri = mlflow_uri
        self._client = None
        self._runs: dict[str, str] = {}
        self._parent: str | None = None
        self._experiment: str | None = None
        self._results: dict[str, list[dict]] = {}

    def __getstate__(self):  # Tune pickles callbacks with the experiment; the client is rebuilt lazily
        return {**self.__dict__, "_client": None, "_results": {}}

    # ---------------------------------------------------------------------------------- mlflow plumbing
    @property
    def client(self):
        if self._client is None:
            import os

            from mlflow.tracking import MlflowClient

            # a dead tracking server should fail in seconds, not after minutes of retries
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
            self._client = MlflowClient(tracking_uri=self.mlflow_uri)
        return self._client

    def _experiment_id(self) -> str:
        if self._experiment is None:
            name = f"clmim/{self.sweep_dir.name}"
            exp = self.client.get_experiment_by_name(name)
            if exp is None:
                local = not self.mlflow_uri.startswith(("http://", "https://", "databricks"))
                where = (self.sweep_dir.parent / "mlartifacts" / self.sweep_dir.name).as_uri() if local else None
                self._experiment = self.client.create_experiment(name, artifact_location=where)
            else:
                self._experiment = exp.experiment_id
        return self._experiment

    def _find_run(self, tag: str, value: str) -> str | None:
        runs = self.client.search_runs([self._experiment_id()], filter_string=f"tags.`{tag}` = '{value}'",
                                       max_results=1)
        return runs[0].info.run_id if runs else None

    def _log_params(self, run_id: str, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(run_id, params=items[i:i + 100])

    def parent_run(self) -> str:
        if self._parent is None:
            self._parent = self._find_run("clmim.role", "sweep")
            if self._parent is None:
                run = self.client.create_run(self._experiment_id(), run_name=self.sweep_dir.name,
                                             tags={"clmim.role": "sweep", "clmim.sweep": self.sweep_dir.name})
                self._parent = run.info.run_id
                info = json.loads((self.sweep_dir / "sweep.json").read_text())
                params = {f"space.{k}": json.dumps(v) for k, v in self.space.space.items()}
                params.update({f"cli.{k}": json.dumps(v) for k, v in (info.get("cli_args") or {}).items()})
                params.update({"search": json.dumps(self.space.search), "scheduler": json.dumps(self.space.scheduler),
                               "num_samples": str(self.space.num_samples), "code_version": info["code_version"]})
                self._log_params(self._parent, {k: v[:6000] for k, v in params.items()})
                self.client.log_artifact(self._parent, str(self.sweep_dir / "sweep.json"))
            else:
                self.client.update_run(self._parent, status="RUNNING")
        return self._parent

    def child_run(self, trial) -> str:
        tid = trial.trial_id
        if tid not in self._runs:
            run_id = self._find_run("clmim.trial_id", tid)
            if run_id is None:
                run = self.client.create_run(self._experiment_id(), run_name=tid, tags={
                    "mlflow.parentRunId": self.parent_run(), "clmim.trial_id": tid,
                    "clmim.sweep": self.sweep_dir.name, "clmim.role": "trial"})
                run_id = run.info.run_id
                cfg = flatten(to_dict(trial_config(self.space, dict(trial.config))))
                self._log_params(run_id, {k: str(v) for k, v in cfg.items()})
            else:
                self.client.update_run(run_id, status="RUNNING")  # a retry or resume continues this run
            self._runs[tid] = run_id
        return self._runs[tid]

    # ---------------------------------------------------------------------------------- Tune hooks
    def setup(self, **info):
        self.parent_run()

    def on_trial_start(self, iteration, trials, trial, **info):
        self.child_run(trial)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        from mlflow.entities import Metric

        self._results.setdefault(trial.trial_id, []).append(dict(result))
        step = int(result.get("step", result.get("training_iteration", 0)))
        ts = int(result.get("timestamp", 0) * 1000)
        metrics = [Metric(k, v, ts, step) for k, v in _metric_items(result).items()]
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(self.child_run(trial), metrics=metrics[i:i + 1000])

    def _finish(self, trial, status: str):
        trial_dir = self.sweep_dir / "tune" / trial.trial_id
        # result.json holds what earlier drivers saw (a resumed sweep); the latest reports may not be flushed to it
        # yet, so add the ones this driver received.
        results, seen = [], set()
        for r in read_result_json(trial_dir) + self._results.pop(trial.trial_id, []):
            key = json.dumps(r, sort_keys=True, default=str)
            if key not in seen:
                seen.add(key)
                results.append(r)
        err = None
        if status == "ERROR":
            err = read_error(trial_dir)
            if err is None:  # no error.json (e.g. a lost process out of retries): the last line of Tune's trace
                lines = (trial.get_error() or "").strip().splitlines()
                err = lines[-1][:500] if lines else "unknown error"
        cfg = trial_config_from_dir(trial_dir) or to_dict(trial_config(self.space, dict(trial.config)))
        write_trial_tables(self.sweep_dir, trial.trial_id, status, cfg, results, error=err)
        compact(self.sweep_dir, batch=COMPACT_BATCH)  # keeps queries over a running sweep fast
        run_id = self.child_run(trial)
        if (trial_dir / "run" / "config.yaml").is_file():
            self.client.log_artifact(run_id, str(trial_dir / "run" / "config.yaml"))
        if err:
            self.client.set_tag(run_id, "clmim.error", err[:5000])
        self.client.set_terminated(run_id, status="FINISHED" if status == "TERMINATED" else "FAILED")

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._finish(trial, "TERMINATED")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._finish(trial, "ERROR")

    def on_experiment_end(self, trials, **info):
        compact(self.sweep_dir)
        done = all(t.status in ("TERMINATED", "ERROR") for t in trials)
        self.client.set_terminated(self.parent_run(), status="FINISHED" if done else "KILLED")
