"""A simulated trial, for measuring the sweep driver at scale (``run.simulate``; ``benchmarks/sweep_scale.py``).

Ten thousand real trials cannot run on a laptop, but the driver's work does not depend on what a trial computes:
only on what it reports, how often, and what it stores. ``simulate(cfg, report)`` stands in for ``trainer.train``
with the same contract: it sleeps ``run.simulate.seconds_per_step`` per optimiser step (and
``seconds_per_eval`` per evaluation) and reports at the steps the trainer reports, with the metric names the
trainer reports for this config (every log step's scalars; the untrained encoder, every ``eval.every`` evaluation
and the final one, with the per-layer ``layer/...`` rows and the ``noise/...`` bands), and writes checkpoints of
``checkpoint_mb`` megabytes at the trainer's checkpoint steps, in its folder layout. The values are random. It
imports no torch, so a simulated trial process costs what the trial entry point costs, and a machine with few
cores can run hundreds of them.

A test (``tests/test_simulate.py``) runs the real trainer and this on one config and checks that both report the
same keys at the same steps. What is not simulated is refused when the config loads (``config._check_simulated``):
staged runs, fine-tuning, and data other than the synthetic set (whose sizes are the config's, so nothing is
read).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from pathlib import Path

from .config import Config, model_stats, objectives_reaching, total_steps, train_flops
from .files import write_json_atomic
from .scale import parse_variant
from .schedule import steps_per_epoch
from .vocab import POOLED_CLASSIFIERS, POOLS, step_metrics

MARKER = "simulated.json"  # beside a simulated checkpoint's checkpoint.pt: {"step": N}


def enabled(cfg: Config) -> bool:
    return cfg.run.simulate.seconds_per_step is not None


def evaluation_keys(cfg: Config, step: int, final: bool) -> list[str]:
    """What the trainer's ``evaluate`` reports for this config at ``step`` (synthetic data: cue-conflict images and
    segmentation masks are there): the last layer's probe summary, the per-layer rows of ``probes.run_probes``,
    the dense probe and CKA, and at step 0 and at the end the noise bands."""
    e, spec = cfg.eval, parse_variant(cfg.model.variant)
    val = min(e.val_samples, cfg.data.train_size // 4) > 0
    keys = []
    for pool in POOLS:
        keys += [f"knn_top1_{pool}", f"linear_top1_{pool}"]
        keys += [f"val_knn_top1_{pool}", f"val_linear_top1_{pool}", f"val_rankme_{pool}"] if val else []
        keys += [f"shape_bias_{pool}", f"cue_match_{pool}"]
    keys += ["knn_top1", "linear_top1", "shape_bias"] + (["val_knn_top1", "val_linear_top1", "val_rankme"] if val
                                                         else [])
    for k in range(1, spec.depth + 1):  # attention_rows: per head and their mean
        for name in ("attn_distance", "attn_nmi", "attn_entropy"):
            keys += [f"layer/{k}/h{h}/{name}" for h in range(spec.heads)] + [f"layer/{k}/{name}"]
        keys.append(f"layer/{k}/attn_head_div")
    layers = range(spec.depth + 1)
    keys += [f"layer/{k}/{m}" for k in layers
             for m in ("fourier_dlogamp_pi", "token_cossim", "effective_rank", "token_norm_outliers")]
    classifiers = [c for c in POOLED_CLASSIFIERS if e.lowshot or c in ("knn", "linear")]
    keys += [f"layer/{k}/{m}_{p}" for p in POOLS for k in layers
             for m in (*(f"{c}_top1" for c in classifiers), "rankme")]
    keys += [f"layer/{spec.depth}/attentive_top1"] if e.attentive_steps else []
    keys += ([f"layer/{k}/grad_cosine" for k, names in objectives_reaching(cfg).items() if len(names) > 1]
             if e.grad_cosine else [])
    keys += [f"layer/{k}/dense_miou" for k in layers] if e.dense_images else []
    keys += ["val_dense_miou"] if e.dense_images and val else []
    keys += [f"layer/{k}/cka_untrained" for k in layers] if e.cka else []
    if e.noise.bands and (step == 0 or final):
        keys += [f"noise/{b}/linear_top1{s}" for b in range(e.noise.bands) for s in ("", "_drop")]
        keys.append("linear_top1_clean")
    if val:  # the trainer's held-out pre-training losses (``trainer.held_out_loss``)
        keys += [f"val_{k}" for k in step_metrics() if k == "loss" or k.removeprefix("loss_") in cfg.objective.mix()]
    return keys


def checkpoint_step(path: str | Path) -> int:
    """The step of a simulated checkpoint (``<dir>/checkpoint.pt`` with ``simulated.json`` beside it); raises
    ``ValueError`` for one that is torn or not simulated (the caller falls back to an older one)."""
    d = Path(path).parent
    meta = json.loads((d / MARKER).read_text())
    if (d / "checkpoint.pt").stat().st_size != meta["bytes"]:
        raise ValueError(f"{d}: checkpoint.pt is not {meta['bytes']} bytes")
    return int(meta["step"])


def _save(out_dir: Path, step: int, size: int) -> Path:
    """A simulated checkpoint in the trainer's layout (``checkpoints/step_NNNNNNN/checkpoint.pt``), written
    atomically, the last two kept (``checkpoints.KEEP_LOCAL``)."""
    root = out_dir / "checkpoints"
    final, tmp = root / f"step_{step:07d}", root / f".tmp_step_{step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with open(tmp / "checkpoint.pt", "wb") as f:
        f.write(os.urandom(size))  # (incompressible, as weights are)
    write_json_atomic(tmp / MARKER, {"step": step, "bytes": size})
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in sorted(root.glob("step_*"))[:-2]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def simulate(cfg: Config, report, sleep=time.sleep) -> dict:
    """Stand in for ``trainer.train(cfg, report)`` (see the module docstring); return the final metrics."""
    sim, r, o = cfg.run.simulate, cfg.run, cfg.optim
    n_train = cfg.data.train_size
    per_epoch = steps_per_epoch(n_train, cfg.data.batch_size)
    total = total_steps(cfg, n_train)
    start = checkpoint_step(r.resume) if r.resume else 0
    out_dir = Path(r.out_dir) if r.out_dir else None
    rng = random.Random(f"{r.seed}-{start}")
    info = {**model_stats(cfg), "total_steps": total, "world_size": 1, "device": "cpu", "train_images": n_train}
    loss_keys = [k for k in step_metrics() if k == "loss" or k.removeprefix("loss_") in cfg.objective.mix()]
    seconds = {"probes": 0.0, "dense": 0.0, "cka": 0.0, "noise": 0.0}

    def evaluation(step: int, final: bool = False) -> dict:
        sleep(sim.seconds_per_eval)
        seconds["probes"] += sim.seconds_per_eval
        return {k: rng.random() for k in evaluation_keys(cfg, step, final)}

    if start == 0:
        report({"step": 0, "epoch": 0.0, **evaluation(0)})
    metrics: dict = {}
    size = int(sim.checkpoint_mb * 2**20)
    t_log = n_log = 0
    for step in range(start, total):
        n_log += 1
        t_log += sim.seconds_per_step
        done = step + 1
        ckpt_due = out_dir is not None and bool((r.ckpt_every and done % r.ckpt_every == 0) or done == total)
        if cfg.eval.every and done % (cfg.eval.every * per_epoch) == 0 and done != total:
            report({"step": done, "epoch": done / per_epoch, **evaluation(done)})
        if done % r.log_every == 0 or done == 1 or done == total or ckpt_due:
            sleep(t_log)
            metrics = {**{k: rng.uniform(0.5, 5.0) for k in loss_keys}, "step": done, "total_steps": total,
                       "epoch": done / per_epoch, "lr": o.blr * o.lr_scale * cfg.data.batch_size / 256,
                       "images_per_s": n_log * cfg.data.batch_size / max(t_log, 1e-9)}
            report(metrics, checkpoint=_save(out_dir, done, size) if ckpt_due else None)
            t_log = n_log = 0
    final = {**info, **metrics, "step": total, "resumed_from": start, "train_flops": train_flops(info, total, cfg),
             "seconds_train": total * sim.seconds_per_step, **evaluation(total, final=True)}
    final |= {f"seconds_{k}": v for k, v in seconds.items()}
    if out_dir is not None:
        write_json_atomic(out_dir / "final_metrics.json", final, indent=2)
    report(final)
    return final
