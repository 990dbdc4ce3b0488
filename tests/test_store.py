"""The sharded store: prepare (Ray Data: marked slow and ray), stream, resume, subsets, S3, damaged input."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny

from trainables.config import load_config
from trainables.data import batch_stream, build_data
from trainables.store import fraction_indices, open_split, read_index


def jpegs(root: Path, n: int, classes: int = 3, size: int = 40) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(n):
        d = root / f"class{i % classes}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (size, size + 8, 3), dtype=np.uint8)).save(d / f"{i:04d}.jpg")


@pytest.fixture(scope="module")
def prepared(ray_address, tmp_path_factory):
    """An ImageFolder of 60 JPEGs (one of them corrupt) prepared at 32 px in shards of ~8 images (on Ray Data)."""
    from orchestrator.prepare import prepare

    root = tmp_path_factory.mktemp("data")
    jpegs(root / "src", 60)
    (root / "src" / "class1" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    index = prepare(str(root / "src"), str(root / "store"), 32, shard_mb=8 * 3 * 32 * 32 / 1e6, address=ray_address)
    return root, index


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A store as `clmim data prepare` writes it (53 train images in shards of 8, 6 eval, 3 classes, 32 px), written
    here without Ray: what the readers' tests need (prepare's own tests use ``prepared``)."""
    from trainables.store import FORMAT, INDEX, write_shard

    root = tmp_path_factory.mktemp("written")
    rng = np.random.default_rng(0)
    splits = {}
    for split, n_images in (("train", 53), ("eval", 6)):
        shards = []
        for k, lo in enumerate(range(0, n_images, 8)):
            n = min(8, n_images - lo)
            images = rng.integers(0, 255, (n, 3, 32, 32), dtype=np.uint8)
            rec = write_shard(root / "store" / split, f"shard-{k:05d}", images, rng.integers(0, 3, n), {"spec": "x"})
            shards.append({"name": rec["name"], "n": rec["n"], "sha256": rec["sha256"]})
        splits[split] = {"n": n_images, "shards": shards}
    index = {"format": FORMAT, "size": 32, "classes": ["class0", "class1", "class2"], "splits": splits,
             "n_images": 59}
    (root / "store" / INDEX).write_text(json.dumps(index))
    return root, index


@pytest.mark.slow
@pytest.mark.extended
@pytest.mark.ray
def test_prepare_writes_shards_and_lists_the_corrupt_file(prepared):
    root, index = prepared
    assert index["splits"]["train"]["n"] + index["splits"]["eval"]["n"] == 60
    assert index["classes"] == ["class0", "class1", "class2"] and index["size"] == 32
    assert len(index["splits"]["train"]["shards"]) >= 6  # ~8 images a shard
    [(path, why)] = index["unreadable"]
    assert path.endswith("class1/broken.jpg") and why
    split = open_split(root / "store", read_index(root / "store"), "train")
    x = split.take([0, len(split) - 1, 3])
    assert x.shape == (3, 3, 32, 32) and x.dtype == torch.uint8
    from orchestrator.prepare import _folder_items, decode

    items, _, _ = _folder_items(root / "src")  # the store keeps source order (unreadable files left out)
    first, label = items["train"][0]
    assert torch.equal(x[0], torch.from_numpy(decode(first, 32))) and split.labels[0] == label


@pytest.mark.slow
@pytest.mark.extended
@pytest.mark.ray
def test_prepare_again_is_a_no_op_and_a_different_store_is_refused(prepared, capsys):
    from orchestrator.prepare import prepare
    from trainables.errors import UserError

    root, index = prepared
    mtimes = {f: f.stat().st_mtime_ns for f in (root / "store").rglob("*")}
    again = prepare(str(root / "src"), str(root / "store"), 32, shard_mb=8 * 3 * 32 * 32 / 1e6)
    assert again == index and "nothing to do" in capsys.readouterr().out
    assert {f: f.stat().st_mtime_ns for f in (root / "store").rglob("*")} == mtimes
    with pytest.raises(UserError, match="holds a different store"):
        prepare(str(root / "src"), str(root / "store"), 24)


