"""Fair-comparison tables: matched steps / FLOPs and the paper-claims verdicts, on hand-made results."""

import numpy as np
import pandas as pd
import pytest

from orchestrator.compare import LITERATURE_CLAIMS, at_matched, matched_table, mean_se, paper_claims


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
    assert claims.loc["attn_distance", "CL"].startswith("20.1 ± ")


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
    assert table.loc["SimMIM", "best optim.lr_scale"] == 30
    assert table.loc["MoCo v3", "best optim.lr_scale"] == 10
    assert table.loc["MoCo v3", "linear_top1"].startswith("0.605 ± ")
    assert table.loc["MoCo v3", "selected on"].startswith("linear_top1 (evaluation split: these trials have no")
    assert tuned_table(pd.DataFrame(rows).assign(**{"optim.lr_scale": 1})).empty


def test_the_best_lr_is_chosen_on_the_validation_split_and_reported_on_the_evaluation_split():
    """The evaluation split favours lr 10 by chance, the validation split lr 30: the choice follows the validation
    split, and the accuracy shown for it is the evaluation split's (not the winner's own selection score)."""
    from orchestrator.compare import tuned_table

    rows = []
    for lr in (10, 30):
        for seed in range(2):
            rows.append({"trial": f"{lr}-{seed}", "lam": 0.0, "objective.lam": 0.0, "optim.lr_scale": lr,
                         "run.seed": seed, "linear_top1": 0.7 if lr == 10 else 0.6,
                         "val_linear_top1": 0.5 if lr == 10 else 0.55})
    row = tuned_table(pd.DataFrame(rows)).iloc[0]
    assert row["best optim.lr_scale"] == 30 and row["linear_top1"].startswith("0.6")
    assert row["selected on"] == "val_linear_top1 (validation split)"


def test_claims_show_trained_minus_untrained_paired_per_trial():
    trials = trials_frame()
    final = layers_frame(trials, steps=(100,))
    untrained = final.assign(step=0, value=final.value - 0.25)  # every trial moved by exactly 0.25
    claims = paper_claims(final, untrained, trials).set_index("key")
    assert claims.loc["linear_gap", "MIM − untrained"] == "0.25 [0.25, 0.25]"  # 95 % interval, per seed
    assert claims.loc["linear_gap", "CL − untrained"] == "0.25 [0.25, 0.25]"


def test_untrained_column_is_shared_only_when_both_groups_share_the_architecture():
    trials = trials_frame().assign(**{"model.pos_embed": "sincos"})
    final = layers_frame(trials, steps=(100,))
    untrained = final.assign(step=0, value=0.5)
    shared = paper_claims(final, untrained, trials).set_index("key")
    assert shared.loc["linear_gap", "untrained"] == "0.5 ± 0"  # one encoder per seed, counted once
    trials.loc[trials.lam == 0, "model.pos_embed"] = "learned"  # MoCo v3's fixed embedding at lam = 1 only
    own = paper_claims(final, untrained, trials).set_index("key")
    assert own.loc["linear_gap", "untrained"] == "MIM 0.5 ± 0 / CL 0.5 ± 0"


# ------------------------------------------------------------------------------------------- the protocol
def two_variant_sweep(effect=0.05, seeds=3):
    """CL beats MIM by ``effect`` inside each of two variants, whose levels differ by far more (0.3)."""
    rng = np.random.default_rng(0)
    trials, rows = [], []
    for variant, level in (("nano/4", 0.2), ("micro/4", 0.5)):
        for lam in (0.0, 1.0):
            for seed in range(seeds):
                t = f"{variant}-{lam:g}-{seed}"
                trials.append({"trial": t, "lam": lam, "objective.lam": lam, "run.seed": seed,
                               "model.variant": variant})
                v = level + effect * lam + rng.normal(0, 0.002)
                for layer in range(3):
                    rows.append({"trial": t, "step": 100, "layer": layer, "head": None,
                                 "metric": "linear_top1_gap", "value": v - 0.01 * (2 - layer)})
    return pd.DataFrame(trials), pd.DataFrame(rows)


