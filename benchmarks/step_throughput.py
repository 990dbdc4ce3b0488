"""Training-step throughput of each objective against a plain supervised timm step, in one run.

For MoCo v3 (lam = 1), SimMIM (lam = 0), the hybrid (lam = 0.5), MAE and DINO this runs the real trainer
(``trainables.trainer.train``: on-device augmentation, masking, momentum update, schedules) on the synthetic set
and reads images/s from its last log interval; the plain step is a timm ``VisionTransformer`` with a 1000-class
head, cross-entropy and AdamW on the same model size and batch. FLOPs per image are counted with
``torch.utils.flop_counter.FlopCounterMode`` over one full step (forward + backward) and printed next to the
analytic count the trials record. On CUDA it also measures a bf16 matmul rate and reports MFU against it.

    python benchmarks/step_throughput.py                                  # CPU: micro/4 at 32 px
    python benchmarks/step_throughput.py --variant B/16 --img-size 224 --batch 256 --steps 40   # GPU
    python benchmarks/step_throughput.py --compile --only plain,hybrid,hybrid@blocks   # whole step vs per block

With ``--compile`` an objective is compiled as the trainer does it in one process (the whole step as one graph);
``NAME@blocks`` compiles each transformer block on its own instead, as the trainer does under DDP.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from trainables import trainer as trainer_module  # noqa: E402
from trainables.config import (
    load_config,  # noqa: E402
    train_flops_per_image,  # noqa: E402
)
from trainables.objectives.mixture import build_objective  # noqa: E402
from trainables.scale import MLP_RATIO, parse_variant  # noqa: E402
from trainables.trainer import train  # noqa: E402

OBJECTIVES = {"mocov3": {"mocov3": 1.0}, "simmim": {"simmim": 1.0}, "hybrid": {"simmim": 0.5, "mocov3": 0.5},
              "mae": {"mae": 1.0}, "dino": {"dino": 1.0}}  # objective.weights of each step measured


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_rate(device, n=8192, reps=10) -> float:
    """Measured bf16 matmul FLOP/s (the MFU denominator)."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync(device)
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t)


def plain_model(args):
    spec = parse_variant(args.variant)
    return VisionTransformer(img_size=args.img_size, patch_size=spec.patch, embed_dim=spec.width, depth=spec.depth,
                             num_heads=spec.heads, mlp_ratio=MLP_RATIO, qkv_bias=True, num_classes=1000)


