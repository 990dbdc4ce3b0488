"""Probe speed: the attention probes on (64, 12, 197, 197) attention for 12 layers (ViT-B/16 at 224 px sized),
and the whole probe suite for one micro/4 trial, on the CPU, with what each evaluation added for issue 28 costs
(head diversity, high-norm tokens, RankMe, the 10 % and 1 % low-shot linear probes) against the suite without it,
in the same run.

    python benchmarks/probe_speed.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from trainables import probes, trainer  # noqa: E402
from trainables.config import load_config  # noqa: E402
from trainables.data import build_data  # noqa: E402
from trainables.objectives.mixture import build_objective  # noqa: E402
from trainables.probes import (  # noqa: E402
    attention_distance,
    attention_head_diversity,
    attention_nmi,
    attention_rows,
    feature_rows,
    fourier_delta_log_amplitude,
    rankme,
    run_probes,
    token_norm_outliers,
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
    t_div, _ = timed(lambda: [attention_head_diversity(a) for a in layers])
    t_norm, _ = timed(lambda: [token_norm_outliers(x) for x in tokens])
    feats = [torch.randn(512, 768) for _ in range(26)]  # 13 layers x 2 poolings of the 512 eval images
    t_rank, _ = timed(lambda: [rankme(f) for f in feats])
    print(f"  attention head diversity, 12 layers of (64, 12, 197, 197): {t_div:.2f} s")
    print(f"  high-norm token share, 13 layers of (64, 196, 768): {t_norm:.2f} s")
    print(f"  RankMe, 26 feature sets of (512, 768): {t_rank:.2f} s")

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
    lowshot = dict(probes.LOWSHOT)
    probes.LOWSHOT.clear()  # the feature probes without the low-shot fits, in the same process
    t_plain, _ = timed(lambda: feature_rows(encoder, data, cfg), reps=1)
    probes.LOWSHOT.update(lowshot)
    print(f"  of the feature probes, the 10 % and 1 % low-shot linear probes: {t_feat - t_plain:.2f} s "
          f"({(t_feat - t_plain) / t_all:.0%} of the suite)")
    fit = probes.fit_attentive
    probes.fit_attentive = lambda x, y, k: (lambda t: torch.zeros(len(t), dtype=torch.long))
    t_no_att, _ = timed(lambda: feature_rows(encoder, data, cfg), reps=1)
    probes.fit_attentive = fit
    print(f"  of those, the attentive probe (its tokens and its 300 steps): {t_feat - t_no_att:.2f} s "
          f"({(t_feat - t_no_att) / t_all:.0%} of the suite)")
    run = trainer.build_run(load_config({}, ["objective.lam=0.5"]))  # a hybrid: the gradient cosines
    t_grad, cos = timed(lambda: trainer.gradient_cosines(run, 0), reps=1)
    print(f"gradient cosines of a lam 0.5 mix, one batch of {run.cfg.data.batch_size}: {t_grad:.2f} s "
          f"({t_grad / t_all:.0%} of the suite), blocks {[k for k, _ in cos]}")


if __name__ == "__main__":
    main()
