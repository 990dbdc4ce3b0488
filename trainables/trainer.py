"""The trainer: one plain function, ``train(config, report) -> final metrics``.

It runs the same under pytest, ``clmim train`` and Ray Train: on CPU or GPU (bf16 autocast), with DDP when a
``torch.distributed`` process group exists (the global batch is split across ranks), resuming from a complete
checkpoint when asked. ``report(metrics, checkpoint=None)`` is called at log steps, checkpoint steps (with the
checkpoint directory) and at the end, on every rank; launchers decide what to do with it.
"""

from __future__ import annotations

import copy
import os
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from timm.models.vision_transformer import Block
from torch.nn.parallel import DistributedDataParallel as DDP

from .checkpoints import (
    find_checkpoint,
    initial_state,
    keep_stable,
    load_checkpoint,
    load_weights,
    newest_loadable,
    pretrained_encoder,
    save_checkpoint,
)
from .config import (
    Config,
    ConfigError,
    load_config,
    model_stats,
    save_config,
    stage_bounds,
    stage_config,
    total_steps,
    train_flops,
)
from .data import DataBundle, batch_stream
from .evaluate import TIMERS, evaluate_encoder
from .files import write_json_atomic
from .finetune import finetune, finetune_steps
from .model import param_groups
from .objectives import registry
from .objectives.mixture import Mixture
from .probes import block_cosines, extract_features
from .robustness import finetune_noise_accuracy
from .schedule import cooldown_start, decay_shape, lr_schedule, step_seed, steps_per_epoch, warmup_length
from .steps import read_log, set_lr

Report = Callable[..., None]


def schedules(cfg: Config, total: int, per_epoch: int = 1) -> dict[str, np.ndarray]:
    """Per-step lr (linear warmup, then ``optim.schedule``: cosine or WSD decay to ``min_lr_ratio``, or multistep:
    the peak until ``decay_at`` of the run, then x ``decay_gamma``), weight decay (cosine), and each objective of
    the mix's own (its declaration's ``schedules``: MoCo v3's and DINO's EMA momentum, cosine to 1; DINO's teacher
    temperature and last-layer freeze, whose default length is one epoch of ``per_epoch`` steps).

    Under ``wsd`` the schedules that span the run (weight decay, EMA momentum) follow the lr's shape instead of a
    cosine over the run: held through the stable phase, annealed in the cooldown. So no schedule depends on the
    run's length before its cooldown, and a stable-phase checkpoint continues into a run of any length exactly."""
    o = cfg.optim
    lr = _lr(cfg, total, o.blr * o.lr_scale * cfg.data.batch_size / 256)
    steps = np.arange(total, dtype=np.float64)
    wd_end = o.weight_decay if o.weight_decay_end is None else o.weight_decay_end
    if o.schedule == "wsd":  # 1 through warmup and the stable phase, 1 - sqrt to 0 over the cooldown
        to_one = decay_shape(total, warmup_length(total, o.warmup_frac, o.warmup_steps), "wsd",
                             cooldown_frac=o.cooldown_frac)
    else:
        to_one = 0.5 * (1 + np.cos(np.pi * steps / max(1, total)))  # 1 -> 0 over the run
    wd = wd_end + (o.weight_decay - wd_end) * to_one
    out = {"lr": lr, "wd": wd}
    for name in cfg.objective.mix():
        obj = registry.get(name)
        if obj.schedules is not None:
            out.update(obj.schedules(getattr(cfg.objective, name), total, to_one, per_epoch))
    return out


def _lr(cfg: Config, total: int, peak: float) -> np.ndarray:
    """The per-step lr of ``cfg``'s ``optim`` schedule over ``total`` steps, peaking at ``peak`` (1.0: its shape)."""
    o = cfg.optim
    return lr_schedule(peak, total, o.warmup_frac, o.schedule, o.min_lr_ratio, o.decay_at, o.decay_gamma,
                       o.warmup_steps, o.cooldown_frac)


