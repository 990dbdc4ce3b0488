import math

import pytest
import torch
from conftest import tiny
from torch import nn

from trainables.config import load_config
from trainables.data import build_data
from trainables.objectives.mixture import build_objective
from trainables.probes import (
    AttentivePool,
    attention_distance,
    attention_entropy,
    attention_head_diversity,
    attention_nmi,
    block_cosines,
    center_tokens,
    cka_rows,
    cue_match,
    dense_rows,
    effective_rank,
    extract_features,
    fit_attentive,
    fit_linear,
    fourier_delta_log_amplitude,
    knn_accuracy,
    lowshot_subset,
    mean_iou,
    patch_labels,
    rankme,
    rows_to_metrics,
    run_probes,
    shape_bias,
    token_cosine_similarity,
    token_norm_outliers,
)

SIDE, P = 4, 16  # a 4x4 grid of 16 px patches
N = SIDE * SIDE


def with_cls(a: torch.Tensor) -> torch.Tensor:
    """Embed patch attention (B, H, n, n) into (B, H, 1+n, 1+n) with an arbitrary CLS row/column."""
    b, h, n, _ = a.shape
    out = torch.zeros(b, h, n + 1, n + 1)
    out[..., 1:, 1:] = a * 0.9
    out[..., 1:, 0] = 0.1
    out[..., 0, :] = 1 / (n + 1)
    return out


def grid_distances():
    ys, xs = torch.meshgrid(torch.arange(SIDE), torch.arange(SIDE), indexing="ij")
    pos = torch.stack([ys.flatten(), xs.flatten()], 1).float()
    return torch.cdist(pos, pos) * P


def test_uniform_attention_nmi_zero_and_mean_grid_distance():
    a = with_cls(torch.full((2, 3, N, N), 1 / N))
    assert torch.allclose(attention_nmi(a), torch.zeros(2, 3), atol=1e-6)
    assert torch.allclose(attention_distance(a, P), torch.full((2, 3), grid_distances().mean().item()), atol=1e-4)


def test_identity_attention_distance_zero_nmi_one():
    a = with_cls(torch.eye(N).expand(2, 3, N, N))
    assert torch.allclose(attention_distance(a, P), torch.zeros(2, 3), atol=1e-4)
    assert torch.allclose(attention_nmi(a), torch.ones(2, 3), atol=1e-4)


def test_attention_on_one_key_at_known_offset():
    # every query attends to the patch one row down and two columns right (wrapping on the grid)
    a = torch.zeros(N, N)
    for q in range(N):
        y, x = divmod(q, SIDE)
        a[q, ((y + 1) % SIDE) * SIDE + (x + 2) % SIDE] = 1
    d = attention_distance(with_cls(a.expand(1, 1, N, N)), P)
    expected = grid_distances()[torch.arange(N), a.argmax(1)].mean()
    assert abs(d.item() - expected.item()) < 1e-3
    # without wrapping, from the top-left patch: one down, two right = sqrt(5) patches
    b = torch.zeros(1, 1, N, N)
    b[..., :, 1 * SIDE + 2] = 1
    per_query = attention_distance(with_cls(b), P)
    assert abs(per_query.item() - grid_distances()[:, SIDE + 2].mean().item()) < 1e-3
    assert abs(grid_distances()[0, SIDE + 2].item() - P * math.sqrt(5)) < 1e-4


def test_attention_entropy_tells_collapse_from_uniform_where_nmi_cannot():
    uniform = with_cls(torch.full((1, 1, N, N), 1 / N))
    collapsed = torch.full((1, 1, N, N), 1e-3)  # every query attends to the same two keys
    collapsed[..., [3, 9]] = 1.0
    collapsed = with_cls(collapsed / collapsed.sum(-1, keepdim=True))
    one_to_one = with_cls(torch.eye(N).expand(1, 1, N, N))
    # NMI is ~0 for both uniform and collapsed attention; entropy separates them
    assert attention_nmi(uniform).item() < 1e-6 and attention_nmi(collapsed).item() < 1e-3
    assert attention_entropy(uniform).item() == pytest.approx(1.0, abs=1e-5)
    assert attention_entropy(collapsed).item() < 0.35  # two keys of 16: about log 2 / log 16 = 0.25
    assert attention_entropy(one_to_one).item() < 0.01
    assert attention_entropy(with_cls(torch.rand(2, 3, N, N).softmax(-1))).shape == (2, 3)


