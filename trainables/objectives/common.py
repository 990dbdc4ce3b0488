"""Small helpers shared by the objectives."""

from __future__ import annotations

import torch


def generator(device: torch.device, seed: int, stream: int) -> torch.Generator:
    """A generator on ``device`` for one random stream of one step (streams keep branches independent)."""
    g = torch.Generator(device=device)
    g.manual_seed((seed * 16 + stream) % (2**63))
    return g


def run_blocks(encoder, h: torch.Tensor, layer: int) -> torch.Tensor:
    """Run tokens (B, T, C) through blocks 1..layer and apply the final norm."""
    for blk in encoder.blocks[:layer]:
        h = blk(h)
    return encoder.norm(h)
