import math

import pytest
import torch
from conftest import tiny
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from trainables.config import load_config
from trainables.data import build_data
from trainables.objectives import build_objective, train_flops_per_image
from trainables.objectives.simmim import default_mask_unit, patchify
from trainables.trainer import train


def batch_of(cfg, n=16, seed=3):
    data = build_data(cfg)
    return {"images": data.train.images[:n], "seed": seed}


def make(over=None, seed=0):
    cfg = load_config(tiny(), over or [])
    torch.manual_seed(seed)
    return cfg, build_objective(cfg)


@pytest.mark.parametrize("lam", [0.0, 1.0, 0.5])
def test_loss_drops_within_a_few_dozen_steps(lam):
    logs = []
    train(load_config(tiny(), [f"objective.lam={lam}", "optim.steps=40", "run.log_every=1", "optim.blr=5e-3",
                               "data.train_size=512"]),
          lambda m, checkpoint=None: logs.append(m["loss"]) if "knn_top1" not in m else None)
    assert len(logs) == 40
    # One step's loss is noisy (its batch, its augmentations): compare the means of the first and last 8 steps.
    first, last = sum(logs[:8]) / 8, sum(logs[-8:]) / 8
    assert last < 0.95 * first, logs


def test_hybrid_at_lam_0_equals_simmim_and_at_lam_1_equals_mocov3():
    cfg, hybrid = make(["objective.lam=0", "model.drop_path=0"])  # stochastic depth would differ per call
    batch = batch_of(cfg)
    assert hybrid.cl is None  # the unused branch is not even built
    torch.testing.assert_close(hybrid(batch)["loss"], hybrid.mim(batch)["loss"])
    cfg, hybrid = make(["objective.lam=1"])
    assert hybrid.mim is None
    torch.testing.assert_close(hybrid(batch)["loss"], hybrid.cl(batch)["loss"])


def test_hybrid_mixes_the_two_losses_of_the_same_batch():
    cfg, hybrid = make(["objective.lam=0.3", "objective.placement.mim_layer=2", "model.drop_path=0"])
    batch = batch_of(cfg)
    out = hybrid(batch)
    torch.testing.assert_close(out["loss"], 0.7 * out["loss_mim"] + 0.3 * out["loss_cl"])
    # Routed (one 3B batch, rows split after their layer) equals each branch run on its own.
    torch.testing.assert_close(out["loss_mim"], hybrid.mim(batch)["loss"])
    torch.testing.assert_close(out["loss_cl"], hybrid.cl(batch)["loss"])


def _grad_blocks(obj, loss):
    obj.zero_grad(set_to_none=True)
    loss.backward(retain_graph=True)
    return [any(p.grad is not None and p.grad.abs().sum() > 0 for p in blk.parameters())
            for blk in obj.encoder.blocks]


def test_graft_layer_splits_gradients_between_objectives():
    g = 2
    cfg, hybrid = make([f"objective.placement.graft_layer={g}"])
    out = hybrid(batch_of(cfg))
    cl_grads = _grad_blocks(hybrid, out["loss_cl"])
    mim_grads = _grad_blocks(hybrid, out["loss_mim"])
    depth = hybrid.encoder.depth
    assert cl_grads == [False] * g + [True] * (depth - g)
    assert mim_grads == [True] * g + [False] * (depth - g)


def test_heads_reading_different_depths_have_their_own_norms_and_every_block_trains():
    cfg, hybrid = make(["objective.placement.mim_layer=3"])  # lam 0.5: MIM reads block 3, CL the last block
    out = hybrid(batch_of(cfg))
    assert _grad_blocks(hybrid, out["loss_mim"]) == [True] * 3 + [False] * 3
    assert _grad_blocks(hybrid, out["loss"]) == [True] * 6
    assert hybrid.mim.norm is not None and hybrid.cl.norm is None  # MIM's own norm; CL uses the final norm
    hybrid.zero_grad()
    out["loss_mim"].backward(retain_graph=True)
    assert hybrid.encoder.norm.weight.grad is None and hybrid.mim.norm.weight.grad.abs().sum() > 0
    assert not hybrid.has_unused_params()


def test_graft_lr_ratio_lets_cl_reach_lower_blocks_at_a_lower_lr():
    from trainables.trainer import _param_groups

    cfg, hybrid = make(["objective.placement.graft_layer=2", "objective.placement.graft_lr_ratio=0.1"])
    out = hybrid(batch_of(cfg))
    assert _grad_blocks(hybrid, out["loss_cl"]) == [True] * 6  # not detached below the graft
    groups = _param_groups(hybrid, cfg)
    slow = {id(p) for g in groups if g["lr_mult"] == 0.1 for p in g["params"]}
    lower = [*hybrid.encoder.blocks[0].parameters(), *hybrid.encoder.blocks[1].parameters(),
             hybrid.encoder.vit.cls_token]
    assert all(id(p) in slow for p in lower)
    assert not any(id(p) in slow for p in hybrid.encoder.blocks[2].parameters())
    assert not any(id(p) in slow for p in hybrid.mim.parameters())
    # the hard graft has no slow group
    cfg, hard = make(["objective.placement.graft_layer=2"])
    assert {g["lr_mult"] for g in _param_groups(hard, cfg)} == {1.0}


