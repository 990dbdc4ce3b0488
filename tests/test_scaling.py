import numpy as np
import pandas as pd
import pytest

from orchestrator.cli import main
from orchestrator.query import sweep_frames
from orchestrator.results import write_trial_tables
from orchestrator.scaling import bootstrap_exponent, exponent_interval, fit_power_law, scaling_table
from trainables.config import load_config, to_dict
from trainables.errors import UserError


def done(root, name):
    return sweep_frames(root, [name]).done


VARIANTS = {"nano/4": 0, "micro/4": 1, "mini/4": 2, "Ti/4": 3, "S/4": 4}


def test_fit_recovers_known_exponent_within_interval():
    rng = np.random.default_rng(0)
    x = np.repeat(np.logspace(5, 8, 8), 4)  # 32 trials: 8 sizes x 4 seeds
    y = 3.0 * x ** -0.25 * np.exp(rng.normal(0, 0.03, len(x)))
    a, b, _ = fit_power_law(x, y)
    lo, hi = bootstrap_exponent(x, y, n_boot=400)
    assert lo < -0.25 < hi and hi - lo < 0.1 and abs(b + 0.25) < 0.03
    yc = 2.0 * x ** -0.4 + 0.1
    _, bc, c = fit_power_law(x, yc, offset=True)
    assert abs(bc + 0.4) < 0.01 and abs(c - 0.1) < 0.01


def test_exponent_interval_covers_at_its_level():
    # A scaling sweep's usual shape: 3 model sizes x 2 trials, multiplicative log-normal noise. Over 400
    # simulated sweeps the 95% interval must hold the true exponent 92-98% of the time (the percentile bootstrap
    # over trials held it 90%).
    x = np.repeat(np.logspace(5, 8, 3), 2)
    hits = 0
    for seed in range(400):
        y = 3.0 * x**-0.25 * np.exp(np.random.default_rng(seed).normal(0, 0.05, len(x)))
        lo, hi, method = exponent_interval(x, y)
        hits += lo < -0.25 < hi
    assert method.startswith("t") and 0.92 <= hits / 400 <= 0.98, hits / 400
    assert exponent_interval(x, 2.0 * x**-0.4 + 0.1, offset=True, n_boot=50)[2] == "percentile bootstrap"


def make_sweep(root, exponents=(("0.0", -0.3), ("1.0", -0.1))):
    rng = np.random.default_rng(1)
    for lam, b in ((float(k), v) for k, v in exponents):
        for v in VARIANTS:
            for seed in range(2):
                cfg = to_dict(load_config({}, [f"objective.lam={lam}", f"model.variant={v}", f"run.seed={seed}"]))
                params = [7e4, 6.8e5, 2e6, 5.5e6, 2.2e7][VARIANTS[v]]
                err = 2.0 * params ** b * np.exp(rng.normal(0, 0.02))
                write_trial_tables(root / "sc", f"{v.replace('/', '_')}-{lam}-{seed}", "TERMINATED", cfg,
                                   [{"step": 10, "params": params, "linear_top1": 1 - err, "done": True}])


def test_scaling_table_recovers_group_exponents(tmp_path):
    make_sweep(tmp_path)
    table, what = scaling_table(done(tmp_path, "sc"), n_boot=300)
    assert what.startswith("error = 1 - linear_top1")
    by = table.set_index("lam")
    for lam, b in {0.0: -0.3, 1.0: -0.1}.items():
        assert by.loc[lam, "b_low"] < b < by.loc[lam, "b_high"]
    assert not list((tmp_path / "sc").glob("scaling_*"))  # fitting writes nothing (a report reads it)
    assert main(["scaling", "sc", "--results", str(tmp_path)]) == 0  # the command saves what it printed
    saved = pd.read_parquet(tmp_path / "sc" / "scaling_params_linear_top1.parquet")
    assert np.allclose(saved.b, table.b, rtol=1e-9)


def test_scaling_groups_by_every_other_varied_axis_and_fits_error_above_chance(tmp_path):
    """Trials of two training lengths are two groups (pooled, the length's effect reads as noise and biases the
    exponent); trials at chance accuracy carry no size signal and are left out, and counted."""
    rng = np.random.default_rng(2)
    params = {"nano/4": 7e4, "micro/4": 6.8e5, "mini/4": 2e6, "Ti/4": 5.5e6, "S/4": 2.2e7}
    for steps, scale in ((100, 1.0), (400, 0.5)):  # longer training: half the error at every size
        for v, n in params.items():
            for seed in range(2):
                cfg = to_dict(load_config({}, ["objective.lam=0", f"model.variant={v}", f"run.seed={seed}",
                                               f"optim.steps={steps}", "data.dataset=digits"]))
                err = scale * 0.8 * (n / 7e4) ** -0.2 * np.exp(rng.normal(0, 0.01))
                acc = 1 - err if not (v == "nano/4" and steps == 100) else 0.1  # the smallest short run: chance
                write_trial_tables(tmp_path / "g", f"{v.replace('/', '_')}-{steps}-{seed}", "TERMINATED", cfg,
                                   [{"step": steps, "params": n, "linear_top1": acc, "done": True}])
    table, what = scaling_table(done(tmp_path, "g"), n_boot=100)
    assert "above chance (0.1)" in what
    assert list(table["optim.steps"]) == [100, 400] and len(table) == 2
    for _, row in table.iterrows():
        assert row.b_low < -0.2 < row.b_high and abs(row.b + 0.2) < 0.02, row
        assert row.group == f"SimMIM, optim.steps={row['optim.steps']}"
    assert table.set_index("optim.steps").at_chance.fillna(0).to_dict() == {100: 2, 400: 0}


