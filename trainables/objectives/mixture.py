"""The training objective: a mixture ``L = sum_k w_k L_k`` of the registered objectives (``objective.weights``;
``objective.lam`` is the shorthand for ``(1 - lam) * L_SimMIM + lam * L_MoCoV3``) with layer-wise placement.

Every objective follows the ``Head`` contract (``common.py``). One routing runs each view through the shared
encoder once: the token batches of all objectives are grouped by token count (SimMIM's masked view, MoCo v3's two
views and DINO's global crops: 1 + N tokens; MAE's visible patches and DINO's local crops: fewer), each group goes
through the blocks as one batch, so every matmul is one big one, and an objective's rows leave the batch after the
block its head reads:

- ``<name>_layer`` (``simmim_layer``, ``mocov3_layer``, ``mae_layer``, ``dino_layer``): the block whose output
  feeds that objective's head;
- ``graft_layer`` g (Layer Grafted Pre-training, Jiang et al. 2023): the CL rows (MoCo v3, DINO) are detached
  after block g, so blocks 1..g learn only from MIM (SimMIM, MAE); MIM reads block g, so blocks g+1..depth learn
  only from CL.
- ``graft_layer`` g with ``graft_lr_ratio`` r: the lr-ratio form of Layer Grafted Pre-training. CL is not detached
  (it reaches every block) and blocks 1..g plus the embedding train at r x lr (the trainer's parameter groups),
  as the paper's CL stage does for its MIM-initialised lower layers (r = 0.1 there). Here both losses train at
  once rather than in two stages.

Heads reading an intermediate block have their own LayerNorm; the encoder's final norm belongs to block depth.
Objectives with weight 0 are not built and not computed.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import Config, resolve_placement
from ..model import ViT
from ..vocab import family, target_encoders
from . import registry


class Mixture(nn.Module):
    """Owns the encoder and the heads of the mix's objectives (each registered as a submodule under its objective's
    name: checkpoint keys ``<name>.*``); see the module docstring."""

    def __init__(self, encoder: ViT, cfg: Config):
        super().__init__()
        o = cfg.objective
        self.encoder = encoder
        self.weights = o.mix()  # {name: weight > 0}
        self.layers, self.graft_layer = resolve_placement(cfg)
        self.detach_below_graft = self.graft_layer is not None and o.placement.graft_lr_ratio is None
        # resolved once here, not looked up in the registry at every step
        self.loss_keys = {name: registry.get(name).loss_key for name in self.layers}
        self.grafted = [n for n in self.layers if self.detach_below_graft and family(n) == "cl"]
        self.heads: dict[str, nn.Module] = {}
        for name, layer in self.layers.items():
            self.heads[name] = registry.get(name).head_class().from_config(encoder, cfg, layer)
            setattr(self, name, self.heads[name])  # a submodule under the objective's name

    def load_encoder(self, state: dict) -> None:
        """Start from another run's encoder (``ViT`` state dict; a staged run's previous stage): the encoder and
        every EMA target copy of it (MoCo v3's momentum encoder, DINO's teacher start equal to it, as when built)."""
        self.encoder.load_state_dict(state)
        for which, owner in target_encoders().items():
            if owner in self.heads:
                self.eval_encoder(which).load_state_dict(state)

    def eval_encoder(self, which: str) -> ViT:
        """The encoder evaluations read (``eval.encoder``): the trained one (student), DINO's EMA teacher, or MoCo
        v3's momentum encoder (both copies of the whole encoder, without stochastic depth)."""
        if which == "student":
            return self.encoder
        return getattr(self.heads[target_encoders()[which]], which)["encoder"]  # MoCoV3.momentum, DINO.teacher

    def momentum_update(self, values: dict[str, float]) -> None:
        """EMA steps of the momentum encoder / teacher (MoCo v3: ``values["momentum"]``, DINO:
        ``values["teacher_momentum"]``); a no-op without them."""
        for head in self.heads.values():
            if hasattr(head, "momentum_update"):
                head.momentum_update(values)

    def has_unused_params(self) -> bool:
        """True if some trainable encoder parameter gets no gradient (DDP must then look for unused parameters).
        The config forbids placements that leave a block untrained; the final norm is unused when no head reads
        the last block."""
        return max(self.layers.values()) < self.encoder.depth

    def lower_parameters(self) -> set[int]:
        """ids of the parameters of blocks 1..graft_layer and the embedding (patch projection, CLS token,
        position embedding): the ones ``graft_lr_ratio`` slows down. Empty without the ratio."""
        if self.graft_layer is None or self.detach_below_graft:
            return set()
        enc = self.encoder.vit
        mods = [enc.patch_embed, *self.encoder.blocks[:self.graft_layer]]
        params = [p for m in mods for p in m.parameters()] + [enc.cls_token, enc.pos_embed]
        return {id(p) for p in params}

    def _route(self, segments: list[tuple[tuple[str, int], torch.Tensor, int, int]]) -> dict:
        """Run token batches through the blocks, one batch per (token count, first block): ``segments`` are
        (key, tokens (R, T, C) after block ``start``, start, end); returns {key: its tokens after block ``end``}
        (not normed: each head applies its own norm). Deepest rows go first, so rows leave from the batch's end
        once their block is read."""
        groups: dict[tuple[int, int], list] = {}
        for seg in segments:
            groups.setdefault((seg[1].shape[1], seg[2]), []).append(seg)
        out = {}
        for (_, start), group in groups.items():
            group.sort(key=lambda s: -s[3])  # stable: equal depths keep the mix's order
            h = torch.cat([s[1] for s in group]) if len(group) > 1 else group[0][1]  # (sum R, T, C)
            for k in range(start + 1, group[0][3] + 1):
                h = self.encoder.blocks[k - 1](h)
                while group and group[-1][3] == k:
                    key, t, _, _ = group.pop()
                    out[key] = h[len(h) - len(t):]
                    h = h[:len(h) - len(t)]
        return out

    def draws(self, batch: dict) -> dict:
        """Every random number of the step for ``batch`` ({"images", "seed"} and the trainer's per-step values),
        drawn from seeded generators: one stream per objective, so an objective's draws do not depend on the mix."""
        return {name: head.draws(batch) for name, head in self.heads.items()}

    def forward(self, batch: dict) -> dict:
        """{"loss", and each objective's own loss (``loss_<name>``)}; per-objective losses keep their graph.

        ``batch`` is {"images": uint8 (B, 3, S, S), "seed": int, ...}; the step is a pure function of the images
        and the seed's random draws.
        """
        return self.step(batch["images"], self.draws(batch))

    def step(self, images: torch.Tensor, draws: dict) -> dict:
        """The training step's forward from uint8 images and their random draws: augmentation, masking, encoder,
        heads and losses. Pure tensor code without generators, so ``run.compile`` compiles it as one graph."""
        prep = {name: head.prepare(images, draws[name]) for name, head in self.heads.items()}
        segments, g, grafted = [], self.graft_layer, self.grafted
        if grafted:  # CL rows through blocks 1..g without autograd: no gradient, and no backward cost, below g
            with torch.no_grad():
                low = self._route([((n, i), t, 0, g) for n in grafted
                                   for i, t in enumerate(self.heads[n].tokens(prep[n]))])
            segments += [(key, t, g, self.layers[key[0]]) for key, t in low.items()]
        for name, head in self.heads.items():
            if name not in grafted:
                segments += [((name, i), t, 0, self.layers[name]) for i, t in enumerate(head.tokens(prep[name]))]
        feats = self._route(segments)
        out, loss = {}, 0.0
        for name, head in self.heads.items():
            mine = sorted((key[1], t) for key, t in feats.items() if key[0] == name)  # in the head's tokens() order
            key = self.loss_keys[name]
            out[key] = head.loss([t for _, t in mine], prep[name])
            loss = loss + self.weights[name] * out[key]
        out["loss"] = loss
        return out


def build_objective(cfg: Config) -> Mixture:
    """The encoder for ``cfg.model`` wrapped in the objective for ``cfg.objective``."""
    m = cfg.model
    return Mixture(ViT(m.variant, m.img_size, m.drop_path, m.pos_embed, m.patch_embed), cfg)
