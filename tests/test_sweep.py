from sweeps import make_sweep


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
