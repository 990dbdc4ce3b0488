"""``run.compile``: the whole training step compiles into one graph, once, and trains like eager."""

import functools

import pytest
import torch
from conftest import tiny
from torch._dynamo.utils import counters

from trainables.config import load_config
from trainables.trainer import train


def losses(over: list[str]) -> list[float]:
    logs = []
    train(load_config(tiny(), over), lambda m, checkpoint=None: logs.append(m["loss"]) if "knn_top1" not in m else None)
    return logs


@pytest.mark.integration
@pytest.mark.parametrize("backend,mix", [
    # (all in the extended tier: make test's 12-minute budget, and CI's slow tier's)
    pytest.param("aot_eager", "objective.lam=0.5", marks=[pytest.mark.slow, pytest.mark.extended]),
    pytest.param("aot_eager", "objective.weights={mae: 0.5, dino: 0.5}",
                 marks=[pytest.mark.slow, pytest.mark.extended]),
    pytest.param("inductor", "objective.lam=0.5", marks=[pytest.mark.slow, pytest.mark.extended])])
def test_compiled_step_is_one_graph_without_recompiles_and_matches_eager(backend, mix, monkeypatch):
    # nano/4 keeps the CPU compile short; lam = 0.5 compiles every part (both views, masking, momentum encoder);
    # MAE + DINO: visible-token gathers, the decoder, multi-crop at two sizes, the centre's in-place EMA and the
    # per-step teacher temperature and last-layer freeze (tensor inputs: a new value must not recompile).
    # aot_eager traces forward and backward exactly as inductor gets them but skips code generation (minutes on
    # two CPU cores); the slow run uses the real inductor backend.
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=backend))
    over = ["model.variant=nano/4", mix, "optim.steps=4", "run.log_every=1", "objective.dino.local_crops=2",
            "objective.dino.freeze_last_layer_frac=0.5", "objective.dino.teacher_temp_warmup_frac=0.5",
            "objective.dino.warmup_teacher_temp=0.02"]
    eager = losses(over)
    torch._dynamo.reset()
    counters.clear()
    with torch._dynamo.config.patch(error_on_recompile=True):  # a new seed or step must not recompile
        compiled = losses([*over, "run.compile=true"])
    assert dict(counters["graph_break"]) == {}
    assert counters["stats"]["unique_graphs"] == 1
    torch.testing.assert_close(torch.tensor(compiled), torch.tensor(eager), rtol=2e-3, atol=0)
