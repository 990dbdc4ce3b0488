"""MAE (He et al. 2022), declared: its settings (``objective.mae.*``), the official ViT recipe
(``main_pretrain.py``, PRETRAIN.md: blr 1.5e-4, 40 of 800 warmup epochs, wd 0.05, AdamW's beta2 0.95, no clipping,
no drop path, fixed 2-D sin-cos position embeddings), its FLOPs and its checks. The head is ``head.MAE``."""

from __future__ import annotations

from dataclasses import dataclass

from ...errors import ConfigError
from ...scale import decoder_shape, tokens_block_flops
from ...settings import setting
from ..registry import Objective


@dataclass
class MAESettings:
    """Defaults from the official ViT recipe: 75% random masking, the encoder on the visible patches only, a light
    transformer decoder (8 blocks of width 512 and 16 heads at ViT-B / L / H; narrower for narrower encoders),
    per-patch normalised pixel targets, loss on masked patches."""

    mask_ratio: float = setting(0.75, lo=0.05, hi=0.95)
    decoder_depth: int = setting(8, lo=1, hi=64)
    decoder_width: int | None = setting(None, lo=8, hi=8192, doc="default: min(512, encoder width)")
    decoder_heads: int | None = setting(None, lo=1, hi=128, doc="default: decoder width / 32")
    norm_pix: bool = setting(True, doc="targets normalised per patch (mean 0, variance 1), as the recipe's best")


def flops(m: MAESettings, v) -> float:
    """The visible patches through blocks 1..layer, the decoder on every token."""
    c, p, n = v.spec.width, v.spec.patch, v.tokens
    keep = int(n * (1 - m.mask_ratio))
    dw, _ = decoder_shape(c, m.decoder_width, m.decoder_heads)
    dec = 2.0 * (1 + keep) * c * dw + m.decoder_depth * tokens_block_flops(dw, 1 + n) + 2.0 * n * dw * p * p * 3
    return v.view(v.layer, tokens_block_flops(c, 1 + keep), v.embed, dec, False)


def validate(cfg, spec, in_mix: bool) -> None:
    """Some patches visible and some masked; a decoder width its heads and its sin-cos embedding divide."""
    if not in_mix:
        return
    m = cfg.objective.mae
    n = (cfg.model.img_size // spec.patch) ** 2
    if not 1 <= int(n * (1 - m.mask_ratio)) < n:
        raise ConfigError(f"objective.mae.mask_ratio: {m.mask_ratio:g} of {n} patches leaves "
                        f"{int(n * (1 - m.mask_ratio))} visible; MAE needs some visible and some masked")
    width, heads = decoder_shape(spec.width, m.decoder_width, m.decoder_heads)
    if width % heads:
        raise ConfigError(f"objective.mae.decoder_heads: {heads} heads do not divide the decoder width {width}")
    if width % 4:
        raise ConfigError(f"objective.mae.decoder_width: {width} is not divisible by 4 (the decoder's 2-D sin-cos "
                        "position embedding)")


MAE = Objective(
    name="mae", family="mim", label="MAE", settings=MAESettings,
    recipe={"blr": 1.5e-4, "weight_decay": 0.05, "weight_decay_end": 0.05, "warmup_frac": 40 / 800, "clip_grad": 0.0,
            "drop_path": 0.0, "beta2": 0.95},
    head="trainables.objectives.mae.head:MAE", flops=flops, validate=validate,
    pos_embed="sincos", patch_embed="trained", color="#d62728")
