"""SimMIM (Xie et al. 2022): random patch masking with a learnable mask token, a linear decoder to the raw
pixels of each patch, and an L1 loss on the masked patches only."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..augment import simmim_view
from .common import generator, run_blocks


def default_mask_unit(img_size: int, patch: int) -> int:
    """Mask unit in pixels, scaled to the image: ~1/7 of the side (32 px at 224, as SimMIM at 192), rounded to
    a multiple of the patch size that divides the image."""
    mult = max(1, round(img_size / (7 * patch)))
    while mult > 1 and img_size % (mult * patch):
        mult -= 1
    return mult * patch


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """(B, 3, H, W) -> (B, N, p * p * 3), patches in row-major grid order, pixels (row, col, channel)."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // p, p, w // p, p)  # (B, C, gh, p, gw, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // p) * (w // p), p * p * c)


class SimMIM(nn.Module):
    """MIM head: mask token and linear pixel decoder; the encoder is shared, not owned (see ``Hybrid``).

    ``layer`` is the block whose output feeds the decoder (1..depth).
    """

    def __init__(self, encoder, img_size: int, layer: int, mask_ratio: float = 0.6, mask_unit: int | None = None):
        super().__init__()
        self._encoder = (encoder,)  # a reference, not a submodule: the encoder's parameters belong to the owner
        self.layer = layer
        self.img_size = img_size
        self.mask_ratio = mask_ratio
        self.unit = mask_unit or default_mask_unit(img_size, encoder.patch)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, encoder.width))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.decoder = nn.Linear(encoder.width, encoder.patch**2 * 3)

    @property
    def encoder(self):
        return self._encoder[0]

    def make_mask(self, batch: int, gen: torch.Generator, device) -> torch.Tensor:
        """Random mask (B, N) over patches: exactly ceil(ratio * U^2) of the U x U mask units per image."""
        u = self.img_size // self.unit
        n_mask = int(-(-self.mask_ratio * u * u // 1))
        noise = torch.rand(batch, u * u, generator=gen, device=device)
        unit_mask = noise.argsort(dim=1).argsort(dim=1) < n_mask  # (B, U*U), rank below n_mask is masked
        s = self.unit // self.encoder.patch  # patches per unit side
        m = unit_mask.view(batch, u, u).repeat_interleave(s, 1).repeat_interleave(s, 2)  # (B, G, G)
        return m.reshape(batch, -1)

    def inputs(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(view (B, 3, H, W), mask (B, N)) for this step, from the step's seed."""
        images = batch["images"]
        gen = generator(images.device, batch["seed"], stream=1)
        view = simmim_view(images, self.img_size, gen)
        return view, self.make_mask(images.shape[0], gen, images.device)

    def loss(self, feats: torch.Tensor, view: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """L1 reconstruction of masked patches. feats (B, 1 + N, C) normed tokens at ``layer``."""
        pred = self.decoder(feats[:, 1:])  # (B, N, p*p*3)
        target = patchify(view, self.encoder.patch)  # (B, N, p*p*3)
        per_patch = F.l1_loss(pred.float(), target.float(), reduction="none").mean(-1)  # (B, N)
        w = mask.to(per_patch.dtype)
        return (per_patch * w).sum() / w.sum().clamp(min=1.0)

    def forward(self, batch: dict) -> dict:
        """Standalone SimMIM step: {"loss": L1 on masked patches}."""
        view, mask = self.inputs(batch)
        h = self.encoder.embed(view, mask, self.mask_token)
        return {"loss": self.loss(run_blocks(self.encoder, h, self.layer), view, mask)}