def test_mocov3_vit_recipe_frozen_patch_projection_and_fixed_sincos_stay_unchanged():
    from trainables.model import sincos_pos_embed

    cfg = load_config(tiny(), ["objective.lam=1", "optim.steps=3", "optim.blr=1e-2"])
    assert (cfg.model.pos_embed, cfg.model.patch_embed) == ("sincos", "frozen")  # the lam = 1 default
    torch.manual_seed(0)
    hybrid = build_objective(cfg)
    vit = hybrid.encoder.vit
    torch.testing.assert_close(vit.pos_embed.detach(), sincos_pos_embed(8, 96))
    before = {k: v.detach().clone() for k, v in hybrid.encoder.state_dict().items()}
    from trainables.trainer import _param_groups

    opt = torch.optim.AdamW(_param_groups(hybrid, cfg), lr=1e-2, weight_decay=0.1)
    for step in range(3):
        hybrid(batch_of(cfg, seed=step))["loss"].backward()
        opt.step()
        opt.zero_grad()
    after = hybrid.encoder.state_dict()
    for k in ("vit.patch_embed.proj.weight", "vit.patch_embed.proj.bias", "vit.pos_embed"):
        assert torch.equal(before[k], after[k]), k
    assert not torch.equal(before["vit.blocks.0.attn.qkv.weight"], after["vit.blocks.0.attn.qkv.weight"])
    # the predictor ends in an affine-free BatchNorm, as the official MoCo_ViT
    last = hybrid.cl.predictor[-1]
    assert isinstance(last, torch.nn.BatchNorm1d) and not last.affine
    # a hybrid keeps the learned embedding unless asked; asked, it gets the same fixed one
    assert load_config(tiny(), ["objective.lam=0.5"]).model.pos_embed == "learned"
    assert load_config(tiny(), ["objective.lam=0.5", "model.pos_embed=sincos"]).model.pos_embed == "sincos"


def test_sincos_embedding_encodes_row_and_column():
    from trainables.model import sincos_pos_embed

    pe = sincos_pos_embed(4, 16)[0]  # (1 + 16, 16): CLS row first
    assert torch.equal(pe[0], torch.zeros(16))
    # patch (row 1, col 2) is index 1 * 4 + 2 + 1; its first quarter is sin(col * w), w_0 = 1
    assert pe[1 * 4 + 2 + 1, 0].item() == pytest.approx(math.sin(2.0))
    assert pe[1 * 4 + 2 + 1, 8].item() == pytest.approx(math.sin(1.0))


def test_momentum_update_moves_towards_online():
    cfg, hybrid = make(["objective.lam=1"])
    with torch.no_grad():
        for p in hybrid.encoder.parameters():
            p.add_(1.0)
    before = [p.clone() for p in hybrid.cl.momentum.parameters()]
    hybrid.momentum_update(0.9)
    online = hybrid.cl.online_params()
    for b, a, o in zip(before, hybrid.cl.momentum.parameters(), online, strict=True):
        torch.testing.assert_close(a, 0.9 * b + 0.1 * o)


@pytest.mark.parametrize("over", [["objective.lam=0"], ["objective.lam=1"], ["objective.lam=0.5"],
                                  ["objective.placement.graft_layer=2"]])
def test_analytic_training_flops_match_flop_counter(over):
    cfg, hybrid = make(over)
    batch = batch_of(cfg, n=8)
    # The math SDPA backend decomposes attention into matmuls the counter sees on the CPU.
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        hybrid(batch)["loss"].backward()
    counted = fc.get_total_flops() / 8
    assert abs(counted - train_flops_per_image(cfg)) / counted < 0.02


def test_mask_ratio_unit_and_patchify():
    assert default_mask_unit(224, 16) == 32 and default_mask_unit(192, 16) == 32
    assert default_mask_unit(32, 4) == 8  # 2 x 2 patches at 32 px: never a single patch
    assert default_mask_unit(112, 16) is None  # a 7 x 7 grid has no unit of 2 x 2 patches or more
    cfg, hybrid = make(["objective.lam=0"])
    mask = hybrid.mim.make_mask(torch.rand(5, 16))  # 4 x 4 mask units of 2 x 2 patches (8 px at 32 px)
    assert mask.shape == (5, 64)
    assert (mask.sum(1) == 40).all()  # ceil(0.6 * 16) units of 4 patches
    g = mask.view(5, 8, 8)  # (B, grid, grid): each 2 x 2 block of patches is masked together
    assert all((g[:, i::2, j::2] == g[:, ::2, ::2]).all() for i in (0, 1) for j in (0, 1))
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    p = patchify(x, 4)
    assert p.shape == (2, 4, 48)
    assert torch.equal(p[0, 1].view(4, 4, 3)[..., 0], x[0, 0, :4, 4:])  # patch (0, 1), red channel
