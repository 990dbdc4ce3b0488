"""One trial of a sweep under Ray Tune: the typed spec the driver hands each trial, and the Tune trainable.

``run_trial(values, spec)`` is a Tune function trainable: ``values`` are the sampled dotted keys, ``spec`` (bound
with ``tune.with_parameters``) a frozen ``TrialSpec``: the sweep's layout (so every path, in the storage every node
reaches), the base config and fixed overrides, the resources.

- One-worker trials run the trainer right in the Tune trial process (``resources.mode: auto``). The trial owns its
  checkpoints: each is copied into its folder in the storage (``checkpoint_<step>``), the older one deleted after;
  a (re)started trial continues from the newest one there that loads (``resume_point``). Tune is never handed
  a checkpoint: its saved state, synced to the storage in the background, can lag the storage, and a state naming a
  checkpoint already deleted made the restored trial fail in Tune before this code ran (seen when the driver
  died). Tune's ``FailureConfig`` retries a lost process, on any node.
- Multi-worker trials build a ``ray.train.torch.TorchTrainer`` (DDP: gloo on CPU, NCCL on GPU) around the same
  trainer; ``TuneReportCallback`` forwards rank 0's reports to Tune, checkpoints live in the storage under
  ``train/<trial_id>``, and a restarted trial's TorchTrainer (same name, same storage) resumes from the latest.

Files: the trainer writes into a scratch folder on its own node; each checkpoint is copied to the storage (by
the trial, or by Ray Train for multi-worker trials) and the local copy deleted, so each checkpoint exists once. The
resolved config is written to ``run/config.yaml`` in the storage before training; at the end the run files
(``final_metrics.json``, and ``model.pt``, the final encoder weights for ``clmim analyze``) are copied there too.

A trial's id is the one the sweep planned (``records.TRIAL_KEY`` in its config), so a resumed sweep's new Tune run
finds the trial's folder and checkpoints again. The trial keeps its own log of every report (``records.REPORTS``),
copied into each checkpoint before it is stored and into ``run/`` at the end: a trial resumed from a checkpoint
continues that log, so the tables never lose a step reported before (Tune's ``result.json`` is rewritten by each
Tune run and is not read).

A trial that raises (a config problem, a non-finite loss) writes ``error.json`` in its storage folder; a retry of
that trial re-raises the same error at once instead of training again, so only lost processes are retried.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import ray.train
from ray import tune
from ray.exceptions import RayActorError
from ray.train import CheckpointConfig, ControllerError, FailureConfig, RunConfig, ScalingConfig, WorkerGroupError
from ray.tune.integration.ray_train import TuneReportCallback

from trainables import simulate
from trainables.config import Config

from . import records, stored_checkpoints
from .layout import SweepLayout
from .ray_private import STORAGE_LOGGERS, lost_worker_errors, train_report_logger_name
from .records import EXPLOIT_KEY, REPORTS, RecordError, sampled_values, trial_id_of
from .space import Space, resolve_config


class TrialError(RuntimeError):
    """A deterministic trial failure (re-raised on retry without training again)."""


@dataclass(frozen=True)
class TrialSpec:
    """What every trial of a sweep needs, passed once from the driver (pickled into each trial process)."""

    layout: SweepLayout
    base: dict
    fixed: dict
    workers: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    in_process: bool = True
    keep_checkpoints: int = 0
    sched_metric: str = ""  # what the scheduler compares trials on ("": FIFO, no scheduler keys)
    sched_mode: str = "max"

    @classmethod
    def from_space(cls, space: Space, layout: SweepLayout) -> TrialSpec:
        r, sch = space.resources, space.scheduler
        return cls(layout=layout, base=space.base, fixed=space.fixed(), workers=r.workers,
                   cpus_per_worker=r.cpus_per_worker, gpus_per_worker=r.gpus_per_worker, in_process=r.in_process,
                   keep_checkpoints=space.checkpoints.keep, sched_metric=sch.metric,
                   sched_mode=sch.mode if sch.mode in ("min", "max") else "max")

    def config(self, values: dict, out_dir: str | None = None) -> Config:
        """The trial's typed config (``resolve_config``), with its run folder, threads from its CPU share, and
        the CPU when it has no GPU."""
        cfg = resolve_config(self.base, self.fixed, values)
        cfg.run.out_dir = out_dir
        cfg.run.threads = max(1, int(self.cpus_per_worker))
        if self.gpus_per_worker <= 0:
            cfg.run.device = "cpu"
        return cfg


# ------------------------------------------------------------------------------------------- errors
def record_error(layout: SweepLayout, trial: str, exc: BaseException) -> None:
    kind, message = describe_error(exc)
    records.record_error(layout, trial, kind, message, traceback.format_exc())


def describe_error(exc: BaseException) -> tuple[str, str]:
    """(type, first line of the message) of the exception the training code raised. For a Ray Train
    ``WorkerGroupError`` that is the lowest failing rank's own exception (Ray Train keeps it in
    ``worker_failures``), not the wrapper's "Training failed due to worker errors"."""
    failures = getattr(exc, "worker_failures", None)
    if failures:
        exc = failures[min(failures)]
    text = str(exc).strip()
    return type(exc).__name__, text.splitlines()[0] if text else type(exc).__name__


