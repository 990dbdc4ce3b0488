"""A sharded, pre-decoded image store: written once by ``clmim data prepare``, streamed by trials
(``data.dataset: store``, ``data.path: DEST``).

    DEST/index.json                        the store's record, written last (a folder without it is incomplete)
    DEST/<split>/shard-NNNNN.npy           uint8 (n, 3, S, S): the split's images, in source order
    DEST/<split>/shard-NNNNN.labels.npy    int64 (n,)
    DEST/<split>/shard-NNNNN.json          the shard's record: spec hash, count, sha256, unreadable files; written
                                           after its arrays, so an interrupted prepare redoes only shards lacking one

Reading: positioned reads (``os.pread``) of just the images a batch needs, through the page cache, so every trial on
a node shares one cached copy and a process holds only the batch it reads (memory does not grow with the store).
A store in S3 is copied once per node into a local cache (``$CLMIM_STORE_CACHE``, else ``~/.cache/clmim/stores``),
keyed by its index's checksum.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import ConfigError, excerpt
from .split import Split
from .storage import Storage

FORMAT = 1
INDEX = "index.json"
SPLITS = ("train", "eval")
FRACTION_SEED = 20_261_129  # fixed: data.fraction subsets are the same for every trial and every run


# ------------------------------------------------------------------------------------------- writing
def shard_name(i: int) -> str:
    return f"shard-{i:05d}"


def write_shard(folder: Path, name: str, images: np.ndarray, labels: np.ndarray, record: dict) -> dict:
    """Write one shard's arrays, then its record (with the images' sha256 and count); return the record."""
    folder.mkdir(parents=True, exist_ok=True)
    for suffix, arr in ((".npy", np.ascontiguousarray(images, dtype=np.uint8)),
                        (".labels.npy", np.asarray(labels, dtype=np.int64))):
        tmp = folder / f".{name}{suffix}.tmp"
        with open(tmp, "wb") as f:
            np.save(f, arr)
        os.replace(tmp, folder / f"{name}{suffix}")
    rec = {**record, "name": name, "n": int(len(labels)),
           "sha256": hashlib.sha256(np.ascontiguousarray(images, dtype=np.uint8).data).hexdigest()}
    tmp = folder / f".{name}.json.tmp"
    tmp.write_text(json.dumps(rec))
    os.replace(tmp, folder / f"{name}.json")
    return rec


def read_shard_record(folder: Path, name: str) -> dict | None:
    """The shard's record if its arrays and record are all there; else None (write it again)."""
    try:
        rec = json.loads((folder / f"{name}.json").read_text())
    except (OSError, ValueError):
        return None
    ok = (folder / f"{name}.npy").is_file() and (folder / f"{name}.labels.npy").is_file()
    return rec if ok and isinstance(rec, dict) else None


# ------------------------------------------------------------------------------------------- reading
def _npy_header(path: Path) -> tuple[int, tuple[int, ...]]:
    """(byte offset of the data, shape) of a .npy file."""
    m = np.load(path, mmap_mode="r")  # reads the header only
    offset, shape = m.offset, m.shape
    del m
    return offset, shape


@dataclass
class StoreSplit:
    """One split of a store: its labels in memory (8 bytes an image), its images read on demand."""

    files: list[Path]
    starts: np.ndarray  # (shards + 1,) first global index of each shard, then the total
    offsets: list[int]  # data offset of each shard's .npy
    image_shape: tuple[int, int, int]
    labels: torch.Tensor
    masks = None  # a store holds no segmentation masks (the dense probe needs the synthetic set's)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def image_bytes(self) -> int:
        return math.prod(self.image_shape)

    def take(self, idx) -> torch.Tensor:
        """uint8 images (len(idx), 3, S, S) at the given global indices, read with one pread each (in file
        order, so neighbouring images are read in sequence)."""
        idx = np.asarray(idx, dtype=np.int64)
        out = np.empty((len(idx), *self.image_shape), dtype=np.uint8)
        flat = out.reshape(len(idx), -1)
        shard = np.searchsorted(self.starts, idx, side="right") - 1
        order = np.lexsort((idx, shard))
        size = self.image_bytes
        fds: dict[int, int] = {}
        try:
            for j in order:
                s = int(shard[j])
                if s not in fds:
                    fds[s] = os.open(self.files[s], os.O_RDONLY)
                pos = self.offsets[s] + (int(idx[j]) - int(self.starts[s])) * size
                got = os.preadv(fds[s], [memoryview(flat[j])], pos)
                if got != size:
                    raise OSError(f"{self.files[s]}: short read at image {int(idx[j])} (store damaged?)")
        finally:
            for fd in fds.values():
                os.close(fd)
        return torch.from_numpy(out)

    def subset(self, n: int, seed: int):
        """A fixed, seeded subset of at most n images, read into memory (an in-memory ``data.Split``)."""
        idx = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))[:n].numpy()
        idx.sort()
        return Split(self.take(idx), self.labels[idx])

    def select(self, idx: np.ndarray) -> StoreSplit:
        """The images at ``idx`` (sorted global indices) as a split of its own, still read on demand."""
        return _Selected(self, np.asarray(idx, dtype=np.int64))


