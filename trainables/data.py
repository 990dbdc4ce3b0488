"""Data sets (all local, nothing is ever downloaded) and the deterministic batch stream.

- ``synthetic``: K shape classes drawn with K textures, generated from a seed. In the train and eval splits
  shape c always wears texture c, so both cues predict the class; the cue-conflict split pairs shape a with a
  texture b != a (for the shape-bias probe).
- ``digits``: scikit-learn's bundled 8x8 handwritten digits (1,797 real images), upsampled.
- ``imagefolder``: ``data.path`` with ``train/`` (and ``val/``) class folders, or one folder of class folders.
- ``cifar10`` / ``cifar100``: the python-format archives already extracted under ``data.path``.
- ``store``: a sharded store ``clmim data prepare`` wrote (``store.py``): images are read per batch, never all
  into memory; any data set at scale goes this way.

``data.fraction`` keeps a nested, class-balanced share of the training split (``store.fraction_indices``).

The validation split (``DataBundle.val``) is held out of the training split's labels: ``eval.val_samples`` images (at
most a quarter of the split), a fixed draw (``VAL_SEED``, the same for every trial). Every selection reads it (the
``val_*`` metrics: the search metric, ASHA, the best lr per objective); no classifier is ever fit on its labels
(the probes and fine-tuning fit on ``DataBundle.labelled``, the rest), and the claims and reported accuracies read the
evaluation split only. Pre-training, which uses no labels, still sees every training image.

Images are kept as uint8 (N, 3, S, S) tensors; augmentation happens on the device (``augment.py``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .config import Config, ConfigError
from .schedule import steps_per_epoch
from .split import Split
from .store import INDEX, StoreSplit, fraction_indices, local_copy, open_split, read_index, verified_once

VAL_SEED = 271828  # the validation split's draw: one for every trial, so selections compare on the same images


@dataclass
class DataBundle:
    train: Split  # pre-training's images (labels unused)
    eval: Split  # what the claims and reported accuracies are read on
    num_classes: int
    cue_conflict: Split | None = None  # labels = shape class
    cue_texture: torch.Tensor | None = None  # texture class of each cue-conflict image
    val: Split | None = None  # held out of ``train``'s labels, read by every selection (``hold_out``)
    labelled: Split | None = None  # ``train`` without ``val``: what probes and fine-tuning fit on

    def __post_init__(self) -> None:
        if self.labelled is None:  # no validation split (yet): every training label may be fit on
            self.labelled = self.train

    def hold_out(self, n: int) -> None:
        """Split ``n`` images (at most a quarter of ``train``, a fixed draw) off the training split's labels as the
        validation split; the rest is ``labelled``."""
        n = min(n, len(self.train) // 4)
        perm = torch.randperm(len(self.train), generator=torch.Generator().manual_seed(VAL_SEED)).numpy()
        self.val = self.train.select(np.sort(perm[:n])) if n else None
        self.labelled = self.train.select(np.sort(perm[n:])) if n else self.train


# ---------------------------------------------------------------- synthetic shapes x textures
def _shape_mask(cls: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside-shape test for each image's class; u, v are (n, S, S) coordinates in shape radii."""
    r = np.sqrt(u**2 + v**2)
    phi = np.arctan2(v, u)

    def polygon(n):  # regular n-gon with circumradius 1
        return r * np.cos(np.mod(phi, 2 * np.pi / n) - np.pi / n) <= np.cos(np.pi / n)

    masks = [
        r <= 0.9,
        polygon(4),
        polygon(3),
        r <= 0.5 + 0.45 * np.cos(5 * phi),
        ((np.abs(u) < 0.28) & (np.abs(v) < 0.95)) | ((np.abs(v) < 0.28) & (np.abs(u) < 0.95)),
        (r <= 0.95) & (r >= 0.55),
        (r <= 0.95) & (np.sqrt((u - 0.45) ** 2 + v**2) >= 0.7),
        (np.abs(u) < 0.95) & (np.abs(v) < 0.3),
    ]
    out = np.zeros_like(r, dtype=bool)
    for k, m in enumerate(masks):
        sel = cls.reshape(-1) == k  # images of class k
        out[sel] = m[sel]
    return out


def _texture(tex: np.ndarray, x: np.ndarray, y: np.ndarray, period: np.ndarray, phase: np.ndarray,
             rng: np.random.Generator) -> np.ndarray:
    """Texture value in [0, 1] per pixel for each image's texture class; x, y in pixels, (n, S, S)."""
    a = 2 * np.pi * (x / period + phase)
    b = 2 * np.pi * (y / period + phase)
    sa, sb = np.sin(a) > 0, np.sin(b) > 0
    dots = (np.mod(x / period + phase, 1) - 0.5) ** 2 + (np.mod(y / period + phase, 1) - 0.5) ** 2 < 0.08
    grid = (np.mod(x / period + phase, 1) < 0.2) | (np.mod(y / period + phase, 1) < 0.2)
    textures = [sb, sa, sa ^ sb, dots, np.sin((a + b) / math.sqrt(2)) > 0, np.ones_like(sa),
                rng.random(x.shape) > 0.5, grid]
    out = np.zeros(x.shape, dtype=np.float32)
    for k, t in enumerate(textures):
        sel = tex.reshape(-1) == k
        out[sel] = t[sel]
    return out


