"""The sweep driver's Tune callback: MLflow runs and Parquet tables, written by one process.

All trials report to the driver, so this callback is the only writer of the MLflow store (an SQLite file is
safe with a single writer) and of the Parquet tables. Each sweep is one MLflow experiment with a parent run for
the sweep (its summary and best trial at the end) and a child run per trial, named by what distinguishes it
(``lam=0.25 micro/4 seed=0``) and found again by its ``clmim.trial_id`` tag, so a retried or resumed trial
continues its child run. A step already logged to a run is never logged again (a resumed trial repeats the
steps after its checkpoint).

A failed write (a full disk, a tracking server gone) does not stop the sweep: it is reported on stderr once per
trial with what to run after fixing it (``clmim results rebuild NAME``); Tune's own state stays resumable.
"""

from __future__ import annotations

import sys
import traceback
from pathlib import Path

from ray.tune import Callback

from trainables.config import flatten, to_dict
from trainables.vocab import HIGHER_IS_BETTER, TUNE_KEYS, objective_label

from .layout import SweepLayout
from .results import COMPACT_BATCH, compact, read_error, read_result_json, stored_config, write_trial_tables
from .space import Space, trial_config


def default_mlflow_uri(results_root: Path, uri: str | None = None) -> str:
    """--mlflow-uri, else $MLFLOW_TRACKING_URI, else an SQLite file under the results root."""
    import os

    return uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{results_root / 'mlflow.db'}"


def _metric_items(result: dict) -> dict[str, float]:
    return {k: float(v) for k, v in result.items()
            if k not in TUNE_KEYS and isinstance(v, (int, float)) and not isinstance(v, bool) and v == v}


def trial_label(space: Space, values: dict) -> str:
    """What distinguishes a trial, for people: ``lam=0.25 micro/4 seed=0`` (``MAE micro/4 seed=0``, ``mix 0.5 MAE +
    0.5 DINO ...``) plus any other varied axis."""
    cfg = trial_config(space, values)
    o = cfg.objective
    what = f"lam={o.lam:g}" if o.lam is not None else objective_label(o.mix())
    label = f"{what} {cfg.model.variant} seed={cfg.run.seed}"
    shown = {"objective.lam", "objective.weights", "model.variant", "run.seed"}
    extra = [f"{k.rsplit('.', 1)[-1]}={v:g}" if isinstance(v, float) else f"{k.rsplit('.', 1)[-1]}={v}"
             for k, v in values.items() if k not in shown]
    return " ".join([label, *extra])


