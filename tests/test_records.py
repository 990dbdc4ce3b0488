"""orchestrator/records.py and the pieces that read records instead of Tune's state: the driver's lease, the plan,
the searcher, statuses, and the reasons a lost trial ends with (issue 23 items 1, 6, 7). No Ray cluster needed."""

import json
import os
import pickle
import re
import socket
import time
from pathlib import Path

import pytest
import yaml

from orchestrator.cli import main
from orchestrator.layout import SweepLayout
from orchestrator.query import query
from orchestrator.records import (
    LEASE_TTL_S,
    TRIAL_KEY,
    DriverLease,
    Plan,
    Status,
    read_error,
    read_plan,
    scan,
    write_plan,
    write_status,
)
from trainables.errors import UserError


class Evil:
    """A pickle that creates a file when loaded."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def plant_tune_pickles(tune_dir: Path, marker: Path) -> None:
    """What an attacker with write access to a shared results root plants: Tune's own files, carrying code."""
    tune_dir.mkdir(parents=True, exist_ok=True)
    (tune_dir / "tuner.pkl").write_bytes(pickle.dumps(Evil(marker)))
    blob = pickle.dumps(Evil(marker)).hex()
    state = {"trial_data": [[json.dumps({"config": {"_type": "CLOUDPICKLE_FALLBACK", "value": blob}}), "{}"]],
             "runner_data": {"_type": "CLOUDPICKLE_FALLBACK", "value": blob}}
    (tune_dir / "experiment_state-2026-11-30_00-00-00.json").write_text(json.dumps(state))
    (tune_dir / "searcher-state-2026-11-30_00-00-00.pkl").write_bytes(pickle.dumps(Evil(marker)))


def sweep_with_records(root: Path, name="s") -> SweepLayout:
    """A sweep's records as a killed driver leaves them: a plan of three trials, one ended, one with reports."""
    from orchestrator import sweep_record
    from orchestrator.space import load_space
    from search_spaces import __file__ as spaces

    layout = SweepLayout(root, name)
    space = load_space(Path(spaces).parent / "quickstart.yaml")
    sweep_record.write(layout.sweep_dir, space, [], {}, None)
    plan = Plan("abcde", {f"abcde_0000{i}": {"objective.lam": lam} for i, lam in enumerate((0.0, 0.25, 0.75))})
    write_plan(layout, plan)
    d0 = Path(layout.trial_path("abcde_00000"))
    (d0 / "run").mkdir(parents=True)
    reports = [{"step": 0, "linear_top1": 0.1, "layer/1/attn_nmi": 0.0}, {"step": 2, "loss": 1.5},
               {"step": 2, "loss": 1.5, "linear_top1": 0.5, "resumed_from": 0, "layer/1/attn_nmi": 0.2}]
    (d0 / "run" / "reports.jsonl").write_text("".join(json.dumps(r) + "\n" for r in reports))
    (d0 / "run" / "final_metrics.json").write_text(json.dumps(reports[-1]))
    d1 = Path(layout.trial_path("abcde_00001"))
    (d1 / "checkpoint_0000002").mkdir(parents=True)
    (d1 / "checkpoint_0000002" / "reports.jsonl").write_text(json.dumps({"step": 2, "loss": 1.9}) + "\n")
    return layout


# ---------------------------------------------------------------------------------------- 1. no pickles
def test_rebuild_summary_and_backfill_never_unpickle_tunes_files(tmp_path):
    from orchestrator.query import query
    from orchestrator.rebuild import rebuild
    from orchestrator.space import load_space
    from orchestrator.sweep import backfill, summarize

    layout = sweep_with_records(tmp_path)
    marker = tmp_path / "pwned"
    plant_tune_pickles(Path(layout.tune_path), marker)
    for d in Path(layout.tune_path).glob("abcde_*"):
        (d / "params.pkl").write_bytes(pickle.dumps(Evil(marker)))
    assert main(["results", "rebuild", "s", "--results", str(tmp_path)]) == 0
    assert rebuild(layout) == 2
    by = query("SELECT trial, status, loss FROM trials ORDER BY trial", tmp_path)
    assert list(by.status) == ["TERMINATED", "PENDING"] and list(by.loss) == [1.5, 1.9]
    space = load_space("search_spaces/quickstart.yaml")
    rows = {r["trial"]: r for r in summarize(layout, space)["rows"]}
    assert rows["abcde_00000"]["status"] == "TERMINATED" and rows["abcde_00002"]["status"] == "PENDING"
    assert rows["abcde_00002"]["objective.lam"] == 0.75

    from orchestrator.callbacks import Part
    from orchestrator.query import recorded_trials

    class Tables(Part):
        def recorded(self):
            return recorded_trials(layout)

    class Recorder:
        ended = []
        parts = [Tables()]

        def record_ended(self, tid, values, status, lost=None, parts=None):
            self.ended.append((tid, status))

        def drain(self):
            pass

    (Path(layout.sweep_dir) / "trials").rename(tmp_path / "gone")  # a fresh results root: nothing recorded yet
    (Path(layout.sweep_dir) / "manifest.json").unlink()
    assert backfill(Recorder(), layout, read_plan(layout)) == 1 and Recorder.ended == [("abcde_00000", "TERMINATED")]
    assert not marker.exists()


