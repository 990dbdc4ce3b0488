from sweeps import make_sweep

from orchestrator.cli import main


def test_results_show_gives_mean_and_se_per_group_matched_budgets_and_claims(tmp_path, capsys):
    make_sweep(tmp_path, "cmp", n=4)  # lam 0 and 1, two seeds each
    assert main(["results", "show", "cmp", "--results", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "per group: mean ±" in out and "SimMIM" in out and "MoCo v3" in out
    assert "0.4 ± 0.1" in out  # MIM's linear probe: mean ± SE of 0.3 and 0.5
    assert "linear probe at matched steps" in out
    assert "paper's" in out and "late-layer" in out  # rich wraps cells at the terminal's width
