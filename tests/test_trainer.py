import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FULL_EVAL, tiny

from orchestrator.results import curves_from_results, noise_from_results, trial_row
from trainables import checkpoints, evaluate
from trainables.checkpoints import find_checkpoint, load_weights
from trainables.config import ConfigError, load_config
from trainables.errors import NonFiniteLossError
from trainables.objectives.mixture import Mixture
from trainables.trainer import schedule_break, schedules, train


def weights(path):
    return torch.load(path, map_location="cpu", weights_only=False)["model"]


def test_wsd_holds_the_peak_then_cools_down_and_its_stable_steps_do_not_depend_on_the_runs_length():
    """WSD: warmup, the peak (momentum and wd held too), then 1 - sqrt to min over the last cooldown_frac; with
    warmup_steps, every schedule of a 40-step run equals the 100-step run's up to its cooldown."""
    over = ["objective.lam=0.5", "optim.schedule=wsd", "optim.warmup_steps=5", "optim.blr=2.56e-3",
            "data.batch_size=100", "optim.min_lr_ratio=0.1", "optim.weight_decay_end=0.2"]
    cfg = load_config(tiny(), over)
    long, short, peak = schedules(cfg, 100), schedules(cfg, 40), 2.56e-3 * 100 / 256
    lr = long["lr"]
    assert lr[0] == pytest.approx(peak / 5) and lr[4] == pytest.approx(peak)
    assert np.allclose(lr[5:80], peak) and np.all(np.diff(lr[79:]) < 0)
    assert lr[-1] == pytest.approx(0.1 * peak) and lr[89] == pytest.approx(peak * (0.1 + 0.9 * (1 - 0.5 ** 0.5)))
    assert long["momentum"][79] == pytest.approx(0.99) and long["momentum"][-1] == pytest.approx(1.0)
    for k in long:  # the 40-step run cools down from step 32; before it, both runs are one
        np.testing.assert_array_equal(short[k][:32], long[k][:32], err_msg=k)
        assert not np.allclose(short[k][32:], long[k][32:40]) or k in ("wd",) or np.ptp(long[k]) == 0, k


@pytest.mark.slow  # (make test's 12-minute budget: CI runs it in the slow tier)
def test_wsd_cooldown_or_extension_from_a_checkpoint_equals_a_straight_run(tmp_path, capsys):
    """A checkpoint of a WSD run's stable phase, resumed with another length, gives a straight run of that length's
    weights bit for bit: cooling a 16-step run's step-8 checkpoint down in 2 steps is the 10-step run, and the
    10-step run's kept stable checkpoint (``stable/``, step 8) extended to 16 steps is the 16-step run."""
    base = tiny(**{"objective__lam": 0.5, "optim__schedule": "wsd", "optim__warmup_steps": 2,
                   "optim__cooldown_frac": 0.2, "run__ckpt_every": 4, "model__drop_path": 0.1})

    def run(name, steps, resume=None):
        out = tmp_path / name

        def keep(metrics, checkpoint=None):  # every checkpoint (a run keeps its last two)
            if checkpoint is not None:
                shutil.copytree(checkpoint, tmp_path / f"{name}-kept" / Path(checkpoint).name)

        train(load_config(base, [f"optim.steps={steps}", f"run.out_dir={out}",
                                 *([f"run.resume={resume}"] if resume else [])]), keep)
        return out

    long, short = run("long", 16), run("short", 10)
    assert (short / "stable" / "checkpoint.pt").is_file() and load_weights(short / "stable" / "checkpoint.pt")[
        "step"] == 8
    cooled = run("cooled", 10, tmp_path / "long-kept" / "step_0000008")
    extended = run("extended", 16, short / "stable")
    assert "run.resume" not in capsys.readouterr().err  # (no schedule break to warn of)
    for a, b in ((short, cooled), (long, extended)):
        wa, wb = weights(find_checkpoint(a)), weights(find_checkpoint(b))
        assert all(torch.equal(wa[k], wb[k]) for k in wa), a.name