def test_statuses_come_from_the_trials_own_records(tmp_path):
    layout = sweep_with_records(tmp_path)
    plan = read_plan(layout)
    recs = scan(layout, plan)
    assert [r.status for r in recs.values()] == [Status.TERMINATED, None, None]
    write_status(layout, "abcde_00001", Status.TERMINATED)  # stopped by a scheduler: no final metrics
    Path(layout.error_path("abcde_00002")).parent.mkdir(parents=True)
    Path(layout.error_path("abcde_00002")).write_text("{trunc")
    recs = scan(layout, plan)
    assert recs["abcde_00001"].status == Status.TERMINATED
    assert recs["abcde_00002"].status == Status.ERROR and recs["abcde_00002"].error == "unreadable error file"
    assert recs["abcde_00002"].values == {"objective.lam": 0.75}


def test_a_damaged_plan_is_a_one_line_error_naming_it(tmp_path, capsys):
    layout = sweep_with_records(tmp_path)
    Path(layout.store.path("s", "plan.json")).write_text(json.dumps({"version": 1, "prefix": "x", "trials": [
        {"id": "../../etc", "values": {}}]}))
    assert main(["resume", "s", "--results", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "plan.json" in err and "not a clmim plan" in err


def test_the_plan_is_the_same_every_time_a_space_is_read(tmp_path):
    from orchestrator.space import iter_plan, load_space

    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump({"space": {"objective.lam": {"grid": [0.0, 1.0]}, "optim.blr": {
        "loguniform": [1e-4, 1e-2]}, "run.seed": {"randint": [0, 100]}}, "num_samples": 3,
        "search": {"algorithm": "random", "seed": 7}}))
    a, b = list(iter_plan(load_space(p))), list(iter_plan(load_space(p)))
    assert a == b and len(a) == 6 and len({v["optim.blr"] for v in a}) == 6
    assert all(1e-4 <= v["optim.blr"] <= 1e-2 and isinstance(v["run.seed"], int) for v in a)
    json.dumps(a)  # a plan is JSON


# ---------------------------------------------------------------------------------------- the searcher
def test_the_searcher_hands_out_queued_trials_then_optunas_with_ids_and_history():
    pytest.importorskip("optuna")
    from ray import tune
    from ray.tune.search import Searcher
    from ray.tune.search.optuna import OptunaSearch

    from orchestrator.searcher import TrialSearcher

    s = TrialSearcher([("p_00001", {"optim.blr": 0.001})], "loss", "min")
    assert s.suggest("x") == {"optim.blr": 0.001, TRIAL_KEY: "p_00001"}
    assert s.suggest("y") == Searcher.FINISHED
    seen = [({"optim.blr": 0.002}, 1.0), ({"optim.blr": 0.003}, 0.5)]
    s = TrialSearcher([("p_00003", {"optim.blr": 0.004})], "loss", "min", inner=OptunaSearch(seed=0), extra=2,
                      prefix="p", next_index=4, evaluated=seen)
    assert s.set_search_properties("loss", "min", {"optim.blr": tune.loguniform(1e-4, 1e-2)})
    assert len(s._inner._ot_study.trials) == 2  # optuna was told the ended trials' results
    got = [s.suggest(f"tune{i}") for i in range(4)]
    assert got[0][TRIAL_KEY] == "p_00003" and [g[TRIAL_KEY] for g in got[1:3]] == ["p_00004", "p_00005"]
    assert got[3] == Searcher.FINISHED
    s.on_trial_complete("tune1", {"loss": 0.3, "optim.blr": got[1]["optim.blr"]})


def test_optuna_is_told_a_trials_evaluations_and_not_the_step_logs_between_them_that_lack_the_metric():
    """A trial reports its step logs (no val_* metric) between its evaluations; optuna records every result it is
    given as an intermediate value and needs the metric in it, so it is given the evaluations only."""
    pytest.importorskip("optuna")
    from ray import tune
    from ray.tune.search.optuna import OptunaSearch

    from orchestrator.searcher import TrialSearcher

    s = TrialSearcher([], "val_rankme", "max", inner=OptunaSearch(seed=0), extra=1, prefix="p", next_index=1)
    assert s.set_search_properties("val_rankme", "max", {"objective.lam": tune.uniform(0.0, 1.0)})
    assert s.suggest("tune0")[TRIAL_KEY] == "p_00001"
    s.on_trial_result("tune0", {"loss": 1.0, "training_iteration": 1})
    s.on_trial_result("tune0", {"loss": 0.9, "val_rankme": 3.0, "training_iteration": 2})
    assert s._inner._ot_study.trials[-1].intermediate_values == {2: 3.0}


# ---------------------------------------------------------------------------------------- 6. one driver
def test_a_second_driver_is_refused_naming_the_first_ones_host_and_start(tmp_path, capsys):
    layout = sweep_with_records(tmp_path)
    with DriverLease(layout, "clmim sweep") as first:
        t = time.time()
        with pytest.raises(UserError, match=re.escape(f"another driver (clmim sweep on host {socket.gethostname()}, "
                                                      f"pid {os.getpid()}, started {first.info['started']}")):
            DriverLease(layout, "clmim resume").acquire()
        assert main(["resume", "s", "--results", str(tmp_path)]) == 2  # before Ray is started
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "another driver" in err and socket.gethostname() in err
        assert time.time() - t < 15
    DriverLease(layout, "clmim resume").acquire().release()  # the first one released it
    assert not Path(layout.store.path("s", "driver.json")).exists()


def test_a_dead_drivers_lease_is_taken_over(tmp_path):
    layout = sweep_with_records(tmp_path)
    f = Path(layout.store.path("s", "driver.json"))
    now = time.time()
    dead_pid = 2 ** 22 + 12345  # beyond pid_max's default: no such process
    for lease, alive in (({"host": socket.gethostname(), "pid": dead_pid, "renewed": now}, False),
                         ({"host": "elsewhere", "pid": 1, "renewed": now - LEASE_TTL_S - 5}, False),
                         ({"host": "elsewhere", "pid": 1, "renewed": now}, True)):
        f.write_text(json.dumps({**lease, "token": "other", "started": "then", "command": "clmim sweep"}))
        if alive:
            with pytest.raises(UserError, match="host elsewhere"):
                DriverLease(layout, "clmim resume").acquire()
        else:
            DriverLease(layout, "clmim resume").acquire().release()


# ---------------------------------------------------------------------------------------- 7. memory
OOM = ("Task was killed due to the node running low on memory.\nMemory on the node (IP: 127.0.0.1, ID: abc) where "
       "the task (actor ID: 1f, name=ImplicitFunc.__init__, pid=4242, memory used=3.21GB) was running was "
       "22.62GB / 23.47GB (0.963779), which exceeds the memory usage threshold of 0.95. Ray killed this worker.")


def test_a_trial_killed_for_memory_is_that_trials_failure_not_the_sweeps():
    """Ray's memory monitor failing a trial's actor call with OutOfMemoryError made Tune's actor manager raise
    RuntimeError out of tuner.fit(); patched, Tune gets a lost actor carrying Ray's message."""
    from ray.air.execution._internal.actor_manager import RayActorManager
    from ray.air.execution._internal.tracked_actor import TrackedActor
    from ray.air.execution._internal.tracked_actor_task import TrackedActorTask
    from ray.exceptions import OutOfMemoryError, RayActorError

    from orchestrator.callbacks import lost_reason
    from orchestrator.ray_private import oom_is_a_lost_trial

    oom_is_a_lost_trial()
    got = []
    actor = TrackedActor(1, on_error=lambda a, e: got.append(("actor", e)))
    task = TrackedActorTask(actor, on_error=lambda a, e: got.append(("task", e)))
    manager = RayActorManager.__new__(RayActorManager)
    manager._failed_actor_ids = set()
    manager._cleanup_actor = lambda tracked_actor: None
    manager._actor_task_failed(task, OutOfMemoryError(OOM))  # raised RuntimeError before
    assert [w for w, _ in got] == ["actor", "task"] and all(isinstance(e, RayActorError) for _, e in got)
    reason = lost_reason(str(got[1][1]), 2)
    assert "out of memory" in reason and "22.62GB / 23.47GB" in reason and "0.95" in reason, reason
    assert lost_reason("Traceback\nRayActorError: the actor died", 0).endswith("RayActorError: the actor died")


def test_a_trial_the_kernel_killed_for_memory_says_so_with_the_cgroups_figures(tmp_path, monkeypatch):
    from orchestrator import callbacks
    from orchestrator.query import query
    from orchestrator.space import space_from_dict

    cg = tmp_path / "cgroup"
    cg.mkdir()
    (cg / "memory.events").write_text("low 0\nhigh 0\nmax 3\noom 1\noom_kill 0\n")
    (cg / "memory.max").write_text(str(2 * 2**30))
    (cg / "memory.peak").write_text(str(2 * 2**30 - 4096))
    monkeypatch.setattr(callbacks, "_cgroup_dir", lambda: cg)
    space = space_from_dict({"space": {"objective.lam": 0.5}, "failure": {"max_failures": 0}}, tmp_path / "s.yaml")
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "sweep.json").write_text("{}")
    layout = SweepLayout(tmp_path, "s")
    cb = callbacks.SweepCallback(layout, space, [callbacks.Tables(layout, space)])
    (cg / "memory.events").write_text("low 0\nhigh 0\nmax 9\noom 2\noom_kill 1\n")  # a trial process killed
    cb.record_ended("t1", {}, "ERROR", "Traceback ...\nRayActorError: The actor died unexpectedly")
    cb.close()
    error = query("SELECT error FROM trials", tmp_path).error[0]
    assert "out of memory (the kernel's OOM killer; 1 process(es)" in error and "limit 2.00 GB, peak 2.00 GB" in error


