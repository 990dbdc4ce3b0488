import re

import pytest
import yaml

from orchestrator.cli import main
from trainables.config import ConfigError, load_config, parse_override, resolve_placement, to_dict


def err(tree=None, overrides=None) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(tree or {}, overrides)
    return str(e.value)


def test_empty_config_is_the_small_cpu_run():
    cfg = load_config({})
    assert cfg.model.variant == "micro/4" and cfg.data.dataset == "synthetic"
    assert resolve_placement(cfg) == ({"simmim": 6, "mocov3": 6}, None)
    assert cfg.objective.lam == 0.5 and cfg.objective.mix() == {"simmim": 0.5, "mocov3": 0.5}


def test_unknown_key_names_dotted_path_and_allowed_keys():
    msg = err({"objective": {"placement": {"mim_layr": 2}}})
    assert msg.startswith("objective.placement.mim_layr: unknown key")
    assert "simmim_layer" in msg
    assert err({"modle": {}}).startswith("modle: unknown key")


def test_wrong_type_and_range_name_the_path():
    assert err({"optim": {"steps": "ten"}}).startswith("optim.steps: expected")
    msg = err(overrides=["objective.lam=1.5"])
    assert msg.startswith("objective.lam:") and "[0.0, 1.0]" in msg
    assert err(overrides=["data.dataset=imagenet"]).startswith("data.dataset:")
    assert "synthetic" in err(overrides=["data.dataset=imagenet"])
    assert err(overrides=["run.compile=3"]).startswith("run.compile: expected bool")


def test_variant_and_patch_checks():
    assert "choose one of" in err(overrides=["model.variant=XL/16"])
    msg = err(overrides=["model.variant=S/16", "model.img_size=100"])
    assert msg.startswith("model.img_size:") and "16" in msg


def test_layer_beyond_depth_and_placement_rules():
    assert err(overrides=["objective.placement.simmim_layer=7"]).startswith("objective.placement.simmim_layer")
    assert err(overrides=["objective.placement.graft_layer=6"]).startswith("objective.placement.graft_layer")
    assert err(overrides=["objective.lam=1", "objective.placement.graft_layer=3"]).startswith(
        "objective.placement.graft_layer")
    assert err(overrides=["objective.placement.graft_layer=3", "objective.placement.simmim_layer=4"]).startswith(
        "objective.placement.simmim_layer")
    assert err(overrides=["objective.placement.graft_layer=3", "objective.placement.mocov3_layer=3"]).startswith(
        "objective.placement.mocov3_layer")
    cfg = load_config({}, ["objective.placement.graft_layer=3"])
    assert resolve_placement(cfg) == ({"simmim": 3, "mocov3": 6}, 3)


def test_a_placement_that_leaves_a_block_untrained_is_an_error_naming_the_keys():
    msg = err(overrides=["objective.lam=0", "objective.placement.simmim_layer=3"])
    assert msg.startswith("objective.placement.simmim_layer = 3") and "blocks 4..6 would get no gradient" in msg
    msg = err(overrides=["objective.placement.simmim_layer=2", "objective.placement.mocov3_layer=4"])
    assert "objective.placement.simmim_layer = 2 and objective.placement.mocov3_layer = 4" in msg and "5..6" in msg
    msg = err(overrides=["objective.placement.graft_layer=3", "objective.placement.simmim_layer=2"])
    assert "graft_layer = 3" in msg and "block 3 would get no gradient" in msg and "graft_lr_ratio" in msg
    assert err(overrides=["objective.placement.graft_lr_ratio=0.1"]).startswith(
        "objective.placement.graft_lr_ratio")
    # valid: each block reached by some objective
    load_config({}, ["objective.placement.simmim_layer=2"])  # CL reads block 6 and trains 1..6
    load_config({}, ["objective.placement.graft_layer=3", "objective.placement.simmim_layer=2",
                     "objective.placement.graft_lr_ratio=0.1"])  # CL reaches 1..3 too


