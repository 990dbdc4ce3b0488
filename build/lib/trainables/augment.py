"""Batched augmentation on the training device.

Images arrive as uint8 (B, 3, S, S) on the device and are augmented as a whole batch (one ``grid_sample`` for
crops and flips, per-image colour factors broadcast over pixels), so augmentation is never a data-loader
bottleneck. Randomness is split from computation: every random choice of a step is one column of a tensor of
uniforms drawn up front from the step's seeded ``torch.Generator`` (``moco_draws``), and the augmentation is a
pure function of (images, uniforms). A step's views are therefore a function of (images, seed), and the
augmentation compiles together with the model under ``run.compile`` (generators cannot be traced).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

MEAN = torch.tensor([0.485, 0.456, 0.406])
STD = torch.tensor([0.229, 0.224, 0.225])
# RGB -> YIQ; hue jitter is a rotation of the (I, Q) plane.
_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_YIQ_INV = torch.linalg.inv(_YIQ)
_DEVICE_COPIES: dict[tuple[int, str], torch.Tensor] = {}


def _on(t: torch.Tensor, device) -> torch.Tensor:
    """Constant ``t`` on ``device``, copied there once: an eager host-to-device copy on every call would make
    the host wait for the device. Under torch.compile the copy is folded into the graph instead."""
    if torch.compiler.is_compiling():
        return t.to(device)
    key = (id(t), str(device))
    if key not in _DEVICE_COPIES:
        _DEVICE_COPIES[key] = t.to(device)
    return _DEVICE_COPIES[key]


def _scale(u: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """Uniforms in [0, 1) -> [lo, hi)."""
    return u * (hi - lo) + lo


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, S, S) -> float in [0, 1]."""
    return images.float().div_(255.0)


def normalize(x: torch.Tensor) -> torch.Tensor:
    """Per-channel ImageNet normalisation of [0, 1] images (B, 3, H, W)."""
    return (x - _on(MEAN, x.device).view(1, 3, 1, 1)) / _on(STD, x.device).view(1, 3, 1, 1)


def resized_float(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (B, 3, S, S) -> float in [0, 1] at ``size`` (the model's input, before normalisation)."""
    x = to_float(images)
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return x


def eval_view(images: torch.Tensor, size: int) -> torch.Tensor:
    """Deterministic view for evaluation: resize to ``size`` and normalise."""
    return normalize(resized_float(images, size))


def random_resized_crop(x: torch.Tensor, size: int, u: torch.Tensor, scale=(0.08, 1.0),
                        ratio=(3 / 4, 4 / 3), flip_p: float = 0.5) -> torch.Tensor:
    """Per-image random resized crop + horizontal flip of float images (B, 3, S, S) -> (B, 3, size, size).

    u (B, 5) uniforms: crop area, log aspect ratio, centre x, centre y, flip.
    """
    area = _scale(u[:, 0], *scale)
    r = torch.exp(_scale(u[:, 1], math.log(ratio[0]), math.log(ratio[1])))
    w = torch.sqrt(area * r).clamp(max=1.0)  # crop width as a fraction of the image side
    h = torch.sqrt(area / r).clamp(max=1.0)
    cx = (u[:, 2] * 2 - 1) * (1 - w)  # crop centre in [-1, 1] coordinates
    cy = (u[:, 3] * 2 - 1) * (1 - h)
    flip = torch.where(u[:, 4] < flip_p, -1.0, 1.0)
    zero = torch.zeros_like(w)
    theta = torch.stack([w * flip, zero, cx, zero, h, cy], dim=1).view(-1, 2, 3)  # (B, 2, 3) affine maps
    grid = F.affine_grid(theta, [x.shape[0], 3, size, size], align_corners=False)  # (B, size, size, 2)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def _gray(x: torch.Tensor) -> torch.Tensor:
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])  # (B, 1, H, W)


