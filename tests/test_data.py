import pytest
import torch
from conftest import tiny

from trainables.augment import moco_draws, moco_views, random_resized_crop, simmim_view, to_float
from trainables.config import ConfigError, load_config
from trainables.data import batch_stream, build_data, synthetic_split


def test_synthetic_is_deterministic_and_cue_conflict_disagrees():
    a = synthetic_split(32, 8, 32, seed=5)
    b = synthetic_split(32, 8, 32, seed=5)
    assert (a[0] == b[0]).all() and (a[1] == a[2]).all()
    c = synthetic_split(64, 8, 32, seed=6, conflict=True)
    assert (c[1] != c[2]).all()
    assert a[0].shape == (32, 3, 32, 32) and a[0].dtype.name == "uint8"


def test_bundles_for_synthetic_and_digits():
    syn = build_data(load_config(tiny()))
    assert len(syn.train) == 256 and len(syn.eval) == 64 and syn.cue_conflict is not None
    dig = build_data(load_config(tiny(), ["data.dataset=digits"]))
    assert len(dig.train) + len(dig.eval) == 1797 and dig.num_classes == 10
    assert dig.train.images.shape[1:] == (3, 32, 32)


def test_missing_local_datasets_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="data.path"):
        build_data(load_config(tiny(), ["data.dataset=cifar10", f"data.path={tmp_path}"]))
    with pytest.raises(ConfigError, match="data.path"):
        build_data(load_config(tiny(), ["data.dataset=imagefolder", f"data.path={tmp_path}"]))


def test_imagefolder_reads_local_images(tmp_path):
    from PIL import Image

    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        for i in range(5):
            Image.new("RGB", (40, 30), (i * 40, 10, 200 if cls == "a" else 0)).save(tmp_path / cls / f"{i}.png")
    data = build_data(load_config(tiny(), ["data.dataset=imagefolder", f"data.path={tmp_path}", "data.workers=0"]))
    assert data.num_classes == 2 and len(data.train) + len(data.eval) == 10
    assert data.train.images.shape[1:] == (3, 37, 37)  # 8/7 of 32 px; the device crops to 32


def test_batch_stream_resumes_exactly_and_shards_ranks():
    data = build_data(load_config(tiny()))
    straight = batch_stream(data.train, 32, seed=1, start_step=0)
    seen = [next(straight)[1] for _ in range(12)]  # crosses an epoch boundary (8 steps per epoch)
    resumed = batch_stream(data.train, 32, seed=1, start_step=9)
    for i in range(9, 12):
        assert torch.equal(next(resumed)[1], seen[i])
    r0 = next(batch_stream(data.train, 32, 1, 0, rank=0, world=2))[1]
    r1 = next(batch_stream(data.train, 32, 1, 0, rank=1, world=2))[1]
    assert torch.equal(torch.cat([r0, r1]), seen[0])


def test_augmentations_are_seeded_and_shaped():
    images = build_data(load_config(tiny())).train.images[:4]
    v1 = moco_views(images, 32, moco_draws(4, torch.Generator().manual_seed(0), "cpu"))
    v2 = moco_views(images, 32, moco_draws(4, torch.Generator().manual_seed(0), "cpu"))
    assert v1.shape == (8, 3, 32, 32) and torch.equal(v1, v2)
    assert not torch.equal(v1[:4], v1[4:])
    v3 = moco_views(images, 32, moco_draws(4, torch.Generator().manual_seed(1), "cpu"))
    assert not torch.equal(v1, v3)
    assert simmim_view(images, 48, torch.rand(4, 5)).shape == (4, 3, 48, 48)
    # All draws at 0.5 except "flip": a centred crop of the whole image, flipped when its uniform is below 0.5.
    u = torch.full((4, 5), 0.5)
    u[:2, 4] = 0.0
    crop = random_resized_crop(to_float(images), 32, u, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    torch.testing.assert_close(crop[2:], to_float(images)[2:], atol=1e-5, rtol=0)
    torch.testing.assert_close(crop[:2], to_float(images)[:2].flip(-1), atol=1e-5, rtol=0)


@pytest.mark.parametrize("dataset", ["synthetic", "digits"])
def test_validation_split_is_held_out_of_the_training_labels_and_apart_from_the_eval_split(dataset):
    """Every selection reads the validation split: a fixed draw from the training split (the same for every seed),
    never fit on (the probes and fine-tuning use ``labelled``, the rest), never the evaluation split."""
    cfg = load_config(tiny(**{"data__dataset": dataset, "eval__val_samples": 48}))
    data = build_data(cfg)
    n = len(data.train)
    assert len(data.val) == min(48, n // 4) and len(data.val) + len(data.labelled) == n
    def key(split):
        return {x.numpy().tobytes() for x in split.images}

    val, labelled, ev = key(data.val), key(data.labelled), key(data.eval)
    assert not val & labelled and not val & ev
    other = build_data(load_config(tiny(**{"data__dataset": dataset, "eval__val_samples": 48, "run__seed": 3})))
    if dataset == "digits":  # a fixed data set: one validation split for every seed
        assert torch.equal(other.val.images, data.val.images)
    none = build_data(load_config(tiny(**{"data__dataset": dataset, "eval__val_samples": 0})))
    assert none.val is None and none.labelled is none.train