def test_a_schedule_break_is_another_lr_shape_before_the_checkpoints_step_not_a_new_peak_or_wsds_stable_phase():
    """Cosine runs of 6 and 12 steps part after warmup; the same length with a new peak (PBT's exploits) or WSD's
    stable phase at any length does not."""
    cos6, cos12 = (load_config(tiny(), [f"optim.steps={n}"]) for n in (6, 12))
    assert schedule_break(cos6, cos12, 2, 256) == "cosine over 6 steps, this run cosine over 12"
    assert schedule_break(cos6, load_config(tiny(), ["optim.lr_scale=3"]), 4, 256) is None
    wsd6, wsd12 = (load_config(tiny(), [f"optim.steps={n}", "optim.schedule=wsd", "optim.warmup_steps=2"])
                   for n in (6, 12))
    assert schedule_break(wsd6, wsd12, 4, 256) is None and schedule_break(wsd12, wsd6, 6, 256) is not None


@pytest.mark.slow  # (make test's 12-minute budget: three training runs)
def test_a_checkpoint_resumed_into_another_lr_shape_warns_that_the_run_is_not_its_configs_straight_run(tmp_path,
                                                                                                       capsys):
    """A 6-step cosine run's step-4 checkpoint resumed as a 12-step run is not the 12-step run: a warning says so,
    once, naming both; resumed into its own 6 steps it says nothing."""
    base = tiny(**{"run__ckpt_every": 2})
    train(load_config(base, [f"run.out_dir={tmp_path / 'a'}"]))
    capsys.readouterr()
    ckpt = tmp_path / "a" / "checkpoints" / "step_0000004"
    warned = {}
    for steps in (12, 6):
        train(load_config(base, [f"optim.steps={steps}", f"run.out_dir={tmp_path / str(steps)}",
                                 f"run.resume={ckpt}"]))
        warned[steps] = [line for line in capsys.readouterr().err.splitlines() if "run.resume" in line]
    assert not warned[6] and len(warned[12]) == 1, warned
    line = warned[12][0]
    assert line.startswith(f"clmim: warning: run.resume: {ckpt}") and ("trained under another lr schedule before its "
                                                                      "step 4 (cosine over 6 steps, this run cosine "
                                                                      "over 12)") in line


@pytest.mark.slow  # (make test's 12-minute budget; test_trial resumes a trial at each checkpoint there)
def test_resume_from_step_n_matches_straight_run(tmp_path):
    """Training to 2N straight and resuming from the step-N checkpoint to 2N give the same weights."""
    base = tiny(**{"objective__lam": 0.5, "optim__steps": 8, "run__ckpt_every": 4, "model__drop_path": 0.1})
    straight = tmp_path / "straight"
    train(load_config(base, [f"run.out_dir={straight}"]))
    half = straight / "checkpoints" / "step_0000004"
    assert (half / "checkpoint.pt").is_file()
    resumed = tmp_path / "resumed"
    train(load_config(base, [f"run.out_dir={resumed}", f"run.resume={half}"]))
    a = weights(find_checkpoint(straight))
    b = weights(find_checkpoint(resumed))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


@pytest.mark.integration
def test_checkpoint_is_complete_and_config_saved(tmp_path):
    out = tmp_path / "run"
    train(load_config(tiny(**{"objective__lam": 1.0}), [f"run.out_dir={out}"]))
    ckpt = torch.load(find_checkpoint(out), map_location="cpu", weights_only=False)
    assert ckpt["step"] == 6
    assert {"model", "optimizer", "rng", "config"} <= set(ckpt)
    assert any(k.startswith("mocov3.momentum.encoder.") for k in ckpt["model"])
    assert (out / "config.yaml").is_file()
    final = json.loads((out / "final_metrics.json").read_text())
    assert final["step"] == 6 and 0 <= final["knn_top1"] <= 1 and final["params"] > 0


