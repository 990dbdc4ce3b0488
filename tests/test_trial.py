"""orchestrator/trial.py without Ray: a trial's own log of reports, its export, resume from any checkpoint (issue 24
item 2, issue 23 items 5 and 8). ``train_reporting_to`` runs with a stand-in for ``ray.tune``."""

import json
import shutil
import time
from pathlib import Path

import pytest
import torch
from conftest import CHEAP_EVAL, tiny

from orchestrator import records
from orchestrator.layout import SweepLayout
from orchestrator.records import EXPLOIT_KEY, REPORTS, parse_reports
from orchestrator.results import curves_from_results, layers_from_results, trial_row
from orchestrator.trial import SchedulerView, TrialSpec, resume_point, train_reporting_to
from trainables.checkpoints import load_weights
from trainables.config import load_config
from trainables.trainer import train


class FakeTune:
    """What ``train_reporting_to`` uses of ``ray.tune``: report, Checkpoint, get_checkpoint."""

    class Checkpoint:
        @staticmethod
        def from_directory(d):
            return d

    def __init__(self):
        self.reports = []

    def report(self, metrics, checkpoint=None):
        self.reports.append(metrics)

    def get_checkpoint(self):
        return None


def run(layout, keep=1):
    base = tiny(optim__steps=8, run__log_every=2, run__ckpt_every=4, **CHEAP_EVAL)
    spec = TrialSpec(layout=layout, base=base, fixed={}, keep_checkpoints=keep)
    api = FakeTune()
    train_reporting_to(api, {"objective.lam": 0.5}, spec, "t1", in_process=True)
    return api.reports


def keys(reports):
    return {(step, metric) for step, _, metric, _ in curves_from_results(reports)}


@pytest.mark.integration
@pytest.mark.slow  # (make test's 12-minute budget: CI's slow tier)
def test_a_trial_resumed_at_any_checkpoint_has_its_export_every_report_and_the_same_tables(tmp_path):
    # the uninterrupted trial, keeping every checkpoint so that each can be a resume point below
    straight = SweepLayout(tmp_path / "a", "s")
    run(straight, keep=10)
    trial = Path(straight.trial_path("t1"))
    full = parse_reports((trial / "run" / REPORTS).read_text())
    assert sorted({s for s, _ in keys(full)}) == [0, 1, 2, 4, 6, 8]
    assert sorted(c.name for c in trial.glob("checkpoint_*")) == ["checkpoint_0000004", "checkpoint_0000008"]
    final_weights = torch.load(trial / "run" / "model.pt", weights_only=True)["model"]
    for resume_at in (8, 4):  # interrupted at its last step (the old bug: no export, no loss rows), and mid-run
        layout = SweepLayout(tmp_path / f"at{resume_at}", "s")
        shutil.copytree(trial.parent.parent, Path(layout.sweep_dir))
        t = Path(layout.trial_path("t1"))
        shutil.rmtree(t / "run")  # what a kill before the trial's end leaves: checkpoints up to resume_at
        for c in t.glob("checkpoint_*"):
            if int(c.name.split("_")[1]) > resume_at:
                shutil.rmtree(c)
        reports = run(layout)
        assert reports[-1]["resumed_from"] == resume_at and reports[0]["step"] > 0  # continued, not started again
        log = parse_reports((t / "run" / REPORTS).read_text())
        assert keys(log) == keys(full), resume_at
        got = {(s, m): v for s, _, m, v in curves_from_results(log)}
        want = {(s, m): v for s, _, m, v in curves_from_results(full)}
        assert all(got[k] == want[k] for k in want if k[1].startswith("loss")), resume_at  # exact resume
        assert {r[:2] + r[3:4] for r in layers_from_results(log)} == {r[:2] + r[3:4] for r in layers_from_results(full)}
        row, ref = trial_row("s", "t1", "a", "TERMINATED", {}, _final(log)), trial_row("s", "t1", "a", "TERMINATED",
                                                                                      {}, _final(full))
        assert row["loss"] == ref["loss"] and row["step"] == ref["step"] == 8
        weights = torch.load(t / "run" / "model.pt", weights_only=True)["model"]
        assert all(torch.equal(weights[k], final_weights[k]) for k in final_weights)
        assert json.loads((t / "run" / "final_metrics.json").read_text())["loss"] == ref["loss"]


def _final(reports):
    out = {}
    for r in reports:
        out.update({k: v for k, v in r.items() if v is not None})
    return out


