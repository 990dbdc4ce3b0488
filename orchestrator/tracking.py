"""The sweep's MLflow part (``callbacks.Part``): runs and metrics, written by the driver alone.

All trials report to the driver, so it is the only writer of the MLflow store (an SQLite file is safe with a single
writer). Each sweep is one MLflow experiment with a parent run for the sweep (its summary and best trial at the end)
and a child run per trial, named by what distinguishes it (``lam=0.25 micro/4 seed=0``) and found again by its
``clmim.trial_id`` tag, so a retried or resumed trial continues its child run. A step already logged to a run is
never logged again (a resumed trial repeats the steps after its checkpoint).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from trainables.config import flatten, to_dict
from trainables.vocab import TUNE_KEYS, objective_label

from . import sweep_record
from .callbacks import Ended, Part
from .layout import SweepLayout
from .query import query
from .records import Status, trial_id_of
from .space import Space, trial_config

HTTP_QUICK = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3", "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
HTTP_PATIENT = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "7", "MLFLOW_HTTP_REQUEST_TIMEOUT": "120"}
MLFLOW_OFF = "off"  # --mlflow-uri off: no MLflow part (the tables hold every result)


def default_mlflow_uri(results_root: Path, uri: str | None = None) -> str:
    """--mlflow-uri (``off``: none), else $MLFLOW_TRACKING_URI, else an SQLite file under the results root."""
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


class MlflowLog(Part):
    """The sweep's MLflow experiment: a parent run for the sweep, a child run per trial (created when it starts,
    fed every report as it arrives, closed with its status and error when it ends). Trials are known by their
    clmim ids (``records.trial_id_of``), never by Tune's, which change with every Tune run of a sweep."""

    what = "log it to MLflow"
    # a log_batch costs ~10 ms in SQLite whatever its size: a trial's reports are sent every few seconds, together
    # (the tables, not MLflow, are the live record)
    interval = 5.0
    # SQLAlchemy and HTTP spend their time in Python: on a thread they would hold the driver's GIL (writer.py)
    process = True

    def __init__(self, layout: SweepLayout, space: Space, mlflow_uri: str):
        self.layout = layout
        self.space = space
        self.mlflow_uri = mlflow_uri
        self._client = None
        self._runs: dict[str, str] = {}
        self._parent: str | None = None
        self._experiment: str | None = None
        self._logged: dict[tuple[str, str], set[int]] = {}  # (run id, metric) -> steps logged
        self._fresh: set[str] = set()  # runs this driver created: nothing logged before it
        self._known: dict[str, str] | None = None  # trial id -> run id of its run (read once, then kept up to date)
        self._ended_runs: set[str] = set()  # trial ids whose runs had ended when they were read
        self._pending: dict[str, list[dict]] = {}  # run id -> results received since the last flush
        self._params: dict[str, list[Param]] = {}  # run id -> its config's params, not logged yet
        # MLflow's HTTP retries and timeout: a value the user set is kept. In the writer process a busy server (it
        # timed out after 30 s, 3 tries, at 1,000 trials beside 128 trial processes on 2 cores) is waited for.
        user = {k: os.environ[k] for k in HTTP_PATIENT if k in os.environ}
        self._quick = {**HTTP_QUICK, **user}
        self._patient = {**HTTP_PATIENT, **user}
        self._in_process = False

    def in_process(self) -> None:
        self._in_process, self._client = True, None

    def __getstate__(self):  # Tune pickles callbacks with the experiment; the client is rebuilt lazily
        return {**self.__dict__, "_client": None, "_logged": {}, "_fresh": set(), "_known": None, "_pending": {},
                "_params": {}, "_ended_runs": set()}

    # ---------------------------------------------------------------------------------- mlflow plumbing
    @property
    def client(self):
        if self._client is None:

            # on the driver (the sweep's first call: ``sweep.check_tracking``), a dead tracking server should fail
            # in seconds, not after minutes of retries; the writer process is patient (``in_process``)
            for k, v in (self._patient if self._in_process else self._quick).items():
                os.environ[k] = v
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

    def _trial_runs(self) -> dict[str, str]:
        """{trial id: run id} of the experiment's trial runs, read once (a resumed sweep's; a new one has none):
        each trial's start then costs no search."""
        if self._known is None:
            self._known, token = {}, None
            while True:
                page = self.client.search_runs([self.experiment_id()], filter_string="tags.`clmim.role` = 'trial'",
                                               max_results=10_000, page_token=token)
                self._known.update({r.data.tags.get("clmim.trial_id"): r.info.run_id for r in page})
                self._ended_runs |= {r.data.tags.get("clmim.trial_id") for r in page
                                     if r.info.status in ("FINISHED", "FAILED")}
                token = page.token
                if not token:
                    break
        return self._known

    def _find_run(self, tag: str, value: str) -> str | None:
        runs = self.client.search_runs([self.experiment_id()], filter_string=f"tags.`{tag}` = '{value}'",
                                       max_results=1)
        return runs[0].info.run_id if runs else None

    def _log_params(self, run_id: str, params: dict[str, str]) -> None:
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

    def recorded(self) -> set[str]:
        """Trials whose runs have ended (read with the experiment's runs, once)."""
        self._trial_runs()
        return set(self._ended_runs)

    def run_of(self, tid: str) -> str | None:
        """The trial's run id, if it has a run."""
        return self._trial_runs().get(tid)

    def child_run(self, tid: str, values: dict) -> str:
        """The trial's run (created the first time; set RUNNING again the first time a driver sees its trial
        again: a retry or a resume continues it). ``_runs``: the trials this driver has open."""
        if tid not in self._runs:
            run_id = self._trial_runs().get(tid)
            if run_id is None:
                run = self.client.create_run(self.experiment_id(), run_name=trial_label(self.space, values), tags={
                    "mlflow.parentRunId": self.parent_run(), "clmim.trial_id": tid,
                    "clmim.sweep": self.layout.name, "clmim.role": "trial"})
                run_id = self._known[tid] = run.info.run_id
                self._fresh.add(run_id)
                cfg = flatten(to_dict(trial_config(self.space, values)))
                # sent with the run's first metrics: one log_batch where two cost twice (SQLite: ~30 ms each)
                self._params[run_id] = [Param(k, str(v)) for k, v in cfg.items()]
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
        metrics = []
        for result in reports:
            step = int(result.get("step", result.get("training_iteration", 0)))
            ts = int((result.get("timestamp") or 0) * 1000)
            for k, v in _metric_items(result).items():
                steps = self._logged_steps(run_id, k)
                if step not in steps:
                    metrics.append(Metric(k, v, ts, step))
                    steps.add(step)
        params = self._params.pop(run_id, [])
        while params or metrics:  # (MLflow's batch limits: 100 params, 1,000 entities)
            p, params = params[:100], params[100:]
            m, metrics = metrics[:1000 - len(p)], metrics[1000 - len(p):]
            self.client.log_batch(run_id, metrics=m, params=p)

    # ---------------------------------------------------------------------------------- the part's hooks
    def start(self) -> None:
        self.parent_run()

    def trial_started(self, tid: str, values: dict, reports: list[dict]) -> None:
        self.child_run(tid, values)

    def trial_reported(self, tid: str, values: dict, result: dict) -> None:
        self._pending.setdefault(self.child_run(tid, values), []).append(result)

    def flush(self) -> None:
        """One ``log_batch`` per run for what its trial reported since the last flush (and a new run's params)."""
        pending, self._pending = self._pending, {}
        for run_id in [*pending, *(r for r in self._params if r not in pending)]:
            self._log_reports(run_id, pending.get(run_id, []))

    def trial_ended(self, e: Ended) -> None:
        """Every report of the ended trial its run lacks, its config as the trial wrote it, its error, its end."""
        run_id = self.child_run(e.trial, e.values)
        self._log_reports(run_id, [*self._pending.pop(run_id, []), *e.reports])
        if e.stored_config is not None:
            self.client.log_dict(run_id, e.stored_config, "config.yaml")
        if e.error:
            self.client.set_tag(run_id, "clmim.error", e.error[:5000])
        elif run_id not in self._fresh and "clmim.error" in self.client.get_run(run_id).data.tags:
            self.client.delete_tag(run_id, "clmim.error")  # an earlier attempt failed; this one did not
        self.client.set_terminated(run_id, status="FINISHED" if e.status == Status.TERMINATED else "FAILED")
        self._logged = {k: v for k, v in self._logged.items() if k[0] != run_id}  # memory stays flat
        self._fresh.discard(run_id)
        self._runs.pop(e.trial, None)

    def sweep_ended(self, trials) -> None:
        self._summarize_parent(trials)

    def _summarize_parent(self, trials) -> None:  # (after the tables part: it reads the compacted trials table)
        """The parent run carries the sweep's outcome: trial counts (every run of the sweep: the tables), the best
        value of the search metric and which trial reached it (tags ``clmim.best_trial``, ``clmim.best_label``)."""
        parent = self.parent_run()
        df = query("SELECT * FROM trials WHERE sweep = ?", self.layout.root, [self.layout.name])
        ended, failed = Status.TERMINATED.value, Status.ERROR.value
        counts = {s: int((df.status == s).sum()) if len(df) else 0 for s in (ended, failed)}
        total = max(self.space.n_trials(), len(df))
        self.client.log_metric(parent, "trials_total", total)
        self.client.log_metric(parent, "trials_terminated", counts[ended])
        self.client.log_metric(parent, "trials_error", counts[failed])
        metric, higher = self.space.search.metric, self.space.search.mode == "max"
        scored = []
        if metric in df:
            ok = df[(df.status == ended) & df[metric].notna()]
            scored = [(float(v), t) for v, t in zip(ok[metric], ok.trial, strict=True)]
        else:  # a per-layer metric: what this run's trials reported last
            scored = [(float(t.last_result[metric]), trial_id_of(t.config, t.trial_id)) for t in trials
                      if t.status == ended and isinstance((t.last_result or {}).get(metric), (int, float))]
        if scored:
            value, best = (max if higher else min)(scored, key=lambda x: x[0])
            self.client.log_metric(parent, f"best_{metric}", float(value))
            self.client.set_tag(parent, "clmim.best_trial", best)
            run = self._find_run("clmim.trial_id", best)
            if run is not None:
                self.client.set_tag(parent, "clmim.best_label", self.client.get_run(run).info.run_name)
        finished = counts[ended] + counts[failed] >= total
        self.client.set_terminated(parent, status="FINISHED" if finished else "KILLED")


def json_dumps(v) -> str:
    return json.dumps(v, sort_keys=True, default=str)