@pytest.mark.integration
def test_non_finite_loss_stops_with_clear_error(monkeypatch):
    real = Mixture.forward

    def poisoned(self, batch):
        out = real(self, batch)
        out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(Mixture, "forward", poisoned)
    with pytest.raises(NonFiniteLossError, match="non-finite loss by step 1"):  # step 1 is a log step
        train(load_config(tiny()))


@pytest.mark.integration
def test_reports_and_final_metrics():
    logs = []
    final = train(load_config(tiny(**{"objective__lam": 0.0})), lambda m, checkpoint=None: logs.append(m))
    steps = [m["step"] for m in logs if "loss" in m and "knn_top1" not in m]
    assert steps == [1, 2, 4, 6]  # step 1 (its rate is the first a user sees), then every log_every
    assert {"loss", "loss_simmim", "lr", "images_per_s", "knn_top1", "linear_top1", "shape_bias",
            "train_flops_per_image"} <= set(final)


def test_schedules_warmup_cosine_and_momentum():
    cfg = load_config(tiny(), ["optim.warmup_frac=0.1", "optim.blr=2.56e-3", "data.batch_size=100"])
    s = schedules(cfg, 100)
    peak = 2.56e-3 * 100 / 256
    assert s["lr"][9] == pytest.approx(peak) and s["lr"][0] == pytest.approx(peak / 10)
    assert np.all(np.diff(s["lr"][10:]) <= 0) and s["lr"][-1] < peak * 0.01
    assert s["momentum"][0] == pytest.approx(0.99) and s["momentum"][-1] > 0.9999


def test_simmim_keeps_its_multistep_schedule_and_mixes_take_cosine():
    """SimMIM's ViT-B recipe: warmup, the peak lr until epoch 700 of 800, then x 0.1 (MultiStepLR); clmim decayed
    it by cosine as the others. A mix takes cosine (one schedule; SimMIM's only where it trains alone)."""
    cfg = load_config(tiny(), ["objective.lam=0", "optim.warmup_frac=0.1", "optim.blr=2.56e-3",
                               "data.batch_size=100"])
    assert cfg.optim.schedule == "multistep"
    lr, peak = schedules(cfg, 800)["lr"], 2.56e-3 * 100 / 256
    assert lr[79] == pytest.approx(peak) and lr[699] == pytest.approx(peak) and lr[700] == pytest.approx(peak / 10)
    assert lr[-1] == pytest.approx(peak / 10)
    assert load_config(tiny(), ["objective.lam=0.25"]).optim.schedule == "cosine"
    assert load_config(tiny(), ["objective.weights={mae: 1}"]).optim.schedule == "cosine"
    assert load_config(tiny(), ["objective.lam=0", "optim.schedule=cosine"]).optim.schedule == "cosine"


