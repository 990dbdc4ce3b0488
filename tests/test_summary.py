import pytest
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


@pytest.mark.integration
def test_sections_are_computed_once_and_every_view_renders_them(tmp_path):
    """summary.sections is DataFrames in, DataFrames out; the console, the HTML report and the Markdown of
    repro_claims show its tables (no view computes its own numbers)."""
    import subprocess
    import sys

    from orchestrator.cli import show
    from orchestrator.layout import SweepLayout
    from orchestrator.query import sweep_frames
    from orchestrator.report import build_report
    from orchestrator.summary import sections

    make_sweep(tmp_path, "cmp", n=4)
    found = sections(sweep_frames(tmp_path, ["cmp"]))
    keys = [s.key for s in found]
    assert keys[:3] == ["status", "best", "per_group"] and "claims" in keys and "matched" in keys
    claims = next(s.table for s in found if s.key == "claims")
    assert [s.key for s in show(SweepLayout(tmp_path, "cmp"))] == [*keys, "storage"]
    page = build_report(SweepLayout(tmp_path, "cmp"))[0].read_text()
    assert all(str(v) in page for v in claims["difference [95% CI]"])
    md = subprocess.run([sys.executable, "benchmarks/repro_claims.py", "cmp", "--results", str(tmp_path)],
                        capture_output=True, text=True, timeout=300).stdout
    assert all(str(v) in md for v in claims["difference [95% CI]"]) and "## the claims' verdict" in md