def test_claims_compare_inside_each_group_of_the_other_axes_and_count_seeds():
    """Pooled over the variants the 0.05 drowned in the variants' 0.3 spread ("unclear", n = 6 trials); inside
    each variant it holds with n = 3 seeds, one table per variant."""
    trials, final = two_variant_sweep()
    claims = paper_claims(final, final.assign(step=0, value=0.1), trials)
    gap = claims[claims.key == "linear_gap"].set_index("group")
    assert list(gap.index) == ["model.variant=micro/4", "model.variant=nano/4"]
    assert (gap.verdict == "holds").all() and gap["CL"].str.endswith("(n=3)").all()
    assert all(abs(float(d.split()[0]) - 0.05) < 0.004 for d in gap["difference [95% CI]"]), gap


def test_a_claim_that_holds_only_because_mim_moved_says_so():
    trials = trials_frame()
    final = layers_frame(trials, steps=(100,))
    # CL's last layer is exactly its untrained value (it did not move); MIM's fell 0.1 below its own
    base = final.assign(step=0, value=np.where(final.lam == 1, final.value, final.value + 0.1))
    claims = paper_claims(final, base, trials).set_index("key")
    assert claims.loc["linear_gap", "verdict"].startswith("holds, but only MIM moved")


def test_holm_matches_the_textbook_step_down():
    from orchestrator.compare import holm

    # R: p.adjust(c(0.01, 0.04, 0.03, 0.005, NA), "holm") -> 0.03 0.06 0.06 0.02 NA
    got = holm([0.01, 0.04, 0.03, 0.005, float("nan")])
    assert got[:4] == pytest.approx([0.03, 0.06, 0.06, 0.02]) and np.isnan(got[4])
    assert holm([0.9, 0.8]) == [1.0, 1.0] and holm([]) == []


def _family_holds(rng, n_seeds: int, n_claims: int = 6) -> bool:
    """One null sweep: no claim has an effect; True if any claim of the table "holds" after Holm."""
    from orchestrator.compare import Welch, _verdict, holm

    tests = [Welch.of(rng.normal(size=n_seeds), rng.normal(size=n_seeds)) for _ in range(n_claims)]
    return any(_verdict(t, p) == "holds" for t, p in zip(tests, holm([t.p for t in tests]), strict=True))


@pytest.mark.parametrize("n_seeds", [2, 3])
def test_null_sweeps_give_a_false_holds_in_at_most_5_percent_of_claims_tables(n_seeds):
    """Welch's t + Holm over a table's 6 claims: the family-wise rate of a false "holds" stays at or below 5 %
    (the 2-SE rule gave 44 % at 2 seeds and 30 % at 3)."""
    rng = np.random.default_rng(n_seeds)
    sims = 4000
    rate = sum(_family_holds(rng, n_seeds) for _ in range(sims)) / sims
    print(f"family-wise false 'holds' rate, {n_seeds} seeds, 6 claims: {rate:.4f} ({sims} null sweeps)")
    assert rate <= 0.05 + 2 * np.sqrt(0.05 * 0.95 / sims)


@pytest.mark.integration
@pytest.mark.parametrize("n_seeds", [2, 3])
def test_mim_peak_claim_is_unbiased_when_every_layer_is_equally_good(n_seeds):
    """Six earlier layers and the last of equal true accuracy: "MIM peaks before the last layer" holds at most at
    the nominal 5 % (best-of-layers minus last on the same numbers held in 47-48 % of such sweeps)."""
    from orchestrator.compare import Welch, _peak_per_seed, _verdict, holm

    rng = np.random.default_rng(10 + n_seeds)
    seed = pd.Series({f"t{s}": s for s in range(n_seeds)})
    sims, holds, biased = 1000, 0, 0
    for _ in range(sims):
        d = pd.DataFrame([{"trial": f"t{s}", "layer": layer, "value": 0.5 + rng.normal(0, 0.02)}
                          for s in range(n_seeds) for layer in range(8)])
        test = Welch.of(_peak_per_seed(d, seed))
        holds += _verdict(test, holm([test.p])[0]) == "holds"
        table = d.pivot(index="trial", columns="layer", values="value")
        old = table[list(range(1, 7))].max(axis=1) - table[7]  # the old statistic and its 2-SE rule
        biased += old.mean() > 2 * old.std(ddof=1) / np.sqrt(n_seeds)
    print(f"false 'holds' of MIM's peak, {n_seeds} seeds: {holds / sims:.4f} (the old statistic: {biased / sims:.3f})")
    assert holds / sims <= 0.05 + 2 * np.sqrt(0.05 * 0.95 / sims) and biased / sims > 0.3


