"""Small helpers shared by the objectives."""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.nn.functional import all_reduce


def generator(device: torch.device, seed: int, stream: int) -> torch.Generator:
    """A generator on ``device`` for one random stream of one step (streams keep branches independent)."""
    g = torch.Generator(device=device)
    g.manual_seed((seed * 16 + stream) % (2**63))
    return g


def run_blocks(encoder, h: torch.Tensor, layer: int) -> torch.Tensor:
    """Run tokens (B, T, C) through blocks 1..layer (no norm: each head applies its own, see ``head_norm``)."""
    for blk in encoder.blocks[:layer]:
        h = blk(h)
    return h


def head_norm(encoder, layer: int) -> nn.LayerNorm | None:
    """The LayerNorm of a head reading block ``layer``: None (use the encoder's final norm) for the last block,
    a head-owned one for an intermediate block, so heads reading different depths never share a norm."""
    return None if layer == encoder.depth else nn.LayerNorm(encoder.width, eps=1e-6)


def target_encoder(encoder) -> nn.Module:
    """An EMA target's copy of ``encoder`` (MoCo v3's momentum encoder, DINO's teacher) without stochastic depth:
    the official targets have none (DINO builds its teacher with drop_path_rate 0; MoCo v3 uses no drop path at
    all), and a target in train mode would otherwise drop blocks at random, two calls on one input differing."""
    target = copy.deepcopy(encoder)
    for blk in target.blocks:
        blk.drop_path1, blk.drop_path2 = nn.Identity(), nn.Identity()
    return target


class Head(nn.Module):
    """One objective's head on a shared encoder (the encoder belongs to ``Mixture``, not to the head). The one
    contract every objective file follows, so ``Mixture`` routes any mix the same way:

    - ``draws(batch)``: every random number of the step, from the step's seeded generator (stream ``STREAM``);
    - ``prepare(images, draws)``: views, masks and whatever else the loss needs (pure tensor code);
    - ``tokens(prep)``: the embedded token batches (rows, T, C) the encoder runs through blocks 1..``layer``;
    - ``loss(feats, prep)``: the loss from those batches' tokens at block ``layer`` (not normed);
    - ``from_config(encoder, cfg, layer)``: the head as a config's ``objective.<name>`` section sets it.

    An EMA copy of the encoder that evaluations may read (its declaration's ``target``) is ``self.<target>
    ["encoder"]``, and a head with one steps it in ``momentum_update(values)`` from its schedules' values.
    """

    STREAM = 0

    def __init__(self, encoder, layer: int):
        super().__init__()
        self._encoder = (encoder,)  # a reference, not a submodule: the encoder's parameters belong to the owner
        self.layer = layer

    @property
    def encoder(self):
        return self._encoder[0]

    @classmethod
    def from_config(cls, encoder, cfg, layer: int) -> Head:
        raise NotImplementedError(f"{cls.__name__}.from_config")

    def generator(self, batch: dict) -> torch.Generator:
        """This step's generator for this objective (its own stream: draws do not depend on the mix)."""
        return generator(batch["images"].device, batch["seed"], self.STREAM)

    def forward(self, batch: dict) -> dict:
        """The objective alone on ``batch`` ({"images", "seed", ...}): {"loss": tensor}."""
        prep = self.prepare(batch["images"], self.draws(batch))
        feats = [run_blocks(self.encoder, t, self.layer) for t in self.tokens(prep)]
        return {"loss": self.loss(feats, prep)}


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class GlobalBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm over the global batch of all DDP ranks, on any device (MoCo v3 always uses SyncBatchNorm;
    torch's ``SyncBatchNorm`` runs on GPUs only). One process: exactly ``nn.BatchNorm1d``.

    The per-feature sum and sum of squares go through the differentiable all-reduce, so the backward pass also
    sums every rank's gradient of the shared statistics, as ``SyncBatchNorm`` does.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        world = _world()
        if not self.training or world == 1:
            return super().forward(x)

        c = x.shape[1]
        xf = x.float()
        stats = all_reduce(torch.cat([xf.sum(0), (xf * xf).sum(0)]))  # (2C,) summed over ranks
        count = x.shape[0] * world
        mean = stats[:c] / count
        var = (stats[c:] / count - mean * mean).clamp_min(0.0)  # biased, as BatchNorm normalises with
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                self.running_mean.lerp_(mean.detach(), self.momentum)
                self.running_var.lerp_(var.detach() * count / max(count - 1, 1), self.momentum)
        y = (xf - mean) * torch.rsqrt(var + self.eps)
        if self.affine:
            y = y * self.weight + self.bias
        return y.to(x.dtype)
