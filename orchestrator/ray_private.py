"""Every import of a private Ray module (``ray._private``, ``ray.*._internal``) lives here, so a Ray upgrade that
moves one breaks one file. Each function says what public behaviour it stands in for."""

from __future__ import annotations

from ray.exceptions import OutOfMemoryError, RayActorError


class TrialOutOfMemory(RayActorError):
    """A trial's process killed by Ray's memory monitor (``oom_is_a_lost_trial``)."""

    def __init__(self, message: str):
        super().__init__(error_msg=f"OutOfMemoryError: {message}")

    def __str__(self) -> str:
        return self.error_msg


def keep_cluster_on_loopback() -> None:
    """Ray reads RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER when first imported; if it already was, set its constant too,
    or "127.0.0.1" resolves to the machine's own address."""
    from ray._private import ray_constants  # (Ray's private API: looked up when used)

    ray_constants.ENABLE_RAY_CLUSTER = False


def lost_worker_errors() -> tuple[type, ...]:
    """The Ray Train 2.60 exceptions that mean a worker process was lost (its health check failed or timed out)."""
    # (Ray's private API: looked up when used)
    from ray.train.v2._internal.exceptions import WorkerHealthCheckFailedError, WorkerHealthCheckTimeoutError

    return WorkerHealthCheckFailedError, WorkerHealthCheckTimeoutError


def train_report_logger_name() -> str:
    """Ray Train logs every report of every rank at INFO under a logger named after this module's file."""
    from ray.train.v2._internal.execution import context as train_context  # (Ray's private API: looked up when used)

    return train_context.__file__


STORAGE_LOGGERS = ("ray.train._internal.storage", "ray.train.v2._internal.execution.storage")
"""Loggers that print "Checkpoint successfully created at: ..." for every checkpoint of every trial."""


def oom_is_a_lost_trial() -> None:
    """Ray 2.60's Tune raises ``RuntimeError: Caught unexpected exception`` out of ``tuner.fit()`` when Ray's memory
    monitor kills a trial's process: the pending call on the trial's actor fails with ``OutOfMemoryError``, which is
    neither an actor nor a task error to Tune's actor manager, and the whole sweep died. Hand Tune what it is, a lost
    actor (``TrialOutOfMemory``, a ``RayActorError`` carrying Ray's message and memory figures): Tune retries the
    trial from its checkpoint (``failure.max_failures``) or ends it as ERROR, and the sweep goes on."""
    from ray.air.execution._internal.actor_manager import RayActorManager  # (Ray's private API: looked up when used)

    original = RayActorManager._actor_task_failed
    if getattr(original, "_clmim", False):
        return

    def _actor_task_failed(self, tracked_actor_task, exception):
        if isinstance(exception, OutOfMemoryError):
            exception = TrialOutOfMemory(str(exception))
        return original(self, tracked_actor_task, exception)

    _actor_task_failed._clmim = True
    RayActorManager._actor_task_failed = _actor_task_failed


def refresh_auth_mode() -> None:
    """Ray caches its settings, RAY_AUTH_MODE included, when it is imported: after the variable is set in an
    already-importing process, re-read them (what Ray's own ``_enable_token_auth`` does)."""
    # (Ray's private API: looked up when used)
    from ray._private.authentication.authentication_token_setup import Config

    Config.initialize("")


def pbt_trial_state(trial):
    """What ``PopulationBasedTraining.on_trial_add`` registers for a new trial (its private ``_PBTTrialState``), for
    ``pbt.TrialOwnedPBT``, which adds trials without Tune's refusal of a search algorithm."""
    from ray.tune.schedulers.pbt import _PBTTrialState  # (Ray's private API: looked up when used)

    return _PBTTrialState(trial)