def schedule_break(trained: Config, cfg: Config, step: int, n_train: int) -> str | None:
    """Whether a checkpoint at ``step`` of a run configured as ``trained`` continues into ``cfg`` as a straight run
    of ``cfg`` would have trained: None when the lr's shape (its share of the peak) before ``step`` is the same in
    both (the same schedule and length, or any lengths within WSD's stable phase; a new peak, as PBT's exploits
    give, is no break), else what differs."""
    before, now = total_steps(trained, n_train), total_steps(cfg, n_train)
    a, b = _lr(trained, before, 1.0)[:step], _lr(cfg, now, 1.0)[:step]
    if len(a) == len(b) and np.allclose(a, b, rtol=1e-9, atol=0.0):
        return None
    return f"{trained.optim.schedule} over {before} steps, this run {cfg.optim.schedule} over {now}"


def warn_schedule_break(trained: dict, cfg: Config, step: int, n_train: int, ckpt: Path) -> None:
    """A warning on stderr when a checkpoint given as ``run.resume`` trained under another lr shape than this run
    has before its step (``schedule_break``): the run goes on, but it is not the straight run of its config that
    its results would be read as (extending or cooling down a cosine run, say)."""
    try:
        before = load_config(trained)
    except ConfigError:  # (a config this version cannot read: its weights loaded, nothing to compare)
        return
    differs = schedule_break(before, cfg, step, n_train)
    if differs is not None:
        print(f"clmim: warning: run.resume: {ckpt} trained under another lr schedule before its step {step} "
              f"({differs}): this run is not the straight run of its config; optim.schedule: wsd runs extend or "
              "cool down from a stable-phase checkpoint exactly", file=sys.stderr, flush=True)


def schedule_inputs(cfg: Config) -> tuple[str, ...]:
    """The schedule values the mix's heads read from each step's batch (their declarations' ``step_inputs``)."""
    return tuple(k for name in cfg.objective.mix() for k in registry.get(name).step_inputs)