def plain_step_fn(model, opt, autocast):
    def step(x, y):
        with autocast:
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def bench_plain(args, device, autocast) -> tuple[float, float]:
    """(images/s, FLOPs per image) of the plain supervised step on device-resident random data."""
    model = plain_model(args).to(device)
    if args.compile:
        model = torch.compile(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    x = torch.randn(args.batch, 3, args.img_size, args.img_size, device=device)
    y = torch.randint(0, 1000, (args.batch,), device=device)
    step = plain_step_fn(model, opt, autocast)
    for _ in range(args.warmup):
        step(x, y)
    sync(device)
    t = time.perf_counter()
    for _ in range(args.steps):
        step(x, y)
    sync(device)
    ips = args.steps * args.batch / (time.perf_counter() - t)
    with FlopCounterMode(display=False) as fc:
        step(x[:8], y[:8])
    return ips, fc.get_total_flops() / 8


def counted_flops(cfg, device, autocast) -> float:
    """FLOPs per image of one full objective step (forward + backward), counted by FlopCounterMode."""
    torch.manual_seed(0)
    obj = build_objective(cfg).to(device)
    images = torch.randint(0, 256, (8, 3, cfg.model.img_size, cfg.model.img_size), dtype=torch.uint8, device=device)
    with FlopCounterMode(display=False) as fc, autocast:
        obj({"images": images, "seed": 0})["loss"].backward()
    return fc.get_total_flops() / 8


def bench_objective(args, weights, device, autocast, blocks: bool = False) -> float:
    """images/s of the real trainer over its log intervals after the first. ``blocks``: compile per block."""
    steps = args.warmup + args.steps
    cfg = load_config({
        "model": {"variant": args.variant, "img_size": args.img_size},
        "data": {"batch_size": args.batch, "train_size": max(args.batch * 2, 256), "eval_size": 64},
        "objective": {"weights": weights},
        "optim": {"steps": steps},
        "eval": {"samples": 64},
        "run": {"log_every": args.warmup, "compile": args.compile, "device": device.type,
                "precision": "bf16" if device.type == "cuda" else "fp32"},
    })
    logs = []
    whole_step = trainer_module.compile_objective
    if blocks:  # the trainer compiles per block when it runs under DDP (world > 1)
        trainer_module.compile_objective = lambda objective, world: whole_step(objective, 2)
    try:
        train(cfg, lambda m, checkpoint=None: logs.append(m) if checkpoint is None and "knn_top1" not in m else None)
    finally:
        trainer_module.compile_objective = whole_step
    # Every log interval holds `warmup` steps; drop the first (warmup, compilation). Equal images per interval,
    # so the overall rate is the harmonic mean of the interval rates.
    rates = [m["images_per_s"] for m in logs[1:]]
    return len(rates) / sum(1 / r for r in rates)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", default="micro/4")
    ap.add_argument("--img-size", type=int, default=32)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=10, help="timed steps after warmup")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--only", default=",".join(["plain", *OBJECTIVES]), help="comma list, plain first")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    for n in args.only.split(","):
        base, _, mode = n.partition("@")
        if n != "plain" and (base not in OBJECTIVES or mode not in ("", "blocks")):
            ap.error(f"--only: unknown step {n!r}; choose plain, {', '.join(OBJECTIVES)}, or NAME@blocks")
    args.steps = max(args.steps, args.warmup)  # the trainer logs every `warmup` steps
    args.steps -= args.steps % args.warmup
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    peak = matmul_rate(device) if device.type == "cuda" else None
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"device {name}, {args.variant} at {args.img_size}px, batch {args.batch}, compile={args.compile}"
          + (f", measured bf16 matmul {peak / 1e12:.0f} TFLOP/s" if peak else ""), flush=True)
    rows = []
    print(f"{'step':<18}{'images/s':>10}{'vs plain':>10}{'GFLOP/img':>11}{'TFLOP/s':>9}{'MFU':>7}", flush=True)

    def emit(r):
        base = rows[0]["images_per_s"] if rows and rows[0]["step"].startswith("plain") else None
        r["tflop_per_s"] = r["images_per_s"] * r["gflop_per_image"] / 1e3
        r["ratio_to_plain"] = r["images_per_s"] / base if base else (1.0 if r["step"].startswith("plain") else None)
        r["mfu"] = r["tflop_per_s"] * 1e12 / peak if peak else None
        rows.append(r)
        print(f"{r['step']:<18}{r['images_per_s']:>10.1f}{(r['ratio_to_plain'] or float('nan')):>10.2f}"
              f"{r['gflop_per_image']:>11.2f}{r['tflop_per_s']:>9.2f}"
              + (f"{100 * r['mfu']:>6.1f}%" if peak else f"{'-':>7}"), flush=True)

    for name_ in args.only.split(","):
        torch._dynamo.reset()  # each measurement compiles from scratch, as it would in its own process
        if name_ == "plain":
            ips, fpi = bench_plain(args, device, autocast)
            emit({"step": "plain supervised", "images_per_s": ips, "gflop_per_image": fpi / 1e9})
            continue
        base_name, _, mode = name_.partition("@")
        weights = OBJECTIVES[base_name]
        cfg = load_config({"model": {"variant": args.variant, "img_size": args.img_size},
                           "objective": {"weights": weights}})
        fpi = counted_flops(cfg, device, autocast)
        ips = bench_objective(args, weights, device, autocast, blocks=mode == "blocks")
        emit({"step": name_, "images_per_s": ips, "gflop_per_image": fpi / 1e9,
              "analytic_gflop_per_image": train_flops_per_image(cfg) / 1e9})
    if args.json:
        Path(args.json).write_text(json.dumps({"device": name, "args": vars(args), "peak_flops": peak,
                                               "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
