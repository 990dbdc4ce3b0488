"""A saved model probed after the fact, as a trial probes its encoder: the body of ``clmim analyze`` on one
checkpoint and of each task of an analysis sweep (``orchestrator/analysis.py`` runs one per checkpoint and data set
on Ray, a GPU each when the cluster has them).

A checkpoint is a clmim one (a checkpoint, an export, a trial's run folder) or a released one (``released.py``:
MoCo v3, SimMIM, MAE, DINO, iBOT, DINOv2, timm). Beside it, the untrained encoder of the same architecture is probed
with the same fitted-probe protocol (clmim's: the trial's own initial weights; a released one: its code base's
initialisation, seeded by ``run.seed``), so every number has its untrained baseline, as in a training sweep: the
reports are a trial's, step 0 the untrained encoder, then the checkpoint at the step it was saved at (a clmim file
records it) or at step 1 (a released file does not say how long it was trained; ``step`` in the ``trials`` table
stays null).

Files are loaded with ``weights_only=True`` (``checkpoints.load_weights``): a results root or a download never runs
code.
"""

from __future__ import annotations

import pickle
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs
import torch
from torch import nn

from .checkpoints import find_checkpoint, load_encoder, load_weights
from .config import Config, load_config, to_dict
from .data import build_data
from .errors import UserError
from .evaluate import TIMERS, evaluate_encoder
from .released import DINO, IBOT, build, config_variant, recognise
from .storage import Storage
from .vocab import objective_label

CHECKPOINT_STEP = 1  # the step a checkpoint's own probes are reported at (0: its untrained encoder)


def fetch(where: str) -> str:
    """A local path for ``where``: itself, or for ``s3://...`` (a trial's ``run/`` folder or a file in a sweep's
    storage, a released checkpoint in a bucket; endpoint from $AWS_ENDPOINT_URL) a downloaded copy in a temporary
    folder."""
    if not where.startswith("s3://"):
        return where
    st = Storage.parse(where, None, Path.cwd())
    local = Path(tempfile.mkdtemp(prefix="clmim-analyze-"))
    try:
        kind = st.fs.get_file_info(st.path()).type
        if kind == pafs.FileType.File:
            (local / Path(st.uri).name).write_bytes(st.read_bytes(st.path()))
            return str(local / Path(st.uri).name)
        if kind == pafs.FileType.Directory:
            return str(st.download(st.path(), local))
    except OSError as e:
        raise UserError(f"checkpoint: cannot read {where} ({str(e).splitlines()[0][:200]})") from None
    raise UserError(f"checkpoint: nothing at {where}")


@dataclass
class Saved:
    """A loaded checkpoint: its encoder (eval mode), the probes' config, what was recognised (printed), the
    registered objective's weights it was trained with (None: trained with something clmim does not register, e.g.
    iBOT), the ``trials`` row's source columns, and a builder of its architecture's untrained encoder."""

    encoder: nn.Module
    cfg: Config
    found: str
    weights: dict[str, float] | None
    source: dict[str, str]
    untrained: Callable[[], nn.Module]
    step: int | None = None  # the step it was saved at (a clmim file records it; a released one does not)
    file: str = ""  # the file read (a run folder's model.pt, a download of an s3:// one)