def test_fourier_constant_map_vs_white_noise():
    const = torch.ones(4, 64, 8) * torch.randn(1, 1, 8)  # spatially constant per channel
    noise = torch.randn(16, 64, 32)
    c, w = fourier_delta_log_amplitude(const), fourier_delta_log_amplitude(noise)
    assert c.shape == (4,) and c[0] == 0
    assert c[-1] < -5  # only the zero frequency carries energy
    # flat spectrum: about 0 (the zero-frequency bin is real-valued, so E[log|F|] there sits ~0.35 below the
    # complex bins of the same power; the curve is relative to it)
    assert abs(w[-1].item()) < 0.5
    assert w[-1] - c[-1] > 5


def test_token_similarity_and_effective_rank():
    same = torch.randn(2, 1, 8).expand(2, 10, 8)
    assert torch.allclose(token_cosine_similarity(same), torch.ones(2), atol=1e-5)
    assert torch.allclose(effective_rank(same), torch.ones(2), atol=1e-3)
    eye = torch.eye(8).expand(2, 8, 8)
    assert torch.allclose(effective_rank(eye), torch.full((2,), 8.0), atol=1e-3)


def test_linear_probe_separable_and_knn():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(200) % 4
    x = torch.randn(200, 16, generator=g) * 0.1
    x[torch.arange(200), y] += 3.0  # linearly separable
    assert (fit_linear(x[:100], y[:100], 4)(x[100:]) == y[100:]).all()
    assert knn_accuracy(x[:100], y[:100], x[100:], y[100:], k=20) == 1.0


def test_shape_bias_counts_only_cue_matches():
    pred = torch.tensor([0, 1, 2, 3, 9])
    shape = torch.tensor([0, 1, 5, 5, 5])
    texture = torch.tensor([7, 7, 2, 7, 7])
    assert shape_bias(pred, shape, texture) == 2 / 3


def test_cue_match_is_the_share_of_decisions_matching_a_cue():
    pred = torch.tensor([0, 1, 2, 3, 9])
    shape = torch.tensor([0, 1, 5, 5, 5])
    texture = torch.tensor([7, 7, 2, 7, 7])
    assert cue_match(pred, shape, texture) == pytest.approx(3 / 5)


def test_centred_tokens_remove_a_shared_direction():
    torch.manual_seed(0)
    spread = torch.randn(4, 16, 32)
    shared = spread + 50.0 * torch.randn(1, 1, 32)  # one direction every token carries
    # raw cosine similarity is ~1 (the shared direction dominates); centred, the tokens are ~orthogonal again
    assert token_cosine_similarity(shared).mean() > 0.95
    centred = center_tokens(shared)
    assert abs(float(token_cosine_similarity(centred).mean())) < 0.1
    torch.testing.assert_close(centred.mean((0, 1)), torch.zeros(32), atol=1e-4, rtol=0)
    assert effective_rank(centred).mean() > 3 * effective_rank(shared).mean()


