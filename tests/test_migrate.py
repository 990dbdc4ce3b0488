"""The one migration step (``trainables/migrate.py``): a config, a space, a checkpoint and the results tables that
the lam-era main wrote (results schema 3; committed under ``tests/data/v3``) load in today's vocabulary."""

import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from orchestrator.query import query
from orchestrator.results import SCHEMA_VERSION, compact, file_version
from orchestrator.space import load_space
from trainables.checkpoints import load_weights, pretrained_encoder
from trainables.config import ConfigError, load_config, to_dict
from trainables.objectives.mixture import build_objective

V3 = Path(__file__).parent / "data" / "v3"


def test_a_lam_era_config_file_loads_with_every_setting_under_its_objective():
    cfg = load_config(V3 / "config.yaml")
    assert cfg.objective.simmim.mask_ratio == 0.5 and cfg.objective.placement.simmim_layer == 3
    assert cfg.objective.mocov3.proj_hidden == 16 and cfg.objective.mocov3.proj_dim == 8
    tree = to_dict(cfg)["objective"]
    assert not {"mask_ratio", "mask_unit", "temperature", "momentum", "proj_dim", "proj_hidden"} & set(tree)
    assert not {"mim_layer", "cl_layer"} & set(tree["placement"])


def test_earlier_names_in_overrides_and_a_clash_with_todays_name():
    cfg = load_config({}, ["objective.mask_ratio=0.4", "objective.placement.cl_layer=6"])
    assert cfg.objective.simmim.mask_ratio == 0.4 and cfg.objective.placement.mocov3_layer == 6
    with pytest.raises(ConfigError, match=r"^objective\.mask_ratio: the earlier name of objective\.simmim\.mask_ratio"):
        load_config({"objective": {"mask_ratio": 0.4, "simmim": {"mask_ratio": 0.7}}})


def test_a_lam_era_space_file_loads_with_todays_keys_and_metric():
    space = load_space(V3 / "space.yaml")
    assert set(space.axes()) == {"objective.lam", "objective.placement.simmim_layer"}
    assert space.fixed()["objective.mocov3.temperature"] == 0.3
    assert space.search.metric == "loss_mocov3"
    assert space.base["objective"]["simmim"]["mask_ratio"] == 0.5


def test_a_lam_era_checkpoint_loads_into_todays_model_with_every_weight():
    ckpt = load_weights(V3 / "checkpoint.pt")
    assert any(k.startswith("simmim.") for k in ckpt["model"]) and any(k.startswith("mocov3.") for k in ckpt["model"])
    assert not any(k.startswith(("mim.", "cl.")) for k in ckpt["model"])
    assert "loss_simmim" in ckpt["log"] and "loss_mim" not in ckpt["log"]
    model = build_objective(load_config(ckpt["config"]))
    model.load_state_dict(ckpt["model"])  # strict: every key of today's model, none left over
    raw = torch.load(V3 / "checkpoint.pt", weights_only=True)["model"]
    torch.testing.assert_close(model.mocov3.momentum["encoder"].state_dict()["vit.blocks.0.attn.qkv.weight"],
                               raw["cl.momentum.encoder.vit.blocks.0.attn.qkv.weight"])
    ckpt["config"]["eval"]["encoder"] = "momentum"
    enc = pretrained_encoder(ckpt)
    torch.testing.assert_close(enc["encoder.vit.blocks.0.attn.qkv.weight"],
                               raw["cl.momentum.encoder.vit.blocks.0.attn.qkv.weight"])


def test_lam_era_tables_read_and_compact_in_todays_vocabulary(tmp_path):
    root = tmp_path / "results"
    shutil.copytree(V3 / "results", root)
    sweep = root / "v3sweep"

    def check():
        t = query('SELECT trial, objective, mix, lam, loss_simmim, loss_mocov3, "objective.simmim.mask_ratio", '
                  '"objective.placement.simmim_layer" FROM trials ORDER BY trial', root)
        assert list(t.objective) == ["mix", "simmim"] and list(t["mix"]) == ["lam=0.5", "SimMIM"]
        assert t.loss_simmim.notna().all() and list(t["objective.simmim.mask_ratio"]) == [0.5, 0.5]
        assert list(t["objective.placement.simmim_layer"]) == [3, 3]
        cols = query("SELECT * FROM trials", root).columns
        assert not {"loss_mim", "loss_cl", "objective.mask_ratio", "objective.placement.mim_layer"} & set(cols)
        metrics = set(query("SELECT DISTINCT metric FROM curves", root).metric)
        assert {"loss_simmim", "loss_mocov3"} <= metrics and not {"loss_mim", "loss_cl"} & metrics
        assert query("SELECT count(*) AS n FROM layers", root).n[0] > 0

    assert all(file_version(f) == 3 for f in sweep.glob("*/*.parquet"))
    check()
    compact(sweep)  # the old files merged into one of today's, migrated
    merged = sorted(sweep.glob("trials/_merged.*.parquet"))
    assert len(merged) == 1 and file_version(merged[0]) == SCHEMA_VERSION
    assert "loss_simmim" in pq.read_schema(merged[0]).names
    check()