def raise_recorded(layout: SweepLayout, trial: str) -> None:
    """Raise ``TrialError`` if the trial recorded a deterministic error (a retry must not train again)."""
    err = records.read_error(layout, trial)
    if err is not None:
        raise TrialError(err)


def is_lost_worker(e: BaseException) -> bool:
    """True if a Ray Train trial failed because a worker process was lost (killed, out of memory, node gone) or
    the worker group could not start: worth a retry from the last checkpoint. An exception raised by the training
    code on any rank is deterministic: not retried. When one rank dies the others often fail with collateral
    errors (a collective's peer vanished), so one lost worker makes the whole failure a lost worker (as Ray
    Train decides for preemptions)."""
    lost = (RayActorError, *lost_worker_errors())
    if isinstance(e, WorkerGroupError):
        return any(isinstance(f, lost) for f in e.worker_failures.values())
    return isinstance(e, (ControllerError, *lost))


# ------------------------------------------------------------------------------------------- the trainable
def run_trial(config: dict, spec: TrialSpec) -> None:
    """Tune function trainable (see the module docstring)."""
    _quiet_ray_storage()
    trial = trial_id_of(config, tune.get_context().get_trial_id())
    values = sampled_values(config)
    raise_recorded(spec.layout, trial)
    try:
        final = records.read_final(spec.layout, trial)
    except RecordError:
        final = None  # damaged: it resumes from its last checkpoint and writes it again
    if final is not None:
        # it finished under a driver that died before recording it: report, do not train again
        tune.report({**_clean(final), **SchedulerView(spec.sched_metric, spec.sched_mode, []).update(final)})
        return
    try:
        if spec.in_process:
            train_reporting_to(tune, values, spec, trial, in_process=True, exploit=config.get(EXPLOIT_KEY))
        else:
            _run_with_train(values, spec, trial)
    except Exception as e:
        if not is_lost_worker(e):
            record_error(spec.layout, trial, e)
        raise


def _quiet_ray_storage() -> None:
    """Ray logs "Checkpoint successfully created at: ..." at INFO for every checkpoint of every trial, forwarded
    to the sweep's console; the progress line already says how trials advance."""
    for name in STORAGE_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def scratch_dir(layout: SweepLayout, trial: str, rank: int) -> Path:
    """This process's local working folder for the trial (on its own node; emptied at start and at the end). Named
    by the sweep's storage too: two sweeps of one name in different results roots may run on one node at once."""
    where = hashlib.sha1(layout.experiment_path.encode()).hexdigest()[:10]
    d = Path(tempfile.gettempdir()) / "clmim" / f"{layout.name}-{where}" / f"{trial}-rank{rank}"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    return d


def _clean(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool)) or v is None}


