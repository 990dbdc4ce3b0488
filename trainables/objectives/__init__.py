"""Training objectives. Each file holds one objective with one contract (``common.Head``): ``draws``, ``prepare``,
``tokens``, ``loss``; standalone, ``forward(batch) -> {"loss": tensor}`` where ``batch = {"images": uint8
(B, 3, S, S), "seed": int}``.

``build_objective`` always returns the ``Hybrid`` composition, which builds and computes only the objectives with a
non-zero weight in ``objective.weights`` (lam = 0 is pure SimMIM, lam = 1 pure MoCo v3).
"""

from .dino import DINO
from .hybrid import Hybrid, build_objective
from .mae import MAE
from .mocov3 import MoCoV3
from .simmim import SimMIM

__all__ = ["DINO", "MAE", "Hybrid", "MoCoV3", "SimMIM", "build_objective"]
