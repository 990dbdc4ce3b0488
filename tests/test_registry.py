"""The objective registry (``trainables/objectives/registry.py``): what the package derives from it, and a fifth
objective declared outside the package (``toy_objective.py``) that trains, sweeps, and reaches every table and the
report without an edit to any module of the package."""

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from orchestrator.query import query
from trainables import vocab
from trainables.config import ConfigError, load_config, to_dict, train_flops_per_image
from trainables.objectives import registry
from trainables.objectives.registry import RegistryError

TESTS = Path(__file__).parent


@pytest.fixture
def toy():
    """The toy objective registered in this process for one test (and unregistered after)."""
    module = importlib.import_module("toy_objective")
    registry.register(module.TOY)
    yield module.TOY
    registry.unregister("toy")


def test_the_four_built_in_objectives_in_table_order_with_one_name_each():
    assert vocab.objective_names()[:4] == ("simmim", "mocov3", "mae", "dino")
    assert vocab.loss_keys()["simmim"] == "loss_simmim" and vocab.layer_keys()["mocov3"] == "mocov3_layer"
    assert vocab.target_encoders() == {"momentum": "mocov3", "teacher": "dino"}
    cfg = to_dict(load_config({}))
    assert {"simmim", "mocov3", "mae", "dino"} <= set(cfg["objective"])
    assert set(cfg["objective"]["placement"]) >= {"simmim_layer", "mocov3_layer", "mae_layer", "dino_layer"}


def test_registering_checks_the_declaration(toy):
    with pytest.raises(RegistryError, match="already registered"):
        registry.register(registry.Objective(**{**toy.__dict__, "label": "Other"}))
    with pytest.raises(RegistryError, match="family"):
        registry.register(registry.Objective(**{**toy.__dict__, "name": "toy2", "family": "rl"}))
    with pytest.raises(RegistryError, match="lower-case"):
        registry.register(registry.Objective(**{**toy.__dict__, "name": "Toy"}))


def test_a_registered_objective_gets_its_config_section_weights_placement_and_vocabulary(toy):
    cfg = load_config({}, ["objective.weights={toy: 0.5, simmim: 0.5}", "objective.toy.scale=2",
                           "objective.placement.toy_layer=6"])
    assert cfg.objective.mix() == {"simmim": 0.5, "toy": 0.5} and cfg.objective.toy.scale == 2.0
    assert "loss_toy" in vocab.step_metrics() and "toy" in vocab.objective_names()
    assert vocab.objective_label({"toy": 1.0}) == "Toy" and vocab.objective_group({"toy": 1.0}) == "toy"
    alone = load_config({}, ["objective.weights={toy: 1.0}"])
    assert alone.optim.blr == 1e-4  # its recipe
    assert train_flops_per_image(alone) > 0
    with pytest.raises(ConfigError, match=r"^objective\.toy\.scale: 0 would train nothing"):
        load_config({}, ["objective.weights={toy: 1.0}", "objective.toy.scale=0"])
    with pytest.raises(ConfigError, match=r"^objective\.toy\.scal: unknown key"):
        load_config({}, ["objective.toy.scal=1"])


def test_an_unregistered_objective_leaves_no_trace():
    assert "toy" not in vocab.objective_names() and "loss_toy" not in vocab.step_metrics()
    with pytest.raises(ConfigError, match=r"^objective\.weights\.toy: unknown key"):
        load_config({}, ["objective.weights={toy: 1.0}"])


@pytest.mark.integration
def test_the_toy_objective_trains_with_its_schedule_and_its_loss(toy, tmp_path):
    from trainables.trainer import schedules, train

    cfg = load_config({}, ["objective.weights={toy: 0.5, simmim: 0.5}", "model.variant=nano/4", "optim.steps=3",
                           "data.train_size=64", "data.eval_size=32", "data.batch_size=16", "eval.samples=32",
                           "eval.val_samples=16", "eval.probe_images=8", "eval.dense_images=0", "eval.cka=false",
                           "eval.noise.bands=0", "run.log_every=1", f"run.out_dir={tmp_path}"])
    assert list(schedules(cfg, 4)["toy_rise"]) == [0.5, 1.0, 1.0, 1.0]
    final = train(cfg)
    assert final["loss_toy"] > 0 and final["loss"] == pytest.approx(0.5 * final["loss_toy"]
                                                                     + 0.5 * final["loss_simmim"], rel=1e-5)


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.extended
def test_a_toy_objective_from_outside_the_package_sweeps_into_every_table_and_the_report(ray_address, tmp_path):
    env = {**os.environ, "CLMIM_OBJECTIVES": "toy_objective",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))}
    space = tmp_path / "toy.yaml"
    space.write_text(yaml.safe_dump({
        "name": "toy", "search": {"metric": "loss_toy", "mode": "min"},
        "base": {"model": {"variant": "nano/4"}, "data": {"train_size": 64, "eval_size": 32, "batch_size": 16},
                 "eval": {"samples": 32, "val_samples": 16, "probe_images": 8, "dense_images": 0, "cka": False,
                          "noise": {"bands": 0}, "attentive_steps": 0, "lowshot": False, "grad_cosine": False},
                 "optim": {"steps": 4}, "run": {"log_every": 2}},
        "space": {"objective.weights": {"grid": [{"toy": 1.0}, {"toy": 0.5, "simmim": 0.5}]}},
        "resources": {"workers": 1, "cpus_per_worker": 1}}))
    results = tmp_path / "res"
    cli = [sys.executable, "-m", "orchestrator.cli"]
    r = subprocess.run([*cli, "sweep", str(space), "--results", str(results), "--address", ray_address],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    trials = query("SELECT * FROM trials ORDER BY w_toy DESC", results)
    assert list(trials.status) == ["TERMINATED"] * 2
    assert list(trials.objective) == ["toy", "mix"] and list(trials["mix"]) == ["Toy", "mix 0.5 SimMIM + 0.5 Toy"]
    assert list(trials.w_toy) == [1.0, 0.5] and trials.loss_toy.notna().all()
    assert list(trials["objective.toy.scale"]) == [1.0, 1.0]
    curves = query("SELECT DISTINCT metric FROM curves", results).metric.tolist()
    assert "loss_toy" in curves
    assert query("SELECT count(*) AS n FROM layers", results).n[0] > 0
    out = tmp_path / "report.html"
    r = subprocess.run([*cli, "report", "toy", "--results", str(results), "--out", str(out)], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    html = out.read_text()
    assert "<td>Toy</td>" in html and "<td>mix 0.5 SimMIM + 0.5 Toy</td>" in html  # its group in the report's tables
