"""Fair-comparison tables: matched steps / FLOPs and the paper-claims verdicts, on hand-made results."""

import numpy as np
import pandas as pd
import pytest

from orchestrator.compare import at_matched, matched_table, mean_se, paper_claims


def trials_frame():
    rows = []
    for lam, fpi in ((0.0, 1.0e8), (1.0, 2.7e8)):
        for seed in range(3):
            rows.append({"trial": f"t{lam:g}_{seed}", "lam": lam, "objective.lam": lam, "run.seed": seed,
                         "train_flops_per_image": fpi, "data.batch_size": 10, "optim.steps": 100})
    return pd.DataFrame(rows)


def layers_frame(trials, steps=(0, 20, 40, 60, 80, 100), depth=2):
    """linear_top1_gap at the last layer rises with step; CL 0.1 above MIM at equal steps."""
    rows = []
    for _, t in trials.iterrows():
        for step in steps:
            v = 0.2 + 0.004 * step + (0.1 if t.lam == 1 and step else 0) + 0.001 * t["run.seed"]
            for layer in range(depth + 1):
                rows.append({"trial": t.trial, "step": step, "layer": layer, "head": None,
                             "metric": "linear_top1_gap", "value": v - 0.01 * (depth - layer), "lam": t.lam})
    return pd.DataFrame(rows)


def test_matched_steps_and_flops_read_each_objective_at_its_own_step():
    trials = trials_frame()
    table = matched_table(layers_frame(trials), trials, metrics=("linear_top1_gap",)).set_index(["lam", "matched"])
    # matched steps: both at step 100
    assert table.loc[(0.0, "steps"), "read_at_step"] == 100 and table.loc[(1.0, "steps"), "read_at_step"] == 100
    assert table.loc[(1.0, "steps"), "mean"] == pytest.approx(0.2 + 0.4 + 0.1 + 0.001)
    # matched FLOPs: MIM's whole run (100 steps x 10 x 1e8) buys CL 37 steps; its last probe within is step 20
    assert table.loc[(0.0, "FLOPs"), "budget"] == pytest.approx(1e11)
    assert table.loc[(0.0, "FLOPs"), "read_at_step"] == 100 and table.loc[(1.0, "FLOPs"), "read_at_step"] == 20
    assert table.loc[(1.0, "FLOPs"), "mean"] == pytest.approx(0.2 + 0.08 + 0.1 + 0.001)
    assert table.loc[(1.0, "FLOPs"), "seeds"] == 3
    assert table.loc[(1.0, "FLOPs"), "se"] == pytest.approx(0.001 / np.sqrt(3))


def test_at_matched_uses_the_largest_budget_all_trials_reached():
    h = pd.DataFrame({"trial": ["a", "a", "b", "b", "b"], "step": [5, 10, 4, 8, 12], "value": [1, 2, 3, 4, 5]})
    rows, budget = at_matched(h, "step")
    assert budget == 10 and dict(zip(rows.trial, rows.step, strict=True)) == {"a": 10, "b": 8}


def test_paper_claims_verdicts_follow_the_difference_and_its_standard_error():
    trials = trials_frame()
    layers = layers_frame(trials, steps=(100,))
    extra = []
    for _, t in trials.iterrows():
        s = t["run.seed"]
        cl = t.lam == 1
        extra += [  # last layer (2): CL attends further and flatter; MIM peaks at layer 1
            {"trial": t.trial, "step": 100, "layer": 2, "head": None, "metric": "attn_distance",
             "value": (20 if cl else 12) + 0.1 * s, "lam": t.lam},
            {"trial": t.trial, "step": 100, "layer": 2, "head": None, "metric": "attn_nmi",
             "value": 0.1 + 0.01 * s, "lam": t.lam},  # no difference: unclear
        ]
    final = pd.concat([layers, pd.DataFrame(extra)])
    mim_peak = (final.metric == "linear_top1_gap") & (final.lam == 0) & (final.layer == 1)
    final.loc[mim_peak, "value"] += 0.05  # MIM's best layer is 1, above its last
    untrained = final.assign(step=0, value=0.0)
    claims = paper_claims(final, untrained, trials).set_index("key")
    assert claims.loc["attn_distance", "verdict"] == "holds"
    assert claims.loc["attn_nmi", "verdict"].startswith("unclear")
    assert claims.loc["linear_gap", "verdict"] == "holds"
    assert claims.loc["mim_peak", "verdict"] == "holds"
    assert claims.loc["fourier", "verdict"] == "not measured"
    assert claims.loc["attn_distance", "untrained"] == "0 ± 0"
    assert claims.loc["attn_distance", "CL (lam=1)"].startswith("20.1 ± ")


def test_mean_se():
    m, se, n = mean_se([1.0, 2.0, 3.0, float("nan")])
    assert (m, n) == (2.0, 3) and se == pytest.approx(1 / np.sqrt(3))
    assert np.isnan(mean_se([5.0])[1])


def test_lr_tuned_per_objective_picks_each_objectives_best_mean():
    from orchestrator.compare import tuned_table

    rows = []
    for lam, best in ((0.0, 30), (1.0, 10)):
        for lr in (10, 30):
            for seed in range(2):
                rows.append({"trial": f"{lam}-{lr}-{seed}", "lam": lam, "objective.lam": lam, "optim.lr_scale": lr,
                             "run.seed": seed, "linear_top1": (0.6 if lr == best else 0.5) + 0.01 * seed})
    table = tuned_table(pd.DataFrame(rows)).set_index("group")
    assert table.loc["MIM (lam=0)", "best optim.lr_scale"] == 30
    assert table.loc["CL (lam=1)", "best optim.lr_scale"] == 10
    assert table.loc["CL (lam=1)", "linear_top1"].startswith("0.605 ± ")
    assert tuned_table(pd.DataFrame(rows).assign(**{"optim.lr_scale": 1})).empty


def test_claims_show_trained_minus_untrained_paired_per_trial():
    trials = trials_frame()
    final = layers_frame(trials, steps=(100,))
    untrained = final.assign(step=0, value=final.value - 0.25)  # every trial moved by exactly 0.25
    claims = paper_claims(final, untrained, trials).set_index("key")
    assert claims.loc["linear_gap", "MIM − untrained"] == "0.25 ± 0"
    assert claims.loc["linear_gap", "CL − untrained"] == "0.25 ± 0"


def test_untrained_column_is_shared_only_when_both_groups_share_the_architecture():
    trials = trials_frame().assign(**{"model.pos_embed": "sincos"})
    final = layers_frame(trials, steps=(100,))
    untrained = final.assign(step=0, value=0.5)
    shared = paper_claims(final, untrained, trials).set_index("key")
    assert shared.loc["linear_gap", "untrained"] == "0.5 ± 0"  # one encoder per seed, counted once
    trials.loc[trials.lam == 0, "model.pos_embed"] = "learned"  # MoCo v3's fixed embedding at lam = 1 only
    own = paper_claims(final, untrained, trials).set_index("key")
    assert own.loc["linear_gap", "untrained"] == "MIM 0.5 ± 0 / CL 0.5 ± 0"
