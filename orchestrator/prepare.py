"""``clmim data prepare SOURCE DEST --size S``: decode and resize a data set once into a sharded store
(``trainables/store.py``), on Ray Data across the cluster's CPUs.

SOURCE is an ImageFolder tree (``train/`` and ``val/`` class folders, or class folders alone: then a fixed tenth is
the eval split, as ``data.dataset: imagefolder`` does) or a built-in data set by name (``synthetic``, ``digits``,
``cifar10``, ``cifar100``; its ``data.*`` settings from ``--set``). Every source goes through the same path: work is
cut into shards of about ``--shard-mb`` of pixels, each shard is one Ray Data task that decodes its images (or takes
a built-in's arrays), writes its arrays and then its record. Re-running with the same arguments does nothing;
an interrupted prepare redoes only the shards without a record; images that cannot be decoded are counted and
listed by path in the index and on the console, never dropped silently and never fatal for the run.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import ray
import torch
from PIL import Image

from trainables.config import ConfigError, load_config
from trainables.data import build_data
from trainables.errors import UserError
from trainables.storage import Storage
from trainables.store import (
    FORMAT,
    INDEX,
    SPLITS,
    local_copy,
    open_split,
    read_index,
    shard_name,
    verify_checksums,
    write_shard,
)

from .sweep import init_ray

BUILTINS = ("synthetic", "digits", "cifar10", "cifar100")
IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff"}


def decode(path: str, size: int) -> np.ndarray:
    """uint8 (3, size, size): the image's shorter side resized to ``size`` (antialiased), centre-cropped."""
    with Image.open(path) as im:
        im = im.convert("RGB")
        w, h = im.size
        scale = size / min(w, h)
        im = im.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BILINEAR, reducing_gap=None)
        w, h = im.size
        left, top = (w - size) // 2, (h - size) // 2
        return np.asarray(im.crop((left, top, left + size, top + size))).transpose(2, 0, 1).copy()


