"""DINO (Caron et al. 2021): self-distillation without labels. A student (the shared encoder and a projection head)
matches a teacher (an EMA of the student) across multi-crop views: the teacher sees the two global crops, the
student every crop (global and local), and the loss is the cross-entropy between the teacher's centred, sharpened
softmax and the student's softmax, over every pair of different views. As the official ``main_dino.py``: the
``DINOHead`` (3-layer GELU MLP, L2-normalised bottleneck, weight-normalised last layer with its norm fixed to 1),
a centre updated as an EMA of the teacher's batch mean over all ranks, a teacher temperature with a linear
warmup, the last layer frozen during the first epoch, and a teacher without stochastic depth."""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ...augment import MOCO_DRAWS, dino_views
from ...scale import default_local_size, default_out_dim
from ..common import Head, head_norm, run_blocks, target_encoder


class DINOHead(nn.Module):
    """``DINOHead``: Linear-GELU-Linear-GELU-Linear to the bottleneck, L2 normalisation, then a weight-normalised
    linear layer to ``out_dim`` prototypes whose weight norm is fixed to 1 (``norm_last_layer=True``)."""

    def __init__(self, in_dim: int, out_dim: int, hidden: int = 2048, bottleneck: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                                 nn.Linear(hidden, bottleneck))
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = nn.Linear(bottleneck, out_dim, bias=False)

    def forward(self, x: torch.Tensor, freeze: torch.Tensor | None = None) -> torch.Tensor:
        """x (R, in_dim) -> logits (R, out_dim). ``freeze`` (0-d, 1.0 = frozen) stops the last layer's gradient."""
        x = F.normalize(self.mlp(x), dim=-1)
        w = self.last_layer.weight  # (out_dim, bottleneck); its rows normalised: weight norm with g = 1
        if freeze is not None:
            w = w.detach() * freeze + w * (1 - freeze)  # same values; no gradient reaches w while frozen
        return F.linear(x, F.normalize(w, dim=1))


