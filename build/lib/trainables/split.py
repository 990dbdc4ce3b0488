"""An in-memory labelled split: the one type both the generated / decoded data sets (``data.py``) and a subset
read from a sharded store (``store.py``) hand to the trainer and the probes."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Split:
    """An in-memory labelled split: uint8 images (N, 3, S, S) and int64 labels (N,)."""

    images: torch.Tensor
    labels: torch.Tensor
    masks: torch.Tensor | None = None  # uint8 (N, S, S): 1 + class on the object's pixels, 0 on the background

    def __len__(self) -> int:
        return len(self.labels)

    def _take(self, t: torch.Tensor) -> Split:
        return Split(self.images[t], self.labels[t], None if self.masks is None else self.masks[t])

    def select(self, idx: np.ndarray) -> Split:
        """The items at ``idx``."""
        return self._take(torch.from_numpy(np.asarray(idx, dtype=np.int64)))

    def subset(self, n: int, seed: int) -> Split:
        """A fixed, seeded subset of at most n items (the same for every trial with the same seed)."""
        if n >= len(self):
            return self
        return self._take(torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))[:n])
