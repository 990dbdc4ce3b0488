"""Analysing saved models after the fact: ``trainables/analysis.py`` (one checkpoint beside its architecture's
untrained encoder, as a trial reports) and ``orchestrator/analysis.py`` (an analysis sweep: checkpoints x data sets
as Ray tasks into a training sweep's tables, read by ``results show``, the claims and the report)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_released import PROBE, _prefixed, _simmim_model, _vit, official

from orchestrator.analysis import plan, trial_id
from orchestrator.cli import main
from orchestrator.query import query, sweep_frames
from orchestrator.results import trial_row
from orchestrator.summary import sections
from trainables.analysis import analyze, load_saved, trial_config
from trainables.config import load_config
from trainables.data import build_data
from trainables.errors import UserError
from trainables.probes import rows_to_metrics, run_probes
from trainables.released import IBOT, MOCO_V3, Released, config_variant, shape_of

CHEAP = [*PROBE, "eval.attentive_steps=0", "eval.lowshot=false"]
BIN = Path(sys.executable).parent


def _moco(seed: int) -> dict:
    """A MoCo v3 checkpoint (official wrapping) of a width-192 ViT: the same model size as ``_simmim_model``."""
    enc = _vit(width=192, heads=3, seed=seed).state_dict()
    return {"epoch": 300, "state_dict": {**_prefixed(enc, "module.base_encoder."),
                                         **_prefixed(enc, "module.momentum_encoder.")}}


def _simmim(seed: int) -> dict:
    m = _simmim_model(seed)
    return {"model": _prefixed(m.state_dict(), "encoder."), "epoch": 799}


def test_a_released_checkpoint_reports_as_a_trial_with_its_untrained_encoder_at_step_0(tmp_path):
    ckpt, model = official(MOCO_V3)
    torch.save(ckpt, tmp_path / "moco.pth")
    out = analyze(str(tmp_path / "moco.pth"), CHEAP)
    untrained, trained = out["results"]
    assert (untrained["step"], trained["step"], out["final"]["step"]) == (0, 1, None)
    # the checkpoint's rows are probing the model directly (same seed, same protocol)
    shape = shape_of(MOCO_V3, model.state_dict())
    cfg = load_config({"model": {"variant": config_variant(shape), "img_size": 32}}, CHEAP)
    torch.manual_seed(cfg.run.seed)
    rows, summary = run_probes(Released(model, MOCO_V3, shape, 32).eval(), build_data(cfg), cfg)
    direct = {**summary, **rows_to_metrics(rows)}
    assert {k: trained[k] for k in direct} == pytest.approx(direct, abs=1e-6)
    assert untrained["linear_top1"] != trained["linear_top1"] or untrained["layer/1/attn_distance"] != \
        trained["layer/1/attn_distance"]
    # the trials row: the objective from the layout, the source recorded, clmim's training recipe left out
    assert out["config"]["objective"] == {"weights": {"mocov3": 1.0}} and "optim" not in out["config"]
    assert out["source"]["source_layout"] == "moco_v3" and out["source"]["source"].endswith("moco.pth")
    assert out["final"]["seconds_probes"] > 0 and out["wall_time_s"] >= out["final"]["seconds_probes"]


def test_moco_v3s_untrained_encoder_keeps_its_fixed_patch_projection_and_position_embedding(tmp_path):
    """MoCo v3 never trains its sin-cos position embedding nor (--stop-grad-conv1) its patch projection: the
    untrained encoder has the checkpoint's; every other weight is drawn afresh, the same for the same seed."""
    ckpt, _ = official(MOCO_V3)
    torch.save(ckpt, tmp_path / "moco.pth")
    saved = load_saved(str(tmp_path / "moco.pth"), CHEAP)
    a, b = saved.untrained().state_dict(), saved.untrained().state_dict()
    trained = saved.encoder.state_dict()
    for k in ("model.pos_embed", "model.patch_embed.proj.weight"):
        assert torch.equal(a[k], trained[k])
    assert not torch.equal(a["model.blocks.0.attn.qkv.weight"], trained["model.blocks.0.attn.qkv.weight"])
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_checkpoint_of_an_unregistered_objective_is_its_own_group_in_no_claim(tmp_path):
    ckpt, _ = official(IBOT)
    torch.save(ckpt, tmp_path / "ibot.pth")
    saved = load_saved(str(tmp_path / "ibot.pth"), CHEAP)
    config = trial_config(saved)
    assert "objective" not in config
    row = trial_row("s", "t", "a", "TERMINATED", config, {}, source=saved.source)
    assert (row["objective"], row["mix"], row["lam"]) == ("ibot", "ibot (released)", None)


def test_trial_ids_are_stable_per_checkpoint_network_and_data_set():
    jobs = plan(["a/moco.pth", "b/moco.pth", "a/moco.pth"], ["digits", "synthetic"], "teacher")
    assert len(jobs) == 4 and len({j.trial for j in jobs}) == 4
    assert jobs[0].trial == trial_id("a/moco.pth", "digits", "teacher") != trial_id("a/moco.pth", "digits", "student")
    assert jobs[0].trial.startswith("moco-digits-")
    assert trial_id("s/tune/5daca_00000/run", None, "teacher").startswith("5daca_00000-run-default-")