def _device(cfg: Config) -> torch.device:
    if cfg.run.device == "cuda" or (cfg.run.device == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def _param_groups(objective: Mixture, cfg: Config) -> list[dict]:
    """AdamW groups: with / without weight decay, each at lr x 1 or, for the lower blocks of the lr-ratio graft
    (``objective.lower_parameters``), at lr x ``graft_lr_ratio``. Frozen parameters are left out. Order: with
    decay first, then by lr multiple, larger first (the optimiser state's order in checkpoints)."""
    lower = objective.lower_parameters()
    ratio = cfg.objective.placement.graft_lr_ratio

    def scale(name, p, decay):
        mult = ratio if id(p) in lower else 1.0
        return (not decay, -mult), mult

    return param_groups(objective, scale)  # (weight decay set per step from the schedule)


# ------------------------------------------------------------------------------------------- evaluation
def evaluate(run: TrainRun, step: int, final: bool = False) -> dict[str, float]:
    """Every probe of the pre-training's encoder at ``step`` (``evaluate.evaluate_encoder``: last-layer kNN /
    linear / shape bias plus ``layer/...`` rows, the dense probe, CKA against the untrained encoder, and at step 0
    and at the end the linear probe's accuracy under frequency-filtered noise), with a mix's gradient cosines per
    block. Seconds spent go to ``run.seconds``.

    The global RNG is left as it was (``fork_rng``): training's draws (drop path) must not depend on which
    evaluations ran, or how often."""
    with torch.random.fork_rng(devices=[run.device] if run.device.type == "cuda" else []):
        return _evaluate(run, step, final)


def _evaluate(run: TrainRun, step: int, final: bool) -> dict[str, float]:
    def untrained(gap: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        if step == 0 and run.untrained is None and run.initial_encoder is None:
            run.untrained = gap  # this encoder is the untrained one
        return untrained_features(run, step)

    metrics = evaluate_encoder(run.objective.eval_encoder(run.cfg.eval.encoder), run.data, run.cfg, run.seconds,
                               untrained, noise=step == 0 or final,
                               more_rows=lambda: [(k, None, "grad_cosine", v) for k, v in gradient_cosines(run, step)])
    t = time.perf_counter()
    metrics |= held_out_loss(run, step)
    run.seconds["probes"] += time.perf_counter() - t
    return metrics


HELD_OUT_DRAWS = 1 << 30  # the "step" whose seeded draws (crops, masks) every held-out loss uses: no training step's


def held_out_loss(run: TrainRun, step: int) -> dict[str, float]:
    """The pre-training loss on the validation split's images (never trained on, no label read): ``val_loss`` and
    each objective's ``val_loss_<name>``, the mean over full batches of ``data.batch_size`` (one batch of all of
    them if fewer), every evaluation with the same seeded draws, and the step's schedule values (EMA momentum,
    DINO's teacher temperature). The training forward itself (train mode, as the loss is minimised); buffers it
    updates (BatchNorm statistics, DINO's center) are put back, so training does not see this. Under DDP each rank
    reads the same images and the result is the same on every rank. {} without a validation split."""
    val, obj, cfg = run.data.val, run.objective, run.cfg
    if val is None:
        return {}
    i = min(max(step - run.offset, 0), max(run.total - 1, 0))
    images = val.subset(len(val), cfg.run.seed).images  # (N, 3, H, W) uint8, in memory
    size = min(cfg.data.batch_size, len(images))
    keys = ("loss", *obj.loss_keys.values())
    sums = dict.fromkeys(keys, 0.0)
    saved = [(b, b.detach().clone()) for b in obj.buffers()]
    n = len(images) // size
    torch.manual_seed(cfg.run.seed)  # drop path (``evaluate`` forks the RNG around this)
    try:
        with torch.no_grad(), run.autocast:
            for b in range(n):
                x = images[b * size:(b + 1) * size].to(run.device)
                batch = {"images": x, "seed": step_seed(cfg.run.seed, HELD_OUT_DRAWS, b),
                         **{k: v[i].clone() for k, v in run.step_inputs.items()}}
                out = type(obj).step(obj, x, obj.draws(batch))  # the class's step: eager even when compiled
                for k in keys:
                    sums[k] += out[k].detach().float()
    finally:
        with torch.no_grad():
            for b, v in saved:
                b.copy_(v)
    return {f"val_{k}": float(v) / n for k, v in sums.items()}  # (one host sync per evaluation)


def gradient_cosines(run: TrainRun, step: int) -> list[tuple[int, float]]:
    """In a mix: per block, the cosine between the objectives' gradients on its parameters (``probes.block_cosines``),
    the quantity Layer Grafted Pre-training reports (Jiang et al. 2023: MIM's and CL's gradients conflict more in
    later layers). One fixed batch (the first ``data.batch_size`` images of the probes' eval subset) with the
    step's seeded draws and schedule values, each objective's own loss differentiated alone
    (``torch.autograd.grad``: no parameter's ``.grad`` is touched), on the eager step even when the step is
    compiled. Buffers a forward updates (DINO's center) are put back, so training does not see this. Not measured
    under DDP with ``run.compile`` (its blocks are compiled one by one; a second backward through them is not
    supported) nor for a single objective."""
    obj, cfg = run.objective, run.cfg
    if not cfg.eval.grad_cosine or len(obj.heads) < 2 or (run.world > 1 and cfg.run.compile):
        return []
    i = min(max(step - run.offset, 0), max(run.total - 1, 0))  # the step's schedule values (clamped at the end)
    images = run.data.eval.subset(cfg.eval.samples, cfg.run.seed).images[:cfg.data.batch_size].to(run.device)
    batch = {"images": images, "seed": step_seed(cfg.run.seed, step, 0),
             **{k: v[i].clone() for k, v in run.step_inputs.items()}}
    blocks = [[p for p in blk.parameters() if p.requires_grad] for blk in obj.encoder.blocks]
    params = [p for ps in blocks for p in ps]
    saved = [(b, b.detach().clone()) for b in obj.buffers()]
    try:
        with run.autocast:
            out = type(obj).step(obj, images, obj.draws(batch))  # the class's step: eager even when compiled
        grads = {n: list(torch.autograd.grad(out[obj.loss_keys[n]], params, retain_graph=True, allow_unused=True))
                 for n in obj.heads}
    finally:
        with torch.no_grad():
            for b, v in saved:
                b.copy_(v)
    return block_cosines(grads, [len(ps) for ps in blocks])


def untrained_features(run: TrainRun, step: int) -> dict[int, torch.Tensor]:
    """GAP features of every layer of the untrained encoder on the fixed eval subset, computed once:
    at step 0 they are the probes' own (``evaluate``), after a resume from the copy ``build_run`` kept of the
    initial weights."""
    if run.untrained is None:
        if run.initial_encoder is None:
            raise RuntimeError("untrained features asked for after training started without an initial copy")
        enc = run.initial_encoder.to(run.device)
        layers = list(range(enc.depth + 1))
        images = run.data.eval.subset(run.cfg.eval.samples, run.cfg.run.seed).images  # the probes' eval subset
        run.untrained = extract_features(enc, images, run.cfg.model.img_size, layers=layers)["gap"]
        run.initial_encoder = None
    return run.untrained


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
    # All compiled modules share the cache of one code object (Module._call_impl; likewise every Mixture's
    # ``step``), so earlier compiles in this process (another trial, a plain model) count against the recompile
    # limit: past it, code silently runs eager. Raise the limit.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    if world == 1:
        objective.step = torch.compile(objective.step, dynamic=False)
        return
    for m in objective.modules():
        if isinstance(m, Block):
            m.compile(dynamic=False)




@dataclass
class TrainRun:
    """Everything the training loop needs, built once by ``build_run``."""

    cfg: Config
    rank: int
    world: int
    device: torch.device
    out_dir: Path | None
    data: DataBundle
    objective: Mixture  # the module that owns the weights (checkpoints, probes, EMA)
    model: torch.nn.Module  # what the step calls: the objective, or its DDP wrapper
    opt: torch.optim.Optimizer
    sched: dict[str, np.ndarray]
    total: int  # pre-training optimiser steps of this stage (fine-tuning steps come after the last stage's)
    steps_per_epoch: int
    start: int  # first step to run (> 0 after a resume; > total: resuming fine-tuning)
    autocast: object
    stream: object
    info: dict  # static facts reported at the end (sizes, FLOPs, world size)
    # schedule_inputs' schedules as device tensors: a step reads its values without a host-to-device copy (a sync)
    step_inputs: dict[str, torch.Tensor] = field(default_factory=dict)
    resumed: Path | None = None  # the checkpoint the run continues from
    last_log: dict = field(default_factory=dict)  # the last log step's metrics before the resumed checkpoint
    initial_encoder: torch.nn.Module | None = None  # a copy of the untrained encoder, kept only after a resume
    untrained: dict | None = None  # its GAP features per layer on the eval subset (``untrained_features``)
    seconds: dict = field(default_factory=lambda: dict.fromkeys(TIMERS, 0.0))
    offset: int = 0  # the global step this stage starts at (a staged run; 0 otherwise): steps and checkpoints count
    # globally, so a staged run is one sequence of reports and checkpoints
    stable_at: int | None = None  # wsd: the global step its cooldown starts at (a checkpoint kept in ``stable/``)

    def ckpt_due(self, done: int, last: int) -> bool:
        """True if the run saves a checkpoint after step ``done`` (every ``run.ckpt_every``, at ``last`` and at a
        WSD run's last stable step)."""
        r = self.cfg.run
        return self.out_dir is not None and bool((r.ckpt_every and done % r.ckpt_every == 0) or done == last
                                                 or done == self.stable_at)

    def save(self, done: int, module: torch.nn.Module, opt: torch.optim.Optimizer,
             extra: dict | None = None) -> Path | None:
        """Save a checkpoint from rank 0 (all ranks wait for it); its directory on rank 0, else None. A WSD run's
        last stable step is also kept in ``stable/`` (``keep_stable``): where a longer run or another cooldown
        branches off."""
        path = save_checkpoint(self.out_dir, done, module, opt, self.cfg, extra) if self.rank == 0 else None
        if path is not None and done == self.stable_at:
            keep_stable(path, self.out_dir)
        if self.world > 1:
            dist.barrier()
        return path


@dataclass
class Stage:
    """Where a stage of a staged run (``config.stages``) sits; the default is an unstaged run."""

    index: int = 0
    offset: int = 0  # the global step it starts at
    last: bool = True
    init: dict | None = None  # the encoder (``ViT`` state dict) it starts from: the previous stage's
    whole: Config | None = None  # the staged run's own config (its length, FLOPs, saved config); None: unstaged


def build_run(cfg: Config, stage: Stage | None = None) -> TrainRun:
    """Seed, load data, build the objective and optimiser, resume from a checkpoint if asked (or start from the
    previous stage's encoder), compile, wrap in DDP when a process group exists."""
    stage = stage or Stage()
    distributed = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    if cfg.data.batch_size % world:
        raise ConfigError(f"data.batch_size: {cfg.data.batch_size} is not divisible by {world} workers")
    if (cfg.eval.finetune.batch_size or world) % world:
        raise ConfigError(f"eval.finetune.batch_size: {cfg.eval.finetune.batch_size} is not divisible by {world} "
                          "workers")
    device = _device(cfg)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    out_dir = Path(cfg.run.out_dir) if cfg.run.out_dir else None
    if out_dir and rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(stage.whole or cfg, out_dir / "config.yaml")  # a staged run's whole config, not a stage's

    data, objective = initial_state(cfg)  # identical initial weights on every rank
    objective = objective.to(device)
    total = total_steps(cfg, len(data.train))
    opt = torch.optim.AdamW(_param_groups(objective, cfg), lr=0.0, betas=(cfg.optim.beta1, cfg.optim.beta2),
                            fused=device.type == "cuda")
    start, ckpt, initial, last_log = 0, None, None, {}
    if cfg.run.resume:
        auto = cfg.run.resume == "auto" and out_dir is not None
        ckpt = newest_loadable(out_dir) if auto else find_checkpoint(cfg.run.resume)
        if ckpt is not None:
            if cfg.eval.cka:  # CKA against the untrained encoder needs its weights, about to be overwritten
                initial = copy.deepcopy(objective.encoder).cpu()
            start, last_log, trained = load_checkpoint(ckpt, objective, opt)
            if not auto and stage.whole is None and rank == 0:
                warn_schedule_break(trained, cfg, start, len(data.train), ckpt)
            start -= stage.offset  # checkpoints count global steps
        elif cfg.run.resume != "auto":
            raise ConfigError(f"run.resume: no checkpoint at {cfg.run.resume!r}")
    if ckpt is None and stage.init is not None:
        objective.load_encoder(stage.init)
    if cfg.run.compile:
        compile_objective(objective, world)
    model = objective
    if world > 1:
        model = DDP(objective, device_ids=[device.index] if device.type == "cuda" else None,
                    find_unused_parameters=objective.has_unused_params())
    use_bf16 = cfg.run.precision == "bf16" or (cfg.run.precision == "auto" and device.type == "cuda")
    finetuning = finetune_steps(cfg, len(data.labelled))
    per_epoch = steps_per_epoch(len(data.train), cfg.data.batch_size)
    sched = schedules(cfg, total, per_epoch)
    return TrainRun(
        cfg=cfg, rank=rank, world=world, device=device, out_dir=out_dir, data=data, objective=objective,
        model=model, opt=opt, sched=sched, total=total, steps_per_epoch=per_epoch, start=start,
        step_inputs={k: torch.as_tensor(sched[k], dtype=torch.float32, device=device) for k in schedule_inputs(cfg)},
        autocast=torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else nullcontext(),
        stream=batch_stream(data.train, cfg.data.batch_size, cfg.run.seed + 104_729 * stage.index, min(start, total),
                            rank, world, device),
        # the whole run's facts: a staged run's length is its stages' together, its FLOPs every stage's
        info={**model_stats(stage.whole or cfg),
              "total_steps": (stage.whole.optim.steps if stage.whole else total) + finetuning,
              "world_size": world, "device": device.type, "train_images": len(data.train)},
        resumed=ckpt, last_log=last_log, initial_encoder=initial, offset=stage.offset,
        stable_at=stage.offset + cooldown_start(total, cfg.optim.cooldown_frac)
        if cfg.optim.schedule == "wsd" and 0 < cooldown_start(total, cfg.optim.cooldown_frac) < total else None)


def _log_metrics(run: TrainRun, out: dict, nonfinite: torch.Tensor, step: int, done: int, images: int,
                 seconds: float) -> dict:
    """The logged scalars of a log step (``steps.read_log``: averaged over ranks, the one host sync of the step;
    a non-finite loss since the last log step raises ``NonFiniteLossError``)."""
    lr = float(run.sched["lr"][step])
    logged = read_log(out, nonfinite, run.world, f"by step {done} (loss={{loss}}, lr={lr:.3g}); try a lower "
                      "optim.blr or set optim.clip_grad")
    return {**logged, "step": run.offset + done, "total_steps": run.info["total_steps"],
            "epoch": (run.offset + done) / run.steps_per_epoch, "lr": lr, "images_per_s": images / seconds}


def clip_gradients(model: torch.nn.Module, max_norm: float, mode: str) -> None:
    """Clip gradients in place without a host sync: ``global`` scales all of them by one factor so their joint
    norm is at most ``max_norm`` (SimMIM); ``per_tensor`` scales each parameter's gradient so its own norm is
    (DINO's ``utils.clip_gradients``: coefficient max_norm / (norm + 1e-6), applied where below 1)."""
    if mode == "global":
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        return
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if grads:
        coefs = [torch.clamp(max_norm / (n + 1e-6), max=1.0) for n in torch._foreach_norm(grads)]
        torch._foreach_mul_(grads, coefs)


def train(config: Config | dict | str, report: Report | None = None) -> dict:
    """Train one model as configured and return its final metrics.

    ``report(metrics: dict, checkpoint: Path | None = None)`` receives the logged scalars. Raises
    ``NonFiniteLossError`` if the loss becomes NaN or infinite. A staged run (``stages``) trains its stages in turn
    on one encoder (``train_stages``)."""
    cfg = config if isinstance(config, Config) else load_config(config)
    report = report or (lambda metrics, checkpoint=None: None)
    if cfg.stages:
        return train_stages(cfg, report)
    return _train(cfg, report, Stage())[0]


def train_stages(cfg: Config, report: Report) -> dict:
    """A staged run: each stage (``config.stage_config``) trains from the previous one's encoder with its own
    heads, optimiser and schedule; steps, reports and checkpoints count globally, so the run is one trial and
    resumes inside any stage (a checkpoint at a stage's last step starts the next stage from its encoder). Only
    the untrained encoder (step 0), each stage's end and the last stage's evaluations are probed; fine-tuning
    follows the last stage."""
    bounds = stage_bounds(cfg)
    out_dir = Path(cfg.run.out_dir) if cfg.run.out_dir else None
    first, init = 0, None
    if cfg.run.resume:
        auto = cfg.run.resume == "auto" and out_dir is not None
        ckpt = newest_loadable(out_dir) if auto else find_checkpoint(cfg.run.resume)
        if ckpt is None and cfg.run.resume != "auto":
            raise ConfigError(f"run.resume: no checkpoint at {cfg.run.resume!r}")
        if ckpt is not None:
            saved = load_weights(ckpt)
            step = int(saved.get("pretrain_step", saved["step"]))
            first = max(i for i in range(len(cfg.stages)) if bounds[i] <= step)
            if step == bounds[first] and first > 0:  # the previous stage's end: this stage starts from its encoder
                init = {k[len("encoder."):]: v for k, v in pretrained_encoder(saved).items()}
    final: dict = {}
    for i in range(first, len(cfg.stages)):
        stage = Stage(index=i, offset=bounds[i], last=i == len(cfg.stages) - 1, init=init, whole=cfg)
        sc = stage_config(cfg, i)
        if i > first or init is not None:
            sc.run.resume = None  # a later stage starts from the previous one's encoder, not a checkpoint
        final, init = _train(sc, report, stage)
    return final


def _train(cfg: Config, report: Report, stage: Stage) -> tuple[dict, dict | None]:
    """One stage's pre-training (the whole run's when unstaged), then for the last stage the final evaluations and
    fine-tuning: (the final metrics, None); for an earlier stage (its end is probed in the loop): ({}, the encoder
    the next stage starts from)."""
    run = build_run(cfg, stage)
    o, r = cfg.optim, cfg.run
    nonfinite = torch.zeros((), dtype=torch.bool, device=run.device)  # accumulated without host syncs
    if run.start == 0 and stage.offset == 0:  # the untrained baseline every probe is read against
        report({"step": 0, "epoch": 0.0, **evaluate(run, 0)})
    t_train, evaluated = time.perf_counter(), sum(run.seconds.values())  # step 0's evaluation is not training
    # after the baseline: images_per_s counts training only
    t_log, n_log, metrics = time.perf_counter(), 0, dict(run.last_log)
    for step in range(run.start, run.total):
        images, _ = next(run.stream)
        set_lr(run.opt, float(run.sched["lr"][step]), float(run.sched["wd"][step]))
        with run.autocast:
            out = run.model({"images": images, "seed": step_seed(r.seed, run.offset + step, run.rank),
                             **{k: v[step].clone() for k, v in run.step_inputs.items()}})
        out["loss"].backward()
        nonfinite |= ~torch.isfinite(out["loss"].detach())
        if o.clip_grad:  # 0: off
            clip_gradients(run.objective, o.clip_grad, o.clip_mode)
        run.opt.step()
        run.opt.zero_grad(set_to_none=True)
        run.objective.momentum_update({k: float(v[step]) for k, v in run.sched.items()})
        n_log += 1
        done = step + 1
        ckpt_due = run.ckpt_due(run.offset + done, run.offset + run.total)
        every = cfg.eval.every and done % (cfg.eval.every * run.steps_per_epoch) == 0 and done != run.total
        if every or (done == run.total and not stage.last):  # (an earlier stage's end is probed here)
            # before this step's checkpoint, so the checkpoint's record of reports holds it (a run resumed from the
            # checkpoint does not evaluate this step again); its time is not training time
            t_eval = time.perf_counter()
            at = run.offset + done
            report({"step": at, "epoch": at / run.steps_per_epoch, **evaluate(run, at)})
            t_log += time.perf_counter() - t_eval
        # step 1 too: its rate is the first a user sees (a run's first log_every steps can take minutes)
        if done % r.log_every == 0 or done == 1 or done == run.total or ckpt_due:
            metrics = _log_metrics(run, out, nonfinite, step, done, n_log * cfg.data.batch_size,
                                   time.perf_counter() - t_log)
            report(metrics, checkpoint=run.save(run.offset + done, run.objective, run.opt, {"log": metrics})
                   if ckpt_due else None)
            t_log, n_log = time.perf_counter(), 0
    seconds_train = time.perf_counter() - t_train - (sum(run.seconds.values()) - evaluated)
    end = run.offset + run.total
    if not stage.last:  # the stage's end (probed in the loop): its encoder goes to the next stage
        encoder = run.objective.eval_encoder(cfg.eval.encoder)
        return {}, {k: v.detach().cpu().clone() for k, v in encoder.state_dict().items()}

    ft_resume = load_weights(run.resumed) if run.start > run.total else None
    if ft_resume is None:  # the pre-training's final metrics
        final = {**run.info, **metrics, "step": end, "resumed_from": run.offset + run.start,
                 "train_flops": train_flops(run.info, end, cfg), "seconds_train": seconds_train,
                 **evaluate(run, end, final=True)}
        final |= {f"seconds_{k}": v for k, v in run.seconds.items()}
    else:  # resumed during fine-tuning: pre-training's final metrics are in the checkpoint
        final = dict(ft_resume["pretrain_metrics"])
    if cfg.eval.finetune.enabled:
        extra = {"pretrain_metrics": final, "pretrain_step": end}
        classifier, tuned = finetune(run, report, ft_resume, extra)
        final |= tuned
        if cfg.eval.noise.bands:
            t = time.perf_counter()
            final |= finetune_noise_accuracy(classifier, run.data, cfg)
            final["seconds_noise"] = final.get("seconds_noise", 0.0) + time.perf_counter() - t
    final["resumed_from"] = run.offset + run.start
    if run.world > 1:
        final["replicas_in_sync"] = replicas_in_sync(run.objective)
    if run.out_dir and run.rank == 0:
        write_json_atomic(run.out_dir / "final_metrics.json", final, indent=2)
    report(final)
    return final, None