@pytest.mark.integration
def test_a_damaged_checkpoint_is_skipped_with_a_warning_naming_it_and_the_fallback(tmp_path, capsys):
    layout = SweepLayout(tmp_path, "s")
    run(layout, keep=10)
    t = Path(layout.trial_path("t1"))
    newest = t / "checkpoint_0000008" / "checkpoint.pt"
    newest.write_bytes(newest.read_bytes()[:1000])  # truncated
    got = resume_point(layout, "t1", tmp_path / "local")
    assert got is not None and "checkpoint_0000004" in got
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(newest) in err[0] and "resuming from step 4" in err[0], err
    (t / "checkpoint_0000004" / "checkpoint.pt").write_bytes(b"")
    assert resume_point(layout, "t1", tmp_path / "local2") is None
    assert "step 0" in capsys.readouterr().err


@pytest.mark.integration
def test_train_resume_auto_skips_a_truncated_checkpoint_with_a_warning(tmp_path, capsys):
    from trainables.config import load_config
    from trainables.trainer import train

    out = tmp_path / "run"
    cfg = tiny(optim__steps=4, run__log_every=2, run__ckpt_every=2, run__out_dir=str(out), **CHEAP_EVAL)
    train(load_config(cfg))
    newest = out / "checkpoints" / "step_0000004" / "checkpoint.pt"
    newest.write_bytes(newest.read_bytes()[:500])
    final = train(load_config(cfg, ["run.resume=auto"]))
    assert final["resumed_from"] == 2
    err = capsys.readouterr().err
    assert str(newest) in err and "resuming from step 2" in err


@pytest.mark.integration
def test_restarted_trial_resumes_from_its_newest_complete_checkpoint(tmp_path):
    """A (re)started trial continues from the newest checkpoint in its storage folder, whatever Tune's saved state
    says (it can lag: on Ctrl-C, or when the driver dies); a torn newer one (a process killed mid-copy) is skipped."""
    import shutil

    from orchestrator.layout import SweepLayout
    from orchestrator.trial import resume_point
    from trainables.trainer import train

    run = tmp_path / "scratch" / "run"
    train(load_config(tiny(), [f"run.out_dir={run}", "optim.steps=4", "run.ckpt_every=2", "eval.probe_images=8"]))
    layout = SweepLayout(tmp_path, "s")
    trial = Path(layout.trial_path("t1"))
    for i, step in enumerate(sorted((run / "checkpoints").glob("step_*"))):  # what Tune copied into the storage
        shutil.copytree(step, trial / f"checkpoint_00000{i}")
    (trial / "checkpoint_000002").mkdir()
    (trial / "checkpoint_000002" / "checkpoint.pt").write_bytes(b"torn")

    got = resume_point(layout, "t1", tmp_path / "local")
    assert got == str(tmp_path / "local" / "checkpoint_000001" / "checkpoint.pt")
    assert torch.load(got, weights_only=True)["step"] == 4
    assert resume_point(layout, "fresh", tmp_path / "local2") is None


def test_two_sweeps_of_one_name_in_different_roots_get_their_own_scratch_folders(tmp_path):
    """(Two pytest workers, or two users' sweeps named quickstart, on one node once emptied each other's.)"""
    from orchestrator.trial import scratch_dir

    a = scratch_dir(SweepLayout(tmp_path / "a", "s"), "t1", 0)
    (a / "mine").write_text("x")
    b = scratch_dir(SweepLayout(tmp_path / "b", "s"), "t1", 0)
    assert a != b and (a / "mine").is_file() and b.is_dir()


def test_the_scheduler_reads_a_metric_only_as_of_a_stored_checkpoint_so_a_pause_loses_no_step():
    """A reading (val_rankme at an evaluation) reaches the scheduler with the next report that carries a checkpoint:
    a scheduler that pauses on it pauses where the trial resumes from. Step 0 and the final report count at once;
    before any reading the scheduler sees epoch 0 and the worst value; a resumed trial starts from its checkpoint's
    reports. FIFO (no metric) adds nothing."""
    v = SchedulerView("val_rankme", "max", [])
    assert v.update({"step": 0, "epoch": 0.0}) == {"sched_epoch": 0.0, "sched_value": float("-inf")}
    assert v.update({"step": 0, "epoch": 0.0, "val_rankme": 2.0}) == {"sched_epoch": 0.0, "sched_value": 2.0}
    assert v.update({"step": 4, "epoch": 1.0, "val_rankme": 5.0}) == {"sched_epoch": 0.0, "sched_value": 2.0}
    assert v.update({"step": 4, "epoch": 1.0, "loss": 1.0}, committed=True) == {"sched_epoch": 1.0,
                                                                               "sched_value": 5.0}
    assert v.update({"step": 8, "epoch": 2.0, "val_rankme": 7.0}) == {"sched_epoch": 1.0, "sched_value": 5.0}
    assert v.update({"step": 8, "epoch": 2.0, "val_rankme": 7.0, "resumed_from": 0}) == {"sched_epoch": 2.0,
                                                                                        "sched_value": 7.0}
    prior = [{"step": 0, "epoch": 0.0, "val_rankme": 2.0}, {"step": 4, "epoch": 1.0, "val_rankme": 5.0},
             {"step": 4, "epoch": 1.0, "loss": 1.0}]  # what the step-4 checkpoint carries
    assert SchedulerView("val_rankme", "max", prior).view == {"sched_epoch": 1.0, "sched_value": 5.0}
    assert SchedulerView("val_loss", "min", []).view["sched_value"] == float("inf")
    assert SchedulerView("", "max", prior).update({"step": 9, "val_rankme": 1.0}, committed=True) == {}


