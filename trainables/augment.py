"""Batched augmentation on the training device.

Images arrive as uint8 (B, 3, S, S) on the device; every random choice is drawn per image from a seeded
``torch.Generator`` and applied to the whole batch at once (one ``grid_sample`` for crops and flips, per-image
colour factors broadcast over pixels), so augmentation is never a data-loader bottleneck and a step's views are
a pure function of (images, seed).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

MEAN = torch.tensor([0.485, 0.456, 0.406])
STD = torch.tensor([0.229, 0.224, 0.225])
# RGB -> YIQ; hue jitter is a rotation of the (I, Q) plane.
_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])


def _u(gen: torch.Generator, n: int, lo: float, hi: float, device) -> torch.Tensor:
    return torch.rand(n, generator=gen, device=device) * (hi - lo) + lo


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, S, S) -> float in [0, 1]."""
    return images.float().div_(255.0)


def normalize(x: torch.Tensor) -> torch.Tensor:
    """Per-channel ImageNet normalisation of [0, 1] images (B, 3, H, W)."""
    return (x - MEAN.to(x.device).view(1, 3, 1, 1)) / STD.to(x.device).view(1, 3, 1, 1)


def eval_view(images: torch.Tensor, size: int) -> torch.Tensor:
    """Deterministic view for evaluation: resize to ``size`` and normalise."""
    x = to_float(images)
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return normalize(x)


def random_resized_crop(x: torch.Tensor, size: int, gen: torch.Generator, scale=(0.08, 1.0),
                        ratio=(3 / 4, 4 / 3), flip_p: float = 0.5) -> torch.Tensor:
    """Per-image random resized crop + horizontal flip of float images (B, 3, S, S) -> (B, 3, size, size)."""
    b, dev = x.shape[0], x.device
    area = _u(gen, b, *scale, dev)
    log_r = _u(gen, b, math.log(ratio[0]), math.log(ratio[1]), dev)
    r = torch.exp(log_r)
    w = torch.sqrt(area * r).clamp(max=1.0)  # crop width as a fraction of the image side
    h = torch.sqrt(area / r).clamp(max=1.0)
    cx = (torch.rand(b, generator=gen, device=dev) * 2 - 1) * (1 - w)  # crop centre in [-1, 1] coordinates
    cy = (torch.rand(b, generator=gen, device=dev) * 2 - 1) * (1 - h)
    flip = torch.where(torch.rand(b, generator=gen, device=dev) < flip_p, -1.0, 1.0)
    theta = torch.zeros(b, 2, 3, device=dev)
    theta[:, 0, 0] = w * flip
    theta[:, 0, 2] = cx
    theta[:, 1, 1] = h
    theta[:, 1, 2] = cy
    grid = F.affine_grid(theta, [b, 3, size, size], align_corners=False)  # (B, size, size, 2)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def _gray(x: torch.Tensor) -> torch.Tensor:
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])  # (B, 1, H, W)


def color_jitter(x: torch.Tensor, gen: torch.Generator, p: float = 0.8, brightness=0.4, contrast=0.4,
                 saturation=0.2, hue=0.1) -> torch.Tensor:
    """Per-image brightness, contrast, saturation and hue jitter, each image jittered with probability p."""
    b, dev = x.shape[0], x.device
    bf = _u(gen, b, 1 - brightness, 1 + brightness, dev).view(b, 1, 1, 1)
    cf = _u(gen, b, 1 - contrast, 1 + contrast, dev).view(b, 1, 1, 1)
    sf = _u(gen, b, 1 - saturation, 1 + saturation, dev).view(b, 1, 1, 1)
    hf = _u(gen, b, -hue, hue, dev) * 2 * math.pi
    y = (x * bf).clamp(0, 1)
    m = _gray(y).mean(dim=(2, 3), keepdim=True)
    y = ((y - m) * cf + m).clamp(0, 1)
    g = _gray(y)
    y = ((y - g) * sf + g).clamp(0, 1)
    cos, sin = torch.cos(hf), torch.sin(hf)
    rot = torch.zeros(b, 3, 3, device=dev)
    rot[:, 0, 0] = 1
    rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = cos, -sin, sin, cos
    yiq = _YIQ.to(dev)
    mat = torch.linalg.inv(yiq) @ rot @ yiq  # (B, 3, 3) per-image hue rotation in RGB
    y = torch.einsum("bij,bjhw->bihw", mat, y).clamp(0, 1)
    apply = (torch.rand(b, generator=gen, device=dev) < p).view(b, 1, 1, 1)
    return torch.where(apply, y, x)