# ------------------------------------------------------------------------------------------- pairs and layers
def four_objective_sweep(seeds=3, depth=6):
    """Pure runs of all four objectives (weights columns, no lam): each CL objective's last-layer linear probe
    0.1 above each MIM objective's; DINO's above MoCo v3's by 0.05, MAE's above SimMIM's by 0.02."""
    level = {"simmim": 0.30, "mae": 0.32, "mocov3": 0.40, "dino": 0.45}
    trials, rows = [], []
    rng = np.random.default_rng(1)
    for obj, v in level.items():
        for seed in range(seeds):
            t = f"{obj}-{seed}"
            trials.append({"trial": t, "run.seed": seed, "lam": 0.0 if obj == "simmim" else 1.0 if obj == "mocov3"
                           else None, **{f"objective.weights.{k}": float(k == obj) for k in level}})
            for layer in range(depth + 1):
                rows.append({"trial": t, "step": 100, "layer": layer, "head": None, "metric": "linear_top1_gap",
                             "value": v + rng.normal(0, 0.002)})
    return pd.DataFrame(trials), pd.DataFrame(rows)


def test_claims_cover_every_cl_mim_pair_the_sweep_ran_and_name_it():
    trials, final = four_objective_sweep()
    claims = paper_claims(final, final.assign(step=0, value=0.1), trials)
    gap = claims[claims.key == "linear_gap"].set_index("pair")
    assert sorted(gap.index) == ["DINO vs MAE", "DINO vs SimMIM", "MoCo v3 vs MAE", "MoCo v3 vs SimMIM"]
    assert (gap.verdict == "holds").all()
    diff = {p: float(gap.loc[p, "difference [95% CI]"].split()[0]) for p in gap.index}
    assert diff["DINO vs SimMIM"] == pytest.approx(0.15, abs=0.01) and diff["MoCo v3 vs MAE"] == pytest.approx(
        0.08, abs=0.01)
    assert gap.loc["DINO vs MAE", "CL"].endswith("(n=3)")
    # a sweep with only DINO and MAE has one table, for that pair
    only = trials[trials.trial.str.startswith(("dino", "mae"))]
    assert set(paper_claims(final, final.assign(step=0, value=0.1), only).pair) == {"DINO vs MAE"}


def test_late_layer_claims_read_the_last_third_of_the_blocks():
    from orchestrator.compare import late_layers

    assert late_layers(12) == [9, 10, 11, 12] and late_layers(6) == [5, 6] and late_layers(4) == [3, 4]
    trials = trials_frame()
    rows = []
    for _, t in trials.iterrows():  # depth 6: CL's distance above MIM's in block 5, equal in block 6
        for layer in range(1, 7):
            v = 10.0 + 0.1 * t["run.seed"] + (8.0 if t.lam == 1 and layer == 5 else 0.0)
            rows.append({"trial": t.trial, "step": 100, "layer": layer, "head": None, "metric": "attn_distance",
                         "value": v})
    final = pd.DataFrame(rows)
    claims = paper_claims(final, final.assign(step=0, value=10.0), trials).set_index("key")
    assert claims.loc["attn_distance", "verdict"] == "holds"  # the last block alone: no difference at all
    assert claims.loc["attn_distance", "CL"].startswith("14.1 ± ")  # (10.1 + 18.1) / 2


def test_collapse_claim_reads_cl_attention_entropy_against_its_untrained_encoder():
    trials = trials_frame()

    def entropy_rows(cl_value):
        rows = []
        for _, t in trials.iterrows():
            for layer in (1, 2):
                v = (cl_value if t.lam == 1 else 0.9) + 0.01 * t["run.seed"]
                rows.append({"trial": t.trial, "step": 100, "layer": layer, "head": None,
                             "metric": "attn_entropy", "value": v})
        return pd.DataFrame(rows)

    untrained = entropy_rows(0.98).assign(step=0, value=0.98)
    concentrated = paper_claims(entropy_rows(0.6), untrained, trials).set_index("key")
    assert concentrated.loc["attn_collapse", "verdict"] == "holds"
    assert concentrated.loc["attn_collapse", "CL − untrained"].startswith("-0.37")
    uniform = paper_claims(entropy_rows(0.98), untrained, trials).set_index("key")  # CL's attention stayed uniform
    assert uniform.loc["attn_collapse", "verdict"] == "unclear"


