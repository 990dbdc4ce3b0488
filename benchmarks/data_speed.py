"""Data path speed, in one run on this machine: images/s delivered to the training loop (uint8 batches in the
trainer's permuted order) from a prepared store, from torchvision ImageFolder + DataLoader over the same JPEG files,
and from Ray Data's own iterator over the store's shards; peak RSS of a reader as the store grows 10x; prepare
throughput with 1 and 2 Ray CPUs.

    python benchmarks/data_speed.py --images 20000 --size 128 --batch 256 --batches 40
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def make_jpegs(root: Path, n: int, size: int, classes: int = 10) -> None:
    """n JPEG files (quality 90) of noise-textured blobs, ``classes`` class folders, slightly larger than ``size``."""
    from PIL import Image

    rng = np.random.default_rng(0)
    side = int(size * 1.15)
    base = rng.integers(0, 255, (classes, side, side, 3), dtype=np.uint8)
    for i in range(n):
        c = i % classes
        d = root / f"c{c}"
        d.mkdir(parents=True, exist_ok=True)
        img = np.roll(base[c], (i * 7) % side, axis=1) // 2 + rng.integers(0, 128, (side, side, 3), dtype=np.uint8)
        Image.fromarray(img).save(d / f"{i:06d}.jpg", quality=90)


def store_rate(store: Path, batch: int, batches: int) -> float:
    import torch

    from trainables.data import batch_stream
    from trainables.store import open_split, read_index

    split = open_split(store, read_index(store), "train")
    stream = batch_stream(split, batch, seed=0, start_step=0)
    next(stream)
    t = time.perf_counter()
    for _ in range(batches):
        x, _ = next(stream)
    assert x.dtype == torch.uint8
    return batches * batch / (time.perf_counter() - t)


def folder_rate(root: Path, size: int, batch: int, batches: int) -> float:
    import torch
    from torchvision import datasets, transforms

    tf = transforms.Compose([transforms.Resize(size), transforms.CenterCrop(size), transforms.PILToTensor()])
    ds = datasets.ImageFolder(str(root), transform=tf)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, num_workers=2, persistent_workers=True,
                                         generator=torch.Generator().manual_seed(0))
    it = iter(loader)
    next(it)
    t = time.perf_counter()
    n = 0
    for _ in range(batches):
        try:
            x, _ = next(it)
        except StopIteration:
            it = iter(loader)
            x, _ = next(it)
        n += len(x)
    return n / (time.perf_counter() - t)


def ray_data_rate(store: Path, batch: int, batches: int) -> float:
    import ray

    files = sorted(str(f) for f in (store / "train").glob("shard-*[0-9].npy"))
    ds = ray.data.read_numpy(files).randomize_block_order(seed=0)
    it = iter(ds.iter_batches(batch_size=batch, batch_format="numpy", local_shuffle_buffer_size=4 * batch,
                              local_shuffle_seed=0))
    next(it)
    t = time.perf_counter()
    n = 0
    for _ in range(batches):
        try:
            b = next(it)
        except StopIteration:
            break
        n += len(b["data"])
    return n / (time.perf_counter() - t)


RSS_CODE = """
import sys
sys.path.insert(0, {repo!r})
from pathlib import Path
from trainables.data import batch_stream
from trainables.store import open_split, read_index

def hwm():  # this process's own peak RSS (ru_maxrss would carry the parent's over fork and exec)
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1])

store = Path({store!r})
split = open_split(store, read_index(store), "train")
stream = batch_stream(split, {batch}, seed=0, start_step=0)
base = hwm()
for _ in range({batches}):
    next(stream)
print(base, hwm())
"""


TRIAL_CODE = """
import sys
sys.path.insert(0, {repo!r})
from trainables.config import load_config
from trainables.trainer import train

def hwm():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1])

cfg = load_config({{"data": {{"dataset": "store", "path": {store!r}, "batch_size": {batch}}},
                   "model": {{"variant": "micro/4", "img_size": 32}}, "optim": {{"steps": {steps}}},
                   "eval": {{"samples": 256, "probe_images": 32}}, "run": {{"threads": 1}}}})
train(cfg)
print(hwm())
"""


RAY_RSS_CODE = """
import sys
from pathlib import Path
import ray

def hwm():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1])

ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
files = sorted(str(f) for f in (Path({store!r}) / "train").glob("shard-*[0-9].npy"))
base = hwm()
n = 0
while n < {batches}:
    ds = ray.data.read_numpy(files).randomize_block_order(seed=n)
    for b in ds.iter_batches(batch_size={batch}, batch_format="numpy", local_shuffle_buffer_size={batch} * 4):
        n += 1
        if n >= {batches}:
            break