class DINO(Head):
    """CL head: the student's projection head, the teacher (EMA copies of encoder, head and norm), the centre.

    ``layer`` is the block whose CLS output feeds the heads (student and teacher); reading an intermediate block,
    the head has its own LayerNorm (and the teacher a copy)."""

    STREAM = 4

    def __init__(self, encoder, img_size: int, layer: int, local_crops: int = 8, local_size: int | None = None,
                 out_dim: int | None = None, hidden: int | None = None, bottleneck: int = 256,
                 student_temp: float = 0.1, teacher_temp: float = 0.04, center_momentum: float = 0.9):
        super().__init__(encoder, layer)
        self.img_size = img_size
        self.local_crops = local_crops
        self.local_size = local_size or default_local_size(img_size, encoder.patch)
        self.student_temp, self.teacher_temp, self.center_momentum = student_temp, teacher_temp, center_momentum
        out_dim = out_dim or default_out_dim(encoder.width)
        self.norm = head_norm(encoder, layer)
        self.head = DINOHead(encoder.width, out_dim, hidden or min(2048, 8 * encoder.width), bottleneck)
        teacher = {"encoder": target_encoder(encoder), "head": copy.deepcopy(self.head)}
        if self.norm is not None:
            teacher["norm"] = copy.deepcopy(self.norm)
        self.teacher = nn.ModuleDict(teacher)
        self.teacher.requires_grad_(False)
        self.register_buffer("center", torch.zeros(1, out_dim))

    @classmethod
    def from_config(cls, encoder, cfg, layer: int) -> DINO:
        """The head for ``cfg`` (its ``objective.dino`` section) reading block ``layer`` of ``encoder``."""
        d = cfg.objective.dino
        return cls(encoder, cfg.model.img_size, layer, d.local_crops, d.local_size, d.out_dim, d.hidden,
                   d.bottleneck, d.student_temp, d.teacher_temp, d.center_momentum)

    def student_params(self) -> list[torch.Tensor]:
        """Student parameters in the order of ``self.teacher.parameters()``."""
        norm = [] if self.norm is None else list(self.norm.parameters())
        return [*self.encoder.parameters(), *self.head.parameters(), *norm]

    @torch.no_grad()
    def momentum_update(self, values: dict[str, float]) -> None:
        """Teacher EMA: teacher <- m * teacher + (1 - m) * student; m = values["teacher_momentum"]."""
        torch._foreach_lerp_(list(self.teacher.parameters()), self.student_params(), 1.0 - values["teacher_momentum"])

    def draws(self, batch: dict) -> dict[str, torch.Tensor]:
        """"crops" (2 + local_crops, B, MOCO_DRAWS) uniforms, and this step's teacher temperature and last-layer
        freeze (0-d tensors, from the trainer's schedules already on the device, ``batch["teacher_temp"]`` /
        ``["freeze_last_layer"]``; standalone: the final temperature, not frozen)."""
        images = batch["images"]
        dev = images.device
        crops = torch.rand(2 + self.local_crops, images.shape[0], MOCO_DRAWS, generator=self.generator(batch),
                           device=dev)
        return {"crops": crops,
                "teacher_temp": torch.as_tensor(batch.get("teacher_temp", self.teacher_temp), dtype=torch.float32,
                                                device=dev),
                "freeze": torch.as_tensor(batch.get("freeze_last_layer", 0.0), dtype=torch.float32, device=dev)}

    def prepare(self, images: torch.Tensor, draws: dict) -> dict:
        """{"global" (2B, 3, S, S), "local" (nB, 3, s, s) crops, "teacher_temp", "freeze"}."""
        glob, local = dino_views(images, self.img_size, self.local_size, draws["crops"])
        return {"global": glob, "local": local, "teacher_temp": draws["teacher_temp"], "freeze": draws["freeze"]}

    def tokens(self, prep: dict) -> list[torch.Tensor]:
        """The student's token batches: global crops (2B, 1 + N, C), then local crops (nB, 1 + n, C) if any."""
        out = [self.encoder.embed(prep["global"])]
        if self.local_crops:
            out.append(self.encoder.embed(prep["local"]))
        return out

    def _cls(self, tokens: torch.Tensor, teacher: bool = False) -> torch.Tensor:
        """The normed CLS token (R, C) of tokens (R, 1 + N, C) at block ``layer``."""
        if self.norm is None:
            norm = (self.teacher["encoder"] if teacher else self.encoder).norm
        else:
            norm = self.teacher["norm"] if teacher else self.norm
        return norm(tokens[:, 0])

    def loss(self, feats: list[torch.Tensor], prep: dict) -> torch.Tensor:
        """DINO's cross-entropy, averaged over the (2 + n) * 2 - 2 pairs of a teacher view and a different student
        view; updates the centre (an EMA of the teacher's mean output over all ranks) after use."""
        student = torch.cat([self._cls(f) for f in feats])  # (2B + nB, C)
        s_logits = self.head(student, prep["freeze"]).float() / self.student_temp
        with torch.no_grad():
            t_enc = self.teacher["encoder"]
            t_tokens = run_blocks(t_enc, t_enc.embed(prep["global"]), self.layer)  # (2B, 1 + N, C)
            t_out = self.teacher["head"](self._cls(t_tokens, teacher=True)).float()  # (2B, K)
            t_probs = F.softmax((t_out - self.center) / prep["teacher_temp"], dim=-1).chunk(2)
        s_logp = F.log_softmax(s_logits, dim=-1).chunk(2 + self.local_crops)  # each (B, K)
        total, terms = 0.0, 0
        for i, q in enumerate(t_probs):
            for v, logp in enumerate(s_logp):
                if v != i:
                    total = total + (-q * logp).sum(-1).mean()
                    terms += 1
        self._update_center(t_out)
        return total / terms

    @torch.no_grad()
    def _update_center(self, t_out: torch.Tensor) -> None:
        """center <- m * center + (1 - m) * mean teacher output of the global batch (all ranks)."""
        total = t_out.sum(0, keepdim=True)  # (1, K)
        count = t_out.shape[0]
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(total)
            count *= dist.get_world_size()
        self.center.mul_(self.center_momentum).add_(total / count, alpha=1 - self.center_momentum)
