import pytest
import yaml

from trainables.config import ConfigError, load_config, parse_override, resolve_placement, to_dict


def err(tree=None, overrides=None) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(tree or {}, overrides)
    return str(e.value)


def test_empty_config_is_the_small_cpu_run():
    cfg = load_config({})
    assert cfg.model.variant == "micro/4" and cfg.data.dataset == "synthetic"
    assert resolve_placement(cfg) == (6, 6, None)


def test_unknown_key_names_dotted_path_and_allowed_keys():
    msg = err({"objective": {"placement": {"mim_layr": 2}}})
    assert msg.startswith("objective.placement.mim_layr: unknown key")
    assert "mim_layer" in msg
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
    assert err(overrides=["objective.placement.mim_layer=7"]).startswith("objective.placement.mim_layer")
    assert err(overrides=["objective.placement.graft_layer=6"]).startswith("objective.placement.graft_layer")
    assert err(overrides=["objective.lam=1", "objective.placement.graft_layer=3"]).startswith(
        "objective.placement.graft_layer")
    assert err(overrides=["objective.placement.graft_layer=3", "objective.placement.mim_layer=4"]).startswith(
        "objective.placement.mim_layer")
    assert err(overrides=["objective.placement.graft_layer=3", "objective.placement.cl_layer=3"]).startswith(
        "objective.placement.cl_layer")
    cfg = load_config({}, ["objective.placement.graft_layer=3"])
    assert resolve_placement(cfg) == (3, 6, 3)


def test_a_placement_that_leaves_a_block_untrained_is_an_error_naming_the_keys():
    msg = err(overrides=["objective.lam=0", "objective.placement.mim_layer=3"])
    assert msg.startswith("objective.placement.mim_layer = 3") and "blocks 4..6 would get no gradient" in msg
    msg = err(overrides=["objective.placement.mim_layer=2", "objective.placement.cl_layer=4"])
    assert "objective.placement.mim_layer = 2 and objective.placement.cl_layer = 4" in msg and "5..6" in msg
    msg = err(overrides=["objective.placement.graft_layer=3", "objective.placement.mim_layer=2"])
    assert "graft_layer = 3" in msg and "block 3 would get no gradient" in msg and "graft_lr_ratio" in msg
    assert err(overrides=["objective.placement.graft_lr_ratio=0.1"]).startswith(
        "objective.placement.graft_lr_ratio")
    # valid: each block reached by some objective
    load_config({}, ["objective.placement.mim_layer=2"])  # CL reads block 6 and trains 1..6
    load_config({}, ["objective.placement.graft_layer=3", "objective.placement.mim_layer=2",
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
