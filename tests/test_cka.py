"""`clmim compare`: CKA between the layers of two finished trials, and of one trial against its untrained encoder."""

import pandas as pd
import pytest
import torch
from conftest import tiny

from orchestrator.cli import main
from trainables.checkpoints import export_weights
from trainables.config import load_config
from trainables.trainer import train


def finished_trial(root, sweep, trial, lam):
    """A trial as a sweep leaves it: run/model.pt (the encoder export) in the sweep's storage."""
    run = root / "scratch" / trial
    train(load_config(tiny(), [f"run.out_dir={run}", f"objective.lam={lam}", "optim.steps=4", "run.ckpt_every=4",
                               "eval.probe_images=8"]))
    export_weights(run / "checkpoints" / "step_0000004" / "checkpoint.pt",
                   root / sweep / "tune" / trial / "run" / "model.pt")


@pytest.mark.integration
@pytest.mark.slow  # (make test's 12-minute budget: CI's slow tier)
def test_compare_two_trials_and_a_trial_with_its_untrained_encoder(tmp_path, capsys):
    finished_trial(tmp_path, "s", "t0", 0.0)
    finished_trial(tmp_path, "s", "t1", 1.0)
    (tmp_path / "s" / "tune" / "t2").mkdir()  # started, never finished
    r = str(tmp_path)
    assert main(["compare", "s/t0", "s/t1", "--results", r, "--samples", "64"]) == 0
    assert "linear CKA" in capsys.readouterr().out
    t = pd.read_parquet(tmp_path / "s" / "cka" / "t0__t1.parquet")
    assert len(t) == 6 * 6 and t.cka.between(-0.1, 1.0 + 1e-9).all()
    assert (tmp_path / "s" / "cka" / "t0__t1.png").stat().st_size > 1000
    assert main(["compare", "s/t0", "s/t0", "--results", r, "--samples", "64"]) == 0
    same = pd.read_parquet(tmp_path / "s" / "cka" / "t0__t0.parquet")
    assert (same[same.layer_a == same.layer_b].cka - 1).abs().max() < 1e-6
    assert main(["compare", "s/t0", "--untrained", "--results", r, "--samples", "64"]) == 0
    moved = pd.read_parquet(tmp_path / "s" / "cka" / "t0__untrained.parquet")
    assert moved[moved.layer_a == moved.layer_b].cka.max() < 1.0 - 1e-9  # 4 steps moved every layer, a little
    # "untrained" is this trial's own initial encoder: what the trainer builds from the same config and seed
    from orchestrator.cka import trial_encoder
    from orchestrator.layout import SweepLayout
    from trainables.trainer import build_run

    enc, cfg = trial_encoder(SweepLayout(tmp_path, "s"), "t0", untrained=True)
    cfg.run.out_dir = None
    init = build_run(cfg).objective.encoder.state_dict()
    assert all(torch.equal(v, init[k]) for k, v in enc.state_dict().items())
    capsys.readouterr()
    for bad, what in ((["s/t2", "s/t0"], "has no final weights"), (["s/nope", "s/t0"], "is not a trial of sweep"),
                      (["s", "s/t0"], "is not SWEEP/TRIAL"), (["s/t0"], "--untrained")):
        assert main(["compare", *bad, "--results", r]) == 2
        err = capsys.readouterr().err
        assert what in err and err.count("\n") == 1, err