def random_grayscale(x: torch.Tensor, gen: torch.Generator, p: float = 0.2) -> torch.Tensor:
    apply = (torch.rand(x.shape[0], generator=gen, device=x.device) < p).view(-1, 1, 1, 1)
    return torch.where(apply, _gray(x).expand_as(x), x)


def gaussian_blur(x: torch.Tensor, gen: torch.Generator, p: float, sigma=(0.1, 2.0)) -> torch.Tensor:
    """Per-image Gaussian blur; sigma is given for 224 px images and scaled to the actual size."""
    b, c, hgt, wid = x.shape
    dev = x.device
    s = _u(gen, b, *sigma, dev) * (wid / 224.0)
    apply = torch.rand(b, generator=gen, device=dev) < p
    k = max(3, int(2 * math.ceil(3 * sigma[1] * wid / 224.0) + 1))
    half = k // 2
    t = torch.arange(k, device=dev, dtype=x.dtype) - half
    ker = torch.exp(-(t[None] ** 2) / (2 * s[:, None] ** 2))  # (B, k)
    ker = ker / ker.sum(1, keepdim=True)
    ker = ker.repeat_interleave(c, 0)  # (B*C, k): one kernel per image channel
    y = x.reshape(1, b * c, hgt, wid)  # images as channels of one batch, for a grouped convolution
    y = F.conv2d(F.pad(y, (half, half, 0, 0), mode="reflect"), ker.view(b * c, 1, 1, k), groups=b * c)
    y = F.conv2d(F.pad(y, (0, 0, half, half), mode="reflect"), ker.view(b * c, 1, k, 1), groups=b * c)
    return torch.where(apply.view(b, 1, 1, 1), y.view(b, c, hgt, wid), x)


def solarize(x: torch.Tensor, gen: torch.Generator, p: float) -> torch.Tensor:
    apply = (torch.rand(x.shape[0], generator=gen, device=x.device) < p).view(-1, 1, 1, 1)
    return torch.where(apply & (x >= 0.5), 1 - x, x)


def crop_scale(size: int) -> tuple[float, float]:
    """MoCo v3's crop scale (0.08, 1) at ImageNet sizes; (0.2, 1) for small images where 8% is a few pixels."""
    return (0.08, 1.0) if size >= 64 else (0.2, 1.0)


def moco_views(images: torch.Tensor, size: int, gen: torch.Generator) -> torch.Tensor:
    """MoCo v3's two asymmetric views: uint8 (B, 3, S, S) -> normalised (2B, 3, size, size), view 1 first."""
    x = to_float(images)
    views = []
    for blur_p, sol_p in ((1.0, 0.0), (0.1, 0.2)):
        v = random_resized_crop(x, size, gen, scale=crop_scale(size))
        v = random_grayscale(color_jitter(v, gen), gen)
        v = solarize(gaussian_blur(v, gen, blur_p), gen, sol_p)
        views.append(normalize(v))
    return torch.cat(views)


def simmim_view(images: torch.Tensor, size: int, gen: torch.Generator) -> torch.Tensor:
    """SimMIM's single view (random resized crop 0.67-1 and flip): uint8 (B, 3, S, S) -> (B, 3, size, size)."""
    return normalize(random_resized_crop(to_float(images), size, gen, scale=(0.67, 1.0)))
