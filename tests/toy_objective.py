"""A fifth objective, declared outside the package as a user would: its settings, recipe, FLOPs, a schedule and a
check, its head, and one ``register`` call. Loaded by name (``CLMIM_OBJECTIVES=toy_objective`` with this folder on
PYTHONPATH), or imported by a test; ``test_registry.py`` shows it trains, sweeps, and reaches every table and the
report with no edit to the package.

Toy: predict each image's mean colour (per channel, normalised) from the CLS token of one cropped view."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from trainables.augment import mae_view
from trainables.errors import ConfigError
from trainables.objectives.common import Head, head_norm
from trainables.objectives.registry import Objective, register
from trainables.settings import setting


@dataclass
class ToySettings:
    scale: float = setting(1.0, lo=0.0, hi=10.0, doc="multiplies the loss")
    warm: float = setting(0.5, lo=0.0, hi=1.0, doc="the share of the run over which the toy schedule rises")


class ToyHead(Head):
    """Linear map from the normed CLS token to the view's mean colour (3 values)."""

    STREAM = 9

    def __init__(self, encoder, img_size: int, layer: int, scale: float):
        super().__init__(encoder, layer)
        self.img_size, self.scale = img_size, scale
        self.norm = head_norm(encoder, layer)
        self.pred = nn.Linear(encoder.width, 3)

    @classmethod
    def from_config(cls, encoder, cfg, layer: int) -> ToyHead:
        return cls(encoder, cfg.model.img_size, layer, cfg.objective.toy.scale)

    def draws(self, batch: dict) -> dict:
        images = batch["images"]
        rise = torch.as_tensor(batch.get("toy_rise", 1.0), dtype=torch.float32, device=images.device)
        return {"crop": torch.rand(images.shape[0], 5, generator=self.generator(batch), device=images.device),
                "rise": rise}

    def prepare(self, images: torch.Tensor, draws: dict) -> dict:
        view = mae_view(images, self.img_size, draws["crop"])  # (B, 3, S, S)
        return {"view": view, "target": view.mean(dim=(2, 3)), "rise": draws["rise"]}  # target (B, 3)

    def tokens(self, prep: dict) -> list[torch.Tensor]:
        return [self.encoder.embed(prep["view"])]

    def loss(self, feats: list[torch.Tensor], prep: dict) -> torch.Tensor:
        cls = (self.encoder.norm if self.norm is None else self.norm)(feats[0])[:, 0]  # (B, C)
        return self.scale * prep["rise"] * F.mse_loss(self.pred(cls).float(), prep["target"].float())


def flops(s: ToySettings, v) -> float:
    return v.view(v.layer, v.block, v.embed, 2.0 * v.spec.width * 3, False)


def schedules(s: ToySettings, total: int, to_one, per_epoch: int) -> dict:
    """toy_rise: 0 -> 1 linearly over ``warm`` of the run, then 1 (read by the head's draws every step)."""
    n = max(1, int(round(s.warm * total)))
    return {"toy_rise": np.minimum(1.0, (np.arange(total) + 1) / n)}


def validate(cfg, spec, in_mix: bool) -> None:
    if in_mix and cfg.objective.toy.scale == 0:
        raise ConfigError("objective.toy.scale: 0 would train nothing")


TOY = register(Objective(
    name="toy", family="mim", label="Toy", settings=ToySettings,
    recipe={"blr": 1e-4, "weight_decay": 0.05, "weight_decay_end": 0.05, "warmup_frac": 0.1, "clip_grad": 0.0,
            "drop_path": 0.0, "beta2": 0.999},
    head=ToyHead, flops=flops, validate=validate, schedules=schedules, step_inputs=("toy_rise",),
    color="#17becf"))
