import pytest
import torch

from trainables.model import ViT
from trainables.scale import SCALES, encoder_params, parse_variant


@pytest.mark.integration
@pytest.mark.parametrize("variant", ["micro/4", "Ti/16", "S/16", "B/16", "L/16"])
def test_every_variant_builds_with_right_shapes(variant):
    spec = parse_variant(variant)
    img = 32 if spec.patch <= 16 else spec.patch * 2
    model = ViT(variant, img).eval()
    assert sum(p.numel() for p in model.parameters()) == encoder_params(spec, img)
    x = torch.randn(2, 3, img, img)
    with torch.no_grad():
        states = model.intermediates(x)
    n = (img // spec.patch) ** 2
    assert len(states) == spec.depth + 1
    assert all(s.shape == (2, n + 1, spec.width) for s in states)


def test_scale_table_has_required_names():
    assert {"micro", "Ti", "S", "B", "L"} <= set(SCALES)
    with pytest.raises(ValueError, match="NAME/PATCH"):
        parse_variant("B16")


def test_last_intermediate_equals_model_output():
    torch.manual_seed(0)
    model = ViT("micro/4", 32).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        states = model.intermediates(x)
        assert torch.allclose(model.norm(states[-1]), model(x), atol=1e-6)
        assert torch.allclose(model.vit.forward_features(x), model(x), atol=1e-6)


def test_attention_maps_reproduce_the_fused_block():
    """The explicit softmax(QK^T) maps, applied to V, give the same output as timm's fused attention."""
    torch.manual_seed(0)
    model = ViT("micro/4", 32).eval()
    x = torch.randn(2, 3, 32, 32)
    maps = model.attention_maps(x)
    assert len(maps) == model.depth and maps[0].shape == (2, 3, 65, 65)
    assert torch.allclose(maps[0].sum(-1), torch.ones(2, 3, 65), atol=1e-5)
    with torch.no_grad():
        h = model.intermediates(x)[2]  # input of block 3
        blk = model.blocks[2]
        b, t, c = h.shape
        v = blk.attn.qkv(blk.norm1(h)).reshape(b, t, 3, 3, c // 3).permute(2, 0, 3, 1, 4)[2]  # (B, h, T, d)
        manual = blk.attn.proj((maps[2] @ v).transpose(1, 2).reshape(b, t, c))
        assert torch.allclose(manual, blk.attn(blk.norm1(h)), atol=1e-5)
