"""Released checkpoints: for each layout, a model of the official architecture (built from timm, random weights,
every parameter perturbed so that a swapped or dropped key changes the numbers), saved with the official key names
and wrapping, gives through ``clmim analyze`` the same per-layer values as probing that model directly. The
hosting is checked against the code bases' own formulas: timm's final features, and SimMIM's attention with its
q/v biases and shared relative position bias written out as in microsoft/SimMIM."""

import math

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from timm.models.beit import Beit
from timm.models.vision_transformer import VisionTransformer

from orchestrator.cli import main
from trainables.config import load_config
from trainables.data import build_data
from trainables.errors import UserError
from trainables.probes import run_probes
from trainables.released import (
    DINO,
    DINOV2,
    IBOT,
    MAE,
    MOCO_V3,
    SIMMIM,
    TIMM,
    Released,
    build,
    config_variant,
    recognise,
    shape_of,
)

SIZE, PATCH = 32, 4
PROBE = ["data.train_size=128", "data.eval_size=64", "eval.samples=64", "eval.probe_images=8",
         "eval.dense_images=0", "eval.cka=false", "eval.noise.bands=0", "eval.attentive_steps=0", "eval.lowshot=false"]


def _perturbed(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


def _vit(width=192, heads=3, seed=0, **kw) -> VisionTransformer:
    torch.manual_seed(seed)
    return _perturbed(VisionTransformer(img_size=SIZE, patch_size=PATCH, embed_dim=width, depth=2, num_heads=heads,
                                       num_classes=0, **kw), seed)


def simmim_index(g: int) -> torch.Tensor:
    """BEiT's relative position index as microsoft/SimMIM computes it (models/vision_transformer.py)."""
    coords = torch.stack(torch.meshgrid(torch.arange(g), torch.arange(g), indexing="ij")).flatten(1)  # (2, g^2)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)  # (g^2, g^2, 2)
    rel[:, :, 0] += g - 1
    rel[:, :, 1] += g - 1
    rel[:, :, 0] *= 2 * g - 1
    n = (2 * g - 1) ** 2 + 3
    index = torch.zeros((g * g + 1,) * 2, dtype=torch.long)
    index[1:, 1:] = rel.sum(-1)
    index[0, 0:], index[0:, 0], index[0, 0] = n - 3, n - 2, n - 1
    return index


def _simmim_model(seed=0) -> Beit:
    torch.manual_seed(seed)
    return _perturbed(Beit(img_size=SIZE, patch_size=PATCH, embed_dim=192, depth=2, num_heads=3, num_classes=0,
                           use_abs_pos_emb=False, use_shared_rel_pos_bias=True, init_values=0.1, use_fc_norm=False),
                      seed)


def _prefixed(state: dict, prefix: str) -> dict:
    return {prefix + k: v for k, v in state.items()}


def official(layout) -> tuple[dict, torch.nn.Module]:
    """(what the code base saves, the model it saved) for a small model of ``layout``'s architecture."""
    if layout is MOCO_V3:  # ViT-S width: 12 heads in MoCo v3's table
        m = _vit(width=384, heads=12)
        enc = m.state_dict()
        return {"epoch": 300, "arch": "vit_small", "state_dict": {
            **_prefixed(enc, "module.base_encoder."), "module.base_encoder.head.0.weight": torch.randn(8, 384),
            **_prefixed(enc, "module.momentum_encoder."), "module.predictor.0.weight": torch.randn(8, 8)}}, m
    if layout is SIMMIM:
        m = _simmim_model()
        enc = {**m.state_dict(), "mask_token": torch.randn(1, 1, 192),
               "rel_pos_bias.relative_position_index": simmim_index(SIZE // PATCH)}
        return {"model": {**_prefixed(enc, "encoder."), "decoder.0.weight": torch.randn(48, 192, 1, 1)},
                "epoch": 799}, m
    if layout is MAE:
        m = _vit()
        return {"model": {**m.state_dict(), "mask_token": torch.randn(1, 1, 192),
                          "decoder_embed.weight": torch.randn(64, 192)}}, m
    if layout is DINO:
        teacher, student = _vit(seed=1), _vit(seed=2)
        head = {"head.last_layer.weight_g": torch.ones(8, 1)}
        return {"teacher": {**_prefixed(teacher.state_dict(), "backbone."), **head},
                "student": _prefixed(student.state_dict(), "module.backbone."), "epoch": 100}, teacher
    if layout is IBOT:
        m = _vit()
        return {"state_dict": {**m.state_dict(), "masked_embed": torch.randn(1, 192)}}, m
    if layout is DINOV2:
        m = _vit(init_values=1e-5)
        return {**m.state_dict(), "mask_token": torch.randn(1, 192)}, m
    m = _vit()
    return m.state_dict(), m


def _analyze(tmp_path, ckpt: dict, *args) -> pd.DataFrame:
    torch.save(ckpt, tmp_path / "released.pth")
    out = tmp_path / "rows.parquet"
    assert main(["analyze", str(tmp_path / "released.pth"), "--out", str(out), *args,
                 *[a for kv in PROBE for a in ("--set", kv)]]) == 0
    return pd.read_parquet(out)


def _direct(layout, model) -> pd.DataFrame:
    shape = shape_of(layout, model.state_dict())
    enc = Released(model, layout, shape, SIZE).eval()
    cfg = load_config({"model": {"variant": config_variant(shape), "img_size": SIZE}}, PROBE)
    rows, _ = run_probes(enc, build_data(cfg), cfg)
    return pd.DataFrame(rows, columns=["layer", "head", "metric", "value"]).astype({"head": "Int64"})


@pytest.mark.parametrize("layout", [MOCO_V3, SIMMIM, MAE, DINO, IBOT, DINOV2, TIMM], ids=lambda x: x.name)
def test_each_released_layout_through_analyze_equals_probing_the_model_directly(layout, tmp_path, capsys):
    ckpt, model = official(layout)
    got = _analyze(tmp_path, ckpt)
    assert f"clmim analyze: {tmp_path / 'released.pth'} ({layout.name} from " in capsys.readouterr().out
    want = _direct(layout, model)
    assert len(got) == len(want) and {"attn_distance", "attn_nmi", "linear_top1_gap"} <= set(got.metric)
    assert got.layer.max() == 2 and got["head"].max() == model.blocks[0].attn.num_heads - 1
    pd.testing.assert_frame_equal(got, want, check_exact=False, atol=1e-6)


def test_a_hosted_encoder_gives_timms_own_features_and_layer_scale_is_loaded():
    for layout in (DINOV2, SIMMIM, MOCO_V3):
        ckpt, model = official(layout)
        found, state = recognise(ckpt)
        enc, shape = build(found, state)
        assert found is layout and shape.depth == 2 and shape.patch == PATCH and shape.grid == SIZE // PATCH
        assert shape.layer_scale == (layout is not MOCO_V3)
        assert shape.heads == model.blocks[0].attn.num_heads
        x = torch.randn(3, 3, SIZE, SIZE)
        with torch.no_grad():
            ours = enc(x)  # (3, 1 + 64, C)
            theirs = model.forward_features(x)
        torch.testing.assert_close(ours, theirs)


def test_simmim_attention_maps_are_simmims_softmax_with_qv_biases_and_the_shared_relative_bias():
    ckpt, model = official(SIMMIM)
    enc, shape = build(*recognise(ckpt))
    x = torch.randn(2, 3, SIZE, SIZE)
    maps = enc.attention_maps(x)
    # microsoft/SimMIM's Attention.forward, written out (no k bias; the bias table indexed by SimMIM's index)
    g = SIZE // PATCH
    table = ckpt["model"]["encoder.rel_pos_bias.relative_position_bias_table"]  # ((2g-1)^2 + 3, heads)
    bias = table[simmim_index(g).view(-1)].view(g * g + 1, g * g + 1, -1).permute(2, 0, 1)  # (heads, T, T)
    with torch.no_grad():
        h = enc.intermediates(x)
        for k, blk in enumerate(model.blocks):
            a = blk.attn
            qkv_bias = torch.cat((a.q_bias, torch.zeros_like(a.v_bias), a.v_bias))
            qkv = F.linear(blk.norm1(h[k]), a.qkv.weight, qkv_bias).reshape(2, g * g + 1, 3, 3, -1)
            q, kk = qkv.permute(2, 0, 3, 1, 4)[:2]  # (B, heads, T, d) each
            want = ((q * a.scale) @ kk.transpose(-2, -1) + bias).softmax(-1)
            torch.testing.assert_close(maps[k], want, atol=1e-5, rtol=1e-5)
    assert shape.heads == 3 and all(m.shape == (2, 3, g * g + 1, g * g + 1) for m in maps)


def test_vit_attention_maps_from_timms_path_equal_clmims_explicit_softmax():
    ckpt, model = official(MAE)
    enc, _ = build(*recognise(ckpt))
    x = torch.randn(2, 3, SIZE, SIZE)
    maps = enc.attention_maps(x)
    with torch.no_grad():
        h = enc.intermediates(x)
        for k, blk in enumerate(model.blocks):
            a = blk.attn
            qkv = a.qkv(blk.norm1(h[k])).reshape(2, -1, 3, a.num_heads, 64).permute(2, 0, 3, 1, 4)
            want = ((qkv[0] * a.scale) @ qkv[1].transpose(-2, -1)).softmax(-1)
            torch.testing.assert_close(maps[k], want, atol=1e-5, rtol=1e-5)
    assert all(b.attn.fused_attn == model.blocks[0].attn.fused_attn for b in model.blocks)  # put back


def test_dino_takes_the_teacher_by_default_and_the_student_on_request():
    ckpt, teacher = official(DINO)
    _, t = recognise(ckpt)
    _, s = recognise(ckpt, "student")
    torch.testing.assert_close(t["blocks.0.attn.qkv.weight"], teacher.state_dict()["blocks.0.attn.qkv.weight"])
    assert not torch.equal(t["blocks.0.attn.qkv.weight"], s["blocks.0.attn.qkv.weight"])
    assert "head.last_layer.weight_g" not in t


def test_a_position_embedding_is_resampled_to_another_probing_size_but_a_relative_bias_is_refused():
    ckpt, model = official(DINOV2)
    enc, shape = build(*recognise(ckpt), img_size=48)
    assert enc.grid == 12 and shape.grid == 8 and enc(torch.randn(1, 3, 48, 48)).shape == (1, 1 + 144, 192)
    with pytest.raises(UserError, match="relative position bias is for 32 px"):
        build(*recognise(official(SIMMIM)[0]), img_size=48)


@pytest.mark.parametrize("bad, message", [
    ({"model": {"encoder.cls_token": torch.zeros(1, 1, 8)}}, "without 'patch_embed.proj.weight'"),
    ({"weights": [1, 2]}, "no known layout .* top-level keys: \\['weights'\\]"),
    ({"student": {"backbone.cls_token": torch.zeros(1)}}, "no 'teacher' weights"),
])
def test_what_cannot_be_mapped_is_refused_naming_the_key(bad, message):
    with pytest.raises(UserError, match=message):
        build(*recognise(bad))


def test_a_missing_or_extra_weight_is_named_and_analyze_exits_2(tmp_path, capsys):
    ckpt, _ = official(MAE)
    del ckpt["model"]["blocks.1.norm2.weight"]
    with pytest.raises(UserError, match="missing 'blocks.1.norm2.weight'"):
        build(*recognise(ckpt))
    ckpt, _ = official(MAE)
    ckpt["model"]["blocks.0.attn.k_bias"] = torch.zeros(192)
    with pytest.raises(UserError, match="hold 'blocks.0.attn.k_bias', which its encoder has not got"):
        build(*recognise(ckpt))
    ckpt, _ = official(DINOV2)
    ckpt["register_tokens"] = torch.zeros(1, 4, 192)
    torch.save(ckpt, tmp_path / "reg.pth")
    assert main(["analyze", str(tmp_path / "reg.pth")]) == 2
    assert "register tokens ('register_tokens'): not supported" in capsys.readouterr().err
    assert main(["analyze", str(tmp_path / "reg.pth"), "--out", str(tmp_path / "x.txt")]) == 2


def test_the_head_count_comes_from_the_weights_for_beit_and_from_the_official_table_otherwise():
    assert MOCO_V3.heads(384) == 12 and DINO.heads(384) == 6 and MAE.heads(768) == 12 and TIMM.heads(192) == 3
    assert IBOT.heads(128) == 2  # outside the table: 64 channels per head
    ckpt, _ = official(SIMMIM)
    assert shape_of(SIMMIM, recognise(ckpt)[1]).heads == 3
    assert math.isqrt(ckpt["model"]["encoder.rel_pos_bias.relative_position_bias_table"].shape[0] - 3) == 15


def test_wrapped_plain_timm_weights_are_timm_not_dino():
    _, model = official(TIMM)
    layout, state = recognise({"state_dict": {**model.state_dict(), "head.weight": torch.zeros(10, 192)}})
    assert layout is TIMM and "head.weight" not in state
    assert recognise({"state_dict": _prefixed(model.state_dict(), "backbone.")})[0] is DINO
