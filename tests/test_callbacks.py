"""The driver's callback and its parts, each alone (``orchestrator/callbacks.py``), and through Tune's hooks."""

import errno
from pathlib import Path

import pytest
from sweeps import few_reports, probed_reports, table_cfg

from orchestrator import records
from orchestrator.callbacks import Ended, Part, Retention, SweepCallback, Tables
from orchestrator.layout import SweepLayout
from orchestrator.query import query
from orchestrator.records import Status


def ended(tid="t1", status=Status.TERMINATED, error=None) -> Ended:
    return Ended(tid, {"objective.lam": 0.5}, status, few_reports(0.4), table_cfg(0.5), None, error)


def a_space(tmp_path, **more):
    from orchestrator.space import space_from_dict

    return space_from_dict({"space": {"objective.lam": 0.5}, **more}, tmp_path / "s.yaml")


def test_tables_part_writes_the_ended_trials_rows(tmp_path):
    layout = SweepLayout(tmp_path, "s")
    tables = Tables(layout, a_space(tmp_path))
    tables.trial_ended(ended(status=Status.ERROR, error="ValueError: x"))
    tables.flush()
    row = query("SELECT trial, status, error, linear_top1 FROM trials", tmp_path).iloc[0]
    assert (row.trial, row.status, row.error, row.linear_top1) == ("t1", "ERROR", "ValueError: x", 0.4)


def test_retention_part_prunes_only_a_finished_trials_checkpoints(tmp_path):
    layout = SweepLayout(tmp_path, "s")
    for step in (2, 4, 6):
        Path(layout.trial_path("t1"), f"checkpoint_{step:07d}").mkdir(parents=True)
    Retention(layout, keep=1).trial_ended(ended(status=Status.ERROR))
    assert len(layout.checkpoint_paths("t1")) == 3  # a failed trial keeps what a retry resumes from
    Retention(layout, keep=1).trial_ended(ended())
    assert [p.rsplit("/", 1)[1] for p in layout.checkpoint_paths("t1")] == ["checkpoint_0000006"]


class Recorder(Part):
    def __init__(self, what, fail=False):
        self.what, self.fail, self.seen = what, fail, []

    def trial_ended(self, e):
        self.seen.append((e.trial, e.status))
        if self.fail:
            raise OSError(errno.ENOSPC, "No space left on device")


def test_a_failing_part_stops_neither_the_others_nor_the_sweep_and_warns_once(tmp_path, capsys):
    layout = SweepLayout(tmp_path, "s")
    first, second = Recorder("write its tables", fail=True), Recorder("log it to MLflow")
    cb = SweepCallback(layout, a_space(tmp_path), [first, second])
    cb.record_ended("t1", {}, "TERMINATED")
    cb.record_ended("t1", {}, "TERMINATED")  # (Tune may report an end twice: one warning per trial and part)
    cb.close()
    assert first.seen and second.seen == [("t1", Status.TERMINATED)] * 2
    err = capsys.readouterr().err
    assert err.count("could not write its tables for trial t1") == 1 and "clmim results rebuild s" in err
    assert records.trial_record(layout, "t1", None).status == Status.TERMINATED  # recorded before any part


@pytest.mark.integration
def test_driver_survives_a_failed_write(tmp_path, monkeypatch, capsys):
    import orchestrator.callbacks as callbacks

    cb = _callback(tmp_path)

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(callbacks, "write_attempts", full)

    class Trial:
        trial_id, status, config, last_result = "t1", "TERMINATED", {}, {}

        def get_error(self):
            return None

    cb.on_trial_complete(0, [], Trial())  # must not raise
    cb.close()
    err = capsys.readouterr().err
    assert "No space left on device" in err and "clmim results rebuild s" in err


class FakeTrial:
    def __init__(self, tid, status="TERMINATED", error=None):
        self.trial_id, self.status, self.config, self.last_result, self._error = tid, status, {}, {}, error

    def get_error(self):
        return self._error


def _callback(tmp_path, **kw):
    from orchestrator.tracking import MlflowLog

    space = a_space(tmp_path, failure={"max_failures": 1})
    (tmp_path / "s").mkdir(exist_ok=True)
    (tmp_path / "s" / "sweep.json").write_text("{}")
    layout = SweepLayout(tmp_path, "s")
    mlflow = MlflowLog(layout, space, f"sqlite:///{tmp_path / 'mlflow.db'}")
    return SweepCallback(layout, space, [Tables(layout, space), mlflow, Retention(layout, 0)], **kw)