@pytest.mark.slow
@pytest.mark.extended
@pytest.mark.ray
def test_interrupted_prepare_redoes_only_missing_shards(prepared, capsys):
    import shutil

    from orchestrator.prepare import prepare

    root, index = prepared
    part = root / "partial"
    shutil.copytree(root / "store", part)
    (part / "index.json").unlink()  # it stopped before the index ...
    (part / "train" / "shard-00001.json").unlink()  # ... and before this shard's record
    kept = (part / "train" / "shard-00000.npy").stat().st_mtime_ns
    again = prepare(str(root / "src"), str(part), 32, shard_mb=8 * 3 * 32 * 32 / 1e6)
    assert again["splits"] == index["splits"]
    assert (part / "train" / "shard-00000.npy").stat().st_mtime_ns == kept
    assert "already there from an interrupted run" in capsys.readouterr().out


def test_store_stream_resumes_batch_for_batch(store):
    root, _ = store
    split = open_split(root / "store", read_index(root / "store"), "train")
    straight = batch_stream(split, 8, seed=3, start_step=0)
    seq = [next(straight) for _ in range(12)]  # crosses an epoch boundary (53 images, 6 steps an epoch)
    resumed = batch_stream(split, 8, seed=3, start_step=7)
    for i in range(7, 12):
        x, y = next(resumed)
        assert torch.equal(x, seq[i][0]) and torch.equal(y, seq[i][1])
    # ranks take disjoint contiguous shares of the same global batch
    r0, r1 = (next(batch_stream(split, 8, seed=3, start_step=0, rank=r, world=2)) for r in (0, 1))
    assert torch.equal(torch.cat([r0[0], r1[0]]), seq[0][0])


def test_fraction_subsets_are_nested_class_balanced_and_fixed():
    labels = np.repeat(np.arange(4), [100, 50, 30, 20])
    a, b = fraction_indices(labels, 0.1), fraction_indices(labels, 0.5)
    assert set(a) <= set(b) and np.array_equal(a, fraction_indices(labels, 0.1))
    assert np.bincount(labels[a]).tolist() == [10, 5, 3, 2]
    assert len(fraction_indices(labels, 1.0)) == 200
    cfg = load_config(tiny(), ["data.fraction=0.25", "data.train_size=200"])
    d1, d2 = build_data(cfg), build_data(load_config(tiny(), ["data.fraction=0.25", "data.train_size=200",
                                                              "run.seed=0"]))
    assert torch.equal(d1.train.labels, d2.train.labels) and 40 <= len(d1.train) <= 60


@pytest.mark.integration
def test_two_trials_train_from_one_store(store, tmp_path):
    root, _ = store
    code = ("import sys; sys.path.insert(0, 'tests'); from conftest import tiny; "
            "from trainables.config import load_config; from trainables.trainer import train; "
            f"print(train(load_config(tiny(), ['data.dataset=store', 'data.path={root / 'store'}', "
            "'model.img_size=24', 'optim.steps=4', 'eval.samples=32', 'data.batch_size=16', "
            "'eval.finetune.steps=2']))['finetune_top1'])")  # fine-tuning reads the store's eval split per batch
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              cwd=str(Path(__file__).resolve().parents[1])) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert outs[0][0] == outs[1][0]  # the same data, the same seed: the same result


