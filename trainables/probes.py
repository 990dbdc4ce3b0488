"""Probes of what a trained encoder learned, on frozen features.

Feature extraction reads ``ViT.intermediates`` (layer 0 = embedding output, layer k = block k output); the
pooled feature of a layer is the mean of its patch tokens (``gap``) or its CLS token (``cls``), after the
encoder's final norm for the last layer only (as the training heads see it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .augment import eval_view


def pool_tokens(tokens: torch.Tensor, pool: str) -> torch.Tensor:
    """(B, 1 + N, C) -> (B, C): CLS token or mean of the patch tokens."""
    return tokens[:, 0] if pool == "cls" else tokens[:, 1:].mean(1)


@torch.no_grad()
def extract_features(encoder, images: torch.Tensor, img_size: int, pool: str = "gap", batch_size: int = 256,
                     layers: list[int] | None = None) -> dict[int, torch.Tensor]:
    """Pooled float32 features per layer for uint8 images (N, 3, S, S): {layer: (N, C)} on the CPU."""
    was_training = encoder.training
    encoder.eval()
    device = next(encoder.parameters()).device
    depth = encoder.depth
    layers = [depth] if layers is None else layers
    out: dict[int, list[torch.Tensor]] = {k: [] for k in layers}
    for i in range(0, len(images), batch_size):
        x = eval_view(images[i:i + batch_size].to(device), img_size)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            states = encoder.intermediates(x)
            states[depth] = encoder.norm(states[depth])
        for k in layers:
            out[k].append(pool_tokens(states[k], pool).float().cpu())
    encoder.train(was_training)
    return {k: torch.cat(v) for k, v in out.items()}


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
    """Multinomial logistic regression on standardised features (full-batch L-BFGS). Returns a predict fn."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    x = (train_x - mean) / std
    lin = torch.nn.Linear(x.shape[1], num_classes)
    opt = torch.optim.LBFGS(lin.parameters(), lr=1.0, max_iter=iters, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(lin(x), train_y) + weight_decay * lin.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)

    @torch.no_grad()
    def predict(z: torch.Tensor) -> torch.Tensor:
        return lin((z - mean) / std).argmax(1)

    return predict


def linear_accuracy(train_x, train_y, test_x, test_y, num_classes: int) -> float:
    """Top-1 accuracy of a linear probe fit on (train_x, train_y), scored on (test_x, test_y)."""
    predict = fit_linear(train_x, train_y, num_classes)
    return (predict(test_x) == test_y).float().mean().item()


def shape_bias(predicted: torch.Tensor, shape_y: torch.Tensor, texture_y: torch.Tensor) -> float:
    """Fraction of shape decisions among decisions that match either cue (Geirhos et al. 2019)."""
    shape_hits = (predicted == shape_y).sum().item()
    texture_hits = (predicted == texture_y).sum().item()
    total = shape_hits + texture_hits
    return shape_hits / total if total else float("nan")
