"""Probe speed: the attention probes on (64, 12, 197, 197) attention for 12 layers (ViT-B/16 at 224 px sized),
and the whole probe suite for one micro/4 trial, on the CPU.

    python benchmarks/probe_speed.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from trainables.config import load_config  # noqa: E402
from trainables.data import build_data  # noqa: E402
from trainables.objectives.mixture import build_objective  # noqa: E402
from trainables.probes import (  # noqa: E402
    attention_distance,
    attention_nmi,
    attention_rows,
    feature_rows,
    fourier_delta_log_amplitude,
    run_probes,
    token_rows,
)


def timed(fn, reps=3):
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def main():
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    layers = [torch.softmax(torch.randn(64, 12, 197, 197), -1) for _ in range(12)]
    t_dist, _ = timed(lambda: [attention_distance(a, 16) for a in layers])
    t_nmi, _ = timed(lambda: [attention_nmi(a) for a in layers])
    tokens = [torch.randn(64, 196, 768) for _ in range(13)]
    t_fft, _ = timed(lambda: [fourier_delta_log_amplitude(x) for x in tokens])
    print("B/16-sized inputs, 64 images (best of 3):")
    print(f"  attention distance, 12 layers of (64, 12, 197, 197): {t_dist:.2f} s")
    print(f"  attention NMI,      12 layers of (64, 12, 197, 197): {t_nmi:.2f} s")
    print(f"  Fourier delta log amplitude, 13 layers of (64, 196, 768): {t_fft:.2f} s")

    cfg = load_config({}, [])  # the default trial: micro/4 on the synthetic set, eval.samples 512
    data = build_data(cfg)
    encoder = build_objective(cfg).encoder
    images = data.eval.subset(cfg.eval.samples, cfg.run.seed).images[:cfg.eval.probe_images]
    t_all, (rows, _) = timed(lambda: run_probes(encoder, data, cfg), reps=1)
    t_attn, _ = timed(lambda: attention_rows(encoder, images, cfg.model.img_size), reps=1)
    t_tok, _ = timed(lambda: token_rows(encoder, images, cfg.model.img_size), reps=1)
    t_feat, _ = timed(lambda: feature_rows(encoder, data, cfg), reps=1)
    print(f"whole probe suite, one micro/4 trial (eval.samples {cfg.eval.samples}, probe_images "
          f"{cfg.eval.probe_images}): {t_all:.2f} s, {len(rows)} rows")
    print(f"  attention probes {t_attn:.2f} s, token probes {t_tok:.2f} s, per-layer kNN + linear + shape bias "
          f"{t_feat:.2f} s")


if __name__ == "__main__":
    main()
