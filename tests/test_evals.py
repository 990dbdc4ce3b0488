"""Evaluations beyond the frozen-feature probes: fine-tuning, robustness to frequency-filtered noise, the dense
probe, CKA against the untrained encoder, and the tables they land in."""

import math

import pytest
import torch
from conftest import FULL_EVAL, tiny
from torch import nn

from orchestrator.results import curves_from_results, noise_from_results, trial_row
from trainables.checkpoints import export_weights, find_checkpoint, load_weights
from trainables.config import ConfigError, load_config
from trainables.data import build_data
from trainables.finetune import build_classifier, layer_decay_groups
from trainables.objectives.mixture import build_objective
from trainables.probes import cka_rows, dense_rows, extract_features, mean_iou, patch_labels
from trainables.robustness import band_mask, band_noise, noise_accuracy
from trainables.trainer import train


# ------------------------------------------------------------------------------------------- band-passed noise
@pytest.mark.parametrize("size,bands", [(32, 8), (16, 8), (24, 4)])
def test_band_noise_energy_is_in_its_band_at_the_requested_rms(size, bands):
    gen = torch.Generator().manual_seed(0)
    for band in range(bands):
        noise = band_noise((6, 3, size, size), band, bands, 0.1, gen)
        rms = noise.double().flatten(1).pow(2).mean(1).sqrt()
        torch.testing.assert_close(rms, torch.full((6,), 0.1, dtype=torch.float64), rtol=1e-5, atol=0)
        power = torch.fft.fft2(noise.double()).abs().pow(2).sum((0, 1))  # (size, size) over images and channels
        inside = power[band_mask(size, band, bands)].sum() / power.sum()
        assert inside > 1 - 1e-9, (band, float(inside))
        f = torch.fft.fftfreq(size, dtype=torch.float64).abs() * 2 * math.pi
        radius = torch.maximum(f[:, None], f[None, :])
        centroid = float((power * radius).sum() / power.sum())  # the noise's mean frequency rises band by band
        assert band * math.pi / bands - 1e-9 <= centroid <= (band + 1) * math.pi / bands + 1e-9


def test_fixed_amplitude_noise_carries_more_energy_in_the_high_bands_as_park_and_kim_add_it():
    """Park & Kim add white noise of one std in normalised space, band-passed and not rescaled: a band's RMS is the
    std times the square root of its share of the frequencies, where the
    default convention gives every band one RMS (on 32 px, 8 bands: the highest ~6x the lowest)."""
    size, bands, std = 32, 8, 0.5
    gen = torch.Generator().manual_seed(0)
    rms = []
    for band in range(bands):
        noise = band_noise((64, 3, size, size), band, bands, std, gen, amplitude="fixed")
        rms.append(float(noise.double().pow(2).mean().sqrt()))
        share = float(band_mask(size, band, bands).double().mean())
        assert rms[-1] == pytest.approx(std * math.sqrt(share), rel=0.05)
    assert rms[-1] / rms[0] > 4
    cfg = load_config(tiny(), ["eval.noise.amplitude=fixed", "eval.noise.scale=0.5"])
    assert (cfg.eval.noise.amplitude, cfg.eval.noise.scale) == ("fixed", 0.5)
    with pytest.raises(ConfigError, match="eval.noise.amplitude"):
        load_config(tiny(), ["eval.noise.amplitude=loud"])
    # added in normalised space: a classifier of normalised inputs sees exactly the band-passed noise
    images = torch.full((4, 3, size, size), 128, dtype=torch.uint8)
    seen = []
    noise_accuracy(lambda x: (seen.append(x), torch.zeros(len(x), dtype=torch.long))[1], images,
                   torch.zeros(4, dtype=torch.long), size, bands, std, seed=0, prefix="p", amplitude="fixed")
    clean, noisy_top = seen[0], seen[-1]
    assert float((noisy_top - clean).pow(2).mean().sqrt()) == pytest.approx(rms[-1], rel=0.1)