def test_exhausted_retries_are_recorded_so_resume_does_not_rerun_them(tmp_path):
    from orchestrator.trial import TrialError, raise_recorded

    cb = _callback(tmp_path)
    trial = FakeTrial("t1", "ERROR", error="Traceback ...\nRayActorError: the actor died unexpectedly")
    cb.on_trial_start(0, [], trial)
    cb.on_trial_error(0, [], trial)
    cb.drain()
    with pytest.raises(TrialError, match="retries exhausted"):  # a resume re-raises it at once
        raise_recorded(SweepLayout(tmp_path, "s"), "t1")
    row = query("SELECT status, error FROM trials", tmp_path).iloc[0]
    assert row.status == "ERROR" and "failure.max_failures=1" in row.error
    mlflow = cb.parts[1]
    run = mlflow.client.get_run(mlflow.run_of("t1"))
    assert run.info.status == "FAILED" and "retries exhausted" in run.data.tags["clmim.error"]


def test_mlflow_never_logs_a_step_twice_and_drops_a_stale_error_tag(tmp_path):
    cb = _callback(tmp_path)
    trial = FakeTrial("t1")
    for step in (5, 10):
        cb.on_trial_result(0, [], trial, {"step": step, "loss": 1.0 / step})
    cb.close()
    cb2 = _callback(tmp_path)  # a new driver after a kill: the resumed trial repeats steps after its checkpoint
    for step in (5, 10, 15):
        cb2.on_trial_result(0, [], trial, {"step": step, "loss": 2.0 / step})
    cb2.drain()
    mlflow = cb2.parts[1]
    run_id = mlflow.run_of("t1")
    assert [m.step for m in mlflow.client.get_metric_history(run_id, "loss")] == [5, 10, 15]
    mlflow.client.set_tag(run_id, "clmim.error", "from an earlier attempt")
    cb2.on_trial_complete(0, [], trial)
    cb2.close()
    run = mlflow.client.get_run(run_id)
    assert "clmim.error" not in run.data.tags and run.info.status == "FINISHED"


def test_a_running_trials_reports_are_queryable_before_it_ends_and_land_once_when_it_does(tmp_path):
    """Live rows: each report is in the tables a flush after it arrives (status RUNNING); the trial's end writes
    its final rows, which replace the live ones: every row exactly once."""
    cb = _callback(tmp_path, interval=0.0)
    trial = FakeTrial("t1")
    cb.on_trial_start(0, [], trial)
    reports = probed_reports(0.4)
    cb.on_trial_result(0, [], trial, reports[0])
    cb.drain()
    live = query("SELECT status, step FROM trials", tmp_path)
    assert list(live.status) == ["RUNNING"] and query("SELECT count(*) n FROM layers", tmp_path).n[0] > 0
    for r in reports[1:]:
        cb.on_trial_result(0, [], trial, r)
    cb.drain()
    assert query("SELECT count(*) n FROM trials", tmp_path).n[0] == 1
    curves_live = query("SELECT step, metric, value FROM curves ORDER BY ALL", tmp_path)
    cb.on_trial_complete(0, [], trial)
    cb.close([])
    assert list(query("SELECT status FROM trials", tmp_path).status) == ["TERMINATED"]
    final = query("SELECT step, metric, value FROM curves ORDER BY ALL", tmp_path)
    assert final.equals(curves_live) and not final.duplicated(["step", "metric"]).any()


def test_a_retried_trials_repeated_steps_are_in_the_live_rows_once(tmp_path):
    """A trial retried from its checkpoint reports the steps after it again: its live rows are written again under
    a new attempt, so no step appears twice."""
    cb = _callback(tmp_path, interval=0.0)
    trial = FakeTrial("t1")
    cb.on_trial_start(0, [], trial)
    for step in (0, 5, 10):
        cb.on_trial_result(0, [], trial, {"step": step, "loss": 1.0 / (step + 1)})
    cb.drain()
    cb.on_trial_start(0, [], trial)  # (Tune restarts it after a lost process)
    for step in (10, 15):
        cb.on_trial_result(0, [], trial, {"step": step, "loss": 2.0 / (step + 1)})
    cb.close()
    rows = query("SELECT step, value FROM curves WHERE metric = 'loss' ORDER BY step", tmp_path)
    assert list(rows.step) == [0, 5, 10, 15] and rows.value.iloc[2] == 2.0 / 11
