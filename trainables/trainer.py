"""The trainer: one plain function, ``train(config, report) -> final metrics``.

It runs the same under pytest, ``clmim train`` and Ray Train: on CPU or GPU (bf16 autocast), with DDP when a
``torch.distributed`` process group exists (the global batch is split across ranks), resuming from a complete
checkpoint when asked. ``report(metrics, checkpoint=None)`` is called at log steps, checkpoint steps (with the
checkpoint directory) and at the end, on every rank; launchers decide what to do with it.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from timm.models.vision_transformer import Block
from torch.nn.parallel import DistributedDataParallel as DDP

from .config import Config, load_config, save_config, to_dict
from .data import DataBundle, batch_stream, build_data, steps_per_epoch
from .model import no_weight_decay_names
from .objectives import Hybrid, build_objective, train_flops_per_image
from .probes import rows_to_metrics, run_probes
from .scale import encoder_params, parse_variant

Report = Callable[..., None]
KEEP_CHECKPOINTS = 2


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite."""


def schedules(cfg: Config, total: int) -> dict[str, np.ndarray]:
    """Per-step lr (linear warmup, cosine decay), weight decay (cosine) and EMA momentum (cosine to 1)."""
    o = cfg.optim
    peak = o.blr * cfg.data.batch_size / 256
    steps = np.arange(total, dtype=np.float64)
    warm = int(round(o.warmup_frac * total))
    progress = np.clip((steps - warm) / max(1, total - warm), 0, 1)
    cosine = 0.5 * (1 + np.cos(np.pi * progress))  # 1 -> 0
    lr = peak * (o.min_lr_ratio + (1 - o.min_lr_ratio) * cosine)
    if warm:
        lr[:warm] = peak * (steps[:warm] + 1) / warm
    wd_end = o.weight_decay if o.weight_decay_end is None else o.weight_decay_end
    wd = wd_end + (o.weight_decay - wd_end) * 0.5 * (1 + np.cos(np.pi * steps / max(1, total)))
    m0 = cfg.objective.momentum
    momentum = 1 - (1 - m0) * 0.5 * (1 + np.cos(np.pi * steps / max(1, total)))
    return {"lr": lr, "wd": wd, "momentum": momentum}


def total_steps(cfg: Config, n_train: int) -> int:
    """optim.steps, or optim.epochs converted with the global batch (default: 100 steps)."""
    if cfg.optim.steps is not None:
        return cfg.optim.steps
    if cfg.optim.epochs is not None:
        return max(1, math.ceil(cfg.optim.epochs * steps_per_epoch(n_train, cfg.data.batch_size)))
    return 100


def model_stats(cfg: Config) -> dict[str, float]:
    """Encoder parameter count and training FLOPs per image (analytic; see ``scale.py``)."""
    spec = parse_variant(cfg.model.variant)
    return {"params": encoder_params(spec, cfg.model.img_size), "train_flops_per_image": train_flops_per_image(cfg)}


def _device(cfg: Config) -> torch.device:
    if cfg.run.device == "cuda" or (cfg.run.device == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def _param_groups(module: torch.nn.Module) -> list[dict]:
    skip = no_weight_decay_names(module)
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if p.requires_grad:
            (no_decay if name in skip else decay).append(p)
    return [{"params": decay, "decay": True}, {"params": no_decay, "decay": False, "weight_decay": 0.0}]


# ------------------------------------------------------------------------------------------- checkpoints
def save_checkpoint(out_dir: Path, step: int, objective: Hybrid, opt: torch.optim.Optimizer, cfg: Config) -> Path:
    """Write a complete checkpoint atomically to out_dir/checkpoints/step_NNNNNNN/; keep the last two."""
    root = out_dir / "checkpoints"
    final = root / f"step_{step:07d}"
    tmp = root / f".tmp_step_{step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch.save({
        "step": step,
        "model": objective.state_dict(),
        "optimizer": opt.state_dict(),
        "config": to_dict(cfg),
        "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
    }, tmp / "checkpoint.pt")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in sorted(root.glob("step_*"))[:-KEEP_CHECKPOINTS]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def find_checkpoint(path: str | Path) -> Path | None:
    """A checkpoint file from a file, a step directory, or a run directory (latest step)."""
    p = Path(path)
    if p.is_file():
        return p
    if (p / "checkpoint.pt").is_file():
        return p / "checkpoint.pt"
    steps = sorted((p / "checkpoints").glob("step_*/checkpoint.pt")) if p.is_dir() else []
    return steps[-1] if steps else None