@pytest.mark.integration
def test_a_trial_reads_a_store_in_s3(store, tmp_path, monkeypatch):
    import boto3
    from conftest import _free_port
    from moto.server import ThreadedMotoServer

    from trainables.storage import Storage
    from trainables.trainer import train

    root, _ = store
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    try:
        endpoint = f"http://127.0.0.1:{port}"
        for k, v in dict(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1",
                         AWS_ENDPOINT_URL=endpoint, CLMIM_STORE_CACHE=str(tmp_path / "cache")).items():
            monkeypatch.setenv(k, v)
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="data")
        st = Storage("s3://data/stores/tiny", endpoint)
        st.upload(root / "store", st.path())
        cfg = load_config(tiny(), ["data.dataset=store", "data.path=s3://data/stores/tiny", "model.img_size=24",
                                   "optim.steps=2", "eval.samples=32", "data.batch_size=16"])
        final = train(cfg)
        assert final["step"] == 2 and 0 <= final["linear_top1"] <= 1
        cached = [c for c in (tmp_path / "cache").iterdir() if not c.name.startswith(".")]
        assert any((c / "index.json").is_file() for c in cached)  # one local copy per node, reused
        assert json.loads(next(c for c in cached if c.is_dir()).joinpath("index.json").read_text())["size"] == 32
    finally:
        server.stop()


def test_store_config_errors_name_the_problem(store, tmp_path):
    from trainables.config import ConfigError

    root, _ = store
    with pytest.raises(ConfigError, match="not a prepared store"):
        build_data(load_config(tiny(), ["data.dataset=store", f"data.path={tmp_path}"]))
    with pytest.raises(ConfigError, match="stored at 32 px"):
        build_data(load_config(tiny(), ["data.dataset=store", f"data.path={root / 'store'}", "model.img_size=64"]))


@pytest.mark.slow
@pytest.mark.extended
@pytest.mark.ray
def test_builtin_sets_go_through_the_same_path(ray_address, tmp_path):
    from orchestrator.prepare import prepare

    index = prepare("digits", str(tmp_path / "digits"), 16, address=ray_address)
    assert index["splits"]["train"]["n"] + index["splits"]["eval"]["n"] == 1797 and len(index["classes"]) == 10
    data = build_data(load_config(tiny(), ["data.dataset=store", f"data.path={tmp_path / 'digits'}",
                                           "model.img_size=16"]))
    direct = build_data(load_config(tiny(), ["data.dataset=digits", "model.img_size=16"]))
    assert len(data.train) == len(direct.train) and torch.equal(data.train.labels, direct.train.labels)
    assert torch.equal(data.train.take(np.arange(5)), direct.train.images[:5])


@pytest.mark.integration
def test_prepare_train_resume_equals_a_straight_run(store, tmp_path):
    """Training from the store to 2N straight, and resuming from the step-N checkpoint to 2N: the same weights
    (so the same batches in the same order)."""
    from trainables.checkpoints import find_checkpoint
    from trainables.trainer import train

    root, _ = store
    base = tiny(**{"objective__lam": 0.5, "optim__steps": 8, "run__ckpt_every": 4, "data__batch_size": 16,
                   "data__dataset": "store", "data__path": str(root / "store"), "model__img_size": 24,
                   "eval__samples": 32})
    straight = tmp_path / "straight"
    train(load_config(base, [f"run.out_dir={straight}"]))
    resumed = tmp_path / "resumed"
    train(load_config(base, [f"run.out_dir={resumed}", f"run.resume={straight / 'checkpoints' / 'step_0000004'}"]))
    a, b = (torch.load(find_checkpoint(d), weights_only=True)["model"] for d in (straight, resumed))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


# ------------------------------------------------------------------------ a damaged or lying store (issue 23, 9)
def small_store(root: Path) -> dict:
    """A store of 2 + 1 shards written without Ray (what `clmim data prepare` writes), and its index."""
    from trainables.store import FORMAT, INDEX, write_shard

    rng = np.random.default_rng(0)
    splits = {}
    for split, counts in (("train", (5, 3)), ("eval", (4,))):
        shards = []
        for k, n in enumerate(counts):
            rec = write_shard(root / split, f"shard-{k:05d}", rng.integers(0, 255, (n, 3, 16, 16), dtype=np.uint8),
                              rng.integers(0, 3, n), {"spec": "x"})
            shards.append({"name": rec["name"], "n": rec["n"], "sha256": rec["sha256"]})
        splits[split] = {"n": sum(counts), "shards": shards}
    index = {"format": FORMAT, "size": 16, "classes": ["a", "b", "c"], "splits": splits, "n_images": 12}
    (root / INDEX).write_text(json.dumps(index))
    return index


