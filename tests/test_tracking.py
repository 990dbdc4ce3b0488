"""The MLflow part of the driver's callback (``orchestrator/tracking.py``), alone: an SQLite store under tmp_path."""

import os

from sweeps import few_reports, table_cfg

from orchestrator.callbacks import Ended, Tables
from orchestrator.layout import SweepLayout
from orchestrator.records import Status
from orchestrator.space import space_from_dict
from orchestrator.tracking import HTTP_PATIENT, HTTP_QUICK, MlflowLog, trial_label


def test_trial_labels_are_readable(tmp_path):
    space = space_from_dict({"base": {"run": {"seed": 2}}, "space": {"objective.lam": {"grid": [0.25]},
                                                                    "optim.blr": {"grid": [1e-3]}}},
                            tmp_path / "s.yaml")
    assert trial_label(space, {"objective.lam": 0.25, "optim.blr": 1e-3}) == "lam=0.25 micro/4 seed=2 blr=0.001"


def test_the_parent_run_names_the_best_trial_in_the_searchs_direction(tmp_path):
    layout = SweepLayout(tmp_path, "s")
    space = space_from_dict({"space": {"objective.lam": {"grid": [0.0, 1.0]}}, "search": {"metric": "val_linear_top1"}},
                            tmp_path / "s.yaml")
    layout.sweep_dir.mkdir()
    (layout.sweep_dir / "sweep.json").write_text("{}")
    mlflow = MlflowLog(layout, space, f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.start()
    for tid, lam, acc in (("t0", 0.0, 0.3), ("t1", 1.0, 0.6)):
        reports = [*few_reports(acc), {"step": 3, "val_linear_top1": acc}]
        e = Ended(tid, {"objective.lam": lam}, Status.TERMINATED, reports, table_cfg(lam), None, None)
        tables = Tables(layout, space)
        tables.trial_ended(e)
        tables.flush()
        mlflow.trial_ended(e)
    mlflow.sweep_ended([])
    parent = mlflow.client.get_run(mlflow.parent_run()).data
    assert parent.tags["clmim.best_trial"] == "t1" and parent.metrics["best_val_linear_top1"] == 0.6
    assert parent.metrics["trials_terminated"] == 2 and parent.metrics["trials_error"] == 0


def test_mlflow_http_is_quick_to_fail_on_the_driver_patient_in_the_writer_process_and_a_users_setting_stays(
        tmp_path, monkeypatch):
    """The driver's first call fails in seconds on a dead server; the writer process waits out a busy one (3 tries
    of 30 s timed out at 1,000 trials); a value the user set is kept in both."""
    for k in HTTP_PATIENT:
        monkeypatch.delenv(k, raising=False)
    space = space_from_dict({"space": {"objective.lam": {"grid": [0.0]}}}, tmp_path / "s.yaml")
    part = MlflowLog(SweepLayout(tmp_path, "s"), space, f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert part.client is not None and {k: os.environ[k] for k in HTTP_QUICK} == HTTP_QUICK
    part.in_process()
    assert part.client is not None and {k: os.environ[k] for k in HTTP_PATIENT} == HTTP_PATIENT
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    mine = MlflowLog(SweepLayout(tmp_path, "s"), space, f"sqlite:///{tmp_path / 'mlflow.db'}")
    mine.in_process()
    assert mine.client is not None and os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "5"
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == HTTP_PATIENT["MLFLOW_HTTP_REQUEST_MAX_RETRIES"]