@pytest.mark.slow
@pytest.mark.extended
def test_flops_budget_stops_objectives_of_different_cost_at_equal_compute():
    from trainables.config import train_flops_per_image

    budget = 1.5e11  # at batch 16: 32, 11 and 8 steps
    spent = {}
    for lam in (0.0, 1.0, 0.5):
        cfg = load_config(tiny(), [f"objective.lam={lam}", "optim.steps=null", f"optim.flops_budget={budget}",
                                   "data.batch_size=16"])
        per_step = train_flops_per_image(cfg) * cfg.data.batch_size
        final = train(cfg)
        steps = final["step"]
        assert steps == int(budget // per_step) and final["total_steps"] == steps
        spent[lam] = steps * per_step
        assert budget - per_step < spent[lam] <= budget  # stops within one step of the budget
    assert spent[0.0] / spent[1.0] == pytest.approx(1.0, abs=0.1)
    with pytest.raises(ConfigError, match="optim.flops_budget: 1e.06 FLOPs is less than one step"):
        load_config(tiny(), ["optim.steps=null", "optim.flops_budget=1e6"])  # refused before any work
    with pytest.raises(ConfigError, match="only one of"):
        load_config(tiny(), ["optim.flops_budget=1e12"])  # tiny() sets optim.steps


@pytest.mark.integration
def test_step_0_probes_the_untrained_encoder_the_same_for_every_objective(tmp_path):
    """Every trial probes its encoder before training (step 0): the baseline its probe values are read against.
    At one seed and one architecture it is the same encoder whatever lam is (lam = 1 defaults to MoCo v3's fixed
    embeddings, so the architecture is set explicitly here); the tables keep step 0 and the final step apart."""
    from orchestrator.query import query
    from orchestrator.results import write_trial_tables

    baselines = []
    for lam in (0.0, 1.0):
        logs = []
        train(load_config(tiny(**{"objective__lam": lam}), ["eval.probe_images=8", "model.pos_embed=learned",
                                                             "model.patch_embed=trained"]),
              lambda m, checkpoint=None: logs.append(dict(m)))  # noqa: B023 - used at once
        first = logs[0]
        assert first["step"] == 0 and "layer/6/attn_nmi" in first and "linear_top1" in first
        baselines.append({k: v for k, v in first.items() if k.startswith("layer/")})
        write_trial_tables(tmp_path / "s", f"lam{lam:g}", "TERMINATED", {"objective": {"lam": lam}}, logs)
    assert baselines[0] == baselines[1]
    steps = query("SELECT trial, list(DISTINCT step ORDER BY step) AS s FROM layers GROUP BY trial", tmp_path)
    assert all(list(s) == [0, 6] for s in steps.s)
    moved = query("""SELECT avg(abs(f.value - u.value)) AS d FROM layers f
                     JOIN layers u USING (trial, layer, head, metric)
                     WHERE f.step = 6 AND u.step = 0 AND f.metric = 'attn_distance'""", tmp_path).d[0]
    assert moved > 0  # "trained minus untrained" is one self-join away


def test_dino_clips_each_parameters_gradient_on_its_own_as_its_official_code():
    """DINO's utils.clip_gradients scales each tensor whose gradient norm exceeds 3.0 to 3.0 and leaves the rest;
    clmim clipped the global norm (every gradient scaled by one factor). SimMIM keeps its global clip_grad_norm_."""
    from trainables.trainer import clip_gradients

    assert load_config(tiny(), ["objective.weights={dino: 1}"]).optim.clip_mode == "per_tensor"
    assert load_config(tiny(), ["objective.lam=0"]).optim.clip_mode == "global"
    assert load_config(tiny(), ["objective.weights={simmim: 0.5, dino: 0.5}"]).optim.clip_grad == 3.0

    def model_with_grads():
        torch.manual_seed(0)
        m = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
        for i, p in enumerate(m.parameters()):
            p.grad = torch.randn_like(p) * (0.1 if i % 2 else 10.0)  # weights' gradients large, biases' small
        return m

    m = model_with_grads()
    before = [p.grad.clone() for p in m.parameters()]
    clip_gradients(m, 3.0, "per_tensor")
    for b, p in zip(before, m.parameters(), strict=True):  # the official loop, on the saved gradients
        coef = 3.0 / (b.norm(2) + 1e-6)
        torch.testing.assert_close(p.grad, b * coef if coef < 1 else b)
    g = model_with_grads()
    clip_gradients(g, 3.0, "global")
    assert torch.cat([p.grad.flatten() for p in g.parameters()]).norm() == pytest.approx(3.0, rel=1e-4)


def test_dino_is_probed_exported_and_fine_tuned_from_its_teacher(monkeypatch, tmp_path):
    """DINO's eval_linear / eval_knn read the teacher (checkpoint_key "teacher"); clmim read the student. Now the
    teacher by default where the mix has DINO, ``eval.encoder`` choosing otherwise, recorded in the config."""
    from trainables import trainer
    from trainables.config import to_dict

    assert load_config(tiny(), ["objective.weights={dino: 1}"]).eval.encoder == "teacher"
    assert load_config(tiny(), ["objective.weights={simmim: 0.5, dino: 0.5}"]).eval.encoder == "teacher"
    assert load_config(tiny(), ["objective.lam=0.5"]).eval.encoder == "student"
    assert load_config(tiny(), ["objective.lam=1", "eval.encoder=momentum"]).eval.encoder == "momentum"
    with pytest.raises(ConfigError, match=r"^eval.encoder: teacher needs dino in the mix"):
        load_config(tiny(), ["objective.lam=0", "eval.encoder=teacher"])

    cfg = load_config(tiny(), ["objective.weights={dino: 1}"])
    run = trainer.build_run(cfg)
    teacher = run.objective.heads["dino"].teacher["encoder"]
    with torch.no_grad():  # the teacher moved away from the student (as its EMA lags behind it)
        for p in teacher.parameters():
            p.add_(0.01)
    seen = []
    monkeypatch.setattr(evaluate, "run_probes", lambda enc, data, c, keep=None: (seen.append(enc), ([], {}))[1])
    trainer.evaluate(run, 1)
    assert seen == [teacher]
    ckpt = {"model": run.objective.state_dict(), "optimizer": {}, "config": to_dict(cfg), "step": 1}
    read = checkpoints.pretrained_encoder(ckpt)
    assert torch.equal(read["encoder.vit.cls_token"], teacher.vit.cls_token)
    assert not torch.equal(read["encoder.vit.cls_token"], run.objective.encoder.vit.cls_token)
    torch.save(ckpt, tmp_path / "checkpoint.pt")  # the export keeps only that encoder, and reads as it
    exported = torch.load(checkpoints.export_weights(tmp_path / "checkpoint.pt", tmp_path / "model.pt"),
                          weights_only=True)
    assert torch.equal(checkpoints.pretrained_encoder(exported)["encoder.vit.cls_token"], teacher.vit.cls_token)
    student = to_dict(load_config(tiny(), ["objective.weights={dino: 1}", "eval.encoder=student"]))
    read = checkpoints.pretrained_encoder({**ckpt, "config": student})
    assert torch.equal(read["encoder.vit.cls_token"], run.objective.encoder.vit.cls_token)


# ------------------------------------------------------------------------------------------- staged runs
GRAFTED = {"stages": [
    {"steps": 4, "set": {"objective.weights": {"mae": 1.0}}},
    {"steps": 4, "set": {"objective.weights": {"mocov3": 1.0}, "objective.placement.graft_layer": 3,
                         "objective.placement.graft_lr_ratio": 0.1}}]}


def grafted(**over):
    cfg = tiny(**{"run__ckpt_every": 2, "model__drop_path": 0.0, **over})
    cfg.pop("optim")  # a staged run's length is its stages'
    return {**cfg, **GRAFTED}


def test_staged_config_resolves_each_stage_with_its_own_recipe_and_refuses_what_a_stage_cannot_set():
    cfg = load_config(grafted())
    first, second = (load_config(s.resolved) for s in cfg.stages)
    assert cfg.optim.steps == 8 and first.optim.steps == 4 and second.optim.steps == 4
    assert first.optim.beta2 == 0.95 and second.optim.beta2 == 0.999  # MAE's recipe, then MoCo v3's
    assert second.objective.placement.graft_lr_ratio == 0.1 and cfg.objective.mix() == {"mocov3": 1.0}
    with pytest.raises(ConfigError, match=r"^stages\[1\]\.set\.model\.variant: a stage may set"):
        load_config({**grafted(), "stages": [GRAFTED["stages"][0], {"steps": 2, "set": {"model.variant": "nano/4"}}]})
    with pytest.raises(ConfigError, match=r"^optim\.steps: a staged run is as long as its stages"):
        load_config({**grafted(), "optim": {"steps": 3}})
    with pytest.raises(ConfigError, match=r"^stages\[0\]\.set: objective\.placement\.graft_layer"):
        load_config({**grafted(), "stages": [{"steps": 2, "set": {"objective.weights": {"mae": 1.0},
                                                                    "objective.placement.graft_layer": 2}}]})
    with pytest.raises(ConfigError, match=r"^stages\[0\]\.steps: required"):
        load_config({**grafted(), "stages": [{"set": {}}]})


@pytest.mark.slow
@pytest.mark.extended
def test_layer_grafting_runs_as_its_paper_mim_first_then_cl_from_its_weights_resumable_in_any_stage(tmp_path):
    """Stage 1 is exactly an MAE run; stage 2 starts MoCo v3 (online and momentum encoder) from its encoder with
    blocks 1..3 and the embedding at 0.1 x lr; steps count globally; a run resumed inside a stage or at the
    boundary ends with the straight run's weights; the tables hold one trial with a stage column."""
    from orchestrator.query import query
    from orchestrator.results import write_trial_tables
    from trainables.config import to_dict

    kept, reports = tmp_path / "kept", []

    def keep(metrics, checkpoint=None):
        reports.append(dict(metrics))
        if checkpoint is not None:  # keep every checkpoint (a run keeps its last two)
            shutil.copytree(checkpoint, kept / Path(checkpoint).name)

    straight = tmp_path / "straight"
    cfg = load_config(grafted(), [f"run.out_dir={straight}"])
    train(cfg, keep)
    steps = [r["step"] for r in reports if "step" in r]
    assert steps == sorted(steps) and max(steps) == 8
    alone = tmp_path / "mae"
    train(load_config(tiny(**{"run__ckpt_every": 2, "model__drop_path": 0.0, "optim__steps": 4}),
                      ["objective.weights={mae: 1}", f"run.out_dir={alone}"]))
    boundary = weights(kept / "step_0000004" / "checkpoint.pt")
    mae = weights(find_checkpoint(alone))
    for k in mae:  # stage 1 is the MAE run itself
        torch.testing.assert_close(boundary[k], mae[k], rtol=0, atol=0, msg=k)
    end = weights(find_checkpoint(straight))
    assert any(k.startswith("mocov3.momentum.encoder.") for k in end) and not any(k.startswith("mae.") for k in end)
    for start in ("step_0000004", "step_0000006"):  # at the boundary, and inside stage 2
        resumed = tmp_path / start
        train(load_config(grafted(), [f"run.out_dir={resumed}", f"run.resume={kept / start}"]))
        got = weights(find_checkpoint(resumed))
        for k in end:
            torch.testing.assert_close(got[k], end[k], rtol=0, atol=0, msg=f"{start}: {k}")
    write_trial_tables(tmp_path / "res" / "s", "t", "TERMINATED", to_dict(cfg), reports)
    stages = query("SELECT step, any_value(stage) AS stage FROM layers GROUP BY step ORDER BY step", tmp_path / "res")
    assert list(stages.step) == [0, 4, 8] and list(stages.stage) == [0, 0, 1]
    trial = query("SELECT mix, objective FROM trials", tmp_path / "res").iloc[0]
    assert (trial.mix, trial.objective) == ("staged: MAE 4 → MoCo v3 4", "staged")


def test_evaluations_land_in_their_tables():
    results = [{"step": 0, "noise/0/linear_top1": 0.5, "noise/0/linear_top1_drop": 0.1, "linear_top1_clean": 0.6},
               {"step": 4, "finetune_loss": 1.5},
               {"step": 4, "noise/1/finetune_top1_drop": 0.2, "finetune_top1": 0.7, "seconds_probes": 1.0}]
    rows = noise_from_results(results, bands=2)
    assert rows[0] == (0, 0, 0.0, math.pi / 2, "linear_top1", 0.5)
    assert (4, 1, math.pi / 2, math.pi, "finetune_top1_drop", 0.2) in rows
    curves = curves_from_results(results)
    assert not any(m.startswith("noise/") or m.startswith("seconds_") for _, _, m, _ in curves)
    assert (4, None, "finetune_loss", 1.5) in curves
    final_report = {"step": 2, "resumed_from": 0, "finetune_top1": 0.7, "linear_top1": 0.6}  # step: pre-training's
    assert curves_from_results([final_report]) == [(2, None, "linear_top1", 0.6)]
    final = {k: v for r in results for k, v in r.items()}
    row = trial_row("s", "t", "a", "TERMINATED", {"objective": {"lam": 0.5}}, final)
    assert row["finetune_top1"] == 0.7 and row["seconds_probes"] == 1.0 and row["linear_top1_clean"] == 0.6


@pytest.mark.integration
def test_cka_with_the_untrained_encoder_after_a_resume_equals_a_straight_run(tmp_path):
    base = tiny(**{"objective__lam": 0.0, "optim__steps": 6, "run__ckpt_every": 3, "eval__cka": True})
    a = train(load_config(base, [f"run.out_dir={tmp_path / 'a'}"]))
    b = train(load_config(base, [f"run.out_dir={tmp_path / 'b'}",
                                 f"run.resume={tmp_path / 'a' / 'checkpoints' / 'step_0000003'}"]))
    keys = [k for k in a if k.endswith("/cka_untrained")]
    assert len(keys) == 7 and b["resumed_from"] == 3
    assert [a[k] for k in keys] == [b[k] for k in keys]
    assert a["layer/6/cka_untrained"] < 1


@pytest.mark.slow
def test_training_does_not_depend_on_which_evaluations_ran(tmp_path):
    """Evaluations draw nothing from the global RNG that training (drop path) reads: the same weights with every
    evaluation on, probed every epoch, and with the optional ones off."""
    base = tiny(**FULL_EVAL, **{"objective__lam": 0.0, "optim__steps": 16, "model__drop_path": 0.2})
    a = tmp_path / "a"
    train(load_config(base, [f"run.out_dir={a}", "eval.every=1"]))
    b = tmp_path / "b"
    train(load_config(base, [f"run.out_dir={b}", "eval.noise.bands=0", "eval.cka=false", "eval.dense_images=0"]))
    wa, wb = (load_weights(find_checkpoint(d))["model"] for d in (a, b))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=0, msg=k)


