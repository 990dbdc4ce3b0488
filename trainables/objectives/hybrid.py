"""Hybrid CL + MIM objective with layer-wise placement: ``L = (1 - lam) * L_MIM + lam * L_CL``.

The MIM view (B rows, masked) and the two CL views (2B rows) go through the shared encoder as one batch of
3B rows, so every matmul is one big one; rows are split off after the block each objective reads:

- ``mim_layer``: the block whose output feeds the SimMIM decoder;
- ``cl_layer``: the block whose output feeds the MoCo v3 projector;
- ``graft_layer`` g (Layer Grafted Pre-training, Jiang et al. 2023): the CL rows are detached after block g, so
  blocks 1..g learn only from MIM; MIM reads block g, so blocks g+1..depth learn only from CL.
- ``graft_layer`` g with ``graft_lr_ratio`` r: the lr-ratio form of Layer Grafted Pre-training. CL is not detached
  (it reaches every block) and blocks 1..g plus the embedding train at r x lr (the trainer's parameter groups),
  as the paper's CL stage does for its MIM-initialised lower layers (r = 0.1 there). Here both losses train at
  once rather than in two stages.

Heads reading an intermediate block have their own LayerNorm; the encoder's final norm belongs to block depth.

At lam = 0 or 1 the unused branch is not built and not computed.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import Config, resolve_placement
from ..model import ViT
from ..scale import block_flops, embed_flops, mlp_head_flops, parse_variant
from .mocov3 import MoCoV3
from .simmim import SimMIM


class Hybrid(nn.Module):
    """Owns the encoder and whichever heads ``lam`` needs; see the module docstring."""

    def __init__(self, encoder: ViT, cfg: Config):
        super().__init__()
        o = cfg.objective
        self.encoder = encoder
        self.lam = o.lam
        self.mim_layer, self.cl_layer, self.graft_layer = resolve_placement(cfg)
        self.detach_below_graft = self.graft_layer is not None and o.placement.graft_lr_ratio is None
        size = cfg.model.img_size
        self.mim = SimMIM(encoder, size, self.mim_layer, o.mask_ratio, o.mask_unit) if o.lam < 1 else None
        self.cl = (MoCoV3(encoder, size, self.cl_layer, o.proj_dim, o.proj_hidden, o.temperature)
                   if o.lam > 0 else None)

    def momentum_update(self, m: float) -> None:
        """EMA step of the momentum encoder (a no-op without the CL branch)."""
        if self.cl is not None:
            self.cl.momentum_update(m)

    def has_unused_params(self) -> bool:
        """True if some trainable encoder parameter gets no gradient (DDP must then look for unused parameters).
        The config forbids placements that leave a block untrained; the final norm is unused when no head reads
        the last block."""
        read = max(self.mim_layer if self.mim else 0, self.cl_layer if self.cl else 0)
        return read < self.encoder.depth

    def lower_parameters(self) -> set[int]:
        """ids of the parameters of blocks 1..graft_layer and the embedding (patch projection, CLS token,
        position embedding): the ones ``graft_lr_ratio`` slows down. Empty without the ratio."""
        if self.graft_layer is None or self.detach_below_graft:
            return set()
        enc = self.encoder.vit
        mods = [enc.patch_embed, *self.encoder.blocks[:self.graft_layer]]
        params = [p for m in mods for p in m.parameters()] + [enc.cls_token, enc.pos_embed]
        return {id(p) for p in params}

    def _route(self, h: torch.Tensor, n_mim: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Run rows [MIM (n_mim) | CL (rest)] of h (3B, T, C) through the blocks; return each group's tokens
        at its own layer (not normed: each head applies its own norm). Rows leave the batch once their layer is
        read."""
        need_mim, need_cl = n_mim > 0, h.shape[0] > n_mim
        last = max(self.mim_layer if need_mim else 0, self.cl_layer if need_cl else 0)
        mim_out = cl_out = None
        for k in range(1, last + 1):
            h = self.encoder.blocks[k - 1](h)
            if need_mim and k == self.mim_layer:
                mim_out, h, n_mim, need_mim = h[:n_mim], h[n_mim:], 0, False
            if need_cl and k == self.cl_layer:
                cl_out, h, need_cl = h[n_mim:], h[:n_mim], False
        return mim_out, cl_out

    def _grafted(self, view, mask, views) -> tuple[torch.Tensor, torch.Tensor]:
        """Graft mode: MIM rows through blocks 1..mim_layer; CL rows through blocks 1..g without autograd (so CL
        sends no gradient, and costs no backward, below g), then g+1..cl_layer with it."""
        enc, g = self.encoder, self.graft_layer
        mim_feats = self._blocks(enc.embed(view, mask, self.mim.mask_token), 0, self.mim_layer)
        with torch.no_grad():
            h = self._blocks(enc.embed(views), 0, g)
        return mim_feats, self._blocks(h, g, self.cl_layer)

    def _blocks(self, h: torch.Tensor, start: int, end: int) -> torch.Tensor:
        for blk in self.encoder.blocks[start:end]:
            h = blk(h)
        return h

    def draws(self, batch: dict) -> dict[str, torch.Tensor]:
        """Every random number of the step for ``batch`` ({"images", "seed"}), drawn from seeded generators."""
        out = {}
        if self.mim is not None:
            out["mim"] = self.mim.draws(batch)
        if self.cl is not None:
            out["cl"] = self.cl.draws(batch)
        return out

    def forward(self, batch: dict) -> dict:
        """{"loss", "loss_mim" (if lam < 1), "loss_cl" (if lam > 0)}; per-branch losses keep their graph.

        ``batch`` is {"images": uint8 (B, 3, S, S), "seed": int}; the step is a pure function of the images and
        the seed's random draws.
        """
        return self.step(batch["images"], self.draws(batch))

    def step(self, images: torch.Tensor, draws: dict) -> dict:
        """The training step's forward from uint8 images and their random draws: augmentation, masking, encoder,
        heads and losses. Pure tensor code without generators, so ``run.compile`` compiles it as one graph."""
        view = mask = views = None
        if self.mim is not None:
            view, mask = self.mim.inputs(images, draws["mim"])  # (B, 3, H, W), (B, N)
        if self.cl is not None:
            views = self.cl.views(images, draws["cl"])  # (2B, 3, H, W)
        if self.detach_below_graft:
            mim_feats, cl_feats = self._grafted(view, mask, views)
        elif views is None:
            mim_feats, cl_feats = self._route(self.encoder.embed(view, mask, self.mim.mask_token), len(view))
        elif view is None:
            mim_feats, cl_feats = self._route(self.encoder.embed(views), 0)
        else:
            # One batch of 3B rows; CL rows get an all-False mask so they keep their patch embeddings.
            full_mask = torch.cat([mask, mask.new_zeros(len(views), mask.shape[1])])  # (3B, N)
            h = self.encoder.embed(torch.cat([view, views]), full_mask, self.mim.mask_token)
            mim_feats, cl_feats = self._route(h, len(view))
        out, loss = {}, 0.0
        if self.mim is not None:
            out["loss_mim"] = self.mim.loss(mim_feats, view, mask)
            loss = loss + (1 - self.lam) * out["loss_mim"]
        if self.cl is not None:
            out["loss_cl"] = self.cl.loss(cl_feats, views)
            loss = loss + self.lam * out["loss_cl"]
        out["loss"] = loss
        return out