print(base, hwm())
ray.shutdown()
"""


def ray_data_peak_rss_mb(store: Path, batch: int, batches: int) -> tuple[float, float]:
    """(RSS after ray.init, peak RSS) in MB of a fresh process iterating Ray Data batches over the store's shards
    (the consumer only: Ray's object store and workers are other processes)."""
    out = subprocess.run([sys.executable, "-c", RAY_RSS_CODE.format(store=str(store), batch=batch, batches=batches)],
                         capture_output=True, text=True, check=True).stdout.split()
    return int(out[-2]) / 1024, int(out[-1]) / 1024


def trial_peak_rss_mb(store: Path, batch: int, steps: int) -> float:
    """Peak RSS in MB of a whole trial (micro/4 at 32 px cropped from the store, ``steps`` steps, then the probes)."""
    repo = str(Path(__file__).resolve().parents[1])
    out = subprocess.run([sys.executable, "-c", TRIAL_CODE.format(repo=repo, store=str(store), batch=batch,
                                                                   steps=steps)],
                         capture_output=True, text=True, check=True).stdout.split()
    return int(out[-1]) / 1024


def peak_rss_mb(store: Path, batch: int, batches: int) -> tuple[float, float]:
    """(peak RSS after imports and opening the store, peak RSS after streaming) in MB of a fresh process reading
    ``batches`` batches."""
    repo = str(Path(__file__).resolve().parents[1])
    out = subprocess.run([sys.executable, "-c", RSS_CODE.format(repo=repo, store=str(store), batch=batch,
                                                                 batches=batches)],
                         capture_output=True, text=True, check=True).stdout.split()
    return int(out[0]) / 1024, int(out[1]) / 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=20000)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--batches", type=int, default=40)
    p.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    a = p.parse_args()
    work = a.work or Path(tempfile.mkdtemp(prefix="clmim-data-speed-"))
    import ray

    from orchestrator.prepare import prepare

    small, big = work / "jpeg-small", work / "jpeg"
    t = time.perf_counter()
    make_jpegs(big, a.images, a.size)
    make_jpegs(small, a.images // 10, a.size)
    print(f"made {a.images} + {a.images // 10} JPEGs in {time.perf_counter() - t:.0f} s under {work}", flush=True)
    results = {}
    for cpus in (1, 2):  # prepare throughput: the same work on a Ray instance of 1, then 2 CPUs
        ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False)
        t = time.perf_counter()
        prepare(str(big), str(work / f"store-{cpus}cpu"), a.size, shard_mb=16)
        results[f"prepare_{cpus}cpu_img_s"] = a.images / (time.perf_counter() - t)
        if cpus == 2:
            prepare(str(small), str(work / "store-small"), a.size, shard_mb=16)
            results["ray_data_img_s"] = ray_data_rate(work / "store-2cpu", a.batch, a.batches)
        ray.shutdown()
    store = work / "store-2cpu"
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    results["store_img_s"] = store_rate(store, a.batch, a.batches)
    results["imagefolder_img_s"] = folder_rate(big, a.size, a.batch, a.batches)
    results["rss_small_mb"] = peak_rss_mb(work / "store-small", a.batch, 4 * a.batches)
    results["rss_big_mb"] = peak_rss_mb(store, a.batch, 4 * a.batches)
    results["ray_data_rss_small_mb"] = ray_data_peak_rss_mb(work / "store-small", a.batch, 4 * a.batches)
    results["ray_data_rss_big_mb"] = ray_data_peak_rss_mb(store, a.batch, 4 * a.batches)
    results["trial_rss_small_mb"] = trial_peak_rss_mb(work / "store-small", 64, 80)
    results["trial_rss_big_mb"] = trial_peak_rss_mb(store, 64, 80)
    results["store_mb"] = sum(f.stat().st_size for f in store.rglob("*") if f.is_file()) / 1e6
    results["jpeg_mb"] = sum(f.stat().st_size for f in big.rglob("*") if f.is_file()) / 1e6
    print(json.dumps(results, indent=1))
    r = results
    print(f"store {r['store_img_s']:,.0f} img/s = {r['store_img_s'] / r['imagefolder_img_s']:.1f}x ImageFolder + "
          f"DataLoader(2 workers) ({r['imagefolder_img_s']:,.0f} img/s), "
          f"{r['store_img_s'] / r['ray_data_img_s']:.1f}x Ray Data iter_batches ({r['ray_data_img_s']:,.0f} img/s)")
    print(f"prepare: {r['prepare_1cpu_img_s']:,.0f} img/s on 1 CPU, {r['prepare_2cpu_img_s']:,.0f} on 2 "
          f"({r['prepare_2cpu_img_s'] / r['prepare_1cpu_img_s']:.2f}x)")
    print(f"peak RSS streaming {4 * a.batches} batches: {r['rss_small_mb'][1]:.0f} MB from {a.images // 10} images, "
          f"{r['rss_big_mb'][1]:.0f} MB from {a.images} (after imports: {r['rss_small_mb'][0]:.0f} / "
          f"{r['rss_big_mb'][0]:.0f} MB)")
    print(f"Ray Data consumer's peak RSS over the same {4 * a.batches} batches: {r['ray_data_rss_small_mb'][1]:.0f} MB "
          f"(small store), {r['ray_data_rss_big_mb'][1]:.0f} MB (10x)")
    print(f"peak RSS of a trial (micro/4, 80 steps of 64, probes): {r['trial_rss_small_mb']:.0f} MB on the small "
          f"store, {r['trial_rss_big_mb']:.0f} MB on the 10x one")


if __name__ == "__main__":
    main()