class ReportLog:
    """The trial's own record of every report (``records.REPORTS``, one JSON object per line): appended as the trial
    reports, copied into each checkpoint before the checkpoint is stored, and into ``run/`` at the end. Each entry
    carries ``time_total_s``, the trial's seconds over all its attempts."""

    def __init__(self, path: Path, prior: list[dict]):
        self.path = path
        self._before = max((float(r.get("time_total_s") or 0) for r in prior), default=0.0)
        self._t0 = time.time()
        path.write_text("".join(json.dumps(r) + "\n" for r in prior))

    def append(self, metrics: dict) -> None:
        entry = {**metrics, "time_total_s": self._before + time.time() - self._t0}
        with open(self.path, "a") as f:
            f.write(json.dumps(entry) + "\n")

    def copy_to(self, folder: Path) -> None:
        shutil.copyfile(self.path, Path(folder) / REPORTS)


class SchedulerView:
    """What a Tune scheduler reads of a trial (``vocab.SCHED_KEYS``, on every report so a scheduler always finds
    them): ``sched_value``, the newest ``metric`` the trial measured as of its newest stored checkpoint, and
    ``sched_epoch``, the epoch it was measured at (a scheduler's time). Both move only at a report that carries a
    checkpoint (and at step 0 and the final report, where nothing is lost), so a scheduler that pauses a trial on a
    reading pauses it where it resumes from without repeating a step; a reading at the trial's last step moves
    them only with the final report (a scheduler at its max_t stops the trial there: before its final evaluation
    it would lose it). Before any reading: epoch 0 and the worst
    value. A resumed trial starts from the readings in the reports its checkpoint carries."""

    def __init__(self, metric: str, mode: str, prior: list[dict]):
        self.metric = metric
        self.view = {"sched_epoch": 0.0, "sched_value": -math.inf if mode == "max" else math.inf}
        self._measured: tuple[float, float] | None = None
        for r in prior:
            self.update(r, committed=True)

    def update(self, report: dict, committed: bool = False) -> dict:
        """The scheduler's keys to send with ``report`` (``committed``: it carries a checkpoint)."""
        if not self.metric:
            return {}
        value = report.get(self.metric)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value == value:
            self._measured = (float(report.get("epoch") or 0.0), float(value))
        last = isinstance(report.get("total_steps"), (int, float)) and (report.get("step") or 0) >= \
            report["total_steps"]  # the last step's reading waits for the final report: a stop there ends the trial
        if self._measured and (committed and not last or report.get("step") == 0 or "resumed_from" in report):
            self.view = {"sched_epoch": self._measured[0], "sched_value": self._measured[1]}
        return dict(self.view)