def test_damaged_error_file_counts_as_an_error(tmp_path):
    from orchestrator.rebuild import rebuild

    d = tmp_path / "s" / "tune" / "t1"
    d.mkdir(parents=True)
    (d / "error.json").write_text("")  # what a full disk left
    (d / "result.json").write_text(json.dumps({"step": 1, "loss": 1.0}) + "\n")
    layout = SweepLayout(tmp_path, "s")
    assert read_error(layout, "t1") == "unreadable error file"
    assert rebuild(layout) == 1
    df = query("SELECT status, error FROM trials", tmp_path)
    assert list(df.status) == ["ERROR"] and df.error[0] == "unreadable error file"


def test_retry_errored_moves_the_error_record_aside(tmp_path):
    from orchestrator.sweep import retire_errors
    from orchestrator.trial import TrialError, raise_recorded

    layout = SweepLayout(tmp_path, "s")
    d = Path(layout.trial_path("t1"))
    d.mkdir(parents=True)
    (d / "error.json").write_text(json.dumps({"type": "ConfigError", "message": "data.path"}))
    with pytest.raises(TrialError):
        raise_recorded(layout, "t1")
    assert retire_errors(layout) == ["t1"]
    raise_recorded(layout, "t1")  # a retried trial now really runs
    assert (d / "error.prev.json").is_file()


