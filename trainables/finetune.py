"""Fine-tuning evaluation (``eval.finetune``): the pre-trained encoder plus a linear head trained end-to-end on
the labelled train split, as in the BEiT / MAE / SimMIM fine-tuning recipes: AdamW with layer-wise lr decay (block
k of depth D at lr x decay^(D + 1 - k), the embedding at decay^(D + 1), the final norm and head at 1), linear
warmup then cosine decay, drop path, label smoothing, random resized crop and flip. Not included: mixup, cutmix,
RandAugment, EMA of weights.

It runs in the trial after pre-training, on the same devices (DDP when a process group exists), and continues the
run's step count: fine-tuning step j is run step ``pretrain_steps + j``, so checkpoints (which carry the
pre-trained encoder and the pre-training's final metrics) sort after pre-training's and a trial killed during
fine-tuning resumes fine-tuning. ``finetune_loss`` is reported at log steps and ``finetune_top1`` (top-1 on the
whole eval split) every ``eval.finetune.eval_every`` steps and at the end.
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from .augment import crop_scale, eval_view, normalize, random_resized_crop, to_float
from .config import Config
from .data import batch_stream
from .model import ViT, param_groups
from .probes import pool_tokens
from .rng import set_rng_state
from .schedule import lr_schedule, phase_steps, step_seed
from .steps import read_log, set_lr


class Classifier(nn.Module):
    """A ViT encoder and a linear head on its pooled final tokens: normalised images (B, 3, S, S) -> logits."""

    def __init__(self, encoder: ViT, num_classes: int, pool: str):
        super().__init__()
        self.encoder, self.pool = encoder, pool
        self.head = nn.Linear(encoder.width, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=2e-5)  # MAE's head init for fine-tuning
        nn.init.zeros_(self.head.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(pool_tokens(self.encoder(images), self.pool))  # (B, 1 + N, C) -> (B, C) -> (B, K)


def build_classifier(cfg: Config, pretrained: dict[str, torch.Tensor], num_classes: int) -> Classifier:
    """A classifier whose encoder holds the ``pretrained`` encoder weights (``ViT`` state dict) and the fine-tuning
    drop path; every parameter trains (as DeiT / MAE fine-tune a MoCo v3 model with a fixed embedding too)."""
    m = cfg.model
    encoder = ViT(m.variant, m.img_size, cfg.eval.finetune.drop_path, pos_embed="learned", patch_embed="trained")
    encoder.load_state_dict(pretrained)
    return Classifier(encoder, num_classes, cfg.eval.finetune.pool)


def layer_decay_groups(model: Classifier, weight_decay: float, layer_decay: float) -> list[dict]:
    """AdamW groups of MAE's ``param_groups_lrd``: per (layer, decay or not), ``lr_mult`` = layer_decay^(D + 1 -
    layer) with layer 0 = embedding (patch embed, CLS token, position embedding), k = block k, D + 1 = the rest."""
    depth = model.encoder.depth

    def scale(name, p, decay):
        if name.startswith("encoder.vit.blocks."):
            layer = int(name.split(".")[3]) + 1
        elif name.startswith(("encoder.vit.patch_embed", "encoder.vit.cls_token", "encoder.vit.pos_embed")):
            layer = 0
        else:
            layer = depth + 1
        return layer, layer_decay ** (depth + 1 - layer)

    return param_groups(model, scale, weight_decay)


def finetune_steps(cfg: Config, n_train: int) -> int:
    """Fine-tuning optimiser steps: ``eval.finetune.steps``, or its epochs at its global batch (0 when off)."""
    f = cfg.eval.finetune
    return phase_steps(f.steps, f.epochs, n_train, f.batch_size or cfg.data.batch_size) or 0


@torch.no_grad()
def top1(model: nn.Module, split, size: int, batch_size: int = 256) -> float:
    """Top-1 accuracy of ``model`` on a whole split (in memory, or a store read per batch), in eval mode."""
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    hits = 0
    for i in range(0, len(split), batch_size):
        idx = np.arange(i, min(i + batch_size, len(split)))
        images = split.take(idx) if hasattr(split, "take") else split.images[i:i + batch_size]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(eval_view(images.to(device), size))
        hits += int((logits.argmax(1).cpu() == split.labels[idx]).sum())
    model.train(was)
    return hits / len(split)


def finetune(run, report, resume: dict | None = None, extra: dict | None = None) -> tuple[Classifier, dict]:
    """Fine-tune the pre-trained encoder ``eval.encoder`` names (or continue the fine-tuning checkpoint
    ``resume``); return the fine-tuned classifier and ``{"finetune_top1", "finetune_steps", "seconds_finetune"}``.
    ``run`` is the trainer's ``TrainRun``; checkpoints go through ``run.save`` at the run's checkpoint steps and
    carry ``extra`` (the pre-training's final metrics and step) and the pre-trained encoder."""
    cfg, f = run.cfg, run.cfg.eval.finetune
    end = run.offset + run.total  # the global step pre-training ended at (after a staged run's last stage)
    t0 = time.perf_counter()
    start_from = run.objective.eval_encoder(cfg.eval.encoder)  # DINO's teacher by default, as DINO fine-tunes
    pretrained = resume["pretrained"] if resume else {k: v.detach().cpu().clone()
                                                      for k, v in start_from.state_dict().items()}
    model = build_classifier(cfg, pretrained, run.data.num_classes).to(run.device)
    opt = torch.optim.AdamW(layer_decay_groups(model, f.weight_decay, f.layer_decay), lr=0.0,
                            fused=run.device.type == "cuda")
    start = 0
    if resume:
        model.load_state_dict(resume["model"])
        opt.load_state_dict(resume["optimizer"])
        set_rng_state(resume["rng"])  # again: building the classifier drew from the global RNG (drop path uses it)
        start = int(resume["step"]) - end
    total = finetune_steps(cfg, len(run.data.labelled))
    lr = lr_schedule(f.blr * (f.batch_size or cfg.data.batch_size) / 256, total, f.warmup_frac)  # warmup, cosine
    ddp = DDP(model, device_ids=[run.device.index] if run.device.type == "cuda" else None) if run.world > 1 else model
    batch = (f.batch_size or cfg.data.batch_size)
    # the labelled images only: the validation split's labels are never fit on
    stream = batch_stream(run.data.labelled, batch, cfg.run.seed + 1, start, run.rank, run.world, run.device)
    size, r = cfg.model.img_size, cfg.run
    crop = (f.crop_min, 1.0) if f.crop_min is not None else crop_scale(size)
    loss_sum = torch.zeros((), device=run.device)  # summed between log steps without host syncs
    nonfinite = torch.zeros((), dtype=torch.bool, device=run.device)
    n = 0
    out: dict = {}
    for j in range(start, total):
        step = end + j  # the run's step count
        images, labels = next(stream)
        gen = torch.Generator(device=run.device).manual_seed(step_seed(r.seed, step, run.rank))
        u = torch.rand(len(images), 5, generator=gen, device=run.device)  # crop (4) and flip (1) per image
        x = normalize(random_resized_crop(to_float(images), size, u, scale=crop, flip_p=0.5 if f.flip else 0.0))
        set_lr(opt, float(lr[j]))  # (AdamW's weight decay: the groups' own, fixed)
        with run.autocast:
            loss = F.cross_entropy(ddp(x).float(), labels, label_smoothing=f.label_smoothing)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss_sum += loss.detach()
        nonfinite |= ~torch.isfinite(loss.detach())
        n += 1
        done = j + 1
        metrics: dict = {}
        if done % r.log_every == 0 or done == total:
            summed = read_log({"finetune_loss": loss_sum}, nonfinite, run.world,
                              f"by fine-tuning step {done}; try a lower eval.finetune.blr")
            metrics = {"finetune_loss": summed["finetune_loss"] / n, "finetune_lr": float(lr[j])}
            loss_sum.zero_()
            n = 0
        if (f.eval_every and done % f.eval_every == 0) or done == total:
            metrics["finetune_top1"] = out["finetune_top1"] = top1(model, run.data.eval, size)
        ckpt = run.ckpt_due(step + 1, end + total)
        if metrics or ckpt:
            metrics |= {"step": step + 1, "total_steps": end + total}
            state = {"phase": "finetune", "pretrained": pretrained, **(extra or {})}
            report(metrics, checkpoint=run.save(step + 1, model, opt, state) if ckpt else None)
    if "finetune_top1" not in out:  # resumed at the very end
        out["finetune_top1"] = top1(model, run.data.eval, size)
    if run.data.val is not None:  # what a selection on fine-tuning reads
        out["val_finetune_top1"] = top1(model, run.data.val, size)
    out |= {"finetune_steps": total, "seconds_finetune": time.perf_counter() - t0}
    return model, out