def load_saved(where: str, overrides: list[str], img_size: int | None = None, network: str = "teacher") -> Saved:
    """Load the checkpoint at ``where`` (a path or s3://); ``overrides``: config keys for the probes (data.*,
    eval.*); ``img_size`` / ``network``: a released checkpoint's probing size and, for DINO / iBOT, which network."""
    path = find_checkpoint(fetch(where), weights=True)
    if path is None:
        raise UserError(f"checkpoint: nothing loadable at {where!r}")
    try:
        ckpt = load_weights(path)
    except pickle.UnpicklingError as e:
        if "GLOBAL" not in str(e) and "Unsupported global" not in str(e):  # (no class refused: not a pickle)
            raise UserError(f"checkpoint: {str(path)!r} is not a torch file (unreadable pickle)") from None
        raise UserError(f"checkpoint: {str(path)!r} holds Python objects beyond tensors and plain values; clmim "
                        "loads weights only (weights_only=True) and never runs code from a file") from None
    except Exception as e:  # noqa: BLE001 - any unreadable file is a usage error
        raise UserError(f"checkpoint: {str(path)!r} is not a torch file ({type(e).__name__})") from None

    if isinstance(ckpt, dict) and "model" in ckpt and "config" in ckpt:  # a clmim checkpoint or export
        if img_size or network != "teacher":
            raise UserError("--img-size / --network: for released checkpoints; a clmim checkpoint is probed as "
                            "its trial was (change data.* with --set)")
        encoder, cfg = load_encoder(ckpt, overrides)  # the pre-trained encoder, never a fine-tuned one
        weights = cfg.objective.mix()
        step = ckpt.get("step")
        return Saved(encoder.eval(), cfg, f"{cfg.model.variant}, trained as {objective_label(weights)}", weights,
                     {"source": where, "source_layout": "clmim", "source_arch": f"clmim ViT {cfg.model.variant}"},
                     lambda: load_encoder(ckpt, overrides, untrained=True)[0].eval(),
                     int(step) if isinstance(step, int) and step > 0 else None, str(path))
    layout, state = recognise(ckpt, network)  # a released checkpoint
    encoder, shape = build(layout, state, img_size)
    cfg = load_config({"model": {"variant": config_variant(shape), "img_size": encoder.img_size}}, overrides)
    if cfg.model.img_size != encoder.img_size:
        raise UserError(f"model.img_size: set the probing size of a released checkpoint with --img-size "
                        f"(it was built at {encoder.img_size} px)")
    part = f" ({network})" if layout in (DINO, IBOT) and network != "teacher" else ""
    arch = f"timm {'Beit' if layout.arch == 'beit' else 'VisionTransformer'}: {shape.describe()}"
    return Saved(encoder.eval(), cfg, f"{layout.name}{part} from {layout.source}: {shape.describe()}",
                 {layout.objective: 1.0} if layout.objective else None,
                 {"source": where + part, "source_layout": layout.name,
                  "source_arch": arch},
                 lambda: build(layout, state, img_size, untrained_seed=cfg.run.seed)[0].eval(), file=str(path))


def trial_config(saved: Saved) -> dict:
    """The ``trials`` row's config of an analysed checkpoint: a clmim one's whole config (how it was trained, with
    the probes' overrides); a released one's what the probes read (model size and image size, data, eval, run) and
    the objective's weights, without an optimiser or objective recipe, which would describe clmim's training, not
    the checkpoint's."""
    d = to_dict(saved.cfg)
    if saved.source.get("source_layout") == "clmim":
        return d
    d.pop("optim", None)
    d.pop("stages", None)
    d.pop("finetune", None)
    if saved.weights:
        d["objective"] = {"weights": dict(saved.weights)}
    else:
        d.pop("objective", None)
    return d


def probe_saved(saved: Saved) -> tuple[list[dict], dict[str, float]]:
    """Every evaluation of a trial (``evaluate.evaluate_encoder``) on the untrained encoder (step 0; its GAP
    features are the CKA baseline) and on the checkpoint (at its step, else ``CHECKPOINT_STEP``), each from the same
    seed: the two reports, and the seconds each evaluation took."""
    cfg = saved.cfg
    if cfg.run.threads:  # the trial's thread count: the same numbers as the trial recorded
        torch.set_num_threads(cfg.run.threads)
    device = torch.device("cuda" if torch.cuda.is_available() and cfg.run.device != "cpu" else "cpu")
    data = build_data(cfg)
    seconds = dict.fromkeys(TIMERS, 0.0)
    baseline: dict = {}

    def first(gap: dict) -> dict:
        baseline.update(gap)
        return gap

    reports = []
    for step, make, against in ((0, saved.untrained, first), (saved.step or CHECKPOINT_STEP, lambda: saved.encoder,
                                                               lambda _gap: baseline)):
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(cfg.run.seed)
            encoder = make().to(device)
            reports.append({"step": step, **evaluate_encoder(encoder, data, cfg, seconds, against, noise=True)})
    return reports, seconds


def analyze(where: str, overrides: list[str], img_size: int | None = None, network: str = "teacher") -> dict:
    """One analysis-sweep task: load, probe, and return plain values for the driver to write (``config``,
    ``source``, ``results``: the two reports, ``final``: the checkpoint's report with the seconds, ``found``)."""
    t = time.perf_counter()
    saved = load_saved(where, overrides, img_size, network)
    reports, seconds = probe_saved(saved)
    wall = time.perf_counter() - t
    final = {**reports[-1], "step": saved.step, **{f"seconds_{k}": v for k, v in seconds.items()}}
    return {"config": trial_config(saved), "source": saved.source, "results": reports, "final": final,
            "found": saved.found, "wall_time_s": wall}