@pytest.mark.slow  # (make test's 12-minute budget: CI runs it in the slow tier)
def test_a_pbt_exploit_continues_from_the_donors_newest_checkpoint_bit_for_bit_and_is_recorded_once(tmp_path):
    """Trial r, paused at step 2, is restarted for an exploit of trial d (newest checkpoint: step 6) with a new lr:
    its stored checkpoint at 6 is d's weights, it ends with the weights of d's checkpoint trained on with the new lr
    straight, and its lineage holds the exploit once (parent, step, lr before and after). Restarted again for the
    same exploit (a lost process), or with its planned values and no exploit (a resumed driver), it continues from
    its own copy with the new lr: the same weights, still one lineage row."""
    layout = SweepLayout(tmp_path, "s")
    base = tiny(optim__steps=8, run__log_every=2, run__ckpt_every=2, **CHEAP_EVAL)
    spec = TrialSpec(layout=layout, base=base, fixed={}, keep_checkpoints=10)
    planned = {"objective.lam": 0.5, "optim.lr_scale": 1.0}

    def trial(tid, values, drop_after, exploit=None):
        train_reporting_to(FakeTune(), values, spec, tid, in_process=True, exploit=exploit)
        t = Path(layout.trial_path(tid))
        shutil.rmtree(t / "run")  # paused (or the donor still running): checkpoints up to drop_after
        for c in t.glob("checkpoint_*"):
            if int(c.name.split("_")[1]) > drop_after:
                shutil.rmtree(c)
        return t

    d = trial("d", planned, 6)
    r = trial("r", planned, 2)
    exploit = {"id": "e1", "donor": "d", "keys": ["optim.lr_scale"]}
    new = {"objective.lam": 0.5, "optim.lr_scale": 2.0}
    trial("r", new, 6, exploit)
    copy = load_weights(r / "checkpoint_0000006" / "checkpoint.pt")["model"]
    donor = load_weights(d / "checkpoint_0000006" / "checkpoint.pt")["model"]
    assert all(torch.equal(copy[k], donor[k]) for k in donor)
    [row] = records.read_lineage(layout, "r")
    assert abs(row.pop("at") - time.time()) < 600  # when it exploited (the schedules read the parent's as of then)
    assert row == {"exploit": "e1", "step": 6, "parent": "d", "before": {"optim.lr_scale": 1.0},
                   "after": {"optim.lr_scale": 2.0}}
    straight = load_config(base, ["objective.lam=0.5", "optim.lr_scale=2.0", f"run.out_dir={tmp_path / 'straight'}",
                                  f"run.resume={d / 'checkpoint_0000006'}"])
    train(straight)
    want = load_weights(tmp_path / "straight" / "checkpoints" / "step_0000008" / "checkpoint.pt")["model"]
    for again in ({**new, records.TRIAL_KEY: "r", EXPLOIT_KEY: exploit}, {**planned, records.TRIAL_KEY: "r"}):
        train_reporting_to(FakeTune(), records.sampled_values(again), spec, "r", in_process=True,
                           exploit=again.get(EXPLOIT_KEY))
        got = load_weights(r / "checkpoint_0000008" / "checkpoint.pt")["model"]
        assert all(torch.equal(got[k], want[k]) for k in want), again
        assert len(records.read_lineage(layout, "r")) == 1
        assert records.read_values(layout, "r")["optim.lr_scale"] == 2.0
        for c in r.glob("checkpoint_*"):  # paused again at 6
            if int(c.name.split("_")[1]) > 6:
                shutil.rmtree(c)
        shutil.rmtree(r / "run")
    reports = parse_reports((r / "checkpoint_0000006" / REPORTS).read_text())
    assert max(x.get("step") or 0 for x in reports) == 2  # its own record: steps up to its pause, not d's
