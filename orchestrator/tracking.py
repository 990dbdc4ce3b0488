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

import dataclasses
import json
import os
import re
import socket
import sys
import traceback
from pathlib import Path

from ray.tune import Callback

from trainables.config import flatten, to_dict
from trainables.vocab import TUNE_KEYS, objective_label

from . import records, stored_checkpoints, sweep_record
from .layout import SweepLayout
from .records import Status, merge_reports, read_reports, sampled_values, stored_config, trial_id_of
from .results import COMPACT_BATCH, compact, query, write_trial_tables
from .space import Space, trial_config


def default_mlflow_uri(results_root: Path, uri: str | None = None) -> str:
    """--mlflow-uri, else $MLFLOW_TRACKING_URI, else an SQLite file under the results root."""
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


CGROUP = Path("/sys/fs/cgroup")


def _cgroup_dir() -> Path | None:
    """This process's memory cgroup folder (v2: the unified hierarchy; v1: the ``memory`` controller's)."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "" and (CGROUP / path.lstrip("/") / "memory.events").is_file():
            return CGROUP / path.lstrip("/")
        if "memory" in controllers.split(",") and (CGROUP / "memory" / path.lstrip("/")).is_dir():
            return CGROUP / "memory" / path.lstrip("/")
    return CGROUP if (CGROUP / "memory.events").is_file() else None


def cgroup_memory() -> tuple[int, str] | None:
    """(the kernel's OOM kills so far, "limit X GB, peak Y GB") of this machine's memory cgroup; None if unknown."""
    d = _cgroup_dir()
    if d is None:
        return None

    def read(*names):
        for n in names:
            try:
                return (d / n).read_text()
            except OSError:
                continue
        return ""

    events = read("memory.events", "memory.oom_control")
    kills = re.search(r"^oom_kill (\d+)$", events, re.M)
    if kills is None:
        return None

    def gb(text):
        text = text.strip()
        return f"{int(text) / 2**30:.2f} GB" if text.isdigit() and int(text) < 2**60 else "none"

    return int(kills.group(1)), (f"cgroup limit {gb(read('memory.max', 'memory.limit_in_bytes'))}, peak "
                                 f"{gb(read('memory.peak', 'memory.max_usage_in_bytes'))}")


def lost_reason(error_text: str | None, max_failures: int, kernel_oom: str | None = None) -> str:
    """Why a trial whose process was lost (out of retries) ended: out of memory, with Ray's memory figures, when
    Ray's memory monitor killed it, or with the cgroup's (``kernel_oom``) when the kernel's OOM killer did; else
    Ray's last line."""
    text = (error_text or "").strip()
    head = f"retries exhausted (failure.max_failures={max_failures})"
    if kernel_oom:
        return f"{head}: out of memory (the kernel's OOM killer; {kernel_oom})"
    if "running low on memory" in text or "OutOfMemoryError" in text:
        used = re.search(r"was ([\d.]+\s*[KMGT]?B\s*/\s*[\d.]+\s*[KMGT]?B\s*\([\d.]+\))", text)
        limit = re.search(r"threshold of ([\d.]+)", text)
        figures = (f": node memory {used.group(1)}" if used else "") + (
            f", above Ray's memory threshold {limit.group(1)}" if limit else "")
        return f"{head}: out of memory (Ray's memory monitor killed the trial process{figures})"
    lines = text.splitlines()
    return f"{head}: {lines[-1][:400] if lines else 'trial process lost'}"


class ResultsCallback(Callback):
    """Logs trials to MLflow as they report and writes their Parquet tables when they end. Trials are known by
    their clmim ids (``records.trial_id_of``), never by Tune's, which change with every Tune run of a sweep."""

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
        self._last: dict[str, dict] = {}  # trial -> the last result received
        self._logged: dict[tuple[str, str], set[int]] = {}  # (run id, metric) -> steps logged
        self._fresh: set[str] = set()  # runs this driver created: nothing logged before it
        self._warned: set[str] = set()
        self._oom = cgroup_memory()  # the kernel's OOM kills on this machine so far, to tell a lost trial's cause

    def __getstate__(self):  # Tune pickles callbacks with the experiment; the client is rebuilt lazily
        return {**self.__dict__, "_client": None, "_results": {}, "_last": {}, "_logged": {}, "_fresh": set(),
                "_warned": set()}

    def last_results(self) -> dict[str, dict]:
        """The last result this driver received from each trial."""
        return dict(self._last)

    # ---------------------------------------------------------------------------------- mlflow plumbing
    @property
    def client(self):
        if self._client is None:
            from mlflow.tracking import MlflowClient

            # a dead tracking server should fail in seconds, not after minutes of retries
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
            self._client = MlflowClient(tracking_uri=self.mlflow_uri)
        return self._client

    def experiment_id(self) -> str:
        if self._experiment is None:
            name = f"clmim/{self.layout.name}"
            exp = self.client.get_experiment_by_name(name)
            if exp is None:
                local = not self.mlflow_uri.startswith(("http://", "https://", "databricks"))
                where = self.layout.mlflow_artifacts.as_uri() if local else None
                # MLflow 3's UI opens a GenAI overview ("Traces 0") unless the experiment says it trains models
                self._experiment = self.client.create_experiment(
                    name, artifact_location=where, tags={"mlflow.experimentKind": "custom_model_development"})
            else:
                self._experiment = exp.experiment_id
        return self._experiment

    def _find_run(self, tag: str, value: str) -> str | None:
        runs = self.client.search_runs([self.experiment_id()], filter_string=f"tags.`{tag}` = '{value}'",
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
                run = self.client.create_run(self.experiment_id(), run_name=self.layout.name,
                                             tags={"clmim.role": "sweep", "clmim.sweep": self.layout.name})
                self._parent = run.info.run_id
                record = sweep_record.read(self.layout.sweep_dir)
                params = {f"space.{k}": json_dumps(v) for k, v in self.space.space.items()}
                params.update({f"cli.{k}": json_dumps(v) for k, v in record.cli_args.items()})
                params.update({"search": json_dumps(dataclasses.asdict(self.space.search)),
                               "scheduler": json_dumps(dataclasses.asdict(self.space.scheduler)),
                               "num_samples": str(self.space.num_samples),
                               "code_version": record.code_version})
                self._log_params(self._parent, {k: v[:6000] for k, v in params.items()})
                self.client.log_artifact(self._parent, str(self.layout.sweep_dir / sweep_record.FILE))
            else:
                self.client.update_run(self._parent, status="RUNNING")
        return self._parent

    def child_run(self, tid: str, values: dict) -> str:
        if tid not in self._runs:
            run_id = self._find_run("clmim.trial_id", tid)
            if run_id is None:
                run = self.client.create_run(self.experiment_id(), run_name=trial_label(self.space, values), tags={
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

    def _logged_steps(self, run_id: str, key: str) -> set[int]:
        """The steps of ``key`` logged to the run (from MLflow the first time, for a run an earlier driver created:
        one query per metric of a resumed run, none for a new run)."""
        if (run_id, key) not in self._logged:
            history = [] if run_id in self._fresh else self.client.get_metric_history(run_id, key)
            self._logged[(run_id, key)] = {m.step for m in history}
        return self._logged[(run_id, key)]

    def _log_reports(self, run_id: str, reports: list[dict]) -> None:
        """Log every metric of ``reports`` at a step the run does not have yet (a resumed trial repeats the steps
        after its checkpoint: those are logged once)."""
        from mlflow.entities import Metric

        metrics = []
        for result in reports:
            step = int(result.get("step", result.get("training_iteration", 0)))
            ts = int((result.get("timestamp") or 0) * 1000)
            for k, v in _metric_items(result).items():
                steps = self._logged_steps(run_id, k)
                if step not in steps:
                    metrics.append(Metric(k, v, ts, step))
                    steps.add(step)
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(run_id, metrics=metrics[i:i + 1000])

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
        tid = trial_id_of(trial.config, trial.trial_id)
        try:
            self.child_run(tid, sampled_values(trial.config))
        except Exception as e:  # noqa: BLE001 - tracking must not stop the sweep
            self._warn(tid, "create its MLflow run", e)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        tid = trial_id_of(trial.config, trial.trial_id)
        result = dict(result)
        self._results.setdefault(tid, []).append(result)
        self._last[tid] = result
        try:
            self._log_reports(self.child_run(tid, sampled_values(trial.config)), [result])
        except Exception as e:  # noqa: BLE001
            self._warn(tid, "log metrics to MLflow", e)

    def _finish(self, tid: str, values: dict, status: str, lost: str | None = None):
        """Record an ended trial: how it ended (first: a resume then never runs it again), its tables (every report
        in its own log, and what this driver received after its last checkpoint), its config as the trial wrote
        it, its error; every report in its MLflow run and the run's end; its checkpoints beyond the kept ones.
        ``lost``: Tune's error text of a trial whose process was lost (no ``error.json`` of its own)."""
        layout = self.layout
        err = None
        if status == Status.ERROR:
            err = records.read_error(layout, tid)
            if err is None:  # a lost process out of retries: recorded so a resume does not rerun it
                err = lost_reason(lost, self.space.failure.max_failures, self._kernel_oom(tid))
                records.record_error(layout, tid, "TrialLost", err, lost or "")
        records.write_status(layout, tid, Status(status))
        results = merge_reports(read_reports(layout, tid), self._results.pop(tid, []))
        if status == Status.TERMINATED and not any("resumed_from" in r for r in results):
            final = records.read_final(layout, tid)  # (a log lost with its folder: the trial's final record)
            if final is not None:
                results.append(final)
        # the config the trial wrote before training; if it never got that far, the same function resolves it
        # from the sweep's space and the trial's sampled values (never defaults for what the space fixed)
        stored = stored_config(layout, tid)
        cfg = stored if stored is not None else to_dict(trial_config(self.space, values))
        write_trial_tables(self.sweep_dir, tid, status, cfg, results, error=err)
        compact(self.sweep_dir, batch=COMPACT_BATCH)  # keeps queries over a running sweep fast
        if status == Status.TERMINATED:
            stored_checkpoints.prune(layout, tid, self.space.checkpoints.keep)
        run_id = self.child_run(tid, values)
        self._log_reports(run_id, results)
        if stored is not None:
            self.client.log_dict(run_id, stored, "config.yaml")
        if err:
            self.client.set_tag(run_id, "clmim.error", err[:5000])
        elif "clmim.error" in self.client.get_run(run_id).data.tags:  # an earlier attempt failed; this one did not
            self.client.delete_tag(run_id, "clmim.error")
        self.client.set_terminated(run_id, status="FINISHED" if status == Status.TERMINATED else "FAILED")
        self._logged = {k: v for k, v in self._logged.items() if k[0] != run_id}  # memory stays flat

    def _kernel_oom(self, tid: str) -> str | None:
        """The cgroup's figures if the kernel's OOM killer killed a process here since this driver last looked and
        the trial ran on this machine (Ray cannot tell that from a ``kill -9``)."""
        now = cgroup_memory()
        before, self._oom = self._oom, now
        here = (self._last.get(tid) or {}).get("hostname") in (None, socket.gethostname())
        if now is None or before is None or now[0] <= before[0] or not here:
            return None
        return f"{now[0] - before[0]} process(es) killed in this machine's memory cgroup; {now[1]}"

    def record_ended(self, tid: str, values: dict, status: str, lost: str | None = None):
        """Record an ended trial (``_finish``); a failure is reported, never raised (the sweep goes on)."""
        try:
            self._finish(tid, values, status, lost)
        except Exception as e:  # noqa: BLE001 - a full disk or a lost server must not kill the driver
            self._warn(tid, "record the result", e)
            if not isinstance(e, OSError):  # not the disk or the network: a bug worth its traceback
                traceback.print_exc(limit=5, file=sys.stderr)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.record_ended(trial_id_of(trial.config, trial.trial_id), sampled_values(trial.config), "TERMINATED")

    def on_trial_error(self, iteration, trials, trial, **info):
        self.record_ended(trial_id_of(trial.config, trial.trial_id), sampled_values(trial.config), "ERROR",
                          trial.get_error())

    def on_experiment_end(self, trials, **info):
        try:
            compact(self.sweep_dir)
            self._summarize_parent(trials)
        except Exception as e:  # noqa: BLE001
            self._warn("(sweep)", "write the sweep summary", e)

    def _summarize_parent(self, trials) -> None:
        """The parent run carries the sweep's outcome: trial counts (every run of the sweep: the tables), the best
        value of the search metric and which trial reached it (tags ``clmim.best_trial``, ``clmim.best_label``)."""
        parent = self.parent_run()
        df = query("SELECT * FROM trials WHERE sweep = ?", self.layout.root, [self.layout.name])
        counts = {s: int((df.status == s).sum()) for s in ("TERMINATED", "ERROR")} if len(df) else {
            "TERMINATED": 0, "ERROR": 0}
        total = max(self.space.n_trials(), len(df))
        self.client.log_metric(parent, "trials_total", total)
        self.client.log_metric(parent, "trials_terminated", counts["TERMINATED"])
        self.client.log_metric(parent, "trials_error", counts["ERROR"])
        metric, higher = self.space.search.metric, self.space.search.mode == "max"
        done = []
        if metric in df:
            ok = df[(df.status == "TERMINATED") & df[metric].notna()]
            done = [(float(v), t) for v, t in zip(ok[metric], ok.trial, strict=True)]
        else:  # a per-layer metric: what this run's trials reported last
            done = [(float(t.last_result[metric]), trial_id_of(t.config, t.trial_id)) for t in trials
                    if t.status == "TERMINATED" and isinstance((t.last_result or {}).get(metric), (int, float))]
        if done:
            value, best = (max if higher else min)(done, key=lambda x: x[0])
            self.client.log_metric(parent, f"best_{metric}", float(value))
            self.client.set_tag(parent, "clmim.best_trial", best)
            run = self._find_run("clmim.trial_id", best)
            if run is not None:
                self.client.set_tag(parent, "clmim.best_label", self.client.get_run(run).info.run_name)
        finished = counts["TERMINATED"] + counts["ERROR"] >= total
        self.client.set_terminated(parent, status="FINISHED" if finished else "KILLED")


def json_dumps(v) -> str:
    return json.dumps(v, sort_keys=True, default=str)