@pytest.mark.parametrize("args, message", [
    (["a.pth", "b.pth"], "name it with --sweep NAME"),
    (["missing.pth", "--sweep", "rel"], "'missing.pth' does not exist"),
    (["x.pth", "--sweep", "rel", "--set", "eval.nope=1"], "eval.nope"),
    (["x.pth", "--sweep", "../up"], "--sweep"),
])
def test_bad_analysis_sweep_input_is_one_line_and_exit_2_before_ray_starts(args, message, tmp_path, capsys,
                                                                           monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save(_moco(0), tmp_path / "x.pth")
    assert main(["analyze", *args, "--results", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.extended
def test_an_analysis_sweep_of_three_checkpoints_of_two_layouts_lands_in_the_tables_claims_and_report(
        ray_address, tmp_path, capsys):
    """Two MoCo v3 checkpoints and one SimMIM (random weights, official layouts, one model size) and a file that is
    no checkpoint, as Ray tasks: every trial in ``trials`` with its source (the bad one as ERROR with its reason,
    exit 1), per-layer rows of the checkpoint (step 1) and its untrained encoder (step 0), the claims with MoCo v3
    n = 2 against SimMIM n = 1, the report; the same command again runs nothing, and other probe settings or a
    resume are refused."""
    paths = []
    for name, ckpt in (("moco_a", _moco(1)), ("moco_b", _moco(2)), ("simmim", _simmim(3))):
        torch.save(ckpt, tmp_path / f"{name}.pth")
        paths.append(str(tmp_path / f"{name}.pth"))
    (tmp_path / "bad.pth").write_bytes(b"not a torch file")
    root = tmp_path / "r"
    args = ["--sweep", "rel", "--results", str(root), "--address", ray_address,
            *[a for kv in CHEAP for a in ("--set", kv)]]
    r = subprocess.run([str(BIN / "clmim"), "analyze", *paths, str(tmp_path / "bad.pth"), *args],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]
    assert "4 trial(s) to analyse" in r.stdout and "moco_v3 from facebookresearch/moco-v3" in r.stdout
    assert "[4/4, " in r.stdout and "1 trial(s) ended in ERROR" in r.stderr

    trials = query("SELECT status, objective, source, error FROM trials ORDER BY source", root)
    assert list(trials.status) == ["ERROR", "TERMINATED", "TERMINATED", "TERMINATED"]
    assert list(trials.source) == [str(tmp_path / "bad.pth"), *sorted(paths)]
    assert "is not a torch file" in trials.error[0] and len(trials.error[0].splitlines()) == 1
    assert list(trials.objective[1:]) == ["mocov3", "mocov3", "simmim"]
    steps = query("SELECT trial, list(DISTINCT step ORDER BY step) AS steps FROM layers GROUP BY trial", root)
    assert len(steps) == 3 and all(list(s) == [0, 1] for s in steps.steps)

    capsys.readouterr()
    assert main(["results", "show", "rel", "--results", str(root)]) == 0
    assert "the paper's claims" in capsys.readouterr().out
    claims = next(s.table for s in sections(sweep_frames(root, ["rel"])) if s.key == "claims")
    assert set(claims.pair) == {"MoCo v3 vs SimMIM"}
    assert claims.verdict.str.startswith("not testable (1 seed").any()  # one SimMIM checkpoint: no spread there
    cl_n = claims["CL"].str.extract(r"\(n=(\d+)\)")[0].dropna().astype(int)
    assert len(cl_n) and (cl_n == 2).all(), claims["CL"]  # the two MoCo v3 checkpoints are its replicates
    assert main(["report", "rel", "--results", str(root)]) == 0
    html = Path(capsys.readouterr().out.split("report: ")[1].split(" (")[0]).read_text()
    assert "MoCo v3 vs SimMIM" in html

    assert main(["analyze", *paths, *args]) == 0  # nothing left to run: Ray is not even asked
    assert "0 trial(s) to analyse, 3 already analysed" in capsys.readouterr().out
    assert main(["analyze", *paths, *args, "--set", "eval.samples=32"]) == 2
    assert "was analysed with" in capsys.readouterr().err
    assert json.loads((root / "rel" / "sweep.json").read_text())["analysis"]["checkpoints"] == [
        *paths, str(tmp_path / "bad.pth")]
    assert main(["resume", "rel", "--results", str(root)]) == 2
    assert "analysis sweep" in capsys.readouterr().err


def test_a_file_that_is_no_pickle_is_named_as_such_not_as_one_holding_code(tmp_path):
    (tmp_path / "bad.pth").write_bytes(b"not a torch file")
    with pytest.raises(UserError, match="is not a torch file"):
        load_saved(str(tmp_path / "bad.pth"), CHEAP)
