"""SimMIM (Xie et al. 2022), declared: its settings (``objective.simmim.*``), the official ViT recipe
(``configs/vit_base__800ep``: BASE_LR 1e-4 per 512 images, 10 of 800 warmup epochs, wd 0.05, CLIP_GRAD 5.0 over all
parameters together, DROP_PATH_RATE 0.1, MULTISTEPS [700] of 800 epochs with GAMMA 0.1), its FLOPs and its checks.
The head is ``head.SimMIM``."""

from __future__ import annotations

from dataclasses import dataclass

from ...errors import ConfigError
from ...scale import default_mask_unit
from ...settings import setting
from ..registry import Objective


@dataclass
class SimMIMSettings:
    mask_ratio: float = setting(0.6, lo=0.05, hi=0.95, doc="share of mask units masked")
    mask_unit: int | None = setting(None, lo=1, doc="mask unit in pixels (default: scaled to the image size)")


def flops(s: SimMIMSettings, v) -> float:
    """One masked view through blocks 1..layer, and the linear pixel decoder on every token."""
    c, p = v.spec.width, v.spec.patch
    return v.view(v.layer, v.block, v.embed, 2.0 * v.tokens * c * p * p * 3, False)


def validate(cfg, spec, in_mix: bool) -> None:
    """The mask unit: whole patches, dividing the image, at least 2 x 2 patches (SimMIM's smallest)."""
    u, size = cfg.objective.simmim.mask_unit, cfg.model.img_size
    if u is not None:
        if u % spec.patch or size % u:
            raise ConfigError(f"objective.simmim.mask_unit: {u} must be a multiple of the patch size {spec.patch} and "
                            f"divide model.img_size {size}")
        if u < 2 * spec.patch:
            raise ConfigError(f"objective.simmim.mask_unit: {u} px is less than 2 x 2 patches of {spec.patch} px; "
                            f"SimMIM masks units of at least 2 x 2 patches (e.g. {2 * spec.patch})")
    elif in_mix and default_mask_unit(size, spec.patch) is None:
        g = size // spec.patch
        raise ConfigError(f"objective.simmim.mask_unit: the {g} x {g} patch grid of model.img_size {size} has no mask "
                        "unit of 2 x 2 patches or more that divides it; choose an image size with an even grid, or "
                        "set objective.simmim.mask_unit")


SIMMIM = Objective(
    name="simmim", family="mim", label="SimMIM", settings=SimMIMSettings,
    recipe={"blr": 5e-5, "weight_decay": 0.05, "weight_decay_end": 0.05, "warmup_frac": 10 / 800, "clip_grad": 5.0,
            "clip_mode": "global", "drop_path": 0.1, "beta2": 0.999, "schedule": "multistep"},
    head="trainables.objectives.simmim.head:SimMIM", flops=flops, validate=validate,
    pos_embed="learned", patch_embed="trained", color="#440154")
