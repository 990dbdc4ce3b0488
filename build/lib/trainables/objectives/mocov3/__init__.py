"""MoCo v3 (Chen, Xie, He 2021), declared: its settings (``objective.mocov3.*``), the official ViT recipe
(``main_moco.py``: blr 1.5e-4, 40 of 300 warmup epochs, wd 0.1, no clipping, no drop path, a fixed 2-D sin-cos
position embedding and a frozen random patch projection), the momentum encoder's EMA schedule, its FLOPs. The head
is ``head.MoCoV3``; ``eval.encoder: momentum`` reads its momentum encoder."""

from __future__ import annotations

from dataclasses import dataclass

from ...scale import mlp_head_flops
from ...settings import setting
from ..registry import Objective


@dataclass
class MoCoV3Settings:
    temperature: float = setting(0.2, lo=1e-3, hi=10.0)
    momentum: float = setting(0.99, lo=0.0, hi=1.0, doc="initial EMA momentum, cosine-scheduled towards 1")
    proj_dim: int = setting(256, lo=8, hi=65536)
    proj_hidden: int | None = setting(None, lo=8, hi=65536, doc="default: min(4096, 8 * width)")


def flops(s: MoCoV3Settings, v) -> float:
    """Two views with gradient through projector and predictor; the momentum encoder and projector forward only."""
    c = v.spec.width
    hidden = s.proj_hidden or min(4096, 8 * c)
    proj = mlp_head_flops([c, hidden, hidden, s.proj_dim])
    pred = mlp_head_flops([s.proj_dim, hidden, s.proj_dim])
    return 2 * v.view(v.layer, v.block, v.embed, proj + pred, True) + 2 * (v.embed + v.layer * v.block + proj)


def schedules(s: MoCoV3Settings, total: int, to_one, per_epoch: int) -> dict:
    """The momentum encoder's EMA momentum, cosine from ``momentum`` to 1 over the run."""
    return {"momentum": 1 - (1 - s.momentum) * to_one}


MOCOV3 = Objective(
    name="mocov3", family="cl", label="MoCo v3", settings=MoCoV3Settings,
    recipe={"blr": 1.5e-4, "weight_decay": 0.1, "weight_decay_end": 0.1, "warmup_frac": 40 / 300, "clip_grad": 0.0,
            "drop_path": 0.0, "beta2": 0.999},
    head="trainables.objectives.mocov3.head:MoCoV3", flops=flops, schedules=schedules, target="momentum",
    pos_embed="sincos", patch_embed="frozen", color="#7ad151")
