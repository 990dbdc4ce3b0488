"""How early signals rank a sweep's trials (``orchestrator/early_signals.py``): the reading step, the direction, and
Spearman's rho on cases with known answers."""

import json

import numpy as np
import pandas as pd
import pytest
from sweeps import table_cfg

from orchestrator.early_signals import early_readings, early_signal_table
from orchestrator.layout import SweepLayout
from orchestrator.query import sweep_frames
from orchestrator.report import build_report
from orchestrator.results import write_trial_tables
from orchestrator.summary import sections


def frames(n=6, end=100, steps=(0, 10, 20, 30, 100), seed=0):
    """``n`` trials whose final val_linear_top1 rises with their index; RankMe at every step rises with it too,
    the held-out loss falls with it, and the early probe is noise."""
    rng = np.random.default_rng(seed)
    done = pd.DataFrame({"sweep": "s", "trial": [f"t{i}" for i in range(n)], "step": end,
                         "val_linear_top1": np.linspace(0.3, 0.9, n)})
    rows = []
    for i in range(n):
        for st in steps:
            rows += [("s", f"t{i}", st, "val_rankme", 10.0 + i + st), ("s", f"t{i}", st, "val_loss", 5.0 - i),
                     ("s", f"t{i}", st, "val_linear_top1", float(rng.random()))]
    return done, pd.DataFrame(rows, columns=["sweep", "trial", "step", "metric", "value"])


def test_signals_are_read_at_the_last_evaluation_within_a_fifth_of_the_run_never_step_0():
    done, signals = frames()
    r = early_readings(done, signals)
    assert set(r.read_at_step) == {20} and len(r) == 6 * 3
    assert early_readings(done, signals, at=0.05).empty  # only step 0 before 5 %: the untrained encoder is no reading


def test_a_signal_that_orders_the_trials_as_their_final_probe_has_rho_1_in_its_own_direction():
    done, signals = frames()
    t = early_signal_table(done, signals).set_index("signal")
    assert list(t.index) == ["val_rankme", "val_loss", "val_linear_top1"]  # label-free first
    assert t.loc["val_rankme", "spearman_rho"] == pytest.approx(1.0)
    assert t.loc["val_loss", "spearman_rho"] == pytest.approx(1.0)  # lower loss, higher probe: negated
    assert abs(t.loc["val_linear_top1", "spearman_rho"]) < 0.9 and t.loc["val_rankme", "p"] < 0.01
    assert (t.trials == 6).all() and list(t.read_at_share) == pytest.approx([0.2] * 3)
    assert list(t.labels) == ["no", "no", "yes"]
    # reversed: the final probe falls where RankMe rises
    done["val_linear_top1"] = done["val_linear_top1"].to_numpy()[::-1]
    assert early_signal_table(done, signals).set_index("signal").loc["val_rankme", "spearman_rho"] == \
        pytest.approx(-1.0)


def test_a_signal_that_ranks_within_each_mix_but_not_across_them_shows_both():
    """Two mixes of four trials: within each, RankMe orders the trials as their final probe does; across them the
    mix with the higher RankMe ends lower (its spectrum sits on another scale), so the sweep-wide rho is negative."""
    done, signals = frames(n=8)
    done["mix"] = ["SimMIM"] * 4 + ["MoCo v3"] * 4
    done["val_linear_top1"] = [0.5, 0.6, 0.7, 0.8, 0.1, 0.2, 0.3, 0.4]  # MoCo v3's end lower; RankMe rises with i
    t = early_signal_table(done, signals).set_index(["mix", "signal"])
    assert list(t.index.get_level_values("mix").unique()) == ["all", "MoCo v3", "SimMIM"]  # "all" first
    assert t.loc[("all", "val_rankme"), "spearman_rho"] < 0 and t.loc[("all", "val_rankme"), "trials"] == 8
    for mix in ("SimMIM", "MoCo v3"):
        assert t.loc[(mix, "val_rankme"), "spearman_rho"] == pytest.approx(1.0) and t.loc[(mix, "val_rankme"),
                                                                                          "trials"] == 4
    one = done.assign(mix="SimMIM")  # a sweep of one mix: its rows are the sweep's, once
    assert set(early_signal_table(one, signals)["mix"]) == {"all"}


def test_trials_without_an_early_evaluation_or_too_few_give_no_rho():
    done, signals = frames(steps=(0, 100))
    assert early_signal_table(done, signals).empty
    done, signals = frames(n=2)
    assert early_signal_table(done, signals).spearman_rho.isna().all()


def test_a_sweeps_early_signals_reach_its_summary_and_report_from_the_trials_reports(tmp_path):
    """Reports carrying the label-free signals at step 20 of 100 land in ``curves``; the summary's section and the
    report show Spearman's rho against each trial's final val_linear_top1."""
    sweep = tmp_path / "es"
    sweep.mkdir()
    (sweep / "sweep.json").write_text(json.dumps({"name": "es", "created": "2026-12-01T10:00:00", "n_trials": 5}))
    for i in range(5):
        early = {"step": 20, "val_rankme": 3.0 + i, "val_loss": 2.0 - i / 10, "val_linear_top1": 0.2,
                 "linear_top1": 0.2}
        final = {"step": 100, "loss": 1.0, "linear_top1": 0.4 + i / 20, "val_linear_top1": 0.4 + i / 20,
                 "val_rankme": 9.0, "val_loss": 1.0, "layer/1/attn_nmi": 0.3}
        write_trial_tables(sweep, f"t{i}", "TERMINATED", table_cfg(lam=float(i % 2), seed=i),
                           [{"step": 0, "linear_top1": 0.1, "val_rankme": 1.0}, early, final])
    table = next(s.table for s in sections(sweep_frames(tmp_path, ["es"])) if s.key == "early_signals")
    t = table[table["mix"] == "all"].set_index("signal")
    assert t.loc["val_rankme", "spearman_rho"] == pytest.approx(1.0) and t.loc["val_loss", "spearman_rho"] == \
        pytest.approx(1.0) and np.isnan(t.loc["val_linear_top1", "spearman_rho"])  # the same early probe for all
    assert set(table["mix"]) == {"all", "SimMIM"}  # MoCo v3's two trials are too few to rank on their own
    assert table.set_index(["mix", "signal"]).loc[("SimMIM", "val_rankme"), "trials"] == 3
    page = build_report(SweepLayout(tmp_path, "es"))[0].read_text()
    assert "<h2>Early signals</h2>" in page and "val_rankme" in page