def test_optimiser_defaults_follow_each_objectives_recipe():
    mim, cl = load_config({}, ["objective.lam=0"]), load_config({}, ["objective.lam=1"])
    assert (mim.optim.blr, mim.optim.weight_decay, mim.optim.clip_grad, mim.model.drop_path) == (5e-5, 0.05, 5.0, 0.1)
    assert (cl.optim.blr, cl.optim.weight_decay, cl.optim.clip_grad, cl.model.drop_path) == (1.5e-4, 0.1, 0.0, 0.0)
    assert (mim.model.pos_embed, cl.model.pos_embed, cl.model.patch_embed) == ("learned", "sincos", "frozen")
    half = load_config({}, ["objective.lam=0.5"])
    assert half.optim.blr == pytest.approx((5e-5 * 1.5e-4) ** 0.5, rel=1e-3)  # geometric mean
    assert half.optim.weight_decay == pytest.approx(0.075) and half.optim.clip_grad == 5.0
    # what the user sets is kept, and the resolved values are what gets saved
    mine = load_config({}, ["objective.lam=1", "optim.blr=1e-3", "optim.weight_decay=0.01"])
    assert (mine.optim.blr, mine.optim.weight_decay) == (1e-3, 0.01)
    assert to_dict(cl)["optim"]["blr"] == 1.5e-4 and to_dict(cl)["model"]["pos_embed"] == "sincos"
    assert load_config(to_dict(cl)) == cl  # the saved config reloads to the same run


def test_steps_and_epochs_exclusive_and_missing_paths():
    assert err(overrides=["optim.steps=3", "optim.epochs=1"]).startswith("optim.steps")
    assert err(overrides=["data.dataset=cifar10"]).startswith("data.path: required")
    assert err(overrides=["data.dataset=cifar10", "data.path=/nonexistent/x"]).startswith("data.path:")


def test_overrides_parse_yaml_values():
    assert parse_override("objective.lam=0.25") == ("objective.lam", 0.25)
    assert parse_override("run.out_dir=null") == ("run.out_dir", None)
    cfg = load_config({"objective": {"lam": 0.2}}, ["objective.lam=0.8", "optim.blr=1e-4"])
    assert cfg.objective.lam == 0.8 and cfg.optim.blr == 1e-4


def test_yaml_file_roundtrip(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump({"model": {"variant": "Ti/16", "img_size": 64}}))
    cfg = load_config(p)
    again = load_config(to_dict(cfg))
    assert to_dict(again) == to_dict(cfg)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_overrides_leave_the_source_mapping_unchanged():
    source = {"optim": {"steps": 4}, "run": {"seed": 1}}
    load_config(source, ["run.resume=auto", "optim.steps=8"])
    assert source == {"optim": {"steps": 4}, "run": {"seed": 1}}


def test_weights_mix_any_set_on_the_simplex_and_lam_is_their_shorthand():
    from trainables.config import recipe

    cfg = load_config({}, ["objective.weights={mae: 0.5, dino: 0.25, simmim: 0.25}"])
    assert cfg.objective.mix() == {"simmim": 0.25, "mae": 0.5, "dino": 0.25} and cfg.objective.lam is None
    assert cfg.objective.weights.mocov3 == 0.0  # resolved: every objective, 0 where unset
    assert load_config(to_dict(cfg)).objective == cfg.objective  # the saved config loads back as it ran
    lam = load_config({}, ["objective.lam=0.25"])
    assert lam.objective.mix() == {"simmim": 0.75, "mocov3": 0.25}
    assert load_config({}, ["objective.weights={simmim: 0.75, mocov3: 0.25}"]).objective == lam.objective
    assert load_config(to_dict(lam)).objective == lam.objective  # lam and weights saved together agree
    msg = err(overrides=["objective.weights={simmim: 0.5, mae: 0.4}"])
    assert msg.startswith("objective.weights:") and "sum to 0.9" in msg and "simplex" in msg
    assert err(overrides=["objective.weights={simmim: -0.5, mae: 1.5}"]).startswith("objective.weights.simmim:")
    msg = err(overrides=["objective.weights={simclr: 1}"])
    assert msg.startswith("objective.weights.simclr: unknown key") and "dino, mae, mocov3, simmim" in msg
    msg = err(overrides=["objective.lam=0.5", "objective.weights={mae: 1}"])
    assert msg.startswith("objective.lam:") and "disagrees" in msg
    # each objective's own recipe; a mix interpolates (blr geometrically) and clips at its smallest clipping
    assert recipe({"simmim": 1.0}) == recipe(0.0) and recipe({"mocov3": 1.0}) == recipe(1.0)
    r = recipe({"mae": 0.5, "dino": 0.5})
    assert r["blr"] == pytest.approx((1.5e-4 * 5e-4) ** 0.5, rel=1e-3) and r["clip_grad"] == 3.0
    dino = load_config({}, ["objective.weights.dino=1"])
    assert (dino.optim.weight_decay, dino.optim.weight_decay_end, dino.optim.clip_grad) == (0.04, 0.4, 3.0)
    assert load_config({}, ["objective.weights.dino=1", "optim.weight_decay=0.1"]).optim.weight_decay_end is None
    mae = load_config({}, ["objective.weights.mae=1"])
    assert (mae.model.pos_embed, mae.model.patch_embed, mae.model.drop_path) == ("sincos", "trained", 0.0)


