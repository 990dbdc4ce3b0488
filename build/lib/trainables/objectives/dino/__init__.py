"""DINO (Caron et al. 2021), declared: its settings (``objective.dino.*``), the official recipe (``main_dino.py``,
ViT-S/16: lr 5e-4 per 256 images, 10 of 100 warmup epochs, wd 0.04 -> 0.4 (cosine), each parameter's gradient
clipped to norm 3.0 on its own, drop path 0.1), the teacher's schedules (EMA momentum, temperature warmup, the
last layer frozen during the first epoch), its FLOPs and its checks. The head is ``head.DINO``; ``eval.encoder:
teacher`` (the default with DINO in the mix, as DINO's own evaluations) reads its teacher."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...errors import ConfigError
from ...scale import default_local_size, default_out_dim, embed_flops, mlp_head_flops, tokens_block_flops
from ...settings import setting
from ..registry import Objective


@dataclass
class DINOSettings:
    """Defaults from main_dino.py (ViT-S/16): 2 global crops (scale 0.4-1) and 8 local crops (0.05-0.4, 96 of 224
    px), a 3-layer MLP head with an L2-normalised bottleneck of 256 and a weight-normalised last layer, teacher = EMA
    of the student (0.996 -> 1), centring (momentum 0.9) and sharpening (student 0.1, teacher 0.04), last layer
    frozen during the first epoch."""

    local_crops: int = setting(8, lo=0, hi=64)
    local_size: int | None = setting(None, lo=4, doc="local crop side in px (default: 96 / 224 of model.img_size, "
                                                      "whole patches, at least 2 x 2)")
    out_dim: int | None = setting(None, lo=2, hi=262144, doc="prototypes (default: 65536 at ViT-S width 384, "
                                                              "scaled with width^2 below, at least 1024)")
    hidden: int | None = setting(None, lo=8, hi=65536, doc="default: min(2048, 8 * width)")
    bottleneck: int = setting(256, lo=8, hi=65536)
    student_temp: float = setting(0.1, lo=1e-3, hi=10.0)
    teacher_temp: float = setting(0.04, lo=1e-3, hi=10.0, doc="after the warmup")
    warmup_teacher_temp: float = setting(0.04, lo=1e-3, hi=10.0)
    teacher_temp_warmup_frac: float = setting(0.0, lo=0.0, hi=1.0, doc="share of pre-training (main_dino: 0; its "
                                                                        "recommended ViT-S/16 run: 30 of 100 epochs)")
    momentum: float = setting(0.996, lo=0.0, hi=1.0, doc="initial teacher EMA momentum, cosine-scheduled to 1")
    center_momentum: float = setting(0.9, lo=0.0, hi=1.0)
    freeze_last_layer_frac: float | None = setting(None, lo=0.0, hi=1.0, doc="share of pre-training with the last "
                                                                              "layer frozen (default: one epoch)")


def flops(d: DINOSettings, v) -> float:
    """Two global crops and the local crops with gradient through the head; the teacher on the global crops, forward
    only."""
    c, p = v.spec.width, v.spec.patch
    hidden = d.hidden or min(2048, 8 * c)
    head = mlp_head_flops([c, hidden, hidden, d.bottleneck, d.out_dim or default_out_dim(c)])
    local = d.local_size or default_local_size(v.img_size, p)
    fe_l, fb_l = embed_flops(v.spec, local), tokens_block_flops(c, 1 + (local // p) ** 2)
    total = 2 * v.view(v.layer, v.block, v.embed, head, True) + 2 * (v.embed + v.layer * v.block + head)
    return total + d.local_crops * v.view(v.layer, fb_l, fe_l, head, True)


def schedules(d: DINOSettings, total: int, to_one, per_epoch: int) -> dict:
    """The teacher's EMA momentum (cosine to 1), its temperature (linear warmup, then constant) and the last layer's
    freeze (1.0 while frozen: ``freeze_last_layer_frac`` of the run, default one epoch of ``per_epoch`` steps)."""
    steps = np.arange(total, dtype=np.float64)
    t_warm = int(round(d.teacher_temp_warmup_frac * total))
    temp = np.full(total, d.teacher_temp)
    temp[:t_warm] = np.linspace(d.warmup_teacher_temp, d.teacher_temp, t_warm)
    frozen = per_epoch if d.freeze_last_layer_frac is None else int(round(d.freeze_last_layer_frac * total))
    return {"teacher_momentum": 1 - (1 - d.momentum) * to_one, "teacher_temp": temp,
            "freeze_last_layer": (steps < frozen).astype(np.float64)}


def validate(cfg, spec, in_mix: bool) -> None:
    """Local crops of whole patches, at least 2 x 2 of them, no larger than the image."""
    ls, size = cfg.objective.dino.local_size, cfg.model.img_size
    if in_mix and ls is not None and (ls % spec.patch or ls < 2 * spec.patch or ls > size):
        raise ConfigError(f"objective.dino.local_size: {ls} px must be whole patches of {spec.patch} px, at least "
                          f"2 x 2 of them and at most model.img_size {size}")


DINO = Objective(
    name="dino", family="cl", label="DINO", settings=DINOSettings,
    recipe={"blr": 5e-4, "weight_decay": 0.04, "weight_decay_end": 0.4, "warmup_frac": 10 / 100, "clip_grad": 3.0,
            "clip_mode": "per_tensor", "drop_path": 0.1, "beta2": 0.999},
    head="trainables.objectives.dino.head:DINO", flops=flops, validate=validate, schedules=schedules,
    step_inputs=("teacher_temp", "freeze_last_layer"), target="teacher",
    pos_embed="learned", patch_embed="trained", color="#1f77b4")