# ------------------------------------------------------------------------------------------- sources
def _folder_items(root: Path) -> tuple[dict[str, list[tuple[str, int]]], list[str], list[tuple[str, str]]]:
    """{split: [(path, label)]}, the class names of an ImageFolder tree (sorted, so the same every run) and the
    entries left out with the reason: hidden class folders (``.name``), and image names that are not regular files
    (a FIFO would block its reader, a device or socket is no image). A class name with a control character (a
    newline) is an error naming it."""
    skipped: list[tuple[str, str]] = []

    def listing(folder: Path, classes: list[str]) -> list[tuple[str, int]]:
        out = []
        for i, c in enumerate(classes):
            for f in sorted((folder / c).rglob("*")):
                if f.suffix.lower() not in IMAGE_EXTS:
                    continue
                if f.is_symlink() or not f.is_file():
                    if not f.is_dir():
                        skipped.append((str(f), "not a regular file"))
                    continue
                out.append((str(f), i))
        return out

    base = root / "train" if (root / "train").is_dir() else root
    classes = []
    for d in sorted(base.iterdir()):
        if not d.is_dir():
            continue
        if any(ord(ch) < 32 or ord(ch) == 127 for ch in d.name):
            raise UserError(f"SOURCE: class folder {d.name!r} in {str(base)!r} has a control character in its name; "
                            "rename it")
        if d.name.startswith("."):
            skipped.append((str(d), "hidden folder, not a class"))
            continue
        classes.append(d.name)
    if not classes:
        raise UserError(f"SOURCE: {str(root)!r} has no class folders (expected ImageFolder: CLASS/IMAGE files, "
                        "optionally under train/ and val/)")
    train = listing(base, classes)
    if (root / "train").is_dir() and (root / "val").is_dir():
        return {"train": train, "eval": listing(root / "val", classes)}, classes, skipped
    perm = np.random.default_rng(12345).permutation(len(train))  # a fixed tenth for eval, as imagefolder does
    n_eval = max(1, len(train) // 10)
    return ({"train": [train[i] for i in sorted(perm[n_eval:])], "eval": [train[i] for i in sorted(perm[:n_eval])]},
            classes, skipped)


def _builtin_arrays(name: str, size: int, overrides: list[str]) -> tuple[dict[str, tuple], list[str]]:
    """{split: (images uint8 (n, 3, size, size), labels)} of a built-in data set rendered or resized to ``size``."""
    try:
        cfg = load_config({"data": {"dataset": name}, "model": {"img_size": size}}, overrides)
        data = build_data(cfg)
    except ConfigError as e:
        raise UserError(str(e)) from None
    out = {}
    for split, s in (("train", data.train), ("eval", data.eval)):
        images = s.images
        if images.shape[-1] != size:
            images = torch.nn.functional.interpolate(images.float(), size=(size, size), mode="bilinear",
                                                     antialias=True).round().clamp(0, 255).to(torch.uint8)
        out[split] = (images.numpy(), s.labels.numpy())
    return out, [str(c) for c in range(data.num_classes)]


# ------------------------------------------------------------------------------------------- one shard
def _write_unit(unit: dict) -> dict:
    """Ray Data task: decode (or take) one shard's images and write it to the store; skip a shard already
    written with the same spec."""
    st = Storage(unit["dest"], unit.get("endpoint"))
    split, name = unit["split"], unit["name"]
    rec_path = st.path(split, f"{name}.json")
    old = st.read_text(rec_path)
    if old is not None:
        try:
            rec = json.loads(old)
            if rec.get("spec") == unit["spec"] and st.exists(st.path(split, f"{name}.npy")):
                return {**rec, "split": split, "skipped": True}
        except ValueError:
            pass
    if "images" in unit:  # a built-in's arrays
        images, labels, unreadable = np.asarray(unit["images"]), np.asarray(unit["labels"]), []
    else:
        size, imgs, labs, unreadable = unit["size"], [], [], []
        for path, label in zip(unit["paths"], unit["labels"], strict=True):
            try:
                imgs.append(decode(path, size))
                labs.append(label)
            except Exception as e:  # noqa: BLE001 - any undecodable file is listed, the rest goes on
                unreadable.append([path, f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"])
        images = np.stack(imgs) if imgs else np.zeros((0, 3, size, size), np.uint8)
        labels = np.asarray(labs, dtype=np.int64)
    if st.is_local:
        rec = write_shard(Path(st.path(split)), name, images, labels, {"spec": unit["spec"],
                                                                      "unreadable": unreadable})
    else:  # written locally, then copied up (S3 objects appear whole)
        tmp = Path(tempfile.mkdtemp(prefix="clmim-shard-"))
        try:
            rec = write_shard(tmp, name, images, labels, {"spec": unit["spec"], "unreadable": unreadable})
            for suffix in (".npy", ".labels.npy", ".json"):  # the record last
                st.write_bytes(st.path(split, f"{name}{suffix}"), (tmp / f"{name}{suffix}").read_bytes())
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return {**rec, "split": split, "skipped": False}


# ------------------------------------------------------------------------------------------- prepare
def prepare(source: str, dest: str, size: int, shard_mb: float = 256, overrides: list[str] | None = None,
            endpoint: str | None = None, address: str | None = None, verify: bool = False) -> dict:
    """Prepare the store (see the module docstring); return its index. ``verify``: then check every shard against
    the index (shapes, types, labels, checksums), also when the store was already there."""
    index = _prepare(source, dest, size, shard_mb, overrides, endpoint, address)
    if verify:
        verify_store(dest, endpoint)
    return index


def verify_store(dest: str, endpoint: str | None = None) -> None:
    """Every shard of the store at ``dest`` against its index; a one-line ``UserError`` naming the shard."""
    if endpoint:
        os.environ.setdefault("AWS_ENDPOINT_URL", endpoint)
    try:
        root = local_copy(dest)
        index = read_index(root)
        for split in SPLITS:
            open_split(root, index, split)
        verify_checksums(root, index)
    except ConfigError as e:
        raise UserError(str(e).replace("data.path: ", "DEST: ", 1)) from None
    print(f"clmim data prepare: verified {index.get('n_images')} images in "
          f"{sum(len(index['splits'][s]['shards']) for s in SPLITS)} shard(s) against {INDEX}", flush=True)


def _prepare(source: str, dest: str, size: int, shard_mb: float, overrides: list[str] | None,
             endpoint: str | None, address: str | None) -> dict:
    if not 8 <= size <= 1024:
        raise UserError(f"--size: {size} is not an image side in 8..1024 pixels")
    if not 0 < shard_mb <= 4096:
        raise UserError(f"--shard-mb: {shard_mb} is not in (0, 4096]")
    st = Storage.parse(dest, endpoint, Path.cwd())
    builtin = source in BUILTINS
    if not builtin and not Path(source).expanduser().is_dir():
        raise UserError(f"SOURCE: {source!r} is neither a folder nor one of {', '.join(BUILTINS)}")
    skipped: list[tuple[str, str]] = []
    if builtin:
        arrays, classes = _builtin_arrays(source, size, overrides or [])
        fingerprint = hashlib.sha256(b"".join(a[0].tobytes()[:1 << 20] for a in arrays.values())).hexdigest()
        n_items = {k: len(v[1]) for k, v in arrays.items()}
    else:
        if overrides:
            raise UserError("--set: only for a built-in SOURCE (an ImageFolder has no data.* settings)")
        items, classes, skipped = _folder_items(Path(source).expanduser().resolve())
        fingerprint = hashlib.sha256("\n".join(p for v in items.values() for p, _ in v).encode()).hexdigest()
        n_items = {k: len(v) for k, v in items.items()}
    args = {"source": source if builtin else str(Path(source).expanduser().resolve()), "size": size,
            "shard_mb": shard_mb, "overrides": overrides or [], "files": fingerprint}
    spec = hashlib.sha256(json.dumps(args, sort_keys=True).encode()).hexdigest()[:16]
    st.check_writable("DEST")
    old = st.read_text(st.path(INDEX))
    if old is not None:
        try:
            index = json.loads(old)
        except ValueError:
            index = {}
        if index.get("spec") == spec:
            print(f"clmim data prepare: {st.uri} already holds this store ({index.get('n_images')} images); "
                  "nothing to do", flush=True)
            return index
        raise UserError(f"DEST: {st.uri} holds a different store (made from {index.get('args', {}).get('source')!r} "
                        f"at {index.get('size')} px); pick another DEST or remove it")
    per_shard = max(1, int(shard_mb * 1e6 // (3 * size * size)))
    units = []
    for split in ("train", "eval"):
        for k, lo in enumerate(range(0, n_items[split], per_shard)):
            u = {"dest": st.uri, "endpoint": st.endpoint, "split": split, "name": shard_name(k), "spec": spec,
                 "size": size}
            if builtin:
                u["images"], u["labels"] = (a[lo:lo + per_shard] for a in arrays[split])
            else:  # two plain columns (Ray Data stores them as Arrow; mixed tuples would be pickled)
                chunk = items[split][lo:lo + per_shard]
                u["paths"], u["labels"] = [p for p, _ in chunk], [int(c) for _, c in chunk]
            units.append(u)
    print(f"clmim data prepare: {sum(n_items.values()):,} images of {source} -> {st.uri} at {size} px, "
          f"{len(units)} shard(s) of up to {per_shard:,} images", flush=True)

    init_ray(address)

    records = ray.data.from_items(units, override_num_blocks=len(units)).map(_write_unit, num_cpus=1).take_all()
    splits = {}
    unreadable = []
    for split in ("train", "eval"):
        recs = sorted((r for r in records if r["split"] == split), key=lambda r: r["name"])
        splits[split] = {"n": sum(r["n"] for r in recs),
                         "shards": [{"name": r["name"], "n": r["n"], "sha256": r["sha256"]} for r in recs]}
        unreadable += [u for r in recs for u in r.get("unreadable", [])]
    unreadable += [list(x) for x in skipped]
    index = {"format": FORMAT, "size": size, "classes": classes, "splits": splits, "spec": spec, "args": args,
             "n_images": sum(s["n"] for s in splits.values()), "unreadable": unreadable}
    st.write_text(st.path(INDEX), json.dumps(index, indent=1))
    skipped = sum(r.get("skipped", False) for r in records)
    print(f"clmim data prepare: wrote {index['n_images']:,} images ({splits['train']['n']:,} train, "
          f"{splits['eval']['n']:,} eval, {len(classes)} classes) in {len(records)} shard(s)"
          + (f", {skipped} already there from an interrupted run" if skipped else ""), flush=True)
    if unreadable:
        print(f"clmim data prepare: {len(unreadable)} unreadable image(s) or folder(s) left out, listed in "
              f"{INDEX}:", flush=True)
        for path, why in unreadable[:20]:
            print(f"  {path!r}: {why}", flush=True)
    return index
