"""What every training phase's step loop shares (pre-training, each stage, fine-tuning): setting the optimiser's
per-step lr and weight decay on its groups, and the one host sync of a log step, where the logged values are
averaged over ranks and a non-finite loss since the last log step stops the run (``NonFiniteLossError``). The
flag is accumulated on the device (``nonfinite |= ~torch.isfinite(loss)``), so a step itself never syncs."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from .errors import NonFiniteLossError


def set_lr(opt: torch.optim.Optimizer, lr: float, weight_decay: float | None = None) -> None:
    """This step's lr on every group, scaled by the group's ``lr_mult`` (``model.param_groups``: layer decay, a
    head's multiple); with ``weight_decay``, that decay on the groups that decay and 0 on the others."""
    for g in opt.param_groups:
        g["lr"] = lr * g["lr_mult"]
        if weight_decay is not None:
            g["weight_decay"] = weight_decay if g["decay"] else 0.0


def read_log(values: dict[str, torch.Tensor], nonfinite: torch.Tensor, world: int, what: str) -> dict[str, float]:
    """The logged scalars (averaged over ranks): the one host sync of a log step. ``nonfinite``: whether any loss
    since the last log step was NaN or infinite; if so (or a logged value is), ``NonFiniteLossError`` with ``what``
    (where and what to try; ``{key}`` fields are filled with the logged values) in its message."""
    keys = sorted(values)
    vals = torch.stack([values[k].detach().float() for k in keys] + [nonfinite.float()])
    if world > 1:
        dist.all_reduce(vals)
        vals /= world
    got = vals.tolist()
    if got[-1] > 0 or not all(math.isfinite(v) for v in got[:-1]):
        raise NonFiniteLossError(f"non-finite loss {what.format_map(dict(zip(keys, got, strict=False)))}")
    return dict(zip(keys, got[:-1], strict=True))
