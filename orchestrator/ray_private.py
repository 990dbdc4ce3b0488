"""Every import of a private Ray module (``ray._private``, ``ray.*._internal``) lives here, so a Ray upgrade that
moves one breaks one file. Each function says what public behaviour it stands in for."""

from __future__ import annotations


def keep_cluster_on_loopback() -> None:
    """Ray reads RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER when first imported; if it already was, set its constant too,
    or "127.0.0.1" resolves to the machine's own address."""
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False


def lost_worker_errors() -> tuple[type, ...]:
    """The Ray Train 2.60 exceptions that mean a worker process was lost (its health check failed or timed out)."""
    from ray.train.v2._internal.exceptions import WorkerHealthCheckFailedError, WorkerHealthCheckTimeoutError

    return WorkerHealthCheckFailedError, WorkerHealthCheckTimeoutError


def train_report_logger_name() -> str:
    """Ray Train logs every report of every rank at INFO under a logger named after this module's file."""
    from ray.train.v2._internal.execution import context as train_context

    return train_context.__file__


STORAGE_LOGGERS = ("ray.train._internal.storage", "ray.train.v2._internal.execution.storage")
"""Loggers that print "Checkpoint successfully created at: ..." for every checkpoint of every trial."""


def use_callbacks(tuner, callbacks: list) -> None:
    """``Tuner.restore`` brings back the callbacks pickled with the experiment: an earlier driver's results root and
    MLflow URI. A resumed sweep must record where this driver says (a fresh machine, another ``--mlflow-uri``)."""
    tuner._local_tuner._run_config.callbacks = list(callbacks)
