"""MoCo v3 (Chen, Xie, He 2021): two augmented views, a momentum (EMA) encoder, projector and predictor MLPs,
and a symmetric InfoNCE loss with temperature 0.2, keys gathered over all DDP ranks. As the official ``MoCo_ViT``:
a 3-layer projector and a 2-layer predictor, both ending in an affine-free BatchNorm, whose batch statistics are
those of the global batch under DDP (``GlobalBatchNorm1d``)."""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ...augment import moco_draws, moco_views
from ..common import GlobalBatchNorm1d, Head, head_norm, run_blocks, target_encoder


def build_mlp(layers: int, d_in: int, d_hidden: int, d_out: int, last_bn: bool = True) -> nn.Sequential:
    """MoCo v3's MLP: Linear-BN-ReLU blocks, then Linear (+ BN without affine: the ViT projector and predictor
    both have it)."""
    mods: list[nn.Module] = []
    for i in range(layers):
        a = d_in if i == 0 else d_hidden
        b = d_out if i == layers - 1 else d_hidden
        mods.append(nn.Linear(a, b, bias=False))
        if i < layers - 1:
            mods += [GlobalBatchNorm1d(b), nn.ReLU(inplace=True)]
        elif last_bn:
            mods.append(GlobalBatchNorm1d(b, affine=False))
    return nn.Sequential(*mods)


@torch.no_grad()
def gather(x: torch.Tensor) -> torch.Tensor:
    """All ranks' rows concatenated (no gradient); identity without a process group."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out)


def contrastive_loss(q: torch.Tensor, k: torch.Tensor, temperature: float) -> torch.Tensor:
    """InfoNCE of queries q (B, D) against all ranks' keys; positives are the same image's key."""
    q = F.normalize(q.float(), dim=1)
    k = F.normalize(gather(k).float(), dim=1)  # (world * B, D)
    logits = q @ k.T / temperature  # (B, world * B)
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    labels = torch.arange(q.shape[0], device=q.device) + q.shape[0] * rank
    return F.cross_entropy(logits, labels) * (2 * temperature)


class MoCoV3(Head):
    """CL head: projector, predictor and the momentum copy of (encoder, projector).

    The online encoder is shared, not owned (see ``Mixture``). ``layer`` is the block whose CLS output feeds the
    projector (1..depth); the momentum encoder reads the same block. Reading an intermediate block, the head has
    its own LayerNorm (and its momentum copy).
    """

    STREAM = 2

    def __init__(self, encoder, img_size: int, layer: int, proj_dim: int = 256, proj_hidden: int | None = None,
                 temperature: float = 0.2):
        super().__init__(encoder, layer)
        self.img_size = img_size
        self.temperature = temperature
        hidden = proj_hidden or min(4096, 8 * encoder.width)
        self.norm = head_norm(encoder, layer)
        self.projector = build_mlp(3, encoder.width, hidden, proj_dim)
        self.predictor = build_mlp(2, proj_dim, hidden, proj_dim)
        momentum = {"encoder": target_encoder(encoder), "projector": copy.deepcopy(self.projector)}
        if self.norm is not None:
            momentum["norm"] = copy.deepcopy(self.norm)
        self.momentum = nn.ModuleDict(momentum)
        self.momentum.requires_grad_(False)

    @classmethod
    def from_config(cls, encoder, cfg, layer: int) -> MoCoV3:
        """The head for ``cfg`` (its ``objective.mocov3`` section) reading block ``layer`` of ``encoder``."""
        m = cfg.objective.mocov3
        return cls(encoder, cfg.model.img_size, layer, m.proj_dim, m.proj_hidden, m.temperature)

    def online_params(self) -> list[torch.Tensor]:
        """Online parameters in the order of ``self.momentum.parameters()``."""
        norm = [] if self.norm is None else list(self.norm.parameters())
        return [*self.encoder.parameters(), *self.projector.parameters(), *norm]

    def _normed(self, tokens: torch.Tensor, momentum: bool = False) -> torch.Tensor:
        """This head's LayerNorm of tokens (B, 1 + N, C) from block ``layer`` (online or momentum copy)."""
        if self.norm is None:
            return (self.momentum["encoder"] if momentum else self.encoder).norm(tokens)
        return (self.momentum["norm"] if momentum else self.norm)(tokens)

    @torch.no_grad()
    def momentum_update(self, values: dict[str, float]) -> None:
        """EMA: momentum <- m * momentum + (1 - m) * online, for encoder and projector; m = values["momentum"]."""
        m = values["momentum"]
        torch._foreach_lerp_(list(self.momentum.parameters()), self.online_params(), 1.0 - m)

    def draws(self, batch: dict) -> torch.Tensor:
        """This step's random numbers for both views, (2, B, MOCO_DRAWS) uniforms."""
        images = batch["images"]
        return moco_draws(images.shape[0], self.generator(batch), images.device)

    def prepare(self, images: torch.Tensor, draws: torch.Tensor) -> dict:
        """{"views": the two augmented views (2B, 3, H, W) of uint8 ``images``, view 1 first}."""
        return {"views": moco_views(images, self.img_size, draws)}

    def tokens(self, prep: dict) -> list[torch.Tensor]:
        """Both views' tokens (2B, 1 + N, C)."""
        return [self.encoder.embed(prep["views"])]

    def project(self, cls: torch.Tensor, proj: nn.Module) -> torch.Tensor:
        # MoCo v3 passes each view through the MLP on its own, so BatchNorm statistics are per view.
        return torch.cat([proj(c) for c in cls.chunk(2)])

    def loss(self, feats: list[torch.Tensor], prep: dict) -> torch.Tensor:
        """Symmetric InfoNCE. feats [(2B, 1 + N, C)] online tokens of both views at block ``layer`` (not normed)."""
        views = prep["views"]
        q = self.project(self._normed(feats[0])[:, 0], lambda c: self.predictor(self.projector(c)))  # (2B, D)
        with torch.no_grad():
            enc = self.momentum["encoder"]
            keys = self._normed(run_blocks(enc, enc.embed(views), self.layer), momentum=True)  # (2B, 1 + N, C)
            k = self.project(keys[:, 0], self.momentum["projector"])
        q1, q2 = q.chunk(2)
        k1, k2 = k.chunk(2)
        t = self.temperature
        return contrastive_loss(q1, k2, t) + contrastive_loss(q2, k1, t)
