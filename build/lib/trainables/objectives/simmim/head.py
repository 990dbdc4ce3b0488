"""SimMIM (Xie et al. 2022): random patch masking with a learnable mask token, a linear decoder to the raw
pixels of each patch, and an L1 loss on the masked patches only."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...augment import simmim_view
from ...scale import default_mask_unit
from ..common import Head, head_norm


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """(B, 3, H, W) -> (B, N, p * p * 3), patches in row-major grid order, pixels (row, col, channel)."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // p, p, w // p, p)  # (B, C, gh, p, gw, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // p) * (w // p), p * p * c)


class SimMIM(Head):
    """MIM head: mask token and linear pixel decoder; the encoder is shared, not owned (see ``Mixture``).

    ``layer`` is the block whose output feeds the decoder (1..depth); reading an intermediate block, the head has
    its own LayerNorm.
    """

    STREAM = 1

    def __init__(self, encoder, img_size: int, layer: int, mask_ratio: float = 0.6, mask_unit: int | None = None):
        super().__init__(encoder, layer)
        self.img_size = img_size
        self.mask_ratio = mask_ratio
        self.unit = mask_unit or default_mask_unit(img_size, encoder.patch)
        self.norm = head_norm(encoder, layer)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, encoder.width))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.decoder = nn.Linear(encoder.width, encoder.patch**2 * 3)

    @classmethod
    def from_config(cls, encoder, cfg, layer: int) -> SimMIM:
        """The head for ``cfg`` (its ``objective.simmim`` section) reading block ``layer`` of ``encoder``."""
        s = cfg.objective.simmim
        return cls(encoder, cfg.model.img_size, layer, s.mask_ratio, s.mask_unit)

    def draws(self, batch: dict) -> dict[str, torch.Tensor]:
        """This step's random numbers (uniforms): "crop" (B, 5) for the view, "mask_noise" (B, U * U) for the mask."""
        images, gen = batch["images"], self.generator(batch)
        b, u = images.shape[0], self.img_size // self.unit
        return {"crop": torch.rand(b, 5, generator=gen, device=images.device),
                "mask_noise": torch.rand(b, u * u, generator=gen, device=images.device)}

    def make_mask(self, noise: torch.Tensor) -> torch.Tensor:
        """Random mask (B, N) over patches from uniforms (B, U * U): the ceil(ratio * U^2) mask units with the
        lowest noise are masked in each image."""
        b, uu = noise.shape
        u = self.img_size // self.unit
        n_mask = int(-(-self.mask_ratio * uu // 1))
        unit_mask = noise.argsort(dim=1).argsort(dim=1) < n_mask  # (B, U*U), rank below n_mask is masked
        s = self.unit // self.encoder.patch  # patches per unit side
        m = unit_mask.view(b, u, u).repeat_interleave(s, 1).repeat_interleave(s, 2)  # (B, G, G)
        return m.reshape(b, -1)

    def prepare(self, images: torch.Tensor, draws: dict) -> dict:
        """{"view": (B, 3, H, W), "mask": (B, N)} of uint8 ``images`` for this step's ``draws``."""
        return {"view": simmim_view(images, self.img_size, draws["crop"]), "mask": self.make_mask(draws["mask_noise"])}

    def tokens(self, prep: dict) -> list[torch.Tensor]:
        """The masked view's tokens (B, 1 + N, C): masked patches replaced by the mask token."""
        return [self.encoder.embed(prep["view"], prep["mask"], self.mask_token)]

    def loss(self, feats: list[torch.Tensor], prep: dict) -> torch.Tensor:
        """L1 reconstruction of masked patches. feats [(B, 1 + N, C)] tokens at block ``layer`` (not normed)."""
        view, mask = prep["view"], prep["mask"]
        x = (self.encoder.norm if self.norm is None else self.norm)(feats[0])
        pred = self.decoder(x[:, 1:])  # (B, N, p*p*3)
        target = patchify(view, self.encoder.patch)  # (B, N, p*p*3)
        per_patch = F.l1_loss(pred.float(), target.float(), reduction="none").mean(-1)  # (B, N)
        w = mask.to(per_patch.dtype)
        return (per_patch * w).sum() / w.sum().clamp(min=1.0)
