"""Training objectives. Each file holds one objective with one contract:
``forward(batch) -> {"loss": tensor, **scalars}`` where ``batch = {"images": uint8 (B, 3, S, S), "seed": int}``.

``build_objective`` always returns the ``Hybrid`` composition, which computes only the branches its
``lam`` needs (lam = 0 is pure SimMIM, lam = 1 pure MoCo v3).
"""

from .hybrid import Hybrid, build_objective, train_flops_per_image
from .mocov3 import MoCoV3
from .simmim import SimMIM

__all__ = ["Hybrid", "MoCoV3", "SimMIM", "build_objective", "train_flops_per_image"]