def test_nsga2_is_told_earlier_results_as_its_first_generation_and_proposes_within_the_space():
    pytest.importorskip("optuna")
    from ray import tune
    from ray.tune.search import Searcher

    from orchestrator.searcher import TrialSearcher, model_searcher, population_size, reward, search_target
    from orchestrator.space import SearchSection

    search = SearchSection(algorithm="nsga2", metric="val_linear_top1", objectives=["val_linear_top1", "train_flops"])
    assert search_target(search) == (["val_linear_top1", "train_flops"], ["max", "min"])
    assert reward(search, {"val_linear_top1": 0.5, "train_flops": 2e9}) == [0.5, 2e9]
    assert reward(search, {"val_linear_top1": 0.5}) is None  # a trial that did not measure both: not told
    assert population_size(24) == 6 and population_size(1000) == 50 and population_size(3) == 4
    seen = [({"objective.lam": lam}, [lam, 1e9 * (1 + lam)]) for lam in (0.1, 0.4, 0.7, 0.9)]
    s = TrialSearcher([], *search_target(search), inner=model_searcher(search, 16), extra=6, prefix="n",
                      evaluated=seen)
    assert s.set_search_properties(None, None, {"objective.lam": tune.uniform(0.0, 1.0)})
    study = s._inner._ot_study
    assert [t.values for t in study.trials] == [v for _, v in seen]
    assert {t.system_attrs.get("NSGAIISampler:generation") for t in study.trials} == {0}  # parents of the next
    got = [s.suggest(f"tune{i}") for i in range(7)]
    assert [g[TRIAL_KEY] for g in got[:6]] == [f"n_{i:05d}" for i in range(6)] and got[6] == Searcher.FINISHED
    assert all(0.0 <= g["objective.lam"] <= 1.0 for g in got[:6])
    s.on_trial_complete("tune0", {"val_linear_top1": 0.3, "train_flops": 1.5e9})
    assert study.trials[4].values == [0.3, 1.5e9]  # a finished proposal's two objectives are told back