def build_objective(cfg: Config) -> Hybrid:
    """The encoder for ``cfg.model`` wrapped in the objective for ``cfg.objective``."""
    m = cfg.model
    return Hybrid(ViT(m.variant, m.img_size, m.drop_path, m.pos_embed, m.patch_embed), cfg)


def train_flops_per_image(cfg: Config) -> float:
    """Matmul FLOPs of one training step per image (forward + backward, momentum forward), counted as
    ``torch.utils.flop_counter`` does: backward costs twice the forward, except the patch embedding whose input
    (the image) needs no gradient, and none at all when it is frozen, and blocks below a hard graft_layer, which
    the CL rows only run forward."""
    spec = parse_variant(cfg.model.variant)
    size, o = cfg.model.img_size, cfg.objective
    fe, fb = embed_flops(spec, size), block_flops(spec, size)
    mim, cl, g = resolve_placement(cfg)
    n = (size // spec.patch) ** 2
    total = 0.0
    eb = 0.0 if cfg.model.patch_embed == "frozen" else fe  # the patch projection's weight gradient
    if o.lam < 1:
        dec = 2.0 * n * spec.width * spec.patch**2 * 3
        total += fe + eb + 3 * (mim * fb + dec)
    if o.lam > 0:
        hidden = o.proj_hidden or min(4096, 8 * spec.width)
        proj = mlp_head_flops([spec.width, hidden, hidden, o.proj_dim])
        pred = mlp_head_flops([o.proj_dim, hidden, o.proj_dim])
        frozen = g if g is not None and o.placement.graft_lr_ratio is None else 0  # CL rows: forward only
        online = fe + frozen * fb + 3 * ((cl - frozen) * fb + proj + pred) + (0 if frozen else eb)
        total += 2 * online + 2 * (fe + cl * fb + proj)  # two views; momentum encoder forward on both
    return total
