import pytest
import torch
from conftest import tiny

from trainables.checkpoints import export_weights, find_checkpoint, load_weights
from trainables.config import load_config
from trainables.finetune import build_classifier, layer_decay_groups
from trainables.objectives.mixture import build_objective
from trainables.trainer import train


def test_layer_decay_groups_follow_the_mae_recipe():
    cfg = load_config(tiny())
    model = build_classifier(cfg, build_objective(cfg).encoder.state_dict(), 8)
    groups = layer_decay_groups(model, 0.05, 0.5)
    depth = model.encoder.depth
    by_param = {id(p): g for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert by_param[id(named["head.weight"])]["lr_mult"] == 1.0
    assert by_param[id(named["encoder.vit.blocks.0.attn.qkv.weight"])]["lr_mult"] == 0.5 ** depth
    assert by_param[id(named["encoder.vit.patch_embed.proj.weight"])]["lr_mult"] == 0.5 ** (depth + 1)
    assert by_param[id(named["encoder.vit.blocks.0.attn.qkv.bias"])]["weight_decay"] == 0.0
    assert by_param[id(named["encoder.vit.blocks.0.attn.qkv.weight"])]["weight_decay"] == 0.05
    assert sum(len(g["params"]) for g in groups) == len(named)


@pytest.mark.slow
@pytest.mark.extended
def test_finetuning_beats_the_linear_probe_on_digits_within_a_small_budget():
    """The same labels for both (eval.samples covers the whole digits train and eval splits); a barely
    pre-trained encoder, so what fine-tuning adds is its own."""
    cfg = load_config({
        "model": {"variant": "micro/4", "img_size": 16}, "data": {"dataset": "digits", "batch_size": 64},
        "optim": {"steps": 10}, "objective": {"lam": 0.0},
        "eval": {"samples": 2000, "dense_images": 0, "cka": False, "noise": {"bands": 0}, "attentive_steps": 0,
                 "lowshot": False,
                 "finetune": {"steps": 400, "blr": 1.2e-2, "layer_decay": 0.75, "crop_min": 0.8, "flip": False}},
        "run": {"log_every": 50, "threads": 2}})
    seen = []
    final = train(cfg, lambda m, checkpoint=None: seen.append(m))
    assert final["finetune_top1"] > final["linear_top1"] + 0.02, (final["finetune_top1"], final["linear_top1"])
    curve = [m for m in seen if "finetune_loss" in m]
    assert [m["step"] for m in curve] == list(range(60, 411, 50))
    assert curve[-1]["finetune_loss"] < curve[0]["finetune_loss"]
    assert final["step"] == 10 and final["finetune_steps"] == 400 and final["total_steps"] == 410


@pytest.mark.integration
@pytest.mark.slow  # (make test's 12-minute budget: CI's slow tier)
def test_resume_during_finetuning_continues_finetuning_and_matches_a_straight_run(tmp_path):
    base = tiny(**{"objective__lam": 0.5, "optim__steps": 4, "run__ckpt_every": 3, "model__drop_path": 0.1,
                   "eval__finetune__steps": 6, "eval__noise__bands": 2})
    straight = tmp_path / "straight"
    a = train(load_config(base, [f"run.out_dir={straight}"]))
    ft_ckpt = straight / "checkpoints" / "step_0000009"  # fine-tuning step 5 of 6
    assert load_weights(ft_ckpt / "checkpoint.pt")["phase"] == "finetune"
    resumed = tmp_path / "resumed"
    seen = []
    b = train(load_config(base, [f"run.out_dir={resumed}", f"run.resume={ft_ckpt}"]),
              lambda m, checkpoint=None: seen.append(m))
    assert all("finetune_loss" in m or "resumed_from" in m for m in seen)  # no pre-training step or probe again
    assert b["resumed_from"] == 9 and a["resumed_from"] == 0
    for k in ("finetune_top1", "linear_top1", "noise/1/finetune_top1", "noise/1/linear_top1", "step"):
        assert a[k] == b[k], k
    wa, wb = (load_weights(find_checkpoint(d))["model"] for d in (straight, resumed))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=0, msg=k)
    # the exported weights are the pre-trained encoder, never the fine-tuned one
    exported = load_weights(export_weights(find_checkpoint(resumed), tmp_path / "model.pt"))
    alone = tmp_path / "pretrain_only"  # the same pre-training without fine-tuning after it
    train(load_config(base, [f"run.out_dir={alone}", "eval.finetune.steps=null"]))
    pretrained = load_weights(alone / "checkpoints" / "step_0000004" / "checkpoint.pt")
    for k, v in exported["model"].items():
        torch.testing.assert_close(v, pretrained["model"][k], rtol=0, atol=0, msg=k)
    assert exported["step"] == 4
