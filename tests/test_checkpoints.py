import os
from pathlib import Path

import pytest
from conftest import tiny

from orchestrator.cli import main
from trainables.config import load_config
from trainables.errors import UserError


def test_checkpoints_never_run_code(tmp_path, capsys):
    import torch

    from trainables.trainer import train

    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    torch.save({"model": Evil(marker), "config": {}, "step": 1}, evil)
    assert main(["analyze", str(evil)]) == 2
    assert "weights_only" in capsys.readouterr().err
    with pytest.raises(UserError, match="run.resume"):
        train(load_config(tiny(), [f"run.resume={evil}", "optim.steps=2"]))
    assert not marker.exists()


class Evil:
    """A pickle that runs a shell command when loaded."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.integration
def test_checkpoint_with_rng_state_loads_weights_only(tmp_path):
    """Resume still works: every RNG state is stored as tensors and plain values."""
    import torch

    from trainables.trainer import train

    out = tmp_path / "run"
    train(load_config(tiny(), [f"run.out_dir={out}", "optim.steps=2", "eval.probe_images=8"]))
    ckpt = torch.load(next(out.glob("checkpoints/step_*/checkpoint.pt")), weights_only=True)
    assert set(ckpt["rng"]) == {"torch", "numpy", "python", "cuda"}
