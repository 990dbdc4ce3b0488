import yaml
from sweeps import make_sweep

from orchestrator.layout import SweepLayout
from orchestrator.records import Status, TrialRecord, append_lineage
from orchestrator.space import load_space
from orchestrator.sweep import resume_queue


def test_summary_of_an_interrupted_sweep_comes_from_the_tables_and_the_plan(tmp_path):
    """The old summary read ``r.config`` of every Tune result and crashed on trials that never started; a planned
    trial that never started is PENDING with its values, read from the sweep's plan (never Tune's state)."""
    from orchestrator import sweep as sweep_mod
    from orchestrator.layout import SweepLayout
    from orchestrator.records import Plan, write_plan
    from orchestrator.space import space_from_dict

    make_sweep(tmp_path, "s", n=1)
    space = space_from_dict({"space": {"objective.lam": {"grid": [0.0, 1.0]}}}, tmp_path / "s.yaml")
    write_plan(SweepLayout(tmp_path, "s"), Plan("t", {"t0": {"objective.lam": 0.0}, "t1": {"objective.lam": 1.0}}))
    summary = sweep_mod.summarize(SweepLayout(tmp_path, "s"), space)
    by = {r["trial"]: r for r in summary["rows"]}
    assert by["t0"]["status"] == "TERMINATED" and by["t0"]["linear_top1"] == 0.3
    assert by["t1"]["status"] == "PENDING" and by["t1"]["objective.lam"] == 1.0 and summary["interrupted"]


def test_a_resume_hands_each_part_only_the_ended_trials_it_lacks(tmp_path):
    """A driver killed after the tables wrote a trial but before MLflow did: the resume gives that trial to MLflow
    alone (the tables would otherwise get it twice, MLflow never)."""
    from orchestrator.callbacks import Part, SweepCallback
    from orchestrator.layout import SweepLayout
    from orchestrator.records import Plan, Status, write_plan, write_status, write_values
    from orchestrator.space import space_from_dict
    from orchestrator.sweep import backfill

    class Ledger(Part):
        def __init__(self, what, have):
            self.what, self.have, self.got = what, have, []

        def recorded(self):
            return set(self.have)

        def trial_ended(self, e):
            self.got.append(e.trial)

    layout = SweepLayout(tmp_path, "s")
    plan = Plan("p", {"p_00000": {"objective.lam": 0.0}, "p_00001": {"objective.lam": 1.0}}, False)
    write_plan(layout, plan)
    for tid, values in plan.trials.items():
        write_values(layout, tid, values)
        write_status(layout, tid, Status.TERMINATED)
    tables, mlflow = Ledger("write its tables", {"p_00000", "p_00001"}), Ledger("log it to MLflow", {"p_00000"})
    space = space_from_dict({"space": {"objective.lam": {"grid": [0.0, 1.0]}}}, tmp_path / "s.yaml")
    cb = SweepCallback(layout, space, [tables, mlflow])
    assert backfill(cb, layout, plan) == 1
    cb.close()
    assert tables.got == [] and mlflow.got == ["p_00001"]


def test_a_resumed_pbt_sweep_queues_each_unended_trial_with_its_newest_exploits_values(tmp_path):
    """After a driver dies, Tune's view of a PBT trial (which later exploits copy from) must be what it trains with:
    its planned values updated by every exploit in its lineage; ended trials are not queued; other schedulers queue
    the planned values."""
    mut = {"optim.lr_scale": {"loguniform": [0.5, 2.0]}}
    raw = {"name": "p", "base": {"optim": {"steps": 4}, "eval": {"every": 1}, "run": {"ckpt_every": 2}},
           "space": dict(mut), "search": {"algorithm": "random", "metric": "val_rankme"}, "num_samples": 3,
           "scheduler": {"type": "pbt", "mutations": mut}}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(raw))
    space = load_space(tmp_path / "s.yaml")
    layout = SweepLayout(tmp_path, "p")
    for e, lr in (("e1", 1.5), ("e2", 0.7)):
        append_lineage(layout, "a", {"exploit": e, "step": 4, "parent": "b", "before": {}, "after":
                                     {"optim.lr_scale": lr}})
    recs = {"a": TrialRecord("a", {"optim.lr_scale": 1.0}, None), "b": TrialRecord("b", {"optim.lr_scale": 0.6}, None),
            "c": TrialRecord("c", {"optim.lr_scale": 0.9}, Status.TERMINATED)}
    assert resume_queue(layout, space, recs) == [("a", {"optim.lr_scale": 0.7}), ("b", {"optim.lr_scale": 0.6})]
    space.scheduler.type = "fifo"
    assert resume_queue(layout, space, recs)[0] == ("a", {"optim.lr_scale": 1.0})