def train_reporting_to(api, values: dict, spec: TrialSpec, trial: str, in_process: bool,
                       exploit: dict | None = None) -> None:
    """Train one trial, reporting metrics and checkpoints through ``api``: ``ray.tune`` in the Tune trial
    process, ``ray.train`` in a Ray Train worker (both have ``get_checkpoint``, ``report`` and ``Checkpoint``).
    A retried or resumed trial continues from its last checkpoint in the storage: in process,
    ``resume_point``; in Ray Train, the one Ray Train hands every rank (all ranks must start
    from the same one). A PBT trial trains with the hyperparameters of its newest exploit (``records.lineage``);
    restarted for a new ``exploit``, it first takes over its donor's newest checkpoint (``take_over``)."""
    layout, store = spec.layout, spec.layout.store
    rank = 0 if in_process else api.get_context().get_world_rank()
    scratch = scratch_dir(layout, trial, rank)
    try:
        lineage = records.read_lineage(layout, trial) if in_process else []
        new = exploit is not None and all(r.get("exploit") != exploit["id"] for r in lineage)
        taken = take_over(layout, trial, exploit, values, scratch / "exploit", spec.keep_checkpoints) \
            if new else None
        if new and taken is None:  # no donor checkpoint: no exploit, the values it trained with so far
            values = records.read_values(layout, trial) or values
        if not taken:  # (a driver resumed after an exploit restarts the trial with its planned values)
            values = records.lineage_values(values, lineage)
        # Every rank gets an out_dir (the trainer writes files from rank 0 only, but all ranks must agree on when
        # checkpoints happen: saving one is a collective step).
        cfg = spec.config(values, str(scratch / "run"))
        if in_process:
            cfg.run.resume = taken or resume_point(layout, trial, scratch / "resume")
        elif (ckpt := api.get_checkpoint()) is not None:
            cfg.run.resume = str(Path(ckpt.to_directory(str(scratch / "resume"))) / "checkpoint.pt")
        resumed = Path(cfg.run.resume).parent if cfg.run.resume else None
        prior = records.parse_reports((resumed / REPORTS).read_text()) if resumed and (resumed / REPORTS).is_file() \
            else []
        log = ReportLog(scratch / REPORTS, prior)
        sched = SchedulerView(spec.sched_metric, spec.sched_mode, prior)
        if rank == 0:
            records.write_config(layout, trial, cfg)
            records.write_values(layout, trial, values)
            store.write_text(f"{layout.trial_path(trial)}/pid", str(os.getpid()))
        # the newest checkpoint: the final weights are exported from it (a trial resumed at its last step has it
        # from the start)
        last: dict[str, Path] = {"dir": resumed} if resumed else {}

        def report(metrics: dict, checkpoint=None) -> None:
            clean = _clean(metrics)
            log.append(clean)
            if checkpoint:
                log.copy_to(checkpoint)  # the checkpoint carries every report up to it
            if checkpoint and in_process:  # into the storage first, then older ones beyond the kept count go
                stored_checkpoints.store(layout, trial, Path(checkpoint), int(metrics["step"]), spec.keep_checkpoints)
            if "resumed_from" in clean:  # the final report: to Tune once the run files are stored (below)
                final.append(clean)
                return
            api.report({**clean, **sched.update(clean, committed=checkpoint is not None)},
                       checkpoint=api.Checkpoint.from_directory(str(checkpoint)) if checkpoint and not in_process
                       else None)
            if checkpoint:  # the storage holds it now: that copy is the only one kept
                if "dir" in last:
                    shutil.rmtree(last["dir"], ignore_errors=True)
                last["dir"] = Path(checkpoint)

        # A scheduler may stop the trial at any report it reads (at its max_t, the last one): its files are stored
        # before the final report goes to Tune, so a stop there loses nothing
        final: list[dict] = []
        simulated = simulate.enabled(cfg)
        (simulate.simulate if simulated else _trainer())(cfg, report)
        if rank == 0:
            run = scratch / "run"
            if "dir" in last:
                _export(last["dir"] / "checkpoint.pt", run / "model.pt", simulated)
            shutil.rmtree(run / "checkpoints", ignore_errors=True)
            (run / "config.yaml").unlink(missing_ok=True)  # (records.write_config wrote the stored one)
            log.copy_to(run)
            store.upload(run, layout.run_path(trial))
        for f in final:
            api.report({**f, **sched.update(f)})
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _trainer():
    """The trainer's ``train``. (start-up: loaded here, so a simulated trial's process never imports torch;
    ``test_simulate.test_a_simulated_trial_imports_no_torch``)"""
    from trainables.trainer import train  # (start-up)

    return train


def _export(checkpoint: Path, out: Path, simulated: bool) -> None:
    """The final encoder weights (``model.pt``) from the newest checkpoint; a simulated trial's is a copy of its
    simulated checkpoint (as many bytes to upload)."""
    if simulated:
        shutil.copyfile(checkpoint, out)
        return
    from trainables.checkpoints import export_weights  # (start-up: torch, see _trainer)

    export_weights(checkpoint, out)


def checkpoint_step(f: Path) -> int:
    """The step of a checkpoint file; raises if it does not load (torn, truncated). A simulated one
    (``simulate.MARKER`` beside it) is read without torch."""
    if (f.parent / simulate.MARKER).is_file():
        return simulate.checkpoint_step(f)
    from trainables.checkpoints import load_weights  # (start-up: torch, see _trainer)

    return int(load_weights(f)["step"])


def resume_point(layout: SweepLayout, trial: str, local: Path) -> str | None:
    """The checkpoint a (re)started one-worker trial continues from, downloaded to ``local``: the newest one in the
    trial's storage folder that loads, else None (a fresh start). A damaged one (torn by a killed process, truncated)
    is skipped with a one-line warning naming it and the step the trial falls back to."""
    store = layout.store
    prefix = layout.trial_path(trial) + "/"
    damaged: list[tuple[str, str]] = []
    found, step = None, 0
    for path in reversed([p for p in layout.checkpoint_paths(trial) if p.startswith(prefix)]):
        name = path.rsplit("/", 1)[-1]
        f = store.download(path, local / name) / "checkpoint.pt"
        try:
            step = checkpoint_step(f)
            found = str(f)
            break
        except Exception as e:  # noqa: BLE001 - torn, truncated or missing: try the one before
            damaged.append((store.display(f"{path}/checkpoint.pt"), type(e).__name__))
            shutil.rmtree(local / name, ignore_errors=True)
    for where, why in damaged:
        print(f"clmim: warning: trial {trial}: checkpoint {where} is damaged ({why}); resuming from "
              + (f"step {step}" if found else "step 0 (no other checkpoint loads)"), file=sys.stderr, flush=True)
    return found