def load_checkpoint(path: Path, objective: Hybrid, opt: torch.optim.Optimizer | None) -> int:
    """Restore model, optimiser and RNG state; return the step to continue from."""
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    objective.load_state_dict(ckpt["model"])
    if opt is not None:
        opt.load_state_dict(ckpt["optimizer"])
    rng = ckpt["rng"]
    torch.set_rng_state(rng["torch"])
    np.random.set_state(rng["numpy"])
    random.setstate(rng["python"])
    if rng.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return int(ckpt["step"])


# ------------------------------------------------------------------------------------------- evaluation
def evaluate(encoder, data: DataBundle, cfg: Config) -> dict[str, float]:
    """Every probe (``probes.run_probes``): last-layer kNN / linear / shape bias plus ``layer/...`` rows."""
    rows, summary = run_probes(encoder, data, cfg)
    return {**summary, **rows_to_metrics(rows)}


def replicas_in_sync(module: torch.nn.Module) -> bool:
    """True if every DDP rank holds bit-identical parameters (max and min of a checksum agree across ranks)."""
    total = torch.stack([p.detach().double().sum() for p in module.parameters()]).sum()
    lo, hi = total.clone(), total.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    return bool(lo == hi)


# ------------------------------------------------------------------------------------------- training
def compile_objective(objective: torch.nn.Module, world: int) -> None:
    """``run.compile``: torch.compile the objective in place; module and state-dict names stay as they are.

    One process: the whole step (augmentation, masking, encoder, heads, losses: ``objective.step``) becomes one
    graph, so the elementwise work between the matmuls fuses. Under DDP each transformer block is compiled on its
    own instead (online and momentum encoder), because one graph would produce every gradient at the end of its
    backward and leave DDP no all-reduce to overlap with compute.
    """
    # All compiled modules share the cache of one code object (Module._call_impl; likewise every Hybrid's
    # ``step``), so earlier compiles in this process (another trial, a plain model) count against the recompile
    # limit: past it, code silently runs eager. Raise the limit.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    if world == 1:
        objective.step = torch.compile(objective.step, dynamic=False)
        return
    for m in objective.modules():
        if isinstance(m, Block):
            m.compile(dynamic=False)