def render_shapes(shape_cls: np.ndarray, texture_cls: np.ndarray, size: int, seed: int,
                  with_masks: bool = False) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Draw one image per (shape, texture) pair: uint8 (n, 3, size, size), deterministic in ``seed``; with
    ``with_masks`` also the shape's pixels, bool (n, size, size)."""
    rng = np.random.default_rng(seed)
    n = len(shape_cls)
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    cx = rng.uniform(0.38, 0.62, n)[:, None, None] * size
    cy = rng.uniform(0.38, 0.62, n)[:, None, None] * size
    rad = rng.uniform(0.28, 0.4, n)[:, None, None] * size
    rot = rng.uniform(0, 2 * np.pi, n)[:, None, None]
    dx, dy = (xs[None] - cx) / rad, (ys[None] - cy) / rad  # (n, S, S) in shape radii
    u = dx * np.cos(rot) + dy * np.sin(rot)
    v = -dx * np.sin(rot) + dy * np.cos(rot)
    inside = _shape_mask(shape_cls[:, None, None], u, v)
    period = (rng.uniform(0.8, 1.2, n) * max(3.0, size / 7))[:, None, None]
    phase = rng.uniform(0, 1, n)[:, None, None]
    tex = _texture(texture_cls[:, None, None], xs[None].repeat(n, 0), ys[None].repeat(n, 0), period, phase, rng)
    c1 = rng.uniform(0.55, 1.0, (n, 3, 1, 1))  # two random foreground colours: colour carries no label
    c2 = rng.uniform(0.0, 0.35, (n, 3, 1, 1))
    fg = c1 * tex[:, None] + c2 * (1 - tex[:, None])
    bg = rng.uniform(0.1, 0.5, (n, 3, 1, 1)) + rng.normal(0, 0.04, (n, 3, size, size))
    img = (np.clip(np.where(inside[:, None], fg, bg), 0, 1) * 255).round().astype(np.uint8)
    return (img, inside) if with_masks else img


def synthetic_split(n: int, k: int, size: int, seed: int, conflict: bool = False):
    """Return (images uint8 (n, 3, S, S), shape labels, texture labels, segmentation masks uint8 (n, S, S): 1 +
    shape class inside the shape, 0 outside) for the train/eval or cue-conflict split."""
    rng = np.random.default_rng(seed)
    shape = rng.integers(0, k, n)
    texture = (shape + rng.integers(1, k, n)) % k if conflict else shape.copy()
    chunks = [render_shapes(shape[i:i + 512], texture[i:i + 512], size, seed * 7919 + i, with_masks=True)
              for i in range(0, n, 512)]
    inside = np.concatenate([c[1] for c in chunks])
    masks = (inside * (1 + shape[:, None, None])).astype(np.uint8)
    return np.concatenate([c[0] for c in chunks]), shape, texture, masks


def _split(images: np.ndarray, labels: np.ndarray, masks: np.ndarray | None = None) -> Split:
    return Split(torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(labels.astype(np.int64)),
                 None if masks is None else torch.from_numpy(masks))


def _synthetic(cfg: Config) -> DataBundle:
    d, size, seed = cfg.data, cfg.model.img_size, cfg.run.seed
    # Fixed seed offsets keep the three splits disjoint draws of the same generator.
    tr = synthetic_split(d.train_size, d.num_classes, size, seed * 1000 + 1)
    ev = synthetic_split(d.eval_size, d.num_classes, size, seed * 1000 + 2)
    cc = synthetic_split(d.eval_size, d.num_classes, size, seed * 1000 + 3, conflict=True)
    return DataBundle(_split(tr[0], tr[1], tr[3]), _split(ev[0], ev[1], ev[3]), d.num_classes,
                      cue_conflict=_split(cc[0], cc[1]), cue_texture=torch.from_numpy(cc[2].astype(np.int64)))


def _digits(cfg: Config) -> DataBundle:
    from sklearn.datasets import load_digits  # (optional: only this data set needs it)

    digits = load_digits()
    x = torch.from_numpy(digits.images).float().div(16.0)[:, None]  # (1797, 1, 8, 8) in [0, 1]
    x = torch.nn.functional.interpolate(x, size=(cfg.model.img_size,) * 2, mode="bilinear", align_corners=False)
    x = (x.clamp(0, 1) * 255).round().to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    y = torch.from_numpy(digits.target.astype(np.int64))
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(12345))  # fixed split for every run
    n_eval = len(y) // 5
    ev, tr = perm[:n_eval], perm[n_eval:]
    return DataBundle(Split(x[tr], y[tr]), Split(x[ev], y[ev]), 10)