def color_jitter(x: torch.Tensor, u: torch.Tensor, p: float = 0.8, brightness=0.4, contrast=0.4,
                 saturation=0.2, hue=0.1) -> torch.Tensor:
    """Per-image brightness, contrast, saturation and hue jitter, each image jittered with probability p.

    u (B, 5) uniforms: brightness, contrast, saturation, hue, apply.
    """
    b = x.shape[0]
    bf = _scale(u[:, 0], 1 - brightness, 1 + brightness).view(b, 1, 1, 1)
    cf = _scale(u[:, 1], 1 - contrast, 1 + contrast).view(b, 1, 1, 1)
    sf = _scale(u[:, 2], 1 - saturation, 1 + saturation).view(b, 1, 1, 1)
    hf = _scale(u[:, 3], -hue, hue) * 2 * math.pi
    y = (x * bf).clamp(0, 1)
    m = _gray(y).mean(dim=(2, 3), keepdim=True)
    y = ((y - m) * cf + m).clamp(0, 1)
    g = _gray(y)
    y = ((y - g) * sf + g).clamp(0, 1)
    cos, sin = torch.cos(hf), torch.sin(hf)
    one, zero = torch.ones_like(cos), torch.zeros_like(cos)
    rot = torch.stack([one, zero, zero, zero, cos, -sin, zero, sin, cos], dim=1).view(b, 3, 3)  # (I, Q) rotation
    mat = _on(_YIQ_INV, x.device) @ rot @ _on(_YIQ, x.device)  # (B, 3, 3) per-image hue rotation in RGB
    y = torch.einsum("bij,bjhw->bihw", mat, y).clamp(0, 1)
    return torch.where((u[:, 4] < p).view(b, 1, 1, 1), y, x)


def random_grayscale(x: torch.Tensor, u: torch.Tensor, p: float = 0.2) -> torch.Tensor:
    """Each image turned to grayscale with probability p; u (B,) uniforms."""
    return torch.where((u < p).view(-1, 1, 1, 1), _gray(x).expand_as(x), x)


def gaussian_blur(x: torch.Tensor, u: torch.Tensor, p: float, sigma=(0.1, 2.0)) -> torch.Tensor:
    """Per-image Gaussian blur; sigma is given for 224 px images and scaled to the actual size.

    u (B, 2) uniforms: sigma, apply.
    """
    b, c, hgt, wid = x.shape
    s = _scale(u[:, 0], *sigma) * (wid / 224.0)
    k = max(3, int(2 * math.ceil(3 * sigma[1] * wid / 224.0) + 1))
    half = k // 2
    t = torch.arange(k, device=x.device, dtype=x.dtype) - half
    ker = torch.exp(-(t[None] ** 2) / (2 * s[:, None] ** 2))  # (B, k)
    ker = ker / ker.sum(1, keepdim=True)
    ker = ker.repeat_interleave(c, 0)  # (B*C, k): one kernel per image channel
    y = x.reshape(1, b * c, hgt, wid)  # images as channels of one batch, for a grouped convolution
    y = F.conv2d(F.pad(y, (half, half, 0, 0), mode="reflect"), ker.view(b * c, 1, 1, k), groups=b * c)
    y = F.conv2d(F.pad(y, (0, 0, half, half), mode="reflect"), ker.view(b * c, 1, k, 1), groups=b * c)
    return torch.where((u[:, 1] < p).view(b, 1, 1, 1), y.view(b, c, hgt, wid), x)


def solarize(x: torch.Tensor, u: torch.Tensor, p: float) -> torch.Tensor:
    """Each image solarised (pixels >= 0.5 inverted) with probability p; u (B,) uniforms."""
    return torch.where((u < p).view(-1, 1, 1, 1) & (x >= 0.5), 1 - x, x)


def crop_scale(size: int) -> tuple[float, float]:
    """MoCo v3's crop scale (0.08, 1) at ImageNet sizes; (0.2, 1) for small images where 8% is a few pixels."""
    return (0.08, 1.0) if size >= 64 else (0.2, 1.0)


