"""The encoder: a timm ``VisionTransformer`` built from the scale table, plus the one documented way to get
per-block token states (``intermediates``) and attention maps for analysis (``attention_maps``).

Training uses timm's fused scaled-dot-product attention untouched; ``attention_maps`` recomputes softmax(QK^T)
explicitly from each block's own qkv projection, so analysis never changes the training path.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from .scale import MLP_RATIO, VariantSpec, parse_variant


def sincos_pos_embed(grid: int, width: int, temperature: float = 10000.0) -> torch.Tensor:
    """MoCo v3's fixed 2-D sin-cos position embedding, (1, 1 + grid^2, width), zeros for the CLS token.

    A patch at grid row y, column x gets [sin(x w), cos(x w), sin(y w), cos(y w)] with width / 4 frequencies
    w_i = temperature^(-i / (width / 4)); patches in row-major order as everywhere else."""
    if width % 4:
        raise ValueError(f"the sin-cos position embedding needs a width divisible by 4, got {width}")
    d = width // 4
    omega = 1.0 / temperature ** (torch.arange(d, dtype=torch.float64) / d)  # (d,)
    ys, xs = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64),
                            indexing="ij")  # (grid, grid) each
    out_x = xs.flatten()[:, None] * omega[None]  # (grid^2, d)
    out_y = ys.flatten()[:, None] * omega[None]
    pe = torch.cat([out_x.sin(), out_x.cos(), out_y.sin(), out_y.cos()], dim=1)  # (grid^2, width)
    return torch.cat([torch.zeros(1, width, dtype=torch.float64), pe]).float()[None]


class ViT(nn.Module):
    """A ViT encoder with a CLS token and position embeddings; no classification head.

    Token layout everywhere: (B, 1 + N, C) with the CLS token first and N = (img_size / patch)^2 patch tokens in
    row-major grid order.

    ``pos_embed``: "learned" (timm's trainable embedding) or "sincos" (MoCo v3's fixed 2-D sin-cos embedding, not
    a parameter that trains). ``patch_embed``: "trained", or "frozen" (MoCo v3's random patch projection: Xavier-
    uniform init, zero bias, never updated; it stabilises contrastive training of ViTs).
    """

    def __init__(self, variant: str = "micro/4", img_size: int = 32, drop_path: float = 0.0,
                 pos_embed: str = "learned", patch_embed: str = "trained"):
        super().__init__()
        self.spec: VariantSpec = parse_variant(variant)
        self.img_size = img_size
        self.vit = VisionTransformer(
            img_size=img_size,
            patch_size=self.spec.patch,
            embed_dim=self.spec.width,
            depth=self.spec.depth,
            num_heads=self.spec.heads,
            mlp_ratio=MLP_RATIO,
            qkv_bias=True,
            num_classes=0,
            drop_path_rate=drop_path,
        )
        if pos_embed == "sincos":
            self.vit.pos_embed.data.copy_(sincos_pos_embed(self.grid, self.spec.width))
            self.vit.pos_embed.requires_grad_(False)
        elif pos_embed != "learned":
            raise ValueError(f"pos_embed: {pos_embed!r} is not 'learned' or 'sincos'")
        if patch_embed == "frozen":
            proj = self.vit.patch_embed.proj  # Conv2d(3, C, p, stride p)
            bound = math.sqrt(6.0 / float(3 * self.spec.patch**2 + self.spec.width))
            nn.init.uniform_(proj.weight, -bound, bound)
            nn.init.zeros_(proj.bias)
            proj.requires_grad_(False)
        elif patch_embed != "trained":
            raise ValueError(f"patch_embed: {patch_embed!r} is not 'trained' or 'frozen'")

    @property
    def blocks(self) -> nn.ModuleList:
        return self.vit.blocks

    @property
    def norm(self) -> nn.Module:
        return self.vit.norm

    @property
    def depth(self) -> int:
        return self.spec.depth

    @property
    def width(self) -> int:
        return self.spec.width

    @property
    def patch(self) -> int:
        return self.spec.patch

    @property
    def grid(self) -> int:
        return self.img_size // self.spec.patch

    def embed(self, images: torch.Tensor, mask: torch.Tensor | None = None,
              mask_token: torch.Tensor | None = None, keep: torch.Tensor | None = None) -> torch.Tensor:
        """Patch-embed ``images`` (B, 3, H, W) into tokens (B, 1 + N, C) with CLS and position embeddings.

        If ``mask`` (B, N) is given, masked patch embeddings are replaced by ``mask_token`` (1, 1, C) before the
        position embedding is added (SimMIM). If ``keep`` (B, K) patch indices are given, only those patches stay
        after the position embedding: (B, 1 + K, C) (MAE's visible tokens). Images of another size than
        ``img_size`` (DINO's local crops) get the position embedding interpolated to their grid.
        """
        if images.shape[-1] != self.img_size:
            return self._embed_resized(images)
        x = self.vit.patch_embed(images)  # (B, N, C)
        if mask is not None:
            w = mask.unsqueeze(-1).to(x.dtype)  # (B, N, 1)
            x = x * (1 - w) + mask_token.to(x.dtype) * w
        x = self.vit._pos_embed(x)  # (B, 1 + N, C)
        if keep is not None:
            idx = keep.unsqueeze(-1).expand(-1, -1, x.shape[-1])  # (B, K, C)
            x = torch.cat([x[:, :1], torch.gather(x[:, 1:], 1, idx)], dim=1)  # (B, 1 + K, C)
        return self.vit.norm_pre(self.vit.patch_drop(x))

    def _embed_resized(self, images: torch.Tensor) -> torch.Tensor:
        """Tokens (B, 1 + n, C) of images whose side is not ``img_size``: the patch position embedding (a G x G
        grid) is resized bicubically to the images' n = g x g grid, as DINO's ``interpolate_pos_encoding``."""
        pe, g = self.vit.patch_embed, images.shape[-1] // self.patch
        x = pe.norm(pe.proj(images).flatten(2).transpose(1, 2))  # (B, C, g, g) -> (B, g * g, C)
        pos = self.vit.pos_embed  # (1, 1 + G * G, C)
        grid = pos[:, 1:].reshape(1, self.grid, self.grid, -1).permute(0, 3, 1, 2)  # (1, C, G, G)
        grid = F.interpolate(grid.float(), size=(g, g), mode="bicubic", align_corners=False).to(pos.dtype)
        patch_pos = grid.permute(0, 2, 3, 1).reshape(1, g * g, -1)  # (1, g * g, C)
        cls = (self.vit.cls_token + pos[:, :1]).expand(x.shape[0], -1, -1)  # (B, 1, C)
        x = torch.cat([cls, x + patch_pos], dim=1)  # (B, 1 + g * g, C)
        return self.vit.norm_pre(self.vit.patch_drop(x))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Final token states (B, 1 + N, C): all blocks, then the final norm."""
        x = self.embed(images)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def intermediates(self, images: torch.Tensor, mask: torch.Tensor | None = None,
                      mask_token: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Per-layer token states: element 0 is the embedding output, element k the output of block k.

        Each is (B, 1 + N, C), before the final norm; ``self.norm(out[-1])`` equals ``self(images)``.
        This is the one way analysis reads intermediate tokens.
        """
        x = self.embed(images, mask, mask_token)
        out = [x]
        for blk in self.blocks:
            x = blk(x)
            out.append(x)
        return out

    @torch.no_grad()
    def attention_maps(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Softmax attention of every block, a list of ``depth`` tensors (B, heads, 1 + N, 1 + N).

        Computed explicitly (non-fused) from each block's qkv projection of its normed input; the block
        itself is then run as in training to produce the next block's input.
        """
        x = self.embed(images)
        maps = []
        for blk in self.blocks:
            attn = blk.attn
            b, t, c = x.shape
            h = attn.num_heads
            qkv = attn.qkv(blk.norm1(x)).reshape(b, t, 3, h, c // h).permute(2, 0, 3, 1, 4)  # (3, B, h, T, d)
            q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
            maps.append(F.softmax((q * attn.scale) @ k.transpose(-2, -1), dim=-1, dtype=torch.float32))
            x = blk(x)
        return maps


def param_groups(module: nn.Module, scale, weight_decay: float = 0.0) -> list[dict]:
    """The AdamW groups of every phase: the trainable parameters of ``module`` grouped by ``scale(name, param,
    decay) -> (order, lr_mult)`` and by weight decay or not (``no_weight_decay_names``), in ``order``; each group
    {"params", "decay", "lr_mult" (the trainer multiplies each step's lr by it), "weight_decay"}. Pre-training's
    lr-ratio graft and fine-tuning's layer-wise lr decay are both such a scale."""
    skip = no_weight_decay_names(module)
    groups: dict = {}
    for name, p in module.named_parameters():
        if p.requires_grad:
            decay = name not in skip
            order, mult = scale(name, p, decay)
            groups.setdefault((order, decay), (mult, []))[1].append(p)
    return [{"params": ps, "decay": decay, "lr_mult": mult, "weight_decay": weight_decay if decay else 0.0}
            for (_, decay), (mult, ps) in sorted(groups.items(), key=lambda kv: kv[0])]


def no_weight_decay_names(module: nn.Module) -> set[str]:
    """Parameter names that get no weight decay: biases, norms, tokens and position embeddings."""
    names = set()
    for name, p in module.named_parameters():
        if p.ndim <= 1 or name.endswith(("cls_token", "pos_embed", "mask_token")):
            names.add(name)
    return names