def take_over(layout: SweepLayout, trial: str, exploit: dict, values: dict, local: Path, keep: int) -> str | None:
    """PBT's exploit, through the trials' own checkpoints: the trial continues from its donor's newest stored
    checkpoint (downloaded to ``local``), with ``values`` (the donor's mutated hyperparameters, perturbed). In
    order, so that a process killed at any point leaves a state its restart reads right: the donor's checkpoint,
    carrying this trial's own record of reports up to that step, is stored as the trial's newest checkpoint (its
    own at that step or later deleted first); then the exploit is recorded (``records.append_lineage``: once per
    exploit id; a restart with the same exploit resumes from the stored copy). The local checkpoint file to resume
    from; None when the donor has no checkpoint (the caller continues the trial's own, with its values unchanged)."""
    donor = resume_point(layout, exploit["donor"], local / "donor")
    if donor is None:
        print(f"clmim: warning: trial {trial}: its PBT donor {exploit['donor']} has no checkpoint; it continues its "
              "own", file=sys.stderr, flush=True)
        return None
    step = checkpoint_step(Path(donor))
    own = resume_point(layout, trial, local / "own")
    mine = records.parse_reports((Path(own).parent / REPORTS).read_text()) if own else []
    folder = Path(donor).parent
    (folder / REPORTS).write_text("".join(json.dumps(r) + "\n" for r in mine if (r.get("step") or 0) <= step))
    stored_checkpoints.drop_from(layout, trial, step)
    stored_checkpoints.store(layout, trial, folder, step, keep)
    before = records.read_values(layout, trial) or {}
    keys = exploit.get("keys") or sorted(values)
    records.append_lineage(layout, trial, {"exploit": exploit["id"], "step": step, "parent": exploit["donor"],
                                           "at": time.time(), "before": {k: before.get(k) for k in keys},
                                           "after": {k: values.get(k) for k in keys}})
    return donor


def _train_worker(loop_config: dict) -> None:
    """Ray Train worker loop: the same trainer, DDP process group already set up by TorchTrainer."""
    # Ray Train logs every report of every rank at INFO with all its metrics (hundreds of per-layer probe values)
    logging.getLogger(train_report_logger_name()).setLevel(logging.WARNING)
    _quiet_ray_storage()
    train_reporting_to(ray.train, loop_config["values"], loop_config["spec"], loop_config["trial"], in_process=False)


def _run_with_train(values: dict, spec: TrialSpec, trial: str) -> None:
    from ray.train.torch import TorchTrainer  # (start-up: torch, see _trainer)

    use_gpu = spec.gpus_per_worker > 0
    per_worker = {"CPU": spec.cpus_per_worker}
    if use_gpu:
        per_worker["GPU"] = spec.gpus_per_worker
    trainer = TorchTrainer(
        _train_worker,
        train_loop_config={"values": values, "spec": spec, "trial": trial},
        scaling_config=ScalingConfig(num_workers=spec.workers, use_gpu=use_gpu, resources_per_worker=per_worker),
        run_config=RunConfig(
            name=trial, storage_path=spec.layout.train_path, storage_filesystem=spec.layout.store.fs,
            callbacks=[TuneReportCallback()],
            # Ray Train would retry every worker failure, the training code's own exceptions included; Tune
            # retries instead (this function again: a new TorchTrainer that resumes from the same storage), and
            # only after a lost worker (``is_lost_worker``).
            failure_config=FailureConfig(max_failures=0),
            # one checkpoint is enough: Ray registers a new one only once it is completely in the storage
            checkpoint_config=CheckpointConfig(num_to_keep=1)),
    )
    trainer.fit()