class _Selected(StoreSplit):
    def __init__(self, base: StoreSplit, idx: np.ndarray):
        self.base, self.idx = base, idx
        self.image_shape, self.labels = base.image_shape, base.labels[torch.from_numpy(idx)]

    def take(self, idx) -> torch.Tensor:
        return self.base.take(self.idx[np.asarray(idx, dtype=np.int64)])

    def select(self, idx: np.ndarray) -> StoreSplit:
        return _Selected(self.base, self.idx[np.asarray(idx, dtype=np.int64)])


def read_index(root: Path) -> dict:
    """The store's index.json; a ``ConfigError`` naming the path if there is none (an unprepared or incomplete
    store) or it is not a store's."""
    try:
        index = json.loads((root / INDEX).read_text())
    except FileNotFoundError:
        raise ConfigError(f"data.path: {str(root)!r} is not a prepared store (no {INDEX}; run `clmim data prepare "
                          "SOURCE DEST` first, or it was interrupted: run it again)") from None
    except (OSError, ValueError) as e:
        raise ConfigError(f"data.path: {str(root / INDEX)!r} is unreadable ({type(e).__name__})") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT or "splits" not in index:
        raise ConfigError(f"data.path: {str(root / INDEX)!r} is not a clmim store index (format {FORMAT})")
    return index


SHARD_NAME = re.compile(r"shard-\d{5}")


def _bad(root: Path, what: str):
    return ConfigError(f"data.path: store {str(root)!r}: {what}")


def check_index(root: Path, index: dict) -> None:
    """The index's own shape: a size, class names, and per split a list of shards, each a plain shard name (never a
    path: ``../x`` or ``/abs`` would read files outside the store) with a non-negative whole count and a checksum;
    a ``ConfigError`` naming what is wrong."""
    size, classes = index.get("size"), index.get("classes")
    if not (isinstance(size, int) and not isinstance(size, bool) and 1 <= size <= 4096):
        raise _bad(root, f"size {size!r} is not an image side in pixels")
    if not (isinstance(classes, list) and classes and all(isinstance(c, str) for c in classes)):
        raise _bad(root, "classes is not a list of class names")
    splits = index.get("splits")
    if not isinstance(splits, dict) or set(SPLITS) - set(splits):
        raise _bad(root, f"splits must hold {' and '.join(SPLITS)}")
    for split in SPLITS:
        shards = splits[split].get("shards") if isinstance(splits[split], dict) else None
        if not isinstance(shards, list):
            raise _bad(root, f"splits.{split}.shards is not a list")
        for i, sh in enumerate(shards):
            name = sh.get("name") if isinstance(sh, dict) else None
            if not (isinstance(name, str) and SHARD_NAME.fullmatch(name)):
                raise _bad(root, f"{split} shard #{i}: name {excerpt(name, 60)} is not shard-NNNNN")
            n = sh.get("n")
            if not (isinstance(n, int) and not isinstance(n, bool) and n >= 0):
                raise _bad(root, f"shard {split}/{name}: count {excerpt(n, 30)} is not a whole number >= 0")
            if not (isinstance(sh.get("sha256"), str) and re.fullmatch(r"[0-9a-f]{64}", sh["sha256"])):
                raise _bad(root, f"shard {split}/{name}: no sha256 of its images")


