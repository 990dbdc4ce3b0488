
import pytest
from sweeps import make_sweep

from orchestrator.cli import main
from trainables.config import load_config


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
    assert all(str(v) in md for v in claims["difference [95% CI]"])
    assert "claims_per_step" not in keys  # one probed step after 0: that table would be the claims table again


def _eval_reports(lam: float, seed: int) -> list[dict]:
    """A finished trial's reports with every evaluation: CL (lam 1) drops less to high-frequency noise and more
    to low-frequency noise, and fine-tunes lower, than MIM (lam 0); small seed-to-seed spread."""
    jitter = 0.002 * seed
    high, low = (0.05, 0.30) if lam == 1 else (0.30, 0.05)
    step0 = {"step": 0, "linear_top1_clean": 0.5, **{f"layer/{k}/cka_untrained": 1.0 for k in range(3)},
             **{f"noise/{b}/linear_top1_drop": 0.1 for b in range(4)}}
    final = {"step": 10, "epoch": 1.0, "loss": 1.0, "linear_top1": 0.8, "knn_top1": 0.7, "params": 1000,
             "train_flops_per_image": 1e6, "finetune_top1": 0.9 - 0.05 * lam + jitter, "seconds_train": 60.0,
             "seconds_probes": 5.0, "seconds_noise": 3.0, "seconds_finetune": 20.0, "time_total_s": 100.0,
             **{f"layer/{k}/cka_untrained": 1.0 - 0.1 * k * (1 + lam) for k in range(3)},
             **{f"layer/{k}/dense_miou": 0.5 - 0.1 * lam + jitter for k in range(3)},
             **{f"noise/{b}/finetune_top1_drop": low + (high - low) * b / 3 + jitter for b in range(4)},
             **{f"noise/{b}/linear_top1_drop": 0.2 for b in range(4)}, "done": True}
    return [step0, final]


def _eval_sweep(root, seeds: int) -> None:
    """Sweep ``ev`` under ``root``: pure MIM and pure CL x ``seeds``, every trial with ``_eval_reports``."""
    from orchestrator.results import write_trial_tables
    from trainables.config import to_dict

    for lam in (0.0, 1.0):
        for seed in range(seeds):
            cfg = to_dict(load_config({}, [f"objective.lam={lam}", f"run.seed={seed}", "eval.noise.bands=4"]))
            write_trial_tables(root / "ev", f"t{int(lam)}{seed}", "TERMINATED", cfg, _eval_reports(lam, seed))


@pytest.mark.integration
def test_report_and_results_show_the_evaluations(tmp_path):
    from orchestrator.cli import show
    from orchestrator.compare import eval_claims, noise_drops
    from orchestrator.layout import SweepLayout
    from orchestrator.query import connect
    from orchestrator.report import build_report

    _eval_sweep(tmp_path, seeds=3)
    con = connect(tmp_path)
    trials = con.execute("SELECT * FROM trials").df()
    robustness = con.execute("SELECT * FROM robustness").df()
    drops = noise_drops(robustness)
    assert set(drops.classifier) == {"finetune"} and len(drops) == 6 * 4  # the fine-tuned model's, at the end
    assert set(drops.untrained) == {0.1}  # the untrained encoder's linear probe at step 0
    claims = eval_claims(trials, robustness).set_index("key")
    assert claims.loc["finetune", "verdict"] == "holds"
    assert claims.loc["noise_high", "verdict"] == "holds" and claims.loc["noise_low", "verdict"] == "holds"
    assert "(finetune)" in claims.loc["noise_high", "claim"]
    tables = {sec.title: sec.table for sec in show(SweepLayout(tmp_path, "ev"))}
    shares = tables["where a trial's time went (share of its wall time, mean over the group's trials)"]
    assert list(shares.evaluations) == [0.28, 0.28] and list(shares.train) == [0.6, 0.6]
    assert "evaluations (pure CL vs pure MIM)" in tables
    page, files = build_report(SweepLayout(tmp_path, "ev"))
    text = page.read_text()
    assert {f.name for f in files} >= {"noise.png", "layers.png"}
    assert "Evaluations: fine-tuning and robustness" in text
    assert "last-layer dense probe mIoU: MIM &gt; CL" in text  # a per-layer claim, in the claims table
    assert "fine-tuning top-1: MIM &gt; CL" in text


def test_a_fine_tuned_drop_is_not_subtracted_from_the_untrained_linear_probe(tmp_path):
    from orchestrator.compare import eval_claims
    from orchestrator.query import connect

    _eval_sweep(tmp_path, seeds=2)
    con = connect(tmp_path)
    claims = eval_claims(con.execute("SELECT * FROM trials").df(),
                         con.execute("SELECT * FROM robustness").df()).set_index("key")
    assert "0.1" in claims.loc["noise_high", "untrained"]  # shown beside, for reference
    assert claims.loc["noise_high", "MIM − untrained"] == "–"  # another classifier: no difference taken