@pytest.mark.parametrize("lie,match", [
    (lambda ix, r: ix["splits"]["train"]["shards"][0].update(n=2), "images are uint8 .5, 3, 16, 16., the index says"),
    (lambda ix, r: ix["splits"]["train"]["shards"][0].update(n=-1), "count -1 is not a whole number"),
    (lambda ix, r: ix["splits"]["train"]["shards"][0].update(n="5"), "count '5' is not a whole number"),
    (lambda ix, r: ix["splits"]["train"]["shards"][0].update(name="../../etc/x"), "name '../../etc/x' is not shard"),
    (lambda ix, r: ix["splits"]["train"]["shards"][0].update(name="/abs/x"), "name '/abs/x' is not shard"),
    (lambda ix, r: np.save(r / "train" / "shard-00000.npy", np.zeros((5, 3, 16, 16))), "images are float64"),
    (lambda ix, r: np.save(r / "train" / "shard-00001.labels.npy", np.array([0, 1, 7])), r"labels outside 0\.\.2"),
    (lambda ix, r: np.save(r / "train" / "shard-00001.labels.npy", np.array([0, 1])), r"labels are int64 \(2,\)"),
    (lambda ix, r: ix.update(size="16"), "size .16. is not an image side"),
])
def test_a_store_index_that_lies_is_a_one_line_error_naming_the_shard(tmp_path, lie, match):
    from trainables.config import ConfigError
    from trainables.store import INDEX, open_split

    index = small_store(tmp_path)
    lie(index, tmp_path)
    (tmp_path / INDEX).write_text(json.dumps(index))
    with pytest.raises(ConfigError, match=match) as e:
        for split in ("train", "eval"):
            open_split(tmp_path, read_index(tmp_path), split)
    assert "\n" not in str(e.value)


def test_a_stores_checksums_are_checked_on_first_use_on_a_node_and_by_verify(tmp_path, monkeypatch, capsys):
    from orchestrator.cli import main
    from trainables.config import ConfigError

    monkeypatch.setenv("CLMIM_STORE_CACHE", str(tmp_path / "cache"))
    small_store(tmp_path / "st")
    cfg = load_config(tiny(), ["data.dataset=store", f"data.path={tmp_path / 'st'}", "model.img_size=16",
                               "model.variant=micro/4"])
    assert len(build_data(cfg).train) == 8  # verified once, then remembered
    arr = np.load(tmp_path / "st" / "train" / "shard-00001.npy")
    arr[0, 0, 0, 0] ^= 1  # one flipped bit, same shape and type
    np.save(tmp_path / "st" / "train" / "shard-00001.npy", arr)
    with pytest.raises(ConfigError, match="shard train/shard-00001: its images do not match the checksum"):
        build_data(cfg)  # the file changed: this node checks again
    (tmp_path / "src").mkdir()
    for c in ("a", "b"):
        (tmp_path / "src" / c).mkdir()
    assert main(["data", "prepare", "synthetic", str(tmp_path / "st"), "--size", "16", "--verify"]) == 2
    assert "holds a different store" in capsys.readouterr().err


def test_prepare_refuses_control_characters_and_reports_hidden_folders_and_fifos(tmp_path):
    import os

    from orchestrator.prepare import _folder_items
    from trainables.errors import UserError

    jpegs(tmp_path / "src", 6, classes=2)
    (tmp_path / "src" / "..dots").mkdir()
    os.mkfifo(tmp_path / "src" / "class0" / "pipe.jpg")
    items, classes, skipped = _folder_items(tmp_path / "src")
    assert classes == ["class0", "class1"] and len(items["train"]) + len(items["eval"]) == 6
    assert {(Path(p).name, why) for p, why in skipped} == {("..dots", "hidden folder, not a class"),
                                                          ("pipe.jpg", "not a regular file")}
    (tmp_path / "src" / "bad\nname").mkdir()
    with pytest.raises(UserError, match="control character"):
        _folder_items(tmp_path / "src")
