"""The Ray Tune trainable: one trial of a sweep.

``run_trial(config, sweep)`` is a Tune function trainable. ``config`` holds the sampled dotted keys; ``sweep``
(bound with ``tune.with_parameters``) holds the base config tree, the fixed overrides and the resources.

- One-worker trials run the trainer right in the Tune trial process (``resources.mode: auto``): checkpoints go
  through ``ray.tune.report`` and come back with ``ray.tune.get_checkpoint`` after a lost process, and Tune's
  ``FailureConfig`` retries. This skips Ray Train's controller and worker-group start (tens of seconds a trial
  on a small machine).
- Multi-worker trials build a ``ray.train.torch.TorchTrainer`` (DDP: gloo on CPU, NCCL on GPU) around the same
  trainer and call ``fit()``; ``TuneReportCallback`` forwards rank 0's reports to Tune, checkpoints live in the
  sweep's storage under ``train/<trial_id>``, and a restarted trial's TorchTrainer (same name, same storage)
  resumes from the latest one.

A trial that raises (a config problem, a non-finite loss) writes ``error.json`` in its directory; a retry of
that trial re-raises the same error at once instead of training again, so only lost processes are retried.
Ray is imported inside the functions: ``trainables`` stays importable without Ray.
"""

from __future__ import annotations

import os
import traceback
from pathlib import Path

from .config import load_config
from .files import DamagedFile, read_json, write_json_atomic, write_text_atomic
from .trainer import find_checkpoint, train

ERROR_FILE = "error.json"


class TrialError(RuntimeError):
    """A deterministic trial failure (re-raised on retry without training again)."""


def _clean(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool)) or v is None}


def _record_error(trial_dir: Path, exc: BaseException) -> None:
    kind, message = _describe_error(exc)
    write_json_atomic(trial_dir / ERROR_FILE, {"type": kind, "message": message, "traceback": traceback.format_exc()})


def _describe_error(exc: BaseException) -> tuple[str, str]:
    """(type, first line of the message) of the exception the training code raised. For a Ray Train
    ``WorkerGroupError`` that is the lowest failing rank's own exception (Ray Train keeps it in
    ``worker_failures``), not the wrapper's "Training failed due to worker errors"."""
    failures = getattr(exc, "worker_failures", None)
    if failures:
        exc = failures[min(failures)]
    text = str(exc).strip()
    return type(exc).__name__, text.splitlines()[0] if text else type(exc).__name__


def _raise_recorded(trial_dir: Path) -> None:
    try:
        err = read_json(trial_dir / ERROR_FILE)
    except DamagedFile:
        raise TrialError("unreadable error file") from None
    if err is not None:
        raise TrialError(f"{err.get('type', 'Error')}: {err.get('message', '')}" if isinstance(err, dict)
                         else "unreadable error file")


def build_trial_config(values: dict, sweep: dict, out_dir: str):
    """The typed config of one trial: base tree + fixed overrides + sampled values; threads from the CPU share."""
    cfg = load_config(sweep["base"], {**sweep["fixed"], **values})
    cfg.run.out_dir = out_dir
    cfg.run.threads = max(1, int(sweep["resources"]["cpus_per_worker"]))
    if sweep["resources"]["gpus_per_worker"] <= 0:
        cfg.run.device = "cpu"
    return cfg


def run_trial(config: dict, sweep: dict) -> None:
    """Tune function trainable (see the module docstring)."""
    from ray import tune

    _quiet_ray_storage()
    ctx = tune.get_context()
    # The trial's directory in the sweep's storage. (Not ctx.get_trial_dir(): in a reused actor that is a
    # working directory under Ray's session folder, so run files would land outside the sweep.)
    trial_dir = Path(sweep["sweep_dir"]) / "tune" / ctx.get_trial_id()
    _raise_recorded(trial_dir)
    try:
        if sweep["resources"]["in_process"]:
            _run_in_process(config, sweep, trial_dir)
        else:
            _run_with_train(config, sweep, trial_dir, ctx.get_trial_id())
    except Exception as e:
        if not _is_lost_worker(e):
            _record_error(trial_dir, e)
        raise