@pytest.mark.integration
def test_training_seconds_exclude_no_more_than_the_evaluations_during_training(monkeypatch):
    """seconds_train is the loop's time minus the evaluations inside it, not minus step 0's baseline too."""
    import time

    import trainables.evaluate as ev

    real = ev.run_probes

    pause = 4.0  # far above two tiny steps on a loaded machine, so the bounds below cannot be met by chance

    def slow(*a, **k):  # every probe call takes an extra `pause` (counted in seconds_probes)
        time.sleep(pause)
        return real(*a, **k)

    monkeypatch.setattr(ev, "run_probes", slow)
    final = train(load_config(tiny(**{"optim__steps": 2, "objective__lam": 0.0})))
    assert final["seconds_probes"] >= 2 * pause  # step 0 and the end
    # The end's evaluation left out (else >= pause); step 0's not subtracted as well (else < 0).
    assert 0 < final["seconds_train"] < pause


@pytest.mark.integration
def test_the_held_out_loss_is_the_mean_training_loss_of_the_validation_images_and_leaves_training_untouched():
    """``val_loss`` (and each objective's) at an evaluation: the training forward of the objective on the
    validation images, batch by batch with fixed draws, averaged; the same at every call; no parameter, buffer
    (MoCo v3's BatchNorm statistics, DINO's center) or RNG state changed. No validation split: nothing."""
    from trainables import trainer
    from trainables.schedule import step_seed

    cfg = load_config(tiny(), ["objective.weights={simmim: 0.4, mocov3: 0.3, dino: 0.3}", "eval.val_samples=64"])
    run = trainer.build_run(cfg)
    state = {k: v.clone() for k, v in run.objective.state_dict().items()}
    rng = torch.random.get_rng_state()
    with torch.random.fork_rng():
        got = trainer.held_out_loss(run, 3)
    assert set(got) == {"val_loss", "val_loss_simmim", "val_loss_mocov3", "val_loss_dino"}
    assert all(torch.equal(v, state[k]) for k, v in run.objective.state_dict().items())
    assert torch.equal(torch.random.get_rng_state(), rng)
    with torch.random.fork_rng():
        assert trainer.held_out_loss(run, 3) == got  # deterministic
    images = run.data.val.images  # 64 held out: two batches of 32
    want = []
    with torch.random.fork_rng(), torch.no_grad():
        torch.manual_seed(cfg.run.seed)
        for b in range(2):
            x = images[32 * b:32 * (b + 1)]
            out = Mixture.step(run.objective, x, run.objective.draws(
                {"images": x, "seed": step_seed(cfg.run.seed, trainer.HELD_OUT_DRAWS, b),
                 **{k: v[3] for k, v in run.step_inputs.items()}}))
            want.append({k: float(out[k.removeprefix("val_")]) for k in got})
    run.objective.load_state_dict(state)
    assert got == pytest.approx({k: (want[0][k] + want[1][k]) / 2 for k in got}, rel=1e-5)
    assert got["val_loss"] == pytest.approx(0.4 * got["val_loss_simmim"] + 0.3 * got["val_loss_mocov3"]
                                            + 0.3 * got["val_loss_dino"], rel=1e-5)
    assert trainer.held_out_loss(trainer.build_run(load_config(tiny(), ["eval.val_samples=0"])), 0) == {}