def test_placement_per_objective_and_the_graft_over_families():
    cfg = load_config({}, ["objective.weights={mae: 0.5, dino: 0.5}", "objective.placement.mae_layer=4"])
    assert resolve_placement(cfg) == ({"mae": 4, "dino": 6}, None)
    msg = err(overrides=["objective.weights={mae: 0.5, dino: 0.5}", "objective.placement.simmim_layer=4"])
    assert msg.startswith("objective.placement.simmim_layer: set, but SimMIM is not in the mix")
    msg = err(overrides=["objective.weights.mae=1", "objective.placement.mae_layer=4"])
    assert msg.startswith("objective.placement.mae_layer = 4") and "blocks 5..6 would get no gradient" in msg
    cfg = load_config({}, ["objective.weights={mae: 0.5, dino: 0.5}", "objective.placement.graft_layer=3"])
    assert resolve_placement(cfg) == ({"mae": 3, "dino": 6}, 3)  # MIM reads the graft, CL the last block
    msg = err(overrides=["objective.weights={mae: 0.5, simmim: 0.5}", "objective.placement.graft_layer=3"])
    assert msg.startswith("objective.placement.graft_layer: needs a MIM objective") and "MAE" in msg
    msg = err(overrides=["objective.weights={mae: 0.5, dino: 0.5}", "objective.placement.graft_layer=3",
                         "objective.placement.dino_layer=3"])
    assert msg.startswith("objective.placement.dino_layer: 3 is at or below graft_layer 3")
    assert err(overrides=["objective.weights.mae=1", "objective.mae.mask_ratio=0.99"]).startswith(
        "objective.mae.mask_ratio:")
    assert err(overrides=["objective.weights.mae=1", "objective.mae.decoder_heads=5"]).startswith(
        "objective.mae.decoder_heads:")
    assert err(overrides=["objective.weights.dino=1", "objective.dino.local_size=10"]).startswith(
        "objective.dino.local_size:")


def test_adamw_beta2_follows_each_objectives_recipe_and_a_mix_interpolates():
    """MAE's official AdamW uses betas (0.9, 0.95); SimMIM, MoCo v3 and DINO PyTorch's 0.999 (clmim used 0.999
    for every objective)."""
    beta2 = {w: load_config({}, [f"objective.weights={w}"]).optim.beta2
             for w in ("{mae: 1}", "{dino: 1}", "{simmim: 1}", "{mocov3: 1}", "{mae: 0.5, dino: 0.5}")}
    assert list(beta2.values()) == [0.95, 0.999, 0.999, 0.999, 0.9745]
    assert load_config({}, ["objective.lam=0.5"]).optim.beta2 == 0.999
    assert load_config({}, ["objective.weights={mae: 1}", "optim.beta2=0.99"]).optim.beta2 == 0.99  # set: kept


def test_a_graft_lr_ratio_of_0_is_an_error_naming_the_key():
    with pytest.raises(ConfigError, match=r"objective.placement.graft_lr_ratio: 0 leaves the embedding"):
        load_config({}, ["objective.lam=0.5", "objective.placement.graft_layer=2",
                         "objective.placement.graft_lr_ratio=0"])


def test_yaml_errors_give_line_numbers(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nspace:\n  objective.lam: {grid: [0, 1]\nbase: {}\n")
    assert main(["sweep", str(bad), "--dry-run"]) == 2
    assert re.search(r"line \d+, column \d+", capsys.readouterr().err)
    assert main(["train", str(bad)]) == 2
    assert re.search(r"line \d+, column \d+", capsys.readouterr().err)


def test_set_typo_is_reported_as_the_key_the_user_typed(capsys):
    assert main(["sweep", "search_spaces/quickstart.yaml", "--set", "objective.lamm=0.3", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "error: --set objective.lamm:" in err and "space.objective.lam:" not in err