def _quiet_ray_storage() -> None:
    """Ray logs "Checkpoint successfully created at: ..." at INFO for every checkpoint of every trial, forwarded
    to the sweep's console; the progress line already says how trials advance."""
    import logging

    for name in ("ray.train._internal.storage", "ray.train.v2._internal.execution.storage"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _is_lost_worker(e: BaseException) -> bool:
    """True if a Ray Train trial failed because a worker process was lost (killed, out of memory, node gone) or
    the worker group could not start: worth a retry from the last checkpoint. An exception raised by the training
    code on any rank is deterministic: not retried. When one rank dies the others often fail with collateral
    errors (a collective's peer vanished), so one lost worker makes the whole failure a lost worker (as Ray
    Train decides for preemptions)."""
    from ray.exceptions import RayActorError
    from ray.train import ControllerError, WorkerGroupError
    from ray.train.v2._internal.exceptions import WorkerHealthCheckFailedError, WorkerHealthCheckTimeoutError

    lost = (RayActorError, WorkerHealthCheckFailedError, WorkerHealthCheckTimeoutError)
    if isinstance(e, WorkerGroupError):
        return any(isinstance(f, lost) for f in e.worker_failures.values())
    return isinstance(e, (ControllerError, *lost))


def _train_reporting_to(api, values: dict, sweep: dict, trial_dir: Path, in_process: bool) -> None:
    """Train one trial, reporting metrics and checkpoints through ``api``: ``ray.tune`` in the Tune trial
    process, ``ray.train`` in a Ray Train worker (both have ``get_checkpoint``, ``report`` and ``Checkpoint``).
    A retried or resumed trial continues from its last checkpoint: in process, ``resume_point``; in Ray Train,
    the one Ray Train hands every rank (all ranks must start from the same one)."""
    cfg = build_trial_config(values, sweep, str(trial_dir / "run"))
    ckpt = api.get_checkpoint()
    if in_process:
        cfg.run.resume = resume_point(ckpt, trial_dir)
    elif ckpt is not None:
        cfg.run.resume = str(Path(ckpt.path) / "checkpoint.pt")
    write_pid = in_process or api.get_context().get_world_rank() == 0
    if write_pid:
        _write_pid(trial_dir)

    def report(metrics: dict, checkpoint=None) -> None:
        api.report(_clean(metrics), checkpoint=api.Checkpoint.from_directory(str(checkpoint)) if checkpoint else None)

    train(cfg, report)


def resume_point(tune_checkpoint, trial_dir: Path) -> str | None:
    """The checkpoint a (re)started trial continues from: the newest one the trainer wrote in the trial's run
    directory, else the one Tune hands back, else None (a fresh start).

    Tune's checkpoints are copies of the trainer's, so the trainer's newest is never older. It can be newer:
    on Ctrl-C Tune saves its experiment state before it stops the trials, so a checkpoint reported in that
    window is on disk but not in Tune's state, and the resumed trial would otherwise start again at step 0."""
    local = find_checkpoint(trial_dir / "run")
    if local is not None:
        return str(local)
    return str(Path(tune_checkpoint.path) / "checkpoint.pt") if tune_checkpoint is not None else None


def _run_in_process(config: dict, sweep: dict, trial_dir: Path) -> None:
    from ray import tune

    _train_reporting_to(tune, config, sweep, trial_dir, in_process=True)


def _write_pid(trial_dir: Path) -> None:
    """The trial's training process id (lets a user, or a test, find and signal the process)."""
    write_text_atomic(trial_dir / "pid", str(os.getpid()))


def _train_worker(loop_config: dict) -> None:
    """Ray Train worker loop: the same trainer, DDP process group already set up by TorchTrainer."""
    import logging

    import ray.train
    from ray.train.v2._internal.execution import context as train_context

    # Ray Train logs every report of every rank at INFO with all its metrics (hundreds of per-layer probe values)
    # to the sweep's console; its logger is named after the module's file.
    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)
    _quiet_ray_storage()
    # Every rank gets the same out_dir (the trainer writes files from rank 0 only, but all ranks must agree on
    # when checkpoints happen: saving one is a collective step).
    _train_reporting_to(ray.train, loop_config["values"], loop_config["sweep"], Path(loop_config["trial_dir"]),
                        in_process=False)


def _run_with_train(config: dict, sweep: dict, trial_dir: Path, trial_id: str) -> None:
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    res = sweep["resources"]
    use_gpu = res["gpus_per_worker"] > 0
    per_worker = {"CPU": res["cpus_per_worker"]}
    if use_gpu:
        per_worker["GPU"] = res["gpus_per_worker"]
    trainer = TorchTrainer(
        _train_worker,
        train_loop_config={"values": config, "sweep": sweep, "trial_dir": str(trial_dir)},
        scaling_config=ScalingConfig(num_workers=res["workers"], use_gpu=use_gpu, resources_per_worker=per_worker),
        run_config=RunConfig(
            name=trial_id, storage_path=sweep["train_storage"], callbacks=[TuneReportCallback()],
            # Ray Train would retry every worker failure, the training code's own exceptions included; Tune
            # retries instead (this function again: a new TorchTrainer that resumes from the same storage), and
            # only after a lost worker (``_is_lost_worker``).
            failure_config=FailureConfig(max_failures=0),
            checkpoint_config=CheckpointConfig(num_to_keep=2)),
    )
    trainer.fit()
