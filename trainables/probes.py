"""Probes of what a trained encoder learned, on frozen features.

Feature extraction reads ``ViT.intermediates`` (layer 0 = embedding output, layer k = block k output); the
pooled feature of a layer is the mean of its patch tokens (``gap``) or its CLS token (``cls``), after the
encoder's final norm for the last layer only (as the training heads see it). Both poolings are always probed:
CL trains the CLS token and MIM the patch tokens, so one pooling alone favours one objective.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import minimize
from torch import nn

from .augment import eval_view

EPS = 1e-8
POOLS = ("gap", "cls")
LOWSHOT = {"linear10pct": 0.10, "linear1pct": 0.01}  # metric prefix -> share of the probe's labelled images


# ------------------------------------------------------------------------------------------- pure tensor probes
def _patch_attention(attn: torch.Tensor) -> torch.Tensor:
    """Drop the CLS row and column, add a tiny epsilon, renormalise rows: (B, H, 1+n, 1+n) -> (B, H, n, n)."""
    a = attn[..., 1:, 1:].float() + EPS
    return a / a.sum(-1, keepdim=True)


def attention_distance(attn: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Mean attention distance in pixels, (B, H), from attention (B, H, 1+n, 1+n) with the CLS token first.

    d(i, j) = patch_size * Euclidean distance of grid positions; per query sum_j A[q, j] d(q, j); mean over
    queries.
    """
    a = _patch_attention(attn)
    n = a.shape[-1]
    side = math.isqrt(n)
    ys, xs = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    pos = torch.stack([ys.flatten(), xs.flatten()], 1).float().to(a.device)  # (n, 2) grid coordinates
    dist = torch.cdist(pos, pos) * patch_size  # (n, n) pixels
    return (a * dist).sum(-1).mean(-1)


def attention_nmi(attn: torch.Tensor) -> torch.Tensor:
    """Normalised mutual information between query and key positions, (B, H).

    Uniform query prior p(q) = 1/n, p(k) = sum_q p(q) A[q, k], I = sum p(q) A[q, k] log(A[q, k] / p(k)),
    NMI = I / sqrt(H(q) H(k)). Collapsed (uniform) attention gives 0, identity attention 1.
    """
    a = _patch_attention(attn)
    n = a.shape[-1]
    pk = a.mean(-2, keepdim=True)  # (B, H, 1, n)
    # sum_qk A log A - sum_k p(k) n log p(k), avoiding a second (B, H, n, n) temporary
    mi = ((a * a.log()).sum((-2, -1)) - n * (pk * pk.log()).sum((-2, -1))) / n
    h_q = math.log(n)
    h_k = -(pk * pk.log()).sum((-2, -1))
    return (mi / (h_q * h_k).sqrt()).clamp(0.0, 1.0)


def attention_entropy(attn: torch.Tensor) -> torch.Tensor:
    """Normalised entropy of each query's attention over the patch tokens, averaged over queries, (B, H), from
    attention (B, H, 1+n, 1+n): mean_q H(A[q, :]) / log n. 1 = every query attends uniformly (an untrained
    encoder is close to it), 0 = every query attends to one token.

    NMI and distance alone cannot tell the paper's collapse (every query attends to the same few salient tokens:
    low NMI, low entropy) from uniform attention that learned nothing (low NMI, entropy 1); entropy can."""
    a = _patch_attention(attn)
    n = a.shape[-1]
    return (-(a * a.log()).sum(-1) / math.log(n)).mean(-1)


def attention_head_diversity(attn: torch.Tensor) -> torch.Tensor:
    """How differently a block's heads attend, (B,), from attention (B, H, 1+n, 1+n): the Jensen-Shannon
    divergence (base 2, in [0, 1]) between two heads' attention over the patch tokens, per query, averaged over
    queries and over every pair of heads. 0 = all heads attend alike (the paper's CL: "homogeneous attention maps
    for all query tokens and heads"), 1 = every pair attends to disjoint tokens. One head: 0."""
    a = _patch_attention(attn)  # (B, H, n, n)
    heads = a.shape[1]
    total = torch.zeros(a.shape[0], device=a.device)
    pairs = 0
    for i in range(heads):  # pair by pair: (B, H^2 / 2, n, n) at once would be hundreds of MB at ViT-B
        for j in range(i + 1, heads):
            p, q = a[:, i], a[:, j]  # (B, n, n)
            m = (p + q) / 2
            js = 0.5 * (p * (p / m).log()).sum(-1) + 0.5 * (q * (q / m).log()).sum(-1)  # (B, n) nats
            total += (js / math.log(2)).mean(-1)
            pairs += 1
    return total / max(pairs, 1)