@pytest.mark.integration
def test_probe_suite_rows_cover_every_layer():
    cfg = load_config(tiny(eval__lowshot=True, eval__attentive_steps=50), ["eval.probe_images=8"])
    torch.manual_seed(0)
    encoder = build_objective(cfg).encoder
    rows, summary = run_probes(encoder, build_data(cfg), cfg)
    metrics = {(k, h, m) for k, h, m, _ in rows}
    depth, heads = encoder.depth, encoder.spec.heads
    for k in range(1, depth + 1):
        assert (k, None, "attn_distance") in metrics and (k, heads - 1, "attn_nmi") in metrics
    for k in range(depth + 1):
        for m in ("fourier_dlogamp_pi", "token_cossim", "effective_rank", "token_norm_outliers", "knn_top1_gap",
                  "linear_top1_gap", "knn_top1_cls", "linear_top1_cls", "linear10pct_top1_gap",
                  "linear1pct_top1_cls", "rankme_gap", "rankme_cls"):
            assert (k, None, m) in metrics
    assert (depth, None, "attentive_top1") in metrics
    assert all((k, None, "attn_head_div") in metrics for k in range(1, depth + 1))
    both = {f"{m}_{p}" for m in ("knn_top1", "linear_top1", "shape_bias", "cue_match") for p in ("gap", "cls")}
    assert {"knn_top1", "linear_top1", "shape_bias"} | both <= set(summary)
    # the unsuffixed names are eval.pool's (gap by default); the two poolings are different features
    assert summary["linear_top1"] == summary["linear_top1_gap"]
    assert summary["shape_bias"] == summary["shape_bias_gap"]
    assert 0 < summary["cue_match_cls"] <= 1
    # the last layer's probes read on the validation split too (what selections use), beside the eval split's
    assert {"val_linear_top1", "val_knn_top1", "val_linear_top1_cls", "val_knn_top1_gap"} <= set(summary)
    assert summary["val_linear_top1"] == summary["val_linear_top1_gap"]
    flat = rows_to_metrics(rows)
    assert "layer/3/h1/attn_nmi" in flat and "layer/0/fourier_dlogamp_pi" in flat


def _reference_hsic(k, l):
    """The unbiased HSIC of Song et al. (2012), term by term with explicit sums (float64 numpy)."""
    import numpy as np

    n = len(k)
    kt, lt = k.copy(), l.copy()
    np.fill_diagonal(kt, 0)
    np.fill_diagonal(lt, 0)
    trace = sum(kt[i, j] * lt[j, i] for i in range(n) for j in range(n))
    sums = kt.sum() * lt.sum() / ((n - 1) * (n - 2))
    cross = sum(kt[i, j] * lt[j, q] for i in range(n) for j in range(n) for q in range(n))
    return (trace + sums - 2 * cross / (n - 2)) / (n * (n - 3))


def test_linear_cka_invariances_and_reference():
    import numpy as np

    from trainables.probes import linear_cka

    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 24, generator=g)
    q, _ = torch.linalg.qr(torch.randn(24, 24, generator=g))
    assert abs(linear_cka(x, x) - 1) < 1e-9
    assert abs(linear_cka(x, 3.0 * x @ q) - 1) < 1e-9  # orthogonal transform and isotropic scale
    assert abs(linear_cka(x, torch.randn(512, 16, generator=g))) < 0.05  # independent
    mixed = x[:, :8] @ torch.randn(8, 8, generator=g)  # shares a subspace: in between
    assert 0.1 < linear_cka(x, mixed) < 0.9
    a, b = np.random.default_rng(1).normal(size=(2, 12, 5))
    ref = _reference_hsic(a @ a.T, b @ b.T) / np.sqrt(_reference_hsic(a @ a.T, a @ a.T)
                                                        * _reference_hsic(b @ b.T, b @ b.T))
    assert abs(linear_cka(torch.from_numpy(a), torch.from_numpy(b), batch=12) - ref) < 1e-12