def open_split(root: Path, index: dict, split: str) -> StoreSplit:
    """A split of a local store (labels loaded, images on demand). Every shard is checked against the index before
    a byte is read: uint8 images (n, 3, size, size), int64 labels (n,) inside the class range, n as the index says;
    a ``ConfigError`` naming the shard otherwise."""
    check_index(root, index)
    size, n_classes = index["size"], len(index["classes"])
    shards = index["splits"][split]["shards"]
    files = [root / split / f"{s['name']}.npy" for s in shards]
    offsets, labels = [], []
    for sh, f in zip(shards, files, strict=True):
        where = f"shard {split}/{sh['name']}"
        try:
            m = np.load(f, mmap_mode="r")  # reads the header only
            lab = np.load(root / split / f"{sh['name']}.labels.npy", allow_pickle=False)
        except (OSError, ValueError) as e:
            raise _bad(root, f"{where}: unreadable ({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None
        if m.dtype != np.uint8 or m.shape[1:] != (3, size, size) or m.shape[0] != sh["n"]:
            raise _bad(root, f"{where}: images are {m.dtype} {tuple(m.shape)}, the index says uint8 "
                             f"({sh['n']}, 3, {size}, {size})")
        if not np.issubdtype(lab.dtype, np.integer) or lab.shape != (sh["n"],):
            raise _bad(root, f"{where}: labels are {lab.dtype} {tuple(lab.shape)}, expected ({sh['n']},) integers")
        if len(lab) and (lab.min() < 0 or lab.max() >= n_classes):
            raise _bad(root, f"{where}: labels outside 0..{n_classes - 1} (the store has {n_classes} classes)")
        offsets.append(m.offset)
        labels.append(lab.astype(np.int64))
        del m
    counts = [s["n"] for s in shards]
    starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return StoreSplit(files, starts, offsets, (3, size, size),
                      torch.from_numpy(np.concatenate(labels) if labels else np.zeros(0, np.int64)))


def verify_checksums(root: Path, index: dict) -> None:
    """Every shard's images against the sha256 the index recorded (the bytes after the .npy header, read in 8 MB
    pieces); a ``ConfigError`` naming the first shard that differs."""
    check_index(root, index)
    for split in SPLITS:
        for sh in index["splits"][split]["shards"]:
            f = root / split / f"{sh['name']}.npy"
            offset, _ = _npy_header(f)
            h = hashlib.sha256()
            with open(f, "rb") as fh:
                fh.seek(offset)
                while chunk := fh.read(1 << 23):
                    h.update(chunk)
            if h.hexdigest() != sh["sha256"]:
                raise _bad(root, f"shard {split}/{sh['name']}: its images do not match the checksum in {INDEX} "
                                 "(damaged or replaced; prepare the store again)")


def verified_once(root: Path, index_text: str) -> None:
    """``verify_checksums`` the first time this node uses the store (a marker per store, its index and its shards'
    sizes and times, under the store cache; concurrent trials wait for one check)."""
    index = json.loads(index_text)
    check_index(root, index)
    stamp = [index_text] + [f"{f}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for split in SPLITS
                            for sh in index["splits"][split]["shards"]
                            for f in [root / split / f"{sh['name']}.npy"] if f.is_file()]
    key = hashlib.sha256(f"{Path(root).resolve()}\n".encode() + "\n".join(stamp).encode()).hexdigest()[:16]
    d = cache_root() / ".verified"  # (beside the cached copies of S3 stores, which are named by their key)
    d.mkdir(parents=True, exist_ok=True)
    with open(d / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (d / key).is_file():
            verify_checksums(root, index)
            (d / key).write_text(str(root))


def cache_root() -> Path:
    return Path(os.environ.get("CLMIM_STORE_CACHE") or Path.home() / ".cache" / "clmim" / "stores")


def local_copy(path: str) -> Path:
    """A local folder holding the store at ``path``: itself, or for ``s3://...`` a cached copy on this node (made
    once, under a lock, keyed by the index's checksum; endpoint from $AWS_ENDPOINT_URL)."""
    if not path.startswith("s3://"):
        return Path(path).expanduser()

    st = Storage.parse(path, None, Path.cwd())
    index_text = st.read_text(st.path(INDEX))
    if index_text is None:
        raise ConfigError(f"data.path: {path!r} is not a prepared store (no {INDEX} there)")
    key = hashlib.sha256(f"{path}\n{index_text}".encode()).hexdigest()[:16]
    cache = cache_root() / key
    cache.parent.mkdir(parents=True, exist_ok=True)
    with open(cache.parent / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one download per node, the other trials wait for it
        if not (cache / INDEX).is_file():
            tmp = cache.with_name(f".{key}.tmp")

            shutil.rmtree(tmp, ignore_errors=True)
            st.download(st.path(), tmp)
            os.replace(tmp, cache)
    return cache


# ------------------------------------------------------------------------------------------- subsets
def fraction_indices(labels: np.ndarray, fraction: float) -> np.ndarray:
    """Sorted indices of a class-balanced subset: from each class, the first ceil(fraction x its size) images of a
    fixed permutation (at least one). The permutation does not depend on the fraction or the trial, so the subset of
    a smaller fraction is always inside that of a larger one (nested) and every trial gets the same one."""
    labels = np.asarray(labels)
    if fraction >= 1.0:
        return np.arange(len(labels))
    rng = np.random.default_rng(FRACTION_SEED)
    order = rng.permutation(len(labels))
    keep = []
    for c in np.unique(labels):
        members = order[labels[order] == c]  # class c in the fixed permuted order
        keep.append(members[:max(1, math.ceil(fraction * len(members)))])
    return np.sort(np.concatenate(keep))