MOCO_DRAWS = 14  # uniforms per image per view: crop 5, colour jitter 5, grayscale 1, blur 2, solarize 1


def moco_draws(batch: int, gen: torch.Generator, device) -> torch.Tensor:
    """Every random choice of MoCo v3's two views, (2, B, MOCO_DRAWS) uniforms from ``gen``."""
    return torch.rand(2, batch, MOCO_DRAWS, generator=gen, device=device)


def ssl_view(x: torch.Tensor, size: int, u: torch.Tensor, scale: tuple[float, float], blur_p: float,
             solarize_p: float) -> torch.Tensor:
    """One BYOL-style view (MoCo v3's and DINO's): random resized crop and flip, colour jitter (p 0.8), grayscale
    (p 0.2), Gaussian blur (p ``blur_p``), solarisation (p ``solarize_p``), normalised. x float (B, 3, S, S) in
    [0, 1] -> (B, 3, size, size); u (B, MOCO_DRAWS) uniforms."""
    v = random_resized_crop(x, size, u[:, 0:5], scale=scale)
    v = random_grayscale(color_jitter(v, u[:, 5:10]), u[:, 10])
    v = solarize(gaussian_blur(v, u[:, 11:13], blur_p), u[:, 13], solarize_p)
    return normalize(v)


def moco_views(images: torch.Tensor, size: int, u: torch.Tensor) -> torch.Tensor:
    """MoCo v3's two asymmetric views: uint8 (B, 3, S, S) -> normalised (2B, 3, size, size), view 1 first.

    ``u`` comes from ``moco_draws``; given it, this is a pure function (so ``torch.compile`` can fuse it).
    """
    x = to_float(images)
    return torch.cat([ssl_view(x, size, uv, crop_scale(size), blur_p, sol_p)  # uv (B, MOCO_DRAWS)
                      for uv, (blur_p, sol_p) in zip(u, ((1.0, 0.0), (0.1, 0.2)), strict=True)])


def dino_views(images: torch.Tensor, size: int, local_size: int, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """DINO's multi-crop (``DataAugmentationDINO``): two global views (crop scale 0.4-1; blur p 1.0, then blur
    p 0.1 and solarisation p 0.2) at ``size`` and ``len(u) - 2`` local views (crop scale 0.05-0.4, blur p 0.5) at
    ``local_size``. uint8 (B, 3, S, S) -> (globals (2B, 3, size, size), locals (nB, 3, local, local)), each in
    view-major order; u (2 + n, B, MOCO_DRAWS) uniforms."""
    x = to_float(images)
    glob = torch.cat([ssl_view(x, size, u[0], (0.4, 1.0), 1.0, 0.0), ssl_view(x, size, u[1], (0.4, 1.0), 0.1, 0.2)])
    if len(u) == 2:
        return glob, x.new_zeros(0, 3, local_size, local_size)
    local = torch.cat([ssl_view(x, local_size, uv, (0.05, 0.4), 0.5, 0.0) for uv in u[2:]])
    return glob, local


def mae_view(images: torch.Tensor, size: int, u: torch.Tensor) -> torch.Tensor:
    """MAE's single view (random resized crop 0.2-1 and flip): uint8 (B, 3, S, S) -> (B, 3, size, size).

    u (B, 5) uniforms for the crop (see ``random_resized_crop``).
    """
    return normalize(random_resized_crop(to_float(images), size, u, scale=(0.2, 1.0)))


def simmim_view(images: torch.Tensor, size: int, u: torch.Tensor) -> torch.Tensor:
    """SimMIM's single view (random resized crop 0.67-1 and flip): uint8 (B, 3, S, S) -> (B, 3, size, size).

    u (B, 5) uniforms for the crop (see ``random_resized_crop``).
    """
    return normalize(random_resized_crop(to_float(images), size, u, scale=(0.67, 1.0)))
