"""Checkpoints released by other code bases, probed as they are: recognise the layout from its keys, build the
architecture it was trained with from timm, load every weight, and give the probes the interface of clmim's own
``ViT`` (``depth``, ``patch``, ``norm``, ``intermediates``, ``attention_maps``).

Why this is possible without the papers' code: MoCo v3, MAE, DINO and iBOT build their ViT from timm's blocks (key
names are timm's once a prefix is stripped), DINOv2's names are timm's with layer scale (``ls1.gamma``), and
SimMIM's ViT is BEiT's (q and v biases without a k bias, one relative position bias shared by all blocks, layer
scale ``gamma_1``/``gamma_2``), which timm's ``Beit`` hosts with the same names. Every shape (width, depth, patch,
grid, MLP width, biases, layer scale, relative position bias) is read from the weights; the head count, which a
ViT's weights do not record (BEiT's bias table does), comes from the layout's official model table (MoCo v3's
ViT-S has 12 heads, everyone else's 6).

Loading is strict: after the layout's known extras are dropped (projection heads, decoders, mask tokens), a
weight the architecture has not got, or one it needs and the file lacks, is refused by name. Nothing is fitted
or guessed from data.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from timm.layers import resample_abs_pos_embed
from timm.models.beit import Beit, gen_relative_position_index
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from .errors import UserError
from .scale import SCALES


@dataclass(frozen=True)
class Layout:
    """One code base's checkpoint layout: its name (as printed and recorded), where it comes from, the architecture
    timm hosts it with, and the head count of its official models by width."""

    name: str
    source: str
    arch: str  # "vit" (timm VisionTransformer) or "beit" (timm Beit)
    official_heads: dict[int, int]
    objective: str | None = None  # the registered objective it was trained with, if clmim has it
    # the untrained encoder (``build(untrained_seed=...)``): timm's init mode for the code base's own init, and the
    # weights its code keeps fixed at their initial value (so the checkpoint's copy is the untrained one's)
    init_mode: str = ""
    fixed: tuple[str, ...] = ()

    def heads(self, width: int) -> int:
        # widths outside the official table (small test models): timm's 64 channels per head
        return self.official_heads.get(width, max(1, width // 64))


_TIMM_HEADS = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16, 1536: 24}
# MoCo v3's ViTs (vits.py) keep a 2-D sin-cos position embedding fixed and, as its README trains them
# (--stop-grad-conv1), the random patch projection too; timm's "moco" mode is their init of the rest. MAE keeps its
# sin-cos position embedding fixed.
MOCO_V3 = Layout("moco_v3", "facebookresearch/moco-v3", "vit", {**_TIMM_HEADS, 384: 12}, "mocov3", "moco",
                 ("pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"))
SIMMIM = Layout("simmim", "microsoft/SimMIM", "beit", _TIMM_HEADS, "simmim")
MAE = Layout("mae", "facebookresearch/mae", "vit", _TIMM_HEADS, "mae", fixed=("pos_embed",))
DINO = Layout("dino", "facebookresearch/dino", "vit", _TIMM_HEADS, "dino")
# (iBOT and DINOv2 add masked-token self-distillation to DINO's: a mix clmim does not register)
IBOT = Layout("ibot", "bytedance/ibot", "vit", _TIMM_HEADS)
DINOV2 = Layout("dinov2", "facebookresearch/dinov2", "vit", _TIMM_HEADS)
TIMM = Layout("timm", "timm VisionTransformer (also DINO's and MAE's backbone-only files)", "vit", _TIMM_HEADS)
LAYOUTS = (MOCO_V3, SIMMIM, MAE, DINO, IBOT, DINOV2, TIMM)
NETWORKS = ("teacher", "student")  # DINO / iBOT full checkpoints hold both; the teacher is what they evaluate


def _tensors(d) -> bool:
    return isinstance(d, dict) and bool(d) and all(isinstance(v, torch.Tensor) for v in d.values())


def _strip(state: dict, prefixes: tuple[str, ...]) -> dict:
    """``state`` with the first matching prefix of each key removed (keys without one are kept as they are)."""
    out = {}
    for k, v in state.items():
        for p in prefixes:
            if k.startswith(p):
                k = k[len(p):]
                break
        out[k] = v
    return out


def _drop(state: dict, pattern: str) -> dict:
    return {k: v for k, v in state.items() if not re.match(pattern, k)}


def recognise(ckpt, network: str = "teacher") -> tuple[Layout, dict[str, torch.Tensor]]:
    """The layout of a loaded checkpoint and its encoder's weights under timm's names (extras dropped).

    MoCo v3: ``state_dict`` with ``module.base_encoder.*`` (its projection head ``head.*`` and the momentum encoder
    and predictor dropped). SimMIM: ``model`` with ``encoder.*`` (decoder and mask token dropped). MAE: ``model``
    with timm names (decoder and mask token dropped). DINO and iBOT full checkpoints: ``teacher`` / ``student`` with
    ``backbone.*`` (``module.`` on the student; the DINO head dropped); iBOT's ``checkpoint_teacher.pth``:
    ``state_dict``; iBOT is told from DINO by its ``masked_embed`` (a ``state_dict`` of plain timm names is timm).
    DINOv2: timm names with layer scale (``ls1.gamma``) and a ``mask_token``. Anything else with timm's ViT names:
    timm."""
    if network not in NETWORKS:
        raise UserError(f"--network: {network!r} is not one of {list(NETWORKS)}")
    if not isinstance(ckpt, dict):
        raise UserError(f"checkpoint: a {type(ckpt).__name__}, not a dict of weights")
    state = ckpt.get("state_dict")
    if _tensors(state) and any(k.startswith("module.base_encoder.") for k in state):
        enc = {k: v for k, v in state.items() if k.startswith("module.base_encoder.")}
        return MOCO_V3, _drop(_strip(enc, ("module.base_encoder.",)), r"head\.")
    model = ckpt.get("model")
    if _tensors(model) and any(k.startswith("encoder.") for k in model):
        enc = {k: v for k, v in model.items() if k.startswith("encoder.")}
        return SIMMIM, _drop(_strip(enc, ("encoder.",)), r"mask_token$")
    if _tensors(model):
        return MAE, _drop(model, r"(decoder_|mask_token$)")
    if any(_tensors(ckpt.get(n)) for n in NETWORKS):
        if not _tensors(ckpt.get(network)):
            raise UserError(f"--network: this checkpoint holds no {network!r} weights (it has "
                            f"{[n for n in NETWORKS if _tensors(ckpt.get(n))]})")
        part = _strip(ckpt[network], ("module.backbone.", "backbone.", "module."))
        return _dino_like(_drop(part, r"head\."))
    if _tensors(state):  # iBOT's checkpoint_teacher.pth, or another code base's wrapped timm weights
        part = _drop(_strip(state, ("module.backbone.", "backbone.", "module.")), r"head\.")
        if "masked_embed" in part or any(k.startswith(("backbone.", "module.backbone.")) for k in state):
            return _dino_like(part)
        return TIMM, part
    if _tensors(ckpt):
        if "mask_token" in ckpt and any(k.endswith(".ls1.gamma") for k in ckpt):
            return DINOV2, _drop(ckpt, r"mask_token$")
        return TIMM, _drop(ckpt, r"head\.")
    raise UserError("checkpoint: no known layout (MoCo v3 'state_dict' with 'module.base_encoder.*', SimMIM or MAE "
                    "'model', DINO or iBOT 'teacher'/'student', iBOT 'state_dict', DINOv2 or timm weights); its "
                    f"top-level keys: {sorted(map(str, ckpt))[:8]}")


def _dino_like(state: dict) -> tuple[Layout, dict]:
    return (IBOT, _drop(state, r"masked_embed$")) if "masked_embed" in state else (DINO, state)


@dataclass(frozen=True)
class Shape:
    """What the weights say about the architecture."""

    width: int
    depth: int
    heads: int
    patch: int
    grid: int  # the grid the position embedding or relative position bias was trained for
    mlp_ratio: float
    layer_scale: bool

    def describe(self) -> str:
        return (f"width {self.width}, depth {self.depth}, {self.heads} heads, patch {self.patch}, "
                f"trained at {self.grid * self.patch} px" + (", layer scale" if self.layer_scale else ""))


def _need(state: dict, key: str, layout: Layout) -> torch.Tensor:
    if key not in state:
        raise UserError(f"checkpoint: {layout.name} weights without {key!r}: cannot build its encoder")
    return state[key]


def shape_of(layout: Layout, state: dict) -> Shape:
    """The architecture's sizes, read from the weights (heads from the layout's table where the weights do not
    record them)."""
    for bad, what in ((r"register_tokens$", "register tokens"), (r"blocks\.\d+\.mlp\.w12\.", "a SwiGLU MLP")):
        key = next((k for k in state if re.match(bad, k)), None)
        if key is not None:
            raise UserError(f"checkpoint: {layout.name} weights with {what} ({key!r}): not supported")
    width = _need(state, "cls_token", layout).shape[-1]
    proj = _need(state, "patch_embed.proj.weight", layout)  # (C, 3, p, p)
    depth = 1 + max((int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))), default=-1)
    if depth == 0:
        raise UserError(f"checkpoint: {layout.name} weights without 'blocks.0.*'")
    fc1 = _need(state, "blocks.0.mlp.fc1.weight", layout)  # (hidden, C)
    if layout.arch == "beit":
        table = state.get("rel_pos_bias.relative_position_bias_table",
                          state.get("blocks.0.attn.relative_position_bias_table"))
        if table is None:
            raise UserError(f"checkpoint: {layout.name} weights without a relative position bias table")
        heads, grid = table.shape[1], (math.isqrt(table.shape[0] - 3) + 1) // 2  # rows: (2g - 1)^2 + 3
        scale = "blocks.0.gamma_1" in state
    else:
        heads = layout.heads(width)
        grid = math.isqrt(_need(state, "pos_embed", layout).shape[1] - 1)  # (1, 1 + g^2, C)
        scale = "blocks.0.ls1.gamma" in state
    return Shape(width, depth, heads, proj.shape[-1], grid, fc1.shape[0] / width, scale)


def build(layout: Layout, state: dict, img_size: int | None = None,
          untrained_seed: int | None = None) -> tuple[Released, Shape]:
    """The encoder of ``state`` (``recognise``'s output) as timm builds it, every weight loaded, at ``img_size``
    (default: the size it was trained at). A learned or fixed absolute position embedding is resampled to another
    size bicubically (timm's ``resample_abs_pos_embed``); a relative position bias is not resized.

    With ``untrained_seed``: the same architecture at the same size with timm's own initialisation (seeded), no
    weight loaded: the untrained encoder every number of the checkpoint is read against."""
    s = shape_of(layout, state)
    size = img_size or s.grid * s.patch
    if size % s.patch:
        raise UserError(f"--img-size: {size} is not a multiple of the checkpoint's patch size {s.patch}")
    state = dict(state)
    if layout.arch == "beit":
        if size != s.grid * s.patch:
            raise UserError(f"--img-size: {layout.name}'s relative position bias is for {s.grid * s.patch} px "
                            f"({s.grid} x {s.grid} patches); probe it at that size")
        model = Beit(img_size=size, patch_size=s.patch, num_classes=0, global_pool="avg", embed_dim=s.width,
                     depth=s.depth, num_heads=s.heads, mlp_ratio=s.mlp_ratio, qkv_bias="blocks.0.attn.q_bias" in state,
                     init_values=0.1 if s.layer_scale else None, use_abs_pos_emb="pos_embed" in state,
                     use_rel_pos_bias="blocks.0.attn.relative_position_bias_table" in state,
                     use_shared_rel_pos_bias="rel_pos_bias.relative_position_bias_table" in state, use_fc_norm=False)
        if untrained_seed is not None:
            return Released(_initialised(model, untrained_seed, layout, state), layout, s, size), s
        # BEiT's index of the bias table is a buffer timm computes; a checkpoint's copy must agree with it
        want = gen_relative_position_index((s.grid, s.grid))
        for k in [k for k in state if k.endswith("relative_position_index")]:
            if not torch.equal(state.pop(k).long(), want):
                raise UserError(f"checkpoint: {k!r} is not BEiT's relative position index for a {s.grid} x "
                                f"{s.grid} grid")
    else:
        g = size // s.patch
        pos = _need(state, "pos_embed", layout)
        if g != s.grid:
            state["pos_embed"] = resample_abs_pos_embed(pos.float(), new_size=(g, g), num_prefix_tokens=1)
        model = VisionTransformer(img_size=size, patch_size=s.patch, num_classes=0, embed_dim=s.width,
                                  depth=s.depth, num_heads=s.heads, mlp_ratio=s.mlp_ratio,
                                  qkv_bias="blocks.0.attn.qkv.bias" in state,
                                  init_values=1.0 if s.layer_scale else None)
        if untrained_seed is not None:
            return Released(_initialised(model, untrained_seed, layout, state), layout, s, size), s
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing:
        raise UserError(f"checkpoint: {layout.name} weights do not fit its architecture ({s.describe()}): "
                        f"missing {missing[0]!r}" + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
    if unexpected:
        raise UserError(f"checkpoint: {layout.name} weights hold {unexpected[0]!r}, which its encoder has not "
                        f"got" + (f" ({len(unexpected) - 1} more)" if len(unexpected) > 1 else ""))
    return Released(model, layout, s, size), s


def _initialised(model: nn.Module, seed: int, layout: Layout, state: dict) -> nn.Module:
    """``model`` initialised as its code base does (timm's init, drawn again from ``seed``: the constructor drew
    from the global RNG), with the weights the code base never trains taken from ``state`` (``layout.fixed``, after
    any resampling)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        if isinstance(model, Beit):
            model.init_weights()
        else:
            model.init_weights(mode=layout.init_mode)
    fixed = {k: state[k] for k in layout.fixed if k in state}
    if fixed:
        model.load_state_dict(fixed, strict=False)
    return model


class Released(nn.Module):
    """A released encoder behind the probes' interface. Token layout as clmim's ``ViT``: (B, 1 + N, C), the CLS
    token first, N patch tokens in row-major order; ``intermediates`` element 0 is the embedding output, element k
    the output of block k, before the final norm ``norm``."""

    def __init__(self, model: nn.Module, layout: Layout, shape: Shape, img_size: int):
        super().__init__()
        self.model, self.layout, self.shape, self.img_size = model, layout, shape, img_size
        self.depth, self.width, self.patch = shape.depth, shape.width, shape.patch
        self.grid = img_size // shape.patch

    @property
    def blocks(self) -> nn.ModuleList:
        return self.model.blocks

    @property
    def norm(self) -> nn.Module:
        return self.model.norm

    def _embed(self, images: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Tokens (B, 1 + N, C) after the embedding, and the keyword arguments every block takes."""
        m = self.model
        if isinstance(m, Beit):  # timm's Beit.forward_features, up to the blocks
            x = m.patch_embed(images)  # (B, N, C)
            x = torch.cat((m.cls_token.expand(x.shape[0], -1, -1), x), dim=1)  # (B, 1 + N, C)
            if m.pos_embed is not None:
                x = x + m.pos_embed
            bias = m.rel_pos_bias() if m.rel_pos_bias is not None else None  # (heads, 1 + N, 1 + N)
            return m.pos_drop(x), {"shared_rel_pos_bias": bias}
        x = m._pos_embed(m.patch_embed(images))  # (B, N, C) -> (B, 1 + N, C)
        return m.norm_pre(m.patch_drop(x)), {}

    def intermediates(self, images: torch.Tensor) -> list[torch.Tensor]:
        x, kw = self._embed(images)
        out = [x]
        for blk in self.blocks:
            x = blk(x, **kw)
            out.append(x)
        return out

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.norm(self.intermediates(images)[-1])

    @torch.no_grad()
    def attention_maps(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Softmax attention of every block (B, heads, 1 + N, 1 + N), relative position bias included: timm's own
        unfused attention path, read where it hands the softmax to ``attn_drop`` (an identity in eval mode)."""
        maps: list[torch.Tensor] = []
        attns = [blk.attn for blk in self.blocks]
        fused = [a.fused_attn for a in attns]
        hooks = [a.attn_drop.register_forward_hook(lambda _m, _i, out: maps.append(out.float())) for a in attns]
        try:
            for a in attns:
                a.fused_attn = False
            self.intermediates(images)
        finally:
            for a, f in zip(attns, fused, strict=True):
                a.fused_attn = f
            for h in hooks:
                h.remove()
        return maps


def config_variant(shape: Shape) -> str:
    """A ``model.variant`` for the config the probes read (their data and image size; the encoder's own sizes are
    in ``shape``): the scale of the same width and depth, else of the same width, else the smallest."""
    same = [n for n, (w, d, _) in SCALES.items() if w == shape.width]
    exact = [n for n in same if SCALES[n][1] == shape.depth]
    return f"{(exact or same or list(SCALES))[0]}/{shape.patch}"