def test_fourier_last_point_reads_pi_minus_two_pi_over_side_not_pi():
    """On 8 x 8 tokens the half-diagonal ends at 3 pi / 4 per axis: energy there lifts the last point, energy at the
    Nyquist pi (the other side of the rolled spectrum) does not. The claim and the README name that frequency."""
    from orchestrator.compare import CLAIMS

    side = 8
    yy, xx = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")

    def tokens_at(freq: float) -> torch.Tensor:
        wave = torch.cos(freq * (yy + xx)).float().reshape(1, side * side, 1)  # (1, n, 1) one plane wave
        return wave + 1e-3 * torch.randn(1, side * side, 1, generator=torch.Generator().manual_seed(0))

    at_3pi4 = fourier_delta_log_amplitude(tokens_at(3 * math.pi / 4))[-1]
    at_pi = fourier_delta_log_amplitude(tokens_at(math.pi))[-1]
    assert at_3pi4 > 5 and at_pi < 0
    assert any("π − 2π/side" in claim for _, claim, *_ in CLAIMS)


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
    """Every layer's probe on the eval images, and the last layer's on the validation images (what a selection
    reads)."""
    cfg = load_config(tiny(**{"data__train_size": 128, "data__eval_size": 128, "eval__dense_images": 64}))
    data = build_data(cfg)
    k, p = data.num_classes + 1, 4
    # images that show the mask: channel 0 = label * 20 (what the encoder "sees"); the probe fits on the labelled
    # training images (the training split less the validation split)
    for s in (data.train, data.labelled, data.val, data.eval):
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

    (good, good_val), (bad, bad_val) = (dense_rows(_TokenEncoder(f, p, c), data, cfg)
                                        for f, c in ((sees_mask, k), (random_features, 32)))
    good, bad = ([v for _, _, m, v in rows if m == "dense_miou"] for rows in (good, bad))
    chance = {}
    for split in ("eval", "val"):  # every patch called background
        test = patch_labels(getattr(data, split).subset(64, cfg.run.seed).masks, p).flatten()
        chance[split] = mean_iou(torch.zeros_like(test), test, k)
    assert min(good) > 0.95 and good_val["val_dense_miou"] > 0.95, (good, good_val)
    assert max(bad) < chance["eval"] + 0.1, (bad, chance)
    assert bad_val["val_dense_miou"] < chance["val"] + 0.1, (bad_val, chance)


def test_dense_probe_is_skipped_without_masks():
    cfg = load_config(tiny(**{"data__dataset": "digits", "eval__dense_images": 64}))
    assert dense_rows(build_objective(cfg).encoder, build_data(cfg), cfg) == ([], {})


def test_cka_rows_of_an_encoder_against_its_own_features_are_one():
    cfg = load_config(tiny())
    enc, images = build_objective(cfg).encoder, build_data(cfg).eval.images[:32]
    own = extract_features(enc, images, 32, layers=list(range(enc.depth + 1)))["gap"]
    rows = cka_rows(extract_features(enc, images, 32, layers=list(range(enc.depth + 1)))["gap"], own)
    assert [r[0] for r in rows] == list(range(enc.depth + 1))
    assert all(abs(v - 1) < 1e-9 for *_, v in rows)


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


def test_head_diversity_is_zero_for_identical_heads_and_one_for_heads_on_disjoint_tokens():
    torch.manual_seed(0)
    one = torch.softmax(torch.randn(2, 1, N, N), -1)
    assert attention_head_diversity(with_cls(one.expand(2, 4, N, N))).abs().max() < 1e-5
    assert attention_head_diversity(with_cls(one)).abs().max() == 0  # one head: nothing to compare
    # head h attends from every query to token h only: every pair disjoint
    disjoint = torch.zeros(1, 3, N, N)
    for h in range(3):
        disjoint[0, h, :, h] = 1.0
    assert attention_head_diversity(with_cls(disjoint)).item() == pytest.approx(1.0, abs=1e-4)
    # two heads equal, one different: the mean over the three pairs, (0 + 1 + 1) / 3
    disjoint[0, 1] = disjoint[0, 0]
    assert attention_head_diversity(with_cls(disjoint)).item() == pytest.approx(2 / 3, abs=1e-4)


def test_token_norm_outliers_counts_planted_high_norm_tokens_at_any_scale():
    torch.manual_seed(0)
    tokens = torch.nn.functional.normalize(torch.randn(4, 25, 8), dim=-1)  # every norm 1
    assert token_norm_outliers(tokens) == 0.0
    tokens[0, 3] *= 10
    tokens[2, 7] *= 5
    tokens[3, 0] *= 3  # below 4x the median: not an outlier
    assert token_norm_outliers(tokens) == pytest.approx(2 / 100)
    assert token_norm_outliers(tokens * 1000) == pytest.approx(2 / 100)