def test_gradient_cosines_compare_the_mixs_objectives_per_block_and_leave_training_untouched():
    """A MAE + DINO mix: a cosine for every block both reach, in [-1, 1]; DINO's center (a forward updates it), the
    parameters' .grad and the global RNG are as before. A graft that detaches CL below it leaves no block both
    reach there."""
    from trainables import trainer
    from trainables.config import objectives_reaching

    cfg = load_config(tiny(eval__grad_cosine=True), ["objective.weights={mae: 0.5, dino: 0.5}"])
    run = trainer.build_run(cfg)
    center = run.objective.heads["dino"].center
    center.add_(0.5)
    before = center.clone()
    rows = trainer.gradient_cosines(run, 0)
    depth = run.objective.encoder.depth
    assert [k for k, _ in rows] == list(range(1, depth + 1)) == [k for k, n in objectives_reaching(cfg).items()
                                                                 if len(n) > 1]
    assert all(-1 <= v <= 1 for _, v in rows) and len({round(v, 6) for _, v in rows}) > 1
    assert torch.equal(center, before) and all(p.grad is None for p in run.objective.parameters())
    rng = torch.random.get_rng_state()
    metrics = trainer.evaluate(run, 0)
    assert torch.equal(torch.random.get_rng_state(), rng)
    assert f"layer/{depth}/grad_cosine" in metrics
    grafted = load_config(tiny(eval__grad_cosine=True), ["objective.lam=0.5", "objective.placement.graft_layer=3"])
    reach = objectives_reaching(grafted)
    assert reach[3] == ["simmim"] and reach[4] == ["mocov3"]
    assert trainer.gradient_cosines(trainer.build_run(grafted), 0) == []
    assert trainer.gradient_cosines(trainer.build_run(load_config(tiny(eval__grad_cosine=True),
                                                                  ["objective.lam=0"])), 0) == []
    assert trainer.gradient_cosines(trainer.build_run(load_config(tiny(), ["objective.lam=0.5"])), 0) == []  # off