def test_too_few_points_said_plainly(tmp_path):
    cfg = to_dict(load_config({}, ["objective.lam=0"]))
    write_trial_tables(tmp_path / "few", "t", "TERMINATED", cfg, [{"step": 1, "params": 10, "linear_top1": 0.5}])
    table, _ = scaling_table(done(tmp_path, "few"))
    assert "too few points" in table.note[0]


@pytest.mark.integration
def test_bad_input_one_line_exit_2(tmp_path, capsys):
    make_sweep(tmp_path)
    cfg = to_dict(load_config({}))
    write_trial_tables(tmp_path / "failed", "t", "ERROR", cfg, [{"step": 1}], error="x")
    assert main(["scaling", "nope", "--results", str(tmp_path)]) == 2
    assert main(["scaling", "sc", "--y", "accuracy", "--results", str(tmp_path)]) == 2
    assert main(["scaling", "failed", "--results", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and "not found" in err[0] and "--y" in err[1] and "no finished trials" in err[2]
    assert main(["scaling", "sc", "--results", str(tmp_path)]) == 0
    with pytest.raises(UserError):
        scaling_table(done(tmp_path, "sc"), x="time")


def test_report_bad_input_exit_2(tmp_path, capsys):
    cfg = to_dict(load_config({}))
    write_trial_tables(tmp_path / "failed", "t", "ERROR", cfg, [{"step": 1}], error="x")
    assert main(["report", "nope", "--results", str(tmp_path)]) == 2
    assert main(["report", "failed", "--results", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "not found" in err[0] and "no finished trials" in err[1]


@pytest.mark.integration
def test_report_of_a_scaling_sweep_has_fits_and_pngs(tmp_path):
    from orchestrator.layout import SweepLayout
    from orchestrator.report import build_report

    make_sweep(tmp_path)
    page, files = build_report(SweepLayout(tmp_path, "sc"))
    text = page.read_text()
    pngs = {p.name for p in page.parent.glob("*.png")}
    assert "Power-law fits" in text and text.count("data:image/png;base64,") == len(pngs)
    assert {"lam.png", "scaling.png"} <= pngs and set(files) == {page, *(page.parent / p for p in pngs)}


def test_scaling_fits_against_data_set_size(tmp_path):
    """A space that sweeps data.fraction: x is the training split's size each trial reported (train_images)."""
    rng = np.random.default_rng(2)
    for lam, b in ((0.0, -0.2), (1.0, -0.4)):
        for frac in (0.125, 0.25, 0.5, 1.0):
            for seed in range(2):
                cfg = to_dict(load_config({}, [f"objective.lam={lam}", f"data.fraction={frac}", f"run.seed={seed}"]))
                n = int(8000 * frac)
                err = 3.0 * n ** b * np.exp(rng.normal(0, 0.02))
                write_trial_tables(tmp_path / "data", f"{lam}-{frac}-{seed}", "TERMINATED", cfg,
                                   [{"step": 10, "params": 1e6, "train_images": n, "linear_top1": 1 - err,
                                     "done": True}])
    table, _ = scaling_table(done(tmp_path, "data"), x="data")
    by = dict(zip(table.group, table.b, strict=True))
    assert len(by) == 2, table  # data.fraction is x, not a grouping axis
    got = sorted(by.values())
    assert abs(got[0] + 0.4) < 0.05 and abs(got[1] + 0.2) < 0.05, table


def test_scaling_fits_one_group_per_objective_mix(tmp_path):
    rng = np.random.default_rng(2)
    exponents = {"objective.weights.mae=1": -0.35, "objective.weights.dino=1": -0.15,
                 "objective.weights={simmim: 0.5, dino: 0.5}": -0.25}
    for i, (mix, b) in enumerate(exponents.items()):
        for v in VARIANTS:
            for seed in range(2):
                cfg = to_dict(load_config({}, [mix, f"model.variant={v}", f"run.seed={seed}"]))
                params = [7e4, 6.8e5, 2e6, 5.5e6, 2.2e7][VARIANTS[v]]
                err = 2.0 * params ** b * np.exp(rng.normal(0, 0.02))
                write_trial_tables(tmp_path / "mx", f"{v.replace('/', '_')}-{i}-{seed}", "TERMINATED", cfg,
                                   [{"step": 10, "params": params, "linear_top1": 1 - err, "done": True}])
    table, _ = scaling_table(done(tmp_path, "mx"), n_boot=200)
    by = table.set_index("group")
    assert set(by.index) == {"MAE", "DINO", "mix 0.5 SimMIM + 0.5 DINO"}  # weights are the group, not axes
    for group, b in (("MAE", -0.35), ("DINO", -0.15), ("mix 0.5 SimMIM + 0.5 DINO", -0.25)):
        assert by.loc[group, "b_low"] < b < by.loc[group, "b_high"]