def test_rankme_is_the_dimension_of_equal_spread_features_and_one_when_collapsed():
    torch.manual_seed(0)
    q, r = torch.linalg.qr(torch.randn(64, 64))[0], torch.linalg.qr(torch.randn(32, 32))[0]  # orthonormal
    for k in (1, 4, 16):
        feats = q[:, :k] @ r[:, :k].T * 3.0  # (64, 32) with k singular values of 3, the rest 0
        assert rankme(feats) == pytest.approx(k, rel=1e-3)
    assert rankme(torch.randn(256, 1) @ torch.randn(1, 32)) == pytest.approx(1.0, rel=1e-3)


def test_lowshot_subsets_are_class_balanced_nested_fixed_and_keep_one_image_a_class():
    labels = torch.arange(1000) % 10  # 100 images a class
    ten, one = lowshot_subset(labels, 0.10, 10), lowshot_subset(labels, 0.01, 10)
    assert torch.bincount(labels[ten], minlength=10).tolist() == [10] * 10
    assert torch.bincount(labels[one], minlength=10).tolist() == [1] * 10
    assert set(one.tolist()) <= set(ten.tolist())
    assert torch.equal(lowshot_subset(labels, 0.10, 10), ten)
    few = torch.tensor([0, 0, 1, 2, 2, 2])  # 1 % of a tiny set: still one image of each class
    assert torch.bincount(few[lowshot_subset(few, 0.01, 3)]).tolist() == [1, 1, 1]


def _marked_tokens(n_images: int, classes: int, seed: int):
    """Tokens (N, 16, 32) where one token, marked by channel 0 = +1, holds the image's class as a direction in
    channels 1..classes, and a distractor marked -1 holds a random class the same way; the rest is noise. Mean
    pooling sees both classes at once; attending to the marked token reads the right one."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(classes, (n_images,), generator=g)
    fake = torch.randint(classes, (n_images,), generator=g)
    x = torch.randn(n_images, 16, 32, generator=g) * 0.1
    pos = torch.randperm(16, generator=g)[:2]
    rows = torch.arange(n_images)
    x[rows, pos[0], 0], x[rows, pos[1], 0] = 3.0, -3.0
    x[rows, pos[0], 1 + y] += 3.0
    x[rows, pos[1], 1 + fake] += 3.0
    return x, y


def test_the_attentive_probe_reads_the_marked_token_where_mean_pooling_cannot():
    x, y = _marked_tokens(512, 4, 0)
    xt, yt = _marked_tokens(256, 4, 1)
    before = torch.random.get_rng_state()
    attentive = fit_attentive(x, y, 4)
    assert torch.equal(torch.random.get_rng_state(), before)  # the global RNG untouched
    assert (attentive(xt) == yt).float().mean() > 0.95
    linear = fit_linear(x.mean(1), y, 4)
    assert (linear(xt.mean(1)) == yt).float().mean() < 0.75  # the true and the random class tie under the mean
    again = fit_attentive(x, y, 4)
    assert torch.equal(again(xt), attentive(xt))  # deterministic
    params = sum(p.numel() for p in AttentivePool(768, 1000, torch.Generator()).parameters())
    assert params < 0.02 * 86e6  # under 2 % of ViT-B


def test_block_cosines_compare_the_objectives_that_reach_each_block():
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])
    grads = {"mim": [a, b, a, None], "cl": [a * 3, b * 3, -a, None], "other": [None, None, b, None]}
    # block 1: params 0-1, block 2: param 2, block 3: param 3 (nobody)
    got = dict(block_cosines(grads, [2, 1, 1]))
    assert got[1] == pytest.approx(1.0)  # the same direction, another length
    assert got[2] == pytest.approx((-1.0 + 0.0 + 0.0) / 3)  # mim/cl opposite, each orthogonal to other
    assert 3 not in got
    assert block_cosines({"mim": [a], "cl": [None]}, [1]) == []  # one objective reaches it: no value
