"""Robustness to frequency-filtered noise (the analysis of Park & Kim, ICLR 2022, that the CL-vs-MIM paper reads
CL's low-pass behaviour from): Gaussian noise band-passed to one frequency band is added to the eval images, and a
classifier's accuracy drop is measured per band, low to high frequency.

Two conventions (``eval.noise.amplitude``): ``rms`` (the default) scales every band's noise to one RMS in the
[0, 1] pixel range, so bands differ only in frequency; ``fixed`` is Park & Kim's: white noise of one standard
deviation (``eval.noise.scale``) in the normalised input space, band-passed and not rescaled, so a band's energy
grows with the number of frequencies it holds (8 bands of 32 px: the highest carries about 6x the lowest's RMS). Drops
under ``fixed`` compare with their figures; drops under ``rms`` separate frequency from energy.

Bands are ``eval.noise.bands`` equal-width rings of the L-infinity radius max(|f_y|, |f_x|) of the angular
frequency, from 0 to pi (band b covers [b pi / bands, (b + 1) pi / bands), the last one includes pi): square rings
tile the 2-D spectrum of a square image exactly. Noise is added to the [0, 1] image at the model's input size,
before normalisation and without clipping (clipping would move energy out of the band).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .augment import normalize, resized_float
from .probes import eval_mode, extract_features, fit_linear, pool_tokens
from .vocab import band_edges


def band_mask(size: int, band: int, bands: int) -> torch.Tensor:
    """Bool (size, size) over ``torch.fft.fft2``'s frequency grid: True for the frequencies of ``band``."""
    f = torch.fft.fftfreq(size, dtype=torch.float64).abs() * 2 * math.pi  # |angular frequency| per index, <= pi
    radius = torch.maximum(f[:, None], f[None, :])  # (size, size) L-infinity radius
    lo, hi = band_edges(band, bands)
    return (radius >= lo - 1e-9) & ((radius < hi - 1e-9) | (band == bands - 1))


def band_noise(shape: tuple[int, int, int, int], band: int, bands: int, rms: float,
               generator: torch.Generator, amplitude: str = "rms") -> torch.Tensor:
    """Gaussian noise (B, C, H, W) with H == W, band-passed to ``band``; with ``amplitude`` "rms" scaled so that
    each image's noise has root-mean-square ``rms`` over its C * H * W values, with "fixed" white noise of standard
    deviation ``rms`` before the band-pass, not rescaled (its RMS: ``rms`` x the square root of the band's share of
    the frequencies). The band mask is symmetric under f -> -f, so the filtered noise is real."""
    b, c, h, w = shape
    if h != w:
        raise ValueError(f"band_noise: square images only, got {h} x {w}")
    white = torch.randn(shape, generator=generator, dtype=torch.float64)
    keep = band_mask(h, band, bands)
    if not keep.any():
        raise ValueError(f"band_noise: band {band} of {bands} holds no frequency of a {h}-pixel image "
                         f"(use at most {h // 2} bands)")
    x = torch.fft.ifft2(torch.fft.fft2(white) * keep).real  # (B, C, H, W)
    if amplitude == "rms":
        x = x / x.flatten(1).pow(2).mean(1).sqrt().view(b, 1, 1, 1).clamp_min(1e-12)  # unit RMS per image
    return (x * rms).float()


@torch.no_grad()
def noise_accuracy(classify: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, labels: torch.Tensor,
                   size: int, bands: int, rms: float, seed: int, prefix: str,
                   batch_size: int = 256, amplitude: str = "rms") -> dict[str, float]:
    """Top-1 of ``classify`` (normalised images (B, 3, size, size) on its device -> predicted labels) on clean
    images and with each band's noise: ``noise/<b>/<prefix>_top1`` and ``noise/<b>/<prefix>_top1_drop`` (clean
    minus noisy) per band, and ``<prefix>_top1_clean``. The noise is the same draw for every trial with the
    same seed. ``amplitude`` "rms": noise of RMS ``rms`` added to the [0, 1] image; "fixed": white noise of
    standard deviation ``rms``, band-passed, added to the normalised image (``band_noise``)."""
    def accuracy(band: int | None) -> float:
        gen = torch.Generator().manual_seed(seed * 7_919 + (band if band is not None else bands) * 104_729)
        hits = 0
        for i in range(0, len(images), batch_size):
            x = resized_float(images[i:i + batch_size], size)
            noise = band_noise(tuple(x.shape), band, bands, rms, gen, amplitude) if band is not None else 0.0
            x = normalize(x + noise) if amplitude == "rms" else normalize(x) + noise
            hits += int((classify(x).cpu() == labels[i:i + batch_size]).sum())
        return hits / len(images)

    clean = accuracy(None)
    out = {f"{prefix}_top1_clean": clean}
    for b in range(bands):
        noisy = accuracy(b)
        out[f"noise/{b}/{prefix}_top1"] = noisy
        out[f"noise/{b}/{prefix}_top1_drop"] = clean - noisy
    return out


def noise_split(data, cfg):
    """The images noise is added to: ``eval.noise.images`` of the fixed eval subset (``eval.samples``), seeded."""
    e, seed = cfg.eval, cfg.run.seed
    test = data.eval.subset(e.samples, seed)
    return test.subset(e.noise.images, seed) if e.noise.images < len(test) else test


def linear_noise_accuracy(encoder, data, cfg, predict=None) -> dict[str, float]:
    """The last layer's linear probe (``eval.pool`` features, fit on the clean train subset as ``probes`` fits it;
    ``predict``: that probe, already fit) under each band of noise (``noise_split``): ``noise/<b>/linear_top1``,
    ``noise/<b>/linear_top1_drop`` and ``linear_top1_clean``."""
    e, size, seed = cfg.eval, cfg.model.img_size, cfg.run.seed
    test = noise_split(data, cfg)
    if predict is None:
        train = data.labelled.subset(e.samples, seed)
        predict = fit_linear(extract_features(encoder, train.images, size)[e.pool][encoder.depth], train.labels,
                             data.num_classes)
    with eval_mode(encoder) as device:
        def classify(x):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                features = pool_tokens(encoder(x.to(device)), e.pool)  # (B, C) as extract_features pools
            return predict(features.float().cpu())
        return noise_accuracy(classify, test.images, test.labels, size, e.noise.bands, _level(e.noise), seed,
                              "linear", amplitude=e.noise.amplitude)


def finetune_noise_accuracy(model, data, cfg) -> dict[str, float]:
    """The fine-tuned classifier (normalised images -> logits) under each band of noise (``noise_split``):
    ``noise/<b>/finetune_top1[_drop]`` and ``finetune_top1_clean``."""
    test = noise_split(data, cfg)
    with eval_mode(model) as device:
        def classify(x):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                return model(x.to(device)).argmax(1)
        return noise_accuracy(classify, test.images, test.labels, cfg.model.img_size, cfg.eval.noise.bands,
                              _level(cfg.eval.noise), cfg.run.seed, "finetune", amplitude=cfg.eval.noise.amplitude)


def _level(noise) -> float:
    """The noise's level under its convention: the RMS (``rms``) or the white noise's standard deviation
    (``fixed``, ``scale``)."""
    return noise.rms if noise.amplitude == "rms" else noise.scale
