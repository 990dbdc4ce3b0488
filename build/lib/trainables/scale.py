"""Model scale: one table of ViT sizes, keyed by the variant string ``"NAME/PATCH"`` (e.g. ``"S/16"``).

The patch size is the number after the slash; the image size is a separate config key. Parameter counts and
FLOPs are analytic (checked against ``torch.utils.flop_counter`` in the tests) so a sweep can record them for
every trial without building the model.
"""

from __future__ import annotations

from dataclasses import dataclass

# name: (width, depth, heads). nano / micro / mini are CPU-sized ViTs for 32x32 images (a CPU scaling ladder).
SCALES: dict[str, tuple[int, int, int]] = {
    "nano": (64, 4, 2),
    "micro": (96, 6, 3),
    "mini": (144, 8, 4),
    "Ti": (192, 12, 3),
    "S": (384, 12, 6),
    "B": (768, 12, 12),
    "L": (1024, 24, 16),
    "H": (1280, 32, 16),
}
MLP_RATIO = 4


@dataclass(frozen=True)
class VariantSpec:
    """A decoded variant string."""

    name: str
    patch: int
    width: int
    depth: int
    heads: int


def parse_variant(variant: str) -> VariantSpec:
    """Decode ``"S/16"`` into its width, depth, heads and patch size; raise ValueError naming the allowed names."""
    if not isinstance(variant, str) or variant.count("/") != 1:
        raise ValueError(f"{variant!r} is not of the form NAME/PATCH (e.g. 'S/16'); names: {list(SCALES)}")
    name, patch = variant.split("/")
    if name not in SCALES:
        raise ValueError(f"unknown scale {name!r} in {variant!r}; choose one of {list(SCALES)}")
    if not patch.isdigit() or int(patch) < 1:
        raise ValueError(f"patch size {patch!r} in {variant!r} is not a positive integer")
    width, depth, heads = SCALES[name]
    return VariantSpec(name, int(patch), width, depth, heads)


def encoder_params(spec: VariantSpec, img_size: int) -> int:
    """Parameters of the encoder (patch embedding, cls token, position embedding, blocks, final norm)."""
    c, p = spec.width, spec.patch
    n = (img_size // p) ** 2
    m = MLP_RATIO * c
    embed = 3 * p * p * c + c + c + (n + 1) * c  # conv weight + bias, cls token, pos embed
    block = 2 * 2 * c + (3 * c * c + 3 * c) + (c * c + c) + (c * m + m) + (m * c + c)
    return embed + spec.depth * block + 2 * c


def tokens_block_flops(width: int, tokens: int) -> float:
    """Forward FLOPs (2 per multiply-add) of one transformer block of ``width`` on ``tokens`` tokens, matmuls only:
    qkv + proj + mlp per token; q @ k^T and attn @ v over all token pairs."""
    m = MLP_RATIO * width
    return 2.0 * (tokens * (4 * width * width + 2 * width * m) + 2 * tokens * tokens * width)


def block_flops(spec: VariantSpec, img_size: int) -> float:
    """Forward FLOPs of one transformer block for one image (1 + N tokens)."""
    return tokens_block_flops(spec.width, (img_size // spec.patch) ** 2 + 1)


def embed_flops(spec: VariantSpec, img_size: int) -> float:
    """Forward FLOPs of the patch embedding for one image."""
    n = (img_size // spec.patch) ** 2
    return 2.0 * n * 3 * spec.patch**2 * spec.width


def mlp_head_flops(dims: list[int]) -> float:
    """Forward FLOPs of an MLP with the given layer sizes, for one sample."""
    return 2.0 * sum(a * b for a, b in zip(dims[:-1], dims[1:], strict=False))


MIN_UNIT_PATCHES = 2  # a mask unit covers at least 2 x 2 patches (SimMIM: 32 px units over 16 px patches)


def default_mask_unit(img_size: int, patch: int) -> int | None:
    """Mask unit in pixels, scaled to the image: ~1/7 of the side (32 px at 224, as SimMIM at 192), as k x k
    patches with k >= 2 dividing the patch grid (k below the grid side); None if the grid allows no such k.

    Never a single patch: one-patch units make MIM an easier, more local task than SimMIM's (a masked patch
    next to visible ones is inferred from its neighbours), which exaggerates how local MIM looks."""
    grid = img_size // patch
    target = img_size / (7 * patch)
    ks = [k for k in range(MIN_UNIT_PATCHES, grid) if grid % k == 0]
    return min(ks, key=lambda k: (abs(k - target), k)) * patch if ks else None


# Per-objective sizes that scale with the model: defaults of objective.dino / objective.mae, read by the heads
# and by the FLOPs model (config.train_flops_per_image)
def default_local_size(img_size: int, patch: int) -> int:
    """DINO's local crop side (96 of 224 px) scaled to ``img_size``, in whole patches, at least 2 x 2."""
    return max(2, round(img_size * 96 / 224 / patch)) * patch


def default_out_dim(width: int) -> int:
    """DINO's 65536 prototypes at ViT-S (width 384), scaled with width^2 for narrower encoders (at least 1024): the
    head's last layer costs width-independent FLOPs per crop, which would dominate a small CPU model."""
    return max(1024, min(65536, 65536 * width * width // (384 * 384)))


def decoder_shape(width: int, decoder_width: int | None, decoder_heads: int | None) -> tuple[int, int]:
    """(decoder width, heads): MAE's 512 wide and 16 heads (32 per head), no wider than the encoder by default."""
    w = decoder_width or min(512, width)
    return w, decoder_heads or max(1, w // 32)