class ResultsCallback(Callback):
    """Logs trials to MLflow as they report and writes their Parquet tables when they end."""

    def __init__(self, layout: SweepLayout, space: Space, mlflow_uri: str):
        self.layout = layout
        self.sweep_dir = layout.sweep_dir
        self.space = space
        self.mlflow_uri = mlflow_uri
        self._client = None
        self._runs: dict[str, str] = {}
        self._parent: str | None = None
        self._experiment: str | None = None
        self._results: dict[str, list[dict]] = {}
        self._logged: dict[tuple[str, str], int] = {}  # (run id, metric) -> last step logged
        self._fresh: set[str] = set()  # runs this driver created: nothing logged before it
        self._warned: set[str] = set()

    def __getstate__(self):  # Tune pickles callbacks with the experiment; the client is rebuilt lazily
        return {**self.__dict__, "_client": None, "_results": {}, "_logged": {}, "_fresh": set(), "_warned": set()}

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
            name = f"clmim/{self.layout.name}"
            exp = self.client.get_experiment_by_name(name)
            if exp is None:
                local = not self.mlflow_uri.startswith(("http://", "https://", "databricks"))
                where = self.layout.mlflow_artifacts.as_uri() if local else None
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
                from trainables.files import read_json

                run = self.client.create_run(self._experiment_id(), run_name=self.layout.name,
                                             tags={"clmim.role": "sweep", "clmim.sweep": self.layout.name})
                self._parent = run.info.run_id
                info = read_json(self.layout.sweep_json, {})
                params = {f"space.{k}": json_dumps(v) for k, v in self.space.space.items()}
                params.update({f"cli.{k}": json_dumps(v) for k, v in (info.get("cli_args") or {}).items()})
                params.update({"search": json_dumps(self.space.search),
                               "scheduler": json_dumps(self.space.scheduler),
                               "num_samples": str(self.space.num_samples),
                               "code_version": str(info.get("code_version"))})
                self._log_params(self._parent, {k: v[:6000] for k, v in params.items()})
                self.client.log_artifact(self._parent, str(self.layout.sweep_json))
            else:
                self.client.update_run(self._parent, status="RUNNING")
        return self._parent

    def child_run(self, trial) -> str:
        tid = trial.trial_id
        if tid not in self._runs:
            run_id = self._find_run("clmim.trial_id", tid)
            if run_id is None:
                values = dict(trial.config)
                run = self.client.create_run(self._experiment_id(), run_name=trial_label(self.space, values), tags={
                    "mlflow.parentRunId": self.parent_run(), "clmim.trial_id": tid,
                    "clmim.sweep": self.layout.name, "clmim.role": "trial"})
                run_id = run.info.run_id
                self._fresh.add(run_id)
                cfg = flatten(to_dict(trial_config(self.space, values)))
                self._log_params(run_id, {k: str(v) for k, v in cfg.items()})
            else:
                self.client.update_run(run_id, status="RUNNING")  # a retry or resume continues this run
            self._runs[tid] = run_id
        return self._runs[tid]

    def _last_step(self, run_id: str, key: str) -> int:
        """The last step of ``key`` logged to the run (from MLflow the first time, for a run an earlier driver
        created: one query per metric of a resumed run, none for a new run)."""
        if (run_id, key) not in self._logged and run_id in self._fresh:
            return -1
        if (run_id, key) not in self._logged:
            history = self.client.get_metric_history(run_id, key)
            self._logged[(run_id, key)] = max((m.step for m in history), default=-1)
        return self._logged[(run_id, key)]

    def _warn(self, trial_id: str, what: str, e: BaseException) -> None:
        if trial_id in self._warned:
            return
        self._warned.add(trial_id)
        reason = getattr(e, "strerror", None) or str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        print(f"clmim: could not {what} for trial {trial_id} ({type(e).__name__}: {reason}); the sweep goes on. "
              f"Once fixed, run: clmim results rebuild {self.layout.name}", file=sys.stderr, flush=True)

    # ---------------------------------------------------------------------------------- Tune hooks
    def setup(self, **info):
        self.parent_run()

    def on_trial_start(self, iteration, trials, trial, **info):
        try:
            self.child_run(trial)
        except Exception as e:  # noqa: BLE001 - tracking must not stop the sweep
            self._warn(trial.trial_id, "create its MLflow run", e)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        from mlflow.entities import Metric

        self._results.setdefault(trial.trial_id, []).append(dict(result))
        try:
            run_id = self.child_run(trial)
            step = int(result.get("step", result.get("training_iteration", 0)))
            ts = int(result.get("timestamp", 0) * 1000)
            metrics = []
            for k, v in _metric_items(result).items():
                if step > self._last_step(run_id, k):
                    metrics.append(Metric(k, v, ts, step))
                    self._logged[(run_id, k)] = step
            for i in range(0, len(metrics), 1000):
                self.client.log_batch(run_id, metrics=metrics[i:i + 1000])
        except Exception as e:  # noqa: BLE001
            self._warn(trial.trial_id, "log metrics to MLflow", e)

    def _finish(self, trial, status: str):
        """Record an ended trial: its tables (from the storage's result.json and what this driver received), its
        config as the trial wrote it, its error; its MLflow run's end; its checkpoints beyond the kept ones."""
        layout, tid = self.layout, trial.trial_id
        # result.json holds what earlier drivers saw (a resumed sweep); the latest reports may not be synced to it
        # yet, so add the ones this driver received.
        results, seen = [], set()
        for r in read_result_json(layout, tid) + self._results.pop(tid, []):
            key = json_dumps(r)
            if key not in seen:
                seen.add(key)
                results.append(r)
        if status == "TERMINATED" and not any("resumed_from" in r for r in results):
            # its final report is in no result.json this driver can read (the driver that received it died before
            # syncing it): the trial's own record of it
            final = layout.store.read_text(f"{layout.run_path(tid)}/final_metrics.json")
            if final is not None:
                import json

                results.append(json.loads(final))
        err = None
        if status == "ERROR":
            err = read_error(layout, tid)
            if err is None:  # a lost process out of retries: Tune's reason, recorded so a resume does not rerun it
                lines = (trial.get_error() or "").strip().splitlines()
                err = (f"retries exhausted (failure.max_failures={self.space.max_failures}): "
                       f"{lines[-1][:400] if lines else 'trial process lost'}")
                layout.store.write_text(layout.error_path(tid), json_dumps(
                    {"type": "TrialLost", "message": err, "traceback": trial.get_error() or ""}))
        # the config the trial wrote before training; if it never got that far, the same function resolves it
        # from the sweep's space and the trial's sampled values (never defaults for what the space fixed)
        stored = stored_config(layout, tid)
        cfg = stored if stored is not None else to_dict(trial_config(self.space, dict(trial.config)))
        write_trial_tables(self.sweep_dir, tid, status, cfg, results, error=err)
        compact(self.sweep_dir, batch=COMPACT_BATCH)  # keeps queries over a running sweep fast
        if status == "TERMINATED":
            prune_checkpoints(layout, tid, self.space.keep_checkpoints)
        run_id = self.child_run(trial)
        if stored is not None:
            self.client.log_dict(run_id, stored, "config.yaml")
        if err:
            self.client.set_tag(run_id, "clmim.error", err[:5000])
        elif "clmim.error" in self.client.get_run(run_id).data.tags:  # an earlier attempt failed; this one did not
            self.client.delete_tag(run_id, "clmim.error")
        self.client.set_terminated(run_id, status="FINISHED" if status == "TERMINATED" else "FAILED")

    def record_ended(self, trial, status: str):
        """Record an ended trial (``_finish``); a failure is reported, never raised (the sweep goes on)."""
        try:
            self._finish(trial, status)
        except Exception as e:  # noqa: BLE001 - a full disk or a lost server must not kill the driver
            self._warn(trial.trial_id, "record the result", e)
            if not isinstance(e, OSError):  # not the disk or the network: a bug worth its traceback
                traceback.print_exc(limit=5, file=sys.stderr)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.record_ended(trial, "TERMINATED")

    def on_trial_error(self, iteration, trials, trial, **info):
        self.record_ended(trial, "ERROR")

    def on_experiment_end(self, trials, **info):
        try:
            compact(self.sweep_dir)
            self._summarize_parent(trials)
        except Exception as e:  # noqa: BLE001
            self._warn("(sweep)", "write the sweep summary", e)

    def _summarize_parent(self, trials) -> None:
        """The parent run carries the sweep's outcome: trial counts, the best value of the search metric and
        which trial reached it (tags ``clmim.best_trial``, ``clmim.best_label``)."""
        parent = self.parent_run()
        counts = {s: sum(t.status == s for t in trials) for s in ("TERMINATED", "ERROR")}
        self.client.log_metric(parent, "trials_total", len(trials))
        self.client.log_metric(parent, "trials_terminated", counts["TERMINATED"])
        self.client.log_metric(parent, "trials_error", counts["ERROR"])
        metric, mode = self.space.search["metric"], self.space.search["mode"]
        done = [(t.last_result.get(metric), t) for t in trials if t.status == "TERMINATED"
                and isinstance((t.last_result or {}).get(metric), (int, float))]
        if done:
            higher = mode == "max" if mode else metric in HIGHER_IS_BETTER
            value, best = (max if higher else min)(done, key=lambda x: x[0])
            self.client.log_metric(parent, f"best_{metric}", float(value))
            self.client.set_tag(parent, "clmim.best_trial", best.trial_id)
            self.client.set_tag(parent, "clmim.best_label", trial_label(self.space, dict(best.config)))
        finished = all(t.status in ("TERMINATED", "ERROR") for t in trials)
        self.client.set_terminated(parent, status="FINISHED" if finished else "KILLED")


def prune_checkpoints(layout: SweepLayout, trial: str, keep: int) -> None:
    """Delete an ended trial's full checkpoints beyond the newest ``keep``. Its final weights (``run/model.pt``)
    stay; a trial without them (stopped early by a scheduler) keeps its last checkpoint whatever ``keep`` says."""
    if not layout.store.exists(f"{layout.run_path(trial)}/model.pt"):
        keep = max(keep, 1)
    paths = layout.checkpoint_paths(trial)
    for p in paths[:len(paths) - keep] if keep else paths:
        layout.store.delete(p)


def json_dumps(v) -> str:
    import json

    return json.dumps(v, sort_keys=True, default=str)
