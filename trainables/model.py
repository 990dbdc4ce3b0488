"""The encoder: a timm ``VisionTransformer`` built from the scale table, plus the one documented way to get
per-block token states (``intermediates``) and attention maps for analysis (``attention_maps``).

Training uses timm's fused scaled-dot-product attention untouched; ``attention_maps`` recomputes softmax(QK^T)
explicitly from each block's own qkv projection, so analysis never changes the training path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from .scale import MLP_RATIO, VariantSpec, parse_variant


class ViT(nn.Module):
    """A ViT encoder with a CLS token and learnable position embeddings; no classification head.

    Token layout everywhere: (B, 1 + N, C) with the CLS token first and N = (img_size / patch)^2 patch tokens in
    row-major grid order.
    """

    def __init__(self, variant: str = "micro/4", img_size: int = 32, drop_path: float = 0.0):
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
              mask_token: torch.Tensor | None = None) -> torch.Tensor:
        """Patch-embed ``images`` (B, 3, H, W) into tokens (B, 1 + N, C) with CLS and position embeddings.

        If ``mask`` (B, N) is given, masked patch embeddings are replaced by ``mask_token`` (1, 1, C) before the
        position embedding is added (SimMIM).
        """
        x = self.vit.patch_embed(images)  # (B, N, C)
        if mask is not None:
            w = mask.unsqueeze(-1).to(x.dtype)  # (B, N, 1)
            x = x * (1 - w) + mask_token.to(x.dtype) * w
        x = self.vit._pos_embed(x)  # (B, 1 + N, C)
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


def no_weight_decay_names(module: nn.Module) -> set[str]:
    """Parameter names that get no weight decay: biases, norms, tokens and position embeddings."""
    names = set()
    for name, p in module.named_parameters():
        if p.ndim <= 1 or name.endswith(("cls_token", "pos_embed", "mask_token")):
            names.add(name)
    return names