def train(config: Config | dict | str, report: Report | None = None) -> dict:
    """Train one model as configured and return its final metrics.

    ``report(metrics: dict, checkpoint: Path | None = None)`` receives the logged scalars. Raises
    ``NonFiniteLossError`` if the loss becomes NaN or infinite.
    """
    cfg = config if isinstance(config, Config) else load_config(config)
    report = report or (lambda metrics, checkpoint=None: None)
    distributed = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    if cfg.data.batch_size % world:
        raise ValueError(f"data.batch_size {cfg.data.batch_size} is not divisible by {world} workers")
    device = _device(cfg)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    out_dir = Path(cfg.run.out_dir) if cfg.run.out_dir else None
    if out_dir and rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out_dir / "config.yaml")

    torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank
    np.random.seed(cfg.run.seed)
    random.seed(cfg.run.seed)
    data = build_data(cfg)
    objective = build_objective(cfg).to(device)
    if world > 1 and device.type == "cuda":
        objective = torch.nn.SyncBatchNorm.convert_sync_batchnorm(objective)
    total = total_steps(cfg, len(data.train))
    spe = steps_per_epoch(len(data.train), cfg.data.batch_size)
    sched = schedules(cfg, total)
    opt = torch.optim.AdamW(_param_groups(objective), lr=0.0, betas=(cfg.optim.beta1, cfg.optim.beta2),
                            fused=device.type == "cuda")
    start = 0
    if cfg.run.resume:
        ckpt = find_checkpoint(out_dir if cfg.run.resume == "auto" and out_dir else cfg.run.resume)
        if ckpt is not None:
            start = load_checkpoint(ckpt, objective, opt)
        elif cfg.run.resume != "auto":
            raise FileNotFoundError(f"run.resume: no checkpoint at {cfg.run.resume!r}")
    if cfg.run.compile:
        compile_objective(objective, world)
    model = objective
    if world > 1:
        model = DDP(objective, device_ids=[device.index] if device.type == "cuda" else None,
                    find_unused_parameters=objective.has_unused_params())
    use_bf16 = cfg.run.precision == "bf16" or (cfg.run.precision == "auto" and device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else nullcontext()
    stream = batch_stream(data.train, cfg.data.batch_size, cfg.run.seed, start, rank, world, device)
    stats = model_stats(cfg)
    info = {**stats, "total_steps": total, "world_size": world, "device": device.type}

    nonfinite = torch.zeros((), dtype=torch.bool, device=device)  # accumulated without host syncs
    t_log, n_log, metrics = time.perf_counter(), 0, {}
    for step in range(start, total):
        images, _ = next(stream)
        for g in opt.param_groups:
            g["lr"] = float(sched["lr"][step])
            g["weight_decay"] = float(sched["wd"][step]) if g["decay"] else 0.0
        with autocast:
            out = model({"images": images, "seed": cfg.run.seed * 1_000_003 + step * 1009 + rank})
        loss = out["loss"]
        loss.backward()
        nonfinite |= ~torch.isfinite(loss.detach())
        if cfg.optim.clip_grad:
            torch.nn.utils.clip_grad_norm_(objective.parameters(), cfg.optim.clip_grad)
        opt.step()
        opt.zero_grad(set_to_none=True)
        objective.momentum_update(float(sched["momentum"][step]))
        n_log += 1
        done = step + 1
        ckpt_due = out_dir is not None and ((cfg.run.ckpt_every and done % cfg.run.ckpt_every == 0) or done == total)
        if done % cfg.run.log_every == 0 or done == total or ckpt_due:
            keys = sorted(out)
            vals = torch.stack([out[k].detach().float() for k in keys] + [nonfinite.float()])
            if world > 1:
                dist.all_reduce(vals)
                vals /= world
            vals = vals.tolist()  # the one host sync per log step
            if vals[-1] > 0 or not all(math.isfinite(v) for v in vals[:-1]):
                raise NonFiniteLossError(
                    f"non-finite loss by step {done} (loss={vals[keys.index('loss')]}, lr={sched['lr'][step]:.3g}); "
                    "try a lower optim.blr or set optim.clip_grad")
            dt = time.perf_counter() - t_log
            metrics = {**dict(zip(keys, vals[:-1], strict=True)), "step": done, "epoch": done / spe,
                       "lr": float(sched["lr"][step]), "images_per_s": n_log * cfg.data.batch_size / dt}
            path = None
            if ckpt_due:
                path = save_checkpoint(out_dir, done, objective, opt, cfg) if rank == 0 else None
                if world > 1:
                    dist.barrier()
            report(metrics, checkpoint=path)
            t_log, n_log = time.perf_counter(), 0
        if cfg.eval.every and done % (cfg.eval.every * spe) == 0 and done != total:
            report({"step": done, "epoch": done / spe, **evaluate(objective.encoder, data, cfg)})

    final = {**info, **metrics, "step": total, "resumed_from": start, **evaluate(objective.encoder, data, cfg)}
    if world > 1:
        final["replicas_in_sync"] = replicas_in_sync(objective)
    if out_dir and rank == 0:
        (out_dir / "final_metrics.json").write_text(json.dumps(final, indent=2))
    report(final)
    return final