def test_bands_tile_the_spectrum_and_too_many_bands_are_refused():
    masks = torch.stack([band_mask(32, b, 8) for b in range(8)])
    assert bool((masks.sum(0) == 1).all())  # every frequency in exactly one band
    with pytest.raises(ValueError, match="holds no frequency"):
        band_noise((1, 3, 8, 8), 5, 8, 0.1, torch.Generator())
    with pytest.raises(ConfigError, match="eval.noise.bands"):
        load_config(tiny(**{"eval__noise__bands": 17}))


def test_noise_accuracy_drop_of_a_low_pass_classifier_is_largest_at_low_frequencies():
    """A classifier that reads only the image's mean brightness (a low-pass one) loses accuracy to low-frequency
    noise and none to high-frequency noise."""
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(200) % 2
    images = (labels * 80 + 80).view(-1, 1, 1, 1).expand(-1, 3, 16, 16).to(torch.uint8).contiguous()
    base = float((80 / 255 - 0.485) / 0.229 + (160 / 255 - 0.485) / 0.229) / 2  # midpoint in normalised units

    def classify(x):  # normalised (B, 3, 16, 16) -> mean of channel 0 above the midpoint
        return (x[:, 0].mean((1, 2)) > base).long()

    out = noise_accuracy(classify, images, labels, 16, 4, 1.0, seed=0, prefix="lp")
    assert out["lp_top1_clean"] == 1.0
    assert out["noise/0/lp_top1_drop"] > 0.1
    assert out["noise/3/lp_top1_drop"] == 0.0
    del gen


# ------------------------------------------------------------------------------------------- dense probe
def test_patch_labels_and_mean_iou():
    masks = torch.zeros(1, 8, 8, dtype=torch.uint8)
    masks[0, :4, :4] = 3  # the top-left patch is all object; the top-right patch a quarter
    masks[0, :2, 4:6] = 3
    assert patch_labels(masks, 4).tolist() == [[3, 0, 0, 0]]
    target = torch.tensor([0, 0, 1, 1, 2])
    assert mean_iou(target, target, 3) == 1.0
    # class 0: 1 / 3, class 1: 1 / 3, class 2: 1 / 1 (class 3 absent everywhere: not counted)
    assert mean_iou(torch.tensor([0, 1, 1, 0, 2]), target, 4) == pytest.approx((1 / 3 + 1 / 3 + 1) / 3)


class _TokenEncoder(nn.Module):
    """An encoder-shaped module whose patch tokens are ``features(images)`` at every layer."""

    def __init__(self, features, patch: int, width: int, depth: int = 2):
        super().__init__()
        self.features, self.patch, self.width, self.depth = features, patch, width, depth
        self.norm = nn.Identity()
        self.dummy = nn.Parameter(torch.zeros(1))

    def intermediates(self, x):
        t = self.features(x)  # (B, n, C)
        t = torch.cat([t.mean(1, keepdim=True), t], 1)  # (B, 1 + n, C)
        return [t] * (self.depth + 1)


