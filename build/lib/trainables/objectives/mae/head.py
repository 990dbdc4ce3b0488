"""MAE (He et al. 2022): 75% of the patches masked at random per image, the encoder run on the visible patches only,
a light transformer decoder that fills in mask tokens, per-patch normalised pixel targets, and a mean squared error
on the masked patches only. As the official ``MaskedAutoencoderViT``: fixed 2-D sin-cos position embeddings in the
decoder, the mask token and decoder initialised as there, the masking by argsort of uniform noise."""

from __future__ import annotations

from functools import partial

import torch
from timm.models.vision_transformer import Block
from torch import nn

from ...augment import mae_view
from ...model import sincos_pos_embed
from ...scale import decoder_shape
from ..common import Head, head_norm
from ..simmim.head import patchify


class MAE(Head):
    """MIM head: decoder (embedding, mask token, blocks, norm, pixel prediction); see the module docstring.

    ``layer`` is the block whose visible tokens feed the decoder; reading an intermediate block, the head has its
    own LayerNorm (else the encoder's final norm, as MAE's encoder ends in it)."""

    STREAM = 3

    def __init__(self, encoder, img_size: int, layer: int, mask_ratio: float = 0.75, decoder_depth: int = 8,
                 decoder_width: int | None = None, decoder_heads: int | None = None, norm_pix: bool = True):
        super().__init__(encoder, layer)
        self.img_size = img_size
        self.n = encoder.grid**2
        self.keep = int(self.n * (1 - mask_ratio))  # visible patches per image, as MAE's len_keep
        self.norm_pix = norm_pix
        width, heads = decoder_shape(encoder.width, decoder_width, decoder_heads)
        self.norm = head_norm(encoder, layer)
        self.decoder_embed = nn.Linear(encoder.width, width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        self.register_buffer("decoder_pos", sincos_pos_embed(encoder.grid, width), persistent=False)  # (1, 1 + N, D)
        ln = partial(nn.LayerNorm, eps=1e-6)
        self.decoder_blocks = nn.ModuleList(Block(width, heads, mlp_ratio=4.0, qkv_bias=True, norm_layer=ln)
                                            for _ in range(decoder_depth))
        self.decoder_norm = ln(width)
        self.decoder_pred = nn.Linear(width, encoder.patch**2 * 3)
        for m in [self.decoder_embed, *self.decoder_blocks, self.decoder_norm, self.decoder_pred]:
            m.apply(_init)
        nn.init.normal_(self.mask_token, std=0.02)

    @classmethod
    def from_config(cls, encoder, cfg, layer: int) -> MAE:
        """The head for ``cfg`` (its ``objective.mae`` section) reading block ``layer`` of ``encoder``."""
        m = cfg.objective.mae
        return cls(encoder, cfg.model.img_size, layer, m.mask_ratio, m.decoder_depth, m.decoder_width,
                   m.decoder_heads, m.norm_pix)

    def draws(self, batch: dict) -> dict[str, torch.Tensor]:
        """Uniforms: "crop" (B, 5) for the view, "noise" (B, N) whose argsort picks the visible patches."""
        images, gen = batch["images"], self.generator(batch)
        b, dev = images.shape[0], images.device
        return {"crop": torch.rand(b, 5, generator=gen, device=dev),
                "noise": torch.rand(b, self.n, generator=gen, device=dev)}

    def prepare(self, images: torch.Tensor, draws: dict) -> dict:
        """{"view" (B, 3, H, W), "keep" (B, K) visible patch indices, "restore" (B, N) the permutation back to grid
        order, "mask" (B, N) 1 = masked}."""
        shuffle = draws["noise"].argsort(dim=1)  # (B, N): ascending noise, the first K stay visible
        restore = shuffle.argsort(dim=1)
        mask = torch.ones_like(draws["noise"])
        mask[:, :self.keep] = 0
        return {"view": mae_view(images, self.img_size, draws["crop"]), "keep": shuffle[:, :self.keep],
                "restore": restore, "mask": torch.gather(mask, 1, restore)}

    def tokens(self, prep: dict) -> list[torch.Tensor]:
        """The visible patches' tokens only, (B, 1 + K, C): the encoder never sees a mask token."""
        return [self.encoder.embed(prep["view"], keep=prep["keep"])]

    def loss(self, feats: list[torch.Tensor], prep: dict) -> torch.Tensor:
        """MSE on the masked patches. feats [(B, 1 + K, C)] visible tokens at block ``layer`` (not normed)."""
        x = self.decoder_embed((self.encoder.norm if self.norm is None else self.norm)(feats[0]))  # (B, 1 + K, D)
        b, k, d = x.shape[0], x.shape[1] - 1, x.shape[2]
        fill = self.mask_token.to(x.dtype).expand(b, self.n - k, d)  # (B, N - K, D)
        idx = prep["restore"].unsqueeze(-1).expand(-1, -1, d)  # (B, N, D)
        patches = torch.gather(torch.cat([x[:, 1:], fill], dim=1), 1, idx)  # (B, N, D) back in grid order
        x = torch.cat([x[:, :1], patches], dim=1) + self.decoder_pos.to(x.dtype)  # (B, 1 + N, D)
        for blk in self.decoder_blocks:
            x = blk(x)
        pred = self.decoder_pred(self.decoder_norm(x)[:, 1:]).float()  # (B, N, p*p*3), the CLS token dropped
        target = patchify(prep["view"], self.encoder.patch).float()  # (B, N, p*p*3)
        if self.norm_pix:
            mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
            target = (target - mean) / (var + 1e-6) ** 0.5
        per_patch = (pred - target).pow(2).mean(-1)  # (B, N)
        mask = prep["mask"].to(per_patch.dtype)
        return (per_patch * mask).sum() / mask.sum()


def _init(m: nn.Module) -> None:
    """MAE's ``_init_weights``: Xavier-uniform linear weights, zero biases, unit LayerNorms."""
    if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