def _cifar(cfg: Config) -> DataBundle:
    from torchvision import datasets  # (optional: only this data set needs it)

    cls = datasets.CIFAR10 if cfg.data.dataset == "cifar10" else datasets.CIFAR100
    try:
        tr = cls(cfg.data.path, train=True, download=False)
        ev = cls(cfg.data.path, train=False, download=False)
    except RuntimeError as e:
        raise ConfigError(f"data.path: no {cfg.data.dataset} archive under {cfg.data.path!r} ({e})") from None

    def to_split(ds):
        return Split(torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(ds.targets))

    return DataBundle(to_split(tr), to_split(ev), len(tr.classes))


def _imagefolder(cfg: Config) -> DataBundle:
    """Decode an ImageFolder into memory at 8/7 of the training size (the device crops from there)."""
    from torchvision import datasets, transforms  # (optional: only this data set needs it)

    root = Path(cfg.data.path).expanduser()
    stored = int(round(cfg.model.img_size * 8 / 7))
    tf = transforms.Compose([transforms.Resize(stored), transforms.CenterCrop(stored), transforms.PILToTensor()])

    def load(folder: Path) -> tuple[Split, list[str]]:
        try:
            ds = datasets.ImageFolder(str(folder), transform=tf)
        except (FileNotFoundError, RuntimeError) as e:
            raise ConfigError(f"data.path: {str(folder)!r} is not an image folder ({e})") from None
        loader = torch.utils.data.DataLoader(ds, batch_size=256, num_workers=cfg.data.workers)
        xs, ys = zip(*loader, strict=True)
        return Split(torch.cat(xs), torch.cat(ys)), ds.classes

    if (root / "train").is_dir():
        train, classes = load(root / "train")
        if (root / "val").is_dir():
            return DataBundle(train, load(root / "val")[0], len(classes))
    else:
        train, classes = load(root)
    perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(12345))
    n_eval = max(1, len(train) // 10)
    ev, tr = perm[:n_eval], perm[n_eval:]
    return DataBundle(Split(train.images[tr], train.labels[tr]), Split(train.images[ev], train.labels[ev]),
                      len(classes))


def _store(cfg: Config) -> DataBundle:
    """A prepared store: labels in memory, images read per batch (``store.StoreSplit``)."""
    if not cfg.data.path:
        raise ConfigError("data.path: data.dataset store needs the store's folder or s3:// URI")
    root = local_copy(cfg.data.path)
    index = read_index(root)
    verified_once(root, (root / INDEX).read_text())  # checksums, the first time this node reads the store
    if index["size"] < cfg.model.img_size:
        raise ConfigError(f"data.path: the store is stored at {index['size']} px, smaller than model.img_size "
                          f"{cfg.model.img_size}; prepare it with --size >= {cfg.model.img_size}")
    return DataBundle(open_split(root, index, "train"), open_split(root, index, "eval"), len(index["classes"]))


def build_data(cfg: Config) -> DataBundle:
    """Load the configured data set; a missing local path is a ``ConfigError``, never a download. With
    ``data.fraction`` < 1 the training split is its nested, class-balanced subset; the validation split is held
    out of it (``DataBundle.hold_out``)."""
    data = {"synthetic": _synthetic, "digits": _digits, "cifar10": _cifar, "cifar100": _cifar,
            "imagefolder": _imagefolder, "store": _store}[cfg.data.dataset](cfg)
    if cfg.data.fraction < 1.0:

        idx = fraction_indices(data.train.labels.numpy(), cfg.data.fraction)
        data.train = data.train.select(idx)
    data.hold_out(cfg.eval.val_samples)
    return data


def batch_stream(split: Split, global_batch: int, seed: int, start_step: int, rank: int = 0, world: int = 1,
                 device: torch.device | str = "cpu") -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless (images uint8, labels) batches for this rank, from step ``start_step`` on.

    Epoch e visits a permutation seeded by (seed, e); step s takes slice s of it; rank r takes its contiguous
    share of that global batch. Resuming at step N therefore yields exactly the batches a straight run sees.
    The split is moved to ``device`` once, so batches are sliced there without host copies.
    """
    per_rank = global_batch // world
    spe = steps_per_epoch(len(split), global_batch)
    streamed = isinstance(split, StoreSplit)  # read per batch on the host, then one copy to the device
    images = None if streamed else split.images.to(device)
    labels = split.labels.to(device)
    step = start_step
    while True:
        epoch, i = divmod(step, spe)
        perm = torch.randperm(len(split), generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        if not streamed:
            perm = perm.to(device)  # one host-to-device copy per epoch, not per step
        while i < spe:
            idx = perm[i * global_batch + rank * per_rank: i * global_batch + (rank + 1) * per_rank]
            if streamed:
                yield split.take(idx.numpy()).to(device, non_blocking=True), labels[idx.to(device)]
            else:
                yield images[idx], labels[idx]
            i += 1
            step += 1