def fourier_delta_log_amplitude(tokens: torch.Tensor) -> torch.Tensor:
    """Relative log amplitude of the token map's spectrum along the half-diagonal, from frequency 0 to the highest
    the diagonal reaches from the centre: pi - 2 pi / side per axis (3 pi / 4 on 8 x 8 tokens; the Nyquist pi sits
    on the other side of the rolled spectrum). The last value is ``fourier_dlogamp_pi`` (the paper's name for it).

    tokens (B, n, C) patch tokens (CLS dropped) -> (side // 2 + side % 2,) curve, first value 0. Follows the
    paper's notebook: log(|FFT2| + 1e-6), roll the zero frequency to the centre, mean over batch and channels,
    take the diagonal from the centre to the corner, subtract the value at frequency 0.
    """
    b, n, c = tokens.shape
    side = math.isqrt(n)
    x = tokens.float().transpose(1, 2).reshape(b, c, side, side)  # (B, C, h, w)
    amp = (torch.fft.fft2(x).abs() + 1e-6).log()
    amp = torch.roll(amp, shifts=(side // 2, side // 2), dims=(2, 3)).mean(dim=(0, 1))  # (h, w), centre = 0
    diag = amp.diagonal()[side // 2:]
    return diag - diag[0]


def token_cosine_similarity(tokens: torch.Tensor) -> torch.Tensor:
    """Mean pairwise cosine similarity between distinct patch tokens of each image: (B, n, C) -> (B,)."""
    z = F.normalize(tokens.float(), dim=-1)
    n = z.shape[1]
    sim = z @ z.transpose(1, 2)  # (B, n, n)
    return (sim.sum((1, 2)) - n) / (n * (n - 1))


def center_tokens(tokens: torch.Tensor) -> torch.Tensor:
    """Subtract the mean token over all images and positions: (B, n, C) -> (B, n, C).

    Token similarity and rank are read on centred tokens: one direction shared by every token (a bias the
    residual stream carries at init and after training alike) would otherwise dominate both."""
    t = tokens.float()
    return t - t.mean(dim=(0, 1), keepdim=True)


def effective_rank(tokens: torch.Tensor) -> torch.Tensor:
    """Effective rank exp(H(sigma / sum sigma)) of each image's token matrix (Roy & Vetterli): (B, n, C) -> (B,)."""
    s = torch.linalg.svdvals(tokens.float())  # (B, min(n, C))
    p = s / s.sum(-1, keepdim=True).clamp_min(EPS)
    return torch.exp(-(p * (p + EPS).log()).sum(-1))


OUTLIER_NORM = 4.0  # a high-norm token: this many times the layer's median patch-token norm (fixed a priori)


def token_norm_outliers(tokens: torch.Tensor, factor: float = OUTLIER_NORM) -> float:
    """Share of patch tokens (B, n, C) whose L2 norm exceeds ``factor`` times the median patch-token norm over all
    the images: the high-norm tokens of "Vision Transformers Need Registers" (Darcet et al. 2024), which appear in
    large, long-trained ViTs where they hold global information instead of their patch's. Scale-free (a ratio to
    the median), so layers and models compare; 0 where norms are homogeneous."""
    norms = tokens.float().norm(dim=-1).flatten()  # (B * n,)
    return float((norms > factor * norms.median()).float().mean())


def rankme(features: torch.Tensor) -> float:
    """RankMe (Garrido et al. 2023): the effective rank exp(H(p)) of the embeddings of many images (N, C), p the
    singular values over their sum (plus 1e-7, as the paper): label-free, high when the features use many
    directions, 1 when they collapse onto one. Uncentred, as in the paper."""
    s = torch.linalg.svdvals(features.double())
    p = s / s.sum().clamp_min(EPS) + 1e-7
    return float(torch.exp(-(p * p.log()).sum()))


def lowshot_subset(labels: torch.Tensor, fraction: float, num_classes: int, seed: int = 0) -> torch.Tensor:
    """Indices of a class-balanced share of ``labels``: in each class, ``fraction`` of its images (at least one),
    taken in a fixed seeded order, so every trial's low-shot probe sees the same images and the 1 % subset is
    inside the 10 % one."""
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    picked = []
    for c in range(num_classes):
        members = order[labels[order] == c]  # this class's images in the fixed order
        if len(members):
            picked.append(members[:max(1, round(fraction * len(members)))])
    return torch.cat(picked).sort().values


def _unbiased_hsic(k: torch.Tensor, l: torch.Tensor) -> torch.Tensor:
    """Unbiased HSIC estimator (Song et al. 2012) of two (n, n) Gram matrices, n >= 4."""
    n = k.shape[0]
    k = k - torch.diag_embed(torch.diagonal(k))  # zero diagonals
    l = l - torch.diag_embed(torch.diagonal(l))
    ones = torch.ones(n, dtype=k.dtype, device=k.device)
    kl = k @ l
    return (torch.trace(kl) + (ones @ k @ ones) * (ones @ l @ ones) / ((n - 1) * (n - 2))
            - 2 * (ones @ kl @ ones) / (n - 2)) / (n * (n - 3))


def linear_cka(x: torch.Tensor, y: torch.Tensor, batch: int = 256) -> float:
    """Linear CKA of two representations of the same images, x (n, c1) and y (n, c2), with the minibatch
    unbiased estimator of Nguyen et al. (2021): HSIC_1 summed over consecutive minibatches of ``batch`` images
    (each >= 4), CKA = sum HSIC(K, L) / sqrt(sum HSIC(K, K) * sum HSIC(L, L)), K = x x^T, L = y y^T (float64).
    1 for a representation with itself or any orthogonal transform (or isotropic scaling) of it; ~0 for
    independent ones."""
    x, y = x.double(), y.double()
    kl = kk = ll = torch.zeros((), dtype=torch.float64)
    for i in range(0, len(x) - 3, batch):
        xb, yb = x[i:i + batch], y[i:i + batch]
        if len(xb) < 4:
            break
        k, l = xb @ xb.T, yb @ yb.T  # (b, b) linear kernels
        kl, kk, ll = kl + _unbiased_hsic(k, l), kk + _unbiased_hsic(k, k), ll + _unbiased_hsic(l, l)
    return float(kl / (kk * ll).sqrt())


@contextmanager
def eval_mode(module: torch.nn.Module):
    """Put ``module`` in eval mode for the block and restore its mode after; yields its device."""
    was_training = module.training
    module.eval()
    try:
        yield next(module.parameters()).device
    finally:
        module.train(was_training)


def pool_tokens(tokens: torch.Tensor, pool: str) -> torch.Tensor:
    """(B, 1 + N, C) -> (B, C): CLS token or mean of the patch tokens."""
    return tokens[:, 0] if pool == "cls" else tokens[:, 1:].mean(1)


@torch.no_grad()
def _layer_states(encoder, images: torch.Tensor, img_size: int, batch_size: int = 256):
    """Per batch of uint8 images (N, 3, S, S): the token states of every layer (``ViT.intermediates``, the last
    one after the final norm), a list of depth + 1 tensors (b, 1 + n, C), in eval mode."""
    depth = encoder.depth
    with eval_mode(encoder) as device:
        for i in range(0, len(images), batch_size):
            x = eval_view(images[i:i + batch_size].to(device), img_size)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                states = encoder.intermediates(x)
                states[depth] = encoder.norm(states[depth])
            yield states


def extract_features(encoder, images: torch.Tensor, img_size: int, batch_size: int = 256,
                     layers: list[int] | None = None,
                     all_tokens: tuple[int, ...] = ()) -> dict[str, dict[int, torch.Tensor]]:
    """Pooled float32 features per pooling and layer for uint8 images (N, 3, S, S):
    {pool: {layer: (N, C)}} on the CPU, pool in ``POOLS``; for the layers in ``all_tokens``, also every token
    (CLS and patches, unpooled) from the same forward pass: {"tokens": {layer: (N, 1 + n, C)}}."""
    layers = [encoder.depth] if layers is None else layers
    out: dict[str, dict[int, list[torch.Tensor]]] = {p: {k: [] for k in layers} for p in POOLS}
    if all_tokens:
        out["tokens"] = {k: [] for k in all_tokens}
    for states in _layer_states(encoder, images, img_size, batch_size):
        for p in POOLS:
            for k in layers:
                out[p][k].append(pool_tokens(states[k], p).float().cpu())
        for k in all_tokens:
            out["tokens"][k].append(states[k].float().cpu())
    return {p: {k: torch.cat(v) for k, v in per.items()} for p, per in out.items()}


def extract_tokens(encoder, images: torch.Tensor, img_size: int, batch_size: int = 256) -> list[torch.Tensor]:
    """Patch tokens of every layer 0..depth (CLS dropped; the last after the final norm) for uint8 images
    (N, 3, S, S): a list of float32 (N, n, C) on the CPU."""
    out: list[list[torch.Tensor]] = [[] for _ in range(encoder.depth + 1)]
    for states in _layer_states(encoder, images, img_size, batch_size):
        for k, s in enumerate(states):
            out[k].append(s[:, 1:].float().cpu())
    return [torch.cat(v) for v in out]


def knn_accuracy(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                 k: int = 20, temperature: float = 0.07) -> float:
    """Cosine kNN top-1 accuracy with similarity-weighted votes (as in DINO's k-NN evaluation)."""
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    sim = F.normalize(test_x, dim=1) @ F.normalize(train_x, dim=1).T  # (n_test, n_train)
    top, idx = sim.topk(min(k, len(train_x)), dim=1)
    votes = torch.zeros(len(test_x), num_classes).scatter_add_(1, train_y[idx], (top / temperature).exp())
    return (votes.argmax(1) == test_y).float().mean().item()


def fit_linear(train_x: torch.Tensor, train_y: torch.Tensor, num_classes: int, weight_decay: float = 1e-4,
               iters: int = 100):
    """Multinomial logistic regression on standardised features: mean cross-entropy + ``weight_decay`` x squared
    weights, minimised by L-BFGS (at most ``iters`` iterations, a history of 100). Returns a predict fn.

    Deterministic: the problem is convex and the weights start at zero (not from the global RNG); the fit runs in
    float64 with an analytic gradient, so thread count and summation order cannot flip a prediction. scipy's
    compiled L-BFGS-B, not ``torch.optim.LBFGS``: the same objective, iteration cap and history, reaching the same
    loss (checked on real features: within 0.2%) at a third to a tenth of the cost; torch's was Python overhead on
    these small problems, 90% of an evaluation's time. Its line search differs, so accuracies of a fit that has not
    converged in ``iters`` iterations can differ from the earlier implementation's by a test image or two."""
    x = train_x.double().cpu().numpy()
    mean, std = x.mean(0), x.std(0, ddof=1) + 1e-6
    x = (x - mean) / std
    y = train_y.cpu().numpy().astype(np.int64)
    n, d = x.shape
    onehot = np.zeros((n, num_classes))
    onehot[np.arange(n), y] = 1.0

    def loss_grad(theta):
        w, b = theta[:d * num_classes].reshape(d, num_classes), theta[d * num_classes:]
        z = x @ w + b  # (n, classes) logits
        z -= z.max(1, keepdims=True)
        p = np.exp(z)
        s = p.sum(1, keepdims=True)
        loss = (np.log(s[:, 0]) - z[np.arange(n), y]).mean() + weight_decay * (w * w).sum()
        g = (p / s - onehot) / n  # d loss / d logits
        return loss, np.concatenate([(x.T @ g + 2 * weight_decay * w).ravel(), g.sum(0)])

    theta = minimize(loss_grad, np.zeros(d * num_classes + num_classes), jac=True, method="L-BFGS-B",
                     options={"maxiter": iters, "maxcor": 100}).x
    w = torch.from_numpy(theta[:d * num_classes].reshape(d, num_classes).copy())
    b, mu, sd = torch.from_numpy(theta[d * num_classes:].copy()), torch.from_numpy(mean), torch.from_numpy(std)

    @torch.no_grad()
    def predict(feats: torch.Tensor) -> torch.Tensor:
        return (((feats.double().cpu() - mu) / sd) @ w + b).argmax(1)

    return predict


class AttentivePool(nn.Module):
    """An attentive probe's head: LayerNorm, then ``queries`` learned queries each attending over the tokens with
    no key, value or output projection (a query's score for a token is its dot product with the whole token, over
    sqrt(C)), their pooled tokens averaged, then a linear classifier; the lightweight attentive probe of "efficient
    probing" (arXiv 2506.10178). (B, T, C) tokens -> (B, classes) logits. Its parameters are (queries + 2) C +
    (C + 1) x classes: under 2 % of any ViT it reads (ViT-B at 1,000 classes: 0.9 %), so what it adds to a linear
    probe is where to look, not capacity."""

    def __init__(self, width: int, num_classes: int, generator: torch.Generator, queries: int = 4):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.query = nn.Parameter(torch.randn(queries, width, generator=generator) * 0.02)
        # the classifier drawn from the probe's own generator (nn.Linear would draw from the global RNG)
        self.weight = nn.Parameter(torch.randn(num_classes, width, generator=generator) * 0.01)
        self.bias = nn.Parameter(torch.zeros(num_classes))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.norm(tokens)  # (B, T, C)
        scores = torch.einsum("btc,mc->bmt", x, self.query) / math.sqrt(x.shape[-1])  # (B, queries, T)
        pooled = torch.einsum("bmt,btc->bmc", scores.softmax(-1), x).mean(1)  # (B, queries, C) -> (B, C)
        return F.linear(pooled, self.weight, self.bias)


ATTENTIVE = {"batch": 128, "lr": 1e-2, "weight_decay": 1e-4}  # fixed a priori, never tuned per claim (steps:
# eval.attentive_steps, 300 by default)


def fit_attentive(train_tokens: torch.Tensor, train_y: torch.Tensor, num_classes: int, seed: int = 0,
                  steps: int = 300, batch: int = ATTENTIVE["batch"], lr: float = ATTENTIVE["lr"],
                  weight_decay: float = ATTENTIVE["weight_decay"]):
    """An attentive probe (``AttentivePool``) trained on frozen tokens (N, T, C) with AdamW, cosine-decayed ``lr``,
    ``steps`` minibatches of ``batch`` drawn from a generator seeded with ``seed`` (deterministic; the global RNG is
    not touched). Returns a predict fn, as ``fit_linear``. Attentive probing closes much of MIM's linear-probe gap
    in recent work ("Beyond [CLS]", arXiv 2412.03215): a claim that CL is more linearly separable should be read
    beside it."""
    g = torch.Generator().manual_seed(seed)
    x, y = train_tokens.float(), train_y.long()
    probe = AttentivePool(x.shape[-1], num_classes, g)
    opt = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=weight_decay)
    with torch.enable_grad():
        for step in range(steps):
            for group in opt.param_groups:
                group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
            idx = torch.randint(len(x), (min(batch, len(x)),), generator=g)
            loss = F.cross_entropy(probe(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    @torch.no_grad()
    def predict(tokens: torch.Tensor) -> torch.Tensor:
        return torch.cat([probe(tokens[i:i + 512].float()).argmax(1) for i in range(0, len(tokens), 512)])

    return predict


def shape_bias(predicted: torch.Tensor, shape_y: torch.Tensor, texture_y: torch.Tensor) -> float:
    """Fraction of shape decisions among decisions that match either cue (Geirhos et al. 2019)."""
    shape_hits = (predicted == shape_y).sum().item()
    texture_hits = (predicted == texture_y).sum().item()
    total = shape_hits + texture_hits
    return shape_hits / total if total else float("nan")


def cue_match(predicted: torch.Tensor, shape_y: torch.Tensor, texture_y: torch.Tensor) -> float:
    """Fraction of cue-conflict decisions that match either cue: the share of images shape bias is read on."""
    hits = ((predicted == shape_y) | (predicted == texture_y)).float().mean()
    return float(hits)


def patch_labels(masks: torch.Tensor, patch: int) -> torch.Tensor:
    """Per-patch class of segmentation masks, uint8 (B, S, S) with 0 = background and 1 + class on the object's
    pixels (one object per image) -> int64 (B, n) in row-major grid order: the object's label where at least half
    of the patch's pixels belong to it, else 0."""
    b, s, _ = masks.shape
    g = s // patch
    m = masks.long().reshape(b, g, patch, g, patch)  # (B, gy, p, gx, p)
    inside = (m > 0).float().mean((2, 4))  # (B, g, g) share of object pixels per patch
    return torch.where(inside >= 0.5, m.amax((2, 4)), 0).reshape(b, g * g)


def mean_iou(predicted: torch.Tensor, target: torch.Tensor, num_classes: int) -> float:
    """Mean intersection over union over the classes present in the target or the prediction."""
    p, t = predicted.flatten().long(), target.flatten().long()
    inter = torch.bincount(t[p == t], minlength=num_classes).double()
    union = torch.bincount(p, minlength=num_classes).double() + torch.bincount(t, minlength=num_classes) - inter
    present = union > 0
    return float((inter[present] / union[present]).mean())


def dense_rows(encoder, data, cfg) -> tuple[list[Row], dict[str, float]]:
    """Dense probe: per layer 0..depth, a linear per-token classifier (``fit_linear`` on patch tokens) of the
    patch's class (``patch_labels``: background or the shape's class), fit on ``eval.dense_images`` training images
    and read as mIoU (``dense_miou``) on as many eval images; the last layer's, read on as many validation images,
    is ``val_dense_miou`` (what a selection on the dense probe reads: the eval images are the claims'). Only for
    data with segmentation masks (synthetic)."""
    n, seed, size = cfg.eval.dense_images, cfg.run.seed, cfg.model.img_size
    if not n or data.labelled.masks is None or data.eval.masks is None:
        return [], {}
    train, test = data.labelled.subset(n, seed), data.eval.subset(n, seed)
    val = data.val.subset(n, seed) if data.val is not None and data.val.masks is not None else None
    classes = data.num_classes + 1
    y_train, y_test = (patch_labels(s.masks, encoder.patch).flatten() for s in (train, test))  # (N * n,)
    tr, te = extract_tokens(encoder, train.images, size), extract_tokens(encoder, test.images, size)
    rows: list[Row] = []
    for k, (a, b) in enumerate(zip(tr, te, strict=True)):
        predict = fit_linear(a.flatten(0, 1), y_train, classes)  # tokens (N, n, C) -> (N * n, C)
        rows.append((k, None, "dense_miou", mean_iou(predict(b.flatten(0, 1)), y_test, classes)))
    summary = {}
    if val is not None:  # the last layer's probe (``predict``, fit above) on the validation images' tokens
        tokens = extract_tokens(encoder, val.images, size)[-1]  # (N, n, C)
        y_val = patch_labels(val.masks, encoder.patch).flatten()  # (N * n,)
        summary["val_dense_miou"] = mean_iou(predict(tokens.flatten(0, 1)), y_val, classes)
    return rows, summary


def cka_rows(now: dict[int, torch.Tensor], untrained: dict[int, torch.Tensor]) -> list[Row]:
    """Per layer, linear CKA (``linear_cka``) of the encoder's GAP features ``now`` with the untrained encoder's
    (both {layer: (N, C)} on the same images): 1 where a layer did not move (``cka_untrained``)."""
    return [(k, None, "cka_untrained", linear_cka(now[k], untrained[k])) for k in sorted(untrained)]


def block_cosines(grads: dict[str, list[torch.Tensor | None]], sizes: list[int]) -> list[tuple[int, float]]:
    """Per block k (1..len(sizes)): the cosine between objectives' gradients on that block's parameters, averaged
    over the pairs of objectives that reach it; ``grads[name]`` holds each parameter's gradient in block order
    (``sizes[k - 1]`` parameters for block k; None where the objective does not reach it). A block fewer than two
    objectives reach gets no value. 1 = the objectives pull the block the same way, -1 = opposite ways."""
    out = []
    start = 0
    for k, n in enumerate(sizes, 1):
        vecs = [torch.cat([g.flatten().float() for g in gs[start:start + n] if g is not None])
                for gs in grads.values() if any(g is not None for g in gs[start:start + n])]
        start += n
        pairs = [(a, b) for i, a in enumerate(vecs) for b in vecs[i + 1:]]
        if pairs:
            cos = torch.stack([F.cosine_similarity(a, b, dim=0) for a, b in pairs]).mean()
            out.append((k, float(cos)))
    return out


# ------------------------------------------------------------------------------------------- the probe suite
Row = tuple[int, int | None, str, float]  # (layer, head or None, metric, value)


@torch.no_grad()
def attention_rows(encoder, images: torch.Tensor, img_size: int) -> list[Row]:
    """Attention distance, NMI and entropy per block (layer 1..depth), per head and averaged over heads; the
    diversity of the block's heads (``attention_head_diversity``)."""
    with eval_mode(encoder) as device:
        maps = encoder.attention_maps(eval_view(images.to(device), img_size))
    rows: list[Row] = []
    for k, attn in enumerate(maps, 1):
        probes = (("attn_distance", attention_distance(attn, encoder.patch)), ("attn_nmi", attention_nmi(attn)),
                  ("attn_entropy", attention_entropy(attn)))
        for name, per in probes:
            per_head = per.mean(0).cpu()  # (H,) mean over images
            rows += [(k, h, name, float(v)) for h, v in enumerate(per_head)]
            rows.append((k, None, name, float(per_head.mean())))
        rows.append((k, None, "attn_head_div", float(attention_head_diversity(attn).mean())))
    return rows


@torch.no_grad()
def token_rows(encoder, images: torch.Tensor, img_size: int) -> list[Row]:
    """Fourier delta log amplitude at the highest half-diagonal frequency (``fourier_delta_log_amplitude``) per
    layer (0..depth), token cosine similarity and effective rank of the centred tokens (``center_tokens``), and the
    share of high-norm patch tokens (``token_norm_outliers``, on the tokens as they are)."""
    with eval_mode(encoder) as device:
        states = encoder.intermediates(eval_view(images.to(device), img_size))
    rows: list[Row] = []
    for k, s in enumerate(states):
        patches = s[:, 1:].float()  # (B, n, C), CLS dropped
        rows.append((k, None, "fourier_dlogamp_pi", float(fourier_delta_log_amplitude(patches)[-1])))
        centred = center_tokens(patches)
        rows.append((k, None, "token_cossim", float(token_cosine_similarity(centred).mean())))
        rows.append((k, None, "effective_rank", float(effective_rank(centred).mean())))
        rows.append((k, None, "token_norm_outliers", token_norm_outliers(patches)))
    return rows


def feature_rows(encoder, data, cfg, keep: dict | None = None) -> tuple[list[Row], dict[str, float]]:
    """Per-layer kNN and linear-probe accuracy on frozen features of both poolings (``knn_top1_gap``,
    ``linear_top1_cls``, ...), the linear probe fit on 10 % and 1 % of the labels (``linear10pct_top1_gap``, ...:
    ``LOWSHOT``, class-balanced, at least one image a class) and RankMe of the evaluation features (``rankme_gap``,
    label-free); the last layer's attentive probe (``attentive_top1``, on all its tokens); shape bias and
    cue-match fraction of the last layer's linear probe.

    Probes are fit on the labelled training images (``DataBundle.labelled``, never the validation split) and read
    on the evaluation subset. The summary holds the last layer's values per pooling, and unsuffixed ``knn_top1`` /
    ``linear_top1`` / ``shape_bias`` for ``eval.pool``; the same last-layer kNN and linear probe read on the
    validation split as ``val_knn_top1[_pool]`` / ``val_linear_top1[_pool]`` (what selections read), with the
    validation images' RankMe (``val_rankme[_pool]``: a label-free early signal a search may read). ``keep``, if
    given, receives what later evaluations reuse instead of computing again: ``eval_gap`` (GAP features of the eval
    subset per layer) and ``predict`` (the last layer's fitted linear probe per pooling)."""
    e, size, seed = cfg.eval, cfg.model.img_size, cfg.run.seed
    train, test = data.labelled.subset(e.samples, seed), data.eval.subset(e.samples, seed)
    layers = list(range(encoder.depth + 1))
    last = encoder.depth
    tokens = (last,) if e.attentive_steps else ()  # the attentive probe's input, from the same forward pass
    tr = extract_features(encoder, train.images, size, layers=layers, all_tokens=tokens)
    te = extract_features(encoder, test.images, size, layers=layers, all_tokens=tokens)
    cc = (extract_features(encoder, data.cue_conflict.images, size, layers=[last])
          if data.cue_conflict is not None else None)
    val = data.val.subset(len(data.val), seed) if data.val is not None else None  # in memory (a store reads here)
    va = extract_features(encoder, val.images, size, layers=[last]) if val is not None else None
    rows: list[Row] = []
    summary: dict[str, float] = {}
    few = ({name: lowshot_subset(train.labels, f, data.num_classes) for name, f in LOWSHOT.items()}
           if e.lowshot else {})
    for pool in POOLS:
        for k in layers:
            knn = knn_accuracy(tr[pool][k], train.labels, te[pool][k], test.labels, e.knn_k)
            predict = fit_linear(tr[pool][k], train.labels, data.num_classes)
            linear = (predict(te[pool][k]) == test.labels).float().mean().item()
            rows += [(k, None, f"knn_top1_{pool}", knn), (k, None, f"linear_top1_{pool}", linear)]
            for name, idx in few.items():  # the same probe fit on a class-balanced share of the labels
                fit = fit_linear(tr[pool][k][idx], train.labels[idx], data.num_classes)
                rows.append((k, None, f"{name}_top1_{pool}", (fit(te[pool][k]) == test.labels).float().mean().item()))
            rows.append((k, None, f"rankme_{pool}", rankme(te[pool][k])))
        summary |= {f"knn_top1_{pool}": knn, f"linear_top1_{pool}": linear}  # the last layer's
        if va is not None:  # the same last-layer probes on the validation split, and its label-free RankMe
            summary[f"val_knn_top1_{pool}"] = knn_accuracy(tr[pool][last], train.labels, va[pool][last],
                                                           val.labels, e.knn_k)
            summary[f"val_linear_top1_{pool}"] = (predict(va[pool][last]) == val.labels).float().mean().item()
            summary[f"val_rankme_{pool}"] = rankme(va[pool][last])
        if keep is not None:
            keep.setdefault("predict", {})[pool] = predict
        if cc is not None:  # the last layer's linear probe (the one fit above) on cue-conflict images
            decided = predict(cc[pool][last])
            summary[f"shape_bias_{pool}"] = shape_bias(decided, data.cue_conflict.labels, data.cue_texture)
            summary[f"cue_match_{pool}"] = cue_match(decided, data.cue_conflict.labels, data.cue_texture)
    if e.attentive_steps:  # the attentive probe on the last layer's tokens (CLS and patches): where linear is read
        attentive = fit_attentive(tr["tokens"][last], train.labels, data.num_classes, steps=e.attentive_steps)
        rows.append((last, None, "attentive_top1",
                     (attentive(te["tokens"][last]) == test.labels).float().mean().item()))
    for name in ("knn_top1", "linear_top1", "shape_bias", "val_knn_top1", "val_linear_top1", "val_rankme"):
        if f"{name}_{e.pool}" in summary:
            summary[name] = summary[f"{name}_{e.pool}"]
    if keep is not None:
        keep["eval_gap"] = te["gap"]
    return rows, summary


def run_probes(encoder, data, cfg, keep: dict | None = None) -> tuple[list[Row], dict[str, float]]:
    """Every probe on the fixed, seeded eval subset: (rows, last-layer summary). Attention and token probes use
    the first ``eval.probe_images`` images of that subset. ``keep``: see ``feature_rows``."""
    images = data.eval.subset(cfg.eval.samples, cfg.run.seed).images[:cfg.eval.probe_images]
    rows, summary = feature_rows(encoder, data, cfg, keep)
    rows = attention_rows(encoder, images, cfg.model.img_size) + token_rows(encoder, images, cfg.model.img_size) + rows
    return rows, summary


def rows_to_metrics(rows: list[Row]) -> dict[str, float]:
    """Flat metric names for reports: ``layer/<L>/<metric>`` or ``layer/<L>/h<H>/<metric>``."""
    return {(f"layer/{k}/{m}" if h is None else f"layer/{k}/h{h}/{m}"): v for k, h, m, v in rows}