def test_dense_probe_reaches_one_when_the_input_holds_the_mask_and_chance_on_random_features():
    cfg = load_config(tiny(**{"data__train_size": 128, "data__eval_size": 128, "eval__dense_images": 64}))
    data = build_data(cfg)
    k, p = data.num_classes + 1, 4
    # images that show the mask: channel 0 = label * 20 (what the encoder "sees"); the probe fits on the labelled
    # training images (the training split less the validation split)
    for s in (data.train, data.labelled, data.eval):
        s.images = (s.masks.long() * 20).to(torch.uint8)[:, None].expand(-1, 3, -1, -1).contiguous()

    def sees_mask(x):  # normalised images -> per patch, the histogram of mask labels (B, n, K)
        label = ((x[:, 0] * 0.229 + 0.485) * 255 / 20).round().long().clamp(0, k - 1)  # (B, S, S)
        onehot = nn.functional.one_hot(label, k).float()  # (B, S, S, K)
        b, s = label.shape[0], label.shape[1]
        g = s // p
        return onehot.reshape(b, g, p, g, p, k).mean((2, 4)).reshape(b, g * g, k)

    gen = torch.Generator().manual_seed(0)

    def random_features(x):
        return torch.randn(x.shape[0], (x.shape[-1] // p) ** 2, 32, generator=gen)

    good = [v for _, _, m, v in dense_rows(_TokenEncoder(sees_mask, p, k), data, cfg) if m == "dense_miou"]
    bad = [v for _, _, m, v in dense_rows(_TokenEncoder(random_features, p, 32), data, cfg) if m == "dense_miou"]
    test = patch_labels(data.eval.subset(64, cfg.run.seed).masks, p).flatten()
    chance = mean_iou(torch.zeros_like(test), test, k)  # every patch called background
    assert min(good) > 0.95, good
    assert max(bad) < chance + 0.1, (bad, chance)


def test_dense_probe_is_skipped_without_masks():
    cfg = load_config(tiny(**{"data__dataset": "digits", "eval__dense_images": 64}))
    assert dense_rows(build_objective(cfg).encoder, build_data(cfg), cfg) == []


def test_cka_rows_of_an_encoder_against_its_own_features_are_one():
    cfg = load_config(tiny())
    enc, images = build_objective(cfg).encoder, build_data(cfg).eval.images[:32]
    own = extract_features(enc, images, 32, layers=list(range(enc.depth + 1)))["gap"]
    rows = cka_rows(extract_features(enc, images, 32, layers=list(range(enc.depth + 1)))["gap"], own)
    assert [r[0] for r in rows] == list(range(enc.depth + 1))
    assert all(abs(v - 1) < 1e-9 for *_, v in rows)


# ------------------------------------------------------------------------------------------- fine-tuning
def test_layer_decay_groups_follow_the_mae_recipe():
    cfg = load_config(tiny())
    model = build_classifier(cfg, build_objective(cfg).encoder.state_dict(), 8)
    groups = layer_decay_groups(model, 0.05, 0.5)
    depth = model.encoder.depth
    by_param = {id(p): g for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert by_param[id(named["head.weight"])]["lr_mult"] == 1.0
    assert by_param[id(named["encoder.vit.blocks.0.attn.qkv.weight"])]["lr_mult"] == 0.5 ** depth
    assert by_param[id(named["encoder.vit.patch_embed.proj.weight"])]["lr_mult"] == 0.5 ** (depth + 1)
    assert by_param[id(named["encoder.vit.blocks.0.attn.qkv.bias"])]["weight_decay"] == 0.0
    assert by_param[id(named["encoder.vit.blocks.0.attn.qkv.weight"])]["weight_decay"] == 0.05
    assert sum(len(g["params"]) for g in groups) == len(named)


@pytest.mark.slow
def test_finetuning_beats_the_linear_probe_on_digits_within_a_small_budget():
    """The same labels for both (eval.samples covers the whole digits train and eval splits); a barely
    pre-trained encoder, so what fine-tuning adds is its own."""
    cfg = load_config({
        "model": {"variant": "micro/4", "img_size": 16}, "data": {"dataset": "digits", "batch_size": 64},
        "optim": {"steps": 10}, "objective": {"lam": 0.0},
        "eval": {"samples": 2000, "dense_images": 0, "cka": False, "noise": {"bands": 0},
                 "finetune": {"steps": 400, "blr": 1.2e-2, "layer_decay": 0.75, "crop_min": 0.8, "flip": False}},
        "run": {"log_every": 50, "threads": 2}})
    seen = []
    final = train(cfg, lambda m, checkpoint=None: seen.append(m))
    assert final["finetune_top1"] > final["linear_top1"] + 0.02, (final["finetune_top1"], final["linear_top1"])
    curve = [m for m in seen if "finetune_loss" in m]
    assert [m["step"] for m in curve] == list(range(60, 411, 50))
    assert curve[-1]["finetune_loss"] < curve[0]["finetune_loss"]
    assert final["step"] == 10 and final["finetune_steps"] == 400 and final["total_steps"] == 410


@pytest.mark.integration
def test_resume_during_finetuning_continues_finetuning_and_matches_a_straight_run(tmp_path):
    base = tiny(**{"objective__lam": 0.5, "optim__steps": 4, "run__ckpt_every": 3, "model__drop_path": 0.1,
                   "eval__finetune__steps": 6, "eval__noise__bands": 2})
    straight = tmp_path / "straight"
    a = train(load_config(base, [f"run.out_dir={straight}"]))
    ft_ckpt = straight / "checkpoints" / "step_0000009"  # fine-tuning step 5 of 6
    assert load_weights(ft_ckpt / "checkpoint.pt")["phase"] == "finetune"
    resumed = tmp_path / "resumed"
    seen = []
    b = train(load_config(base, [f"run.out_dir={resumed}", f"run.resume={ft_ckpt}"]),
              lambda m, checkpoint=None: seen.append(m))
    assert all("finetune_loss" in m or "resumed_from" in m for m in seen)  # no pre-training step or probe again
    assert b["resumed_from"] == 9 and a["resumed_from"] == 0
    for k in ("finetune_top1", "linear_top1", "noise/1/finetune_top1", "noise/1/linear_top1", "step"):
        assert a[k] == b[k], k
    wa, wb = (load_weights(find_checkpoint(d))["model"] for d in (straight, resumed))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=0, msg=k)
    # the exported weights are the pre-trained encoder, never the fine-tuned one
    exported = load_weights(export_weights(find_checkpoint(resumed), tmp_path / "model.pt"))
    alone = tmp_path / "pretrain_only"  # the same pre-training without fine-tuning after it
    train(load_config(base, [f"run.out_dir={alone}", "eval.finetune.steps=null"]))
    pretrained = load_weights(alone / "checkpoints" / "step_0000004" / "checkpoint.pt")
    for k, v in exported["model"].items():
        torch.testing.assert_close(v, pretrained["model"][k], rtol=0, atol=0, msg=k)
    assert exported["step"] == 4


# ------------------------------------------------------------------------------------------- tables
def test_evaluations_land_in_their_tables():
    results = [{"step": 0, "noise/0/linear_top1": 0.5, "noise/0/linear_top1_drop": 0.1, "linear_top1_clean": 0.6},
               {"step": 4, "finetune_loss": 1.5},
               {"step": 4, "noise/1/finetune_top1_drop": 0.2, "finetune_top1": 0.7, "seconds_probes": 1.0}]
    rows = noise_from_results(results, bands=2)
    assert rows[0] == (0, 0, 0.0, math.pi / 2, "linear_top1", 0.5)
    assert (4, 1, math.pi / 2, math.pi, "finetune_top1_drop", 0.2) in rows
    curves = curves_from_results(results)
    assert not any(m.startswith("noise/") or m.startswith("seconds_") for _, _, m, _ in curves)
    assert (4, None, "finetune_loss", 1.5) in curves
    final_report = {"step": 2, "resumed_from": 0, "finetune_top1": 0.7, "linear_top1": 0.6}  # step: pre-training's
    assert curves_from_results([final_report]) == [(2, None, "linear_top1", 0.6)]
    final = {k: v for r in results for k, v in r.items()}
    row = trial_row("s", "t", "a", "TERMINATED", {"objective": {"lam": 0.5}}, final)
    assert row["finetune_top1"] == 0.7 and row["seconds_probes"] == 1.0 and row["linear_top1_clean"] == 0.6


def _eval_reports(lam: float, seed: int) -> list[dict]:
    """A finished trial's reports with every evaluation: CL (lam 1) drops less to high-frequency noise and more
    to low-frequency noise, and fine-tunes lower, than MIM (lam 0); small seed-to-seed spread."""
    jitter = 0.002 * seed
    high, low = (0.05, 0.30) if lam == 1 else (0.30, 0.05)
    step0 = {"step": 0, "linear_top1_clean": 0.5, **{f"layer/{k}/cka_untrained": 1.0 for k in range(3)},
             **{f"noise/{b}/linear_top1_drop": 0.1 for b in range(4)}}
    final = {"step": 10, "epoch": 1.0, "loss": 1.0, "linear_top1": 0.8, "knn_top1": 0.7, "params": 1000,
             "train_flops_per_image": 1e6, "finetune_top1": 0.9 - 0.05 * lam + jitter, "seconds_train": 60.0,
             "seconds_probes": 5.0, "seconds_noise": 3.0, "seconds_finetune": 20.0, "time_total_s": 100.0,
             **{f"layer/{k}/cka_untrained": 1.0 - 0.1 * k * (1 + lam) for k in range(3)},
             **{f"layer/{k}/dense_miou": 0.5 - 0.1 * lam + jitter for k in range(3)},
             **{f"noise/{b}/finetune_top1_drop": low + (high - low) * b / 3 + jitter for b in range(4)},
             **{f"noise/{b}/linear_top1_drop": 0.2 for b in range(4)}, "done": True}
    return [step0, final]


def _eval_sweep(root, seeds: int) -> None:
    """Sweep ``ev`` under ``root``: pure MIM and pure CL x ``seeds``, every trial with ``_eval_reports``."""
    from orchestrator.results import write_trial_tables
    from trainables.config import to_dict

    for lam in (0.0, 1.0):
        for seed in range(seeds):
            cfg = to_dict(load_config({}, [f"objective.lam={lam}", f"run.seed={seed}", "eval.noise.bands=4"]))
            write_trial_tables(root / "ev", f"t{int(lam)}{seed}", "TERMINATED", cfg, _eval_reports(lam, seed))


@pytest.mark.integration
def test_report_and_results_show_the_evaluations(tmp_path):
    from orchestrator.cli import show
    from orchestrator.compare import eval_claims, noise_drops
    from orchestrator.layout import SweepLayout
    from orchestrator.query import connect
    from orchestrator.report import build_report

    _eval_sweep(tmp_path, seeds=3)
    con = connect(tmp_path)
    trials = con.execute("SELECT * FROM trials").df()
    robustness = con.execute("SELECT * FROM robustness").df()
    drops = noise_drops(robustness)
    assert set(drops.classifier) == {"finetune"} and len(drops) == 6 * 4  # the fine-tuned model's, at the end
    assert set(drops.untrained) == {0.1}  # the untrained encoder's linear probe at step 0
    claims = eval_claims(trials, robustness).set_index("key")
    assert claims.loc["finetune", "verdict"] == "holds"
    assert claims.loc["noise_high", "verdict"] == "holds" and claims.loc["noise_low", "verdict"] == "holds"
    assert "(finetune)" in claims.loc["noise_high", "claim"]
    tables = {sec.title: sec.table for sec in show(SweepLayout(tmp_path, "ev"))}
    shares = tables["where a trial's time went (share of its wall time, mean over the group's trials)"]
    assert list(shares.evaluations) == [0.28, 0.28] and list(shares.train) == [0.6, 0.6]
    assert "evaluations (pure CL vs pure MIM)" in tables
    page, files = build_report(SweepLayout(tmp_path, "ev"))
    text = page.read_text()
    assert {f.name for f in files} >= {"noise.png", "layers.png"}
    assert "Evaluations: fine-tuning and robustness" in text
    assert "last-layer dense probe mIoU: MIM &gt; CL" in text  # a per-layer claim, in the claims table
    assert "fine-tuning top-1: MIM &gt; CL" in text


def test_a_fine_tuned_drop_is_not_subtracted_from_the_untrained_linear_probe(tmp_path):
    from orchestrator.compare import eval_claims
    from orchestrator.query import connect

    _eval_sweep(tmp_path, seeds=2)
    con = connect(tmp_path)
    claims = eval_claims(con.execute("SELECT * FROM trials").df(),
                         con.execute("SELECT * FROM robustness").df()).set_index("key")
    assert "0.1" in claims.loc["noise_high", "untrained"]  # shown beside, for reference
    assert claims.loc["noise_high", "MIM − untrained"] == "–"  # another classifier: no difference taken


@pytest.mark.integration
def test_reused_features_and_probe_give_what_a_fresh_computation_gives():
    from trainables.probes import run_probes
    from trainables.robustness import linear_noise_accuracy

    cfg = load_config(tiny(**{"eval__noise__bands": 2}))
    data, enc = build_data(cfg), build_objective(cfg).encoder
    keep = {}
    run_probes(enc, data, cfg, keep)
    fresh = extract_features(enc, data.eval.subset(64, 0).images, 32, layers=list(range(enc.depth + 1)))["gap"]
    assert all(torch.equal(keep["eval_gap"][k], fresh[k]) for k in fresh)
    assert linear_noise_accuracy(enc, data, cfg, keep["predict"]["gap"]) == linear_noise_accuracy(enc, data, cfg)


@pytest.mark.integration
def test_cka_with_the_untrained_encoder_after_a_resume_equals_a_straight_run(tmp_path):
    base = tiny(**{"objective__lam": 0.0, "optim__steps": 6, "run__ckpt_every": 3, "eval__cka": True})
    a = train(load_config(base, [f"run.out_dir={tmp_path / 'a'}"]))
    b = train(load_config(base, [f"run.out_dir={tmp_path / 'b'}",
                                 f"run.resume={tmp_path / 'a' / 'checkpoints' / 'step_0000003'}"]))
    keys = [k for k in a if k.endswith("/cka_untrained")]
    assert len(keys) == 7 and b["resumed_from"] == 3
    assert [a[k] for k in keys] == [b[k] for k in keys]
    assert a["layer/6/cka_untrained"] < 1


@pytest.mark.slow
def test_training_does_not_depend_on_which_evaluations_ran(tmp_path):
    """Evaluations draw nothing from the global RNG that training (drop path) reads: the same weights with every
    evaluation on, probed every epoch, and with the optional ones off."""
    base = tiny(**FULL_EVAL, **{"objective__lam": 0.0, "optim__steps": 16, "model__drop_path": 0.2})
    a = tmp_path / "a"
    train(load_config(base, [f"run.out_dir={a}", "eval.every=1"]))
    b = tmp_path / "b"
    train(load_config(base, [f"run.out_dir={b}", "eval.noise.bands=0", "eval.cka=false", "eval.dense_images=0"]))
    wa, wb = (load_weights(find_checkpoint(d))["model"] for d in (a, b))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=0, msg=k)


@pytest.mark.integration
def test_training_seconds_exclude_no_more_than_the_evaluations_during_training(monkeypatch):
    """seconds_train is the loop's time minus the evaluations inside it, not minus step 0's baseline too."""
    import time

    import trainables.trainer as tr

    real = tr.run_probes

    pause = 4.0  # far above two tiny steps on a loaded machine, so the bounds below cannot be met by chance

    def slow(*a, **k):  # every probe call takes an extra `pause` (counted in seconds_probes)
        time.sleep(pause)
        return real(*a, **k)

    monkeypatch.setattr(tr, "run_probes", slow)
    final = train(load_config(tiny(**{"optim__steps": 2, "objective__lam": 0.0})))
    assert final["seconds_probes"] >= 2 * pause  # step 0 and the end
    # The end's evaluation left out (else >= pause); step 0's not subtracted as well (else < 0).
    assert 0 < final["seconds_train"] < pause