def test_literature_claims_are_a_family_of_their_own_and_a_pair_metric_is_read_as_a_difference():
    """The attentive claim reads (linear CLS - attentive) per trial: CL leads MIM by 0.20 in the linear probe and by
    0.05 in the attentive one, so the lead shrinks (holds). Adding the literature's family leaves the paper's
    table exactly as it was."""
    trials = trials_frame()
    rows = []
    for _, t in trials.iterrows():
        s, cl = t["run.seed"], t.lam == 1
        for metric, v in (("linear_top1_cls", 0.3 + (0.2 if cl else 0)), ("attentive_top1", 0.5 + (0.05 if cl else 0)),
                          ("linear_top1_gap", 0.4 + (0.1 if cl else 0))):
            rows.append({"trial": t.trial, "step": 100, "layer": 2, "head": None, "metric": metric,
                         "value": v + 0.003 * s * (1 + cl), "lam": t.lam})
    final = pd.DataFrame(rows)
    untrained = final.assign(step=0, value=0.1)
    before = paper_claims(final, untrained, trials)
    lit = paper_claims(final, untrained, trials, LITERATURE_CLAIMS).set_index("key")
    assert lit.loc["attentive", "verdict"].startswith("holds")
    assert lit.loc["attentive", "CL"].startswith("-0.05 ")  # 0.5 - 0.55 (the seed terms cancel)
    assert lit.loc["lowshot", "verdict"] == "not measured" and lit.loc["head_div", "verdict"] == "not measured"
    pd.testing.assert_frame_equal(paper_claims(final, untrained, trials), before)
    # the attentive lead reversed: opposite
    flipped = final.copy()
    att = flipped.metric == "attentive_top1"
    flipped.loc[att, "value"] += np.where(flipped[att].lam == 1, 0.5, 0.0)
    again = paper_claims(flipped, untrained, trials, LITERATURE_CLAIMS).set_index("key")
    assert again.loc["attentive", "verdict"] == "opposite"


def test_the_depth_conflict_claim_reads_the_slope_of_a_mixs_gradient_cosine_over_its_blocks():
    """A SimMIM + MoCo v3 mix (3 seeds) beside the pure runs: its per-block gradient cosine falling with depth holds
    (the slope, per block, is the difference), rising is opposite; the untrained column is the slope at step 0;
    without a mix the claim is not measured."""
    pure = trials_frame()
    mix = pd.DataFrame([{"trial": f"mix_{s}", "lam": 0.5, "objective.lam": 0.5, "run.seed": s,
                         "train_flops_per_image": 2e8, "data.batch_size": 10, "optim.steps": 100} for s in range(3)])
    trials = pd.concat([pure, mix], ignore_index=True)

    def cosines(slope: float, step: int) -> pd.DataFrame:
        return pd.DataFrame([{"trial": f"mix_{s}", "step": step, "layer": b, "head": None, "metric": "grad_cosine",
                              "value": 0.3 + slope * b + 0.01 * s * (b % 2), "lam": 0.5}
                             for s in range(3) for b in range(1, 7)])

    base = cosines(0.0, 0)
    falling = paper_claims(cosines(-0.05, 100), base, trials, LITERATURE_CLAIMS).set_index("key")
    row = falling.loc["conflict_depth"]
    assert row.verdict == "holds" and row["difference [95% CI]"].startswith("0.05")
    assert abs(float(row.untrained.split(" ± ")[0])) < 0.005  # flat at initialisation
    rising = paper_claims(cosines(+0.05, 100), base, trials, LITERATURE_CLAIMS).set_index("key")
    assert rising.loc["conflict_depth", "verdict"] == "opposite"
    none = paper_claims(cosines(-0.05, 100), base, pure, LITERATURE_CLAIMS).set_index("key")
    assert none.loc["conflict_depth", "verdict"] == "not measured"
