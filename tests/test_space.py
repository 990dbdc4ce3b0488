import time

import pytest
import yaml
from conftest import tiny

from orchestrator.cli import main
from orchestrator.space import SpaceError, load_space, plan_values, sample_table
from orchestrator.sweep import check_schedulable, trial_bundles
from trainables.config import load_config
from trainables.errors import UserError

SHIPPED = ["quickstart", "lambda", "placement", "scaling", "data_scaling", "paper", "repro", "repro_lr", "objectives",
           "dino_mae", "pb2_weights"]


def space_file(tmp_path, **over):
    raw = {"name": "t", "base": {"optim": {"steps": 4}}, "space": {"objective.lam": {"grid": [0.0, 1.0]}}}
    raw.update(over)
    if isinstance(raw["base"], dict):  # checkpoints during a trial, which every scheduler reads (unless a test says)
        raw["base"] = {**raw["base"], "run": {"ckpt_every": 2, **raw["base"].get("run", {})}}
    p = tmp_path / "s.yaml"
    p.write_text(yaml.safe_dump(raw))
    return p


def err(tmp_path, **over) -> str:
    with pytest.raises(SpaceError) as e:
        load_space(space_file(tmp_path, **over))
    return str(e.value)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_spaces_validate(name):
    sp = load_space(f"search_spaces/{name}.yaml")
    assert sp.n_trials() >= 1 and sample_table(sp)


def test_bad_spaces_are_rejected_naming_the_key(tmp_path):
    assert err(tmp_path, space={"objective.lamda": {"grid": [0.5]}}).startswith("space.objective.lamda:")
    assert "unknown key" in err(tmp_path, space={"objective.lamda": {"grid": [0.5]}})
    assert err(tmp_path, space={"objective.lam": {"grid": [0.0, 1.5]}}).startswith("space.objective.lam:")
    assert err(tmp_path, space={"objective.lam": {"uniform": [0.0, 2.0]}}).startswith("space.objective.lam:")
    msg = err(tmp_path, space={"objective.placement.simmim_layer": {"grid": [3, 9]}})
    assert msg.startswith("space.objective.placement.simmim_layer:") and "depth" in msg
    msg = err(tmp_path, space={"model.variant": {"choice": ["micro/4", "micro/5"]}})
    assert msg.startswith("space.model.variant:") and "divisible" in msg
    assert err(tmp_path, space={"objective.lam": {"grid": []}}).startswith("space.objective.lam.grid: empty")
    assert err(tmp_path, searh={}).startswith("space file.searh: unknown key")
    assert err(tmp_path, resources={"workers": 0}).startswith("resources.workers")
    assert err(tmp_path, search={"algorithm": "optuna"}).startswith("search.algorithm")


def test_space_sections_are_typed_as_the_config_is(tmp_path):
    """search, scheduler, resources, failure and checkpoints go through the config's typed loader: a wrong type,
    a value out of range or an unknown key is an error naming its dotted key (an ASHA grace period of "2" reached
    Ray before)."""
    assert err(tmp_path, scheduler={"type": "asha", "grace_period": "2"}).startswith(
        "scheduler.grace_period: expected int, got '2'")
    assert err(tmp_path, scheduler={"type": "asha", "reduction_factor": 1}).startswith(
        "scheduler.reduction_factor: 1.0 is out of range")
    assert err(tmp_path, scheduler={"type": "median"}).startswith("scheduler.type: 'median' is not allowed")
    assert err(tmp_path, search={"mode": "maximise"}).startswith("search.mode: 'maximise' is not allowed")
    assert err(tmp_path, search={"seed": -1}).startswith("search.seed: -1 is out of range")
    assert err(tmp_path, resources={"mode": "gpu"}).startswith("resources.mode: 'gpu' is not allowed")
    assert err(tmp_path, resources={"cpus_per_worker": 0}).startswith("resources.cpus_per_worker: 0")
    assert err(tmp_path, failure={"max_failure": 1}).startswith("failure.max_failure: unknown key")
    assert err(tmp_path, checkpoints={"keep": 1.5}).startswith("checkpoints.keep: expected int")


def test_the_search_direction_is_decided_once_from_the_metric_unless_the_space_says(tmp_path):
    """mode: auto (the default) maximises accuracies and minimises losses; a statistic without a better direction
    needs the space to say which (an accuracy once defaulted to min, and a search minimised it)."""
    assert load_space(space_file(tmp_path, search={"metric": "val_linear_top1"})).search.mode == "max"
    assert load_space(space_file(tmp_path, search={"metric": "val_dense_miou"})).search.mode == "max"
    assert load_space(space_file(tmp_path)).search.mode == "min"  # loss
    assert load_space(space_file(tmp_path, search={"metric": "val_linear_top1", "mode": "min"})).search.mode == "min"
    assert err(tmp_path, search={"metric": "layer/3/attn_distance"}) == (
        "search.mode: layer/3/attn_distance has no better direction; say mode: min or mode: max")


def test_search_metric_must_be_reported(tmp_path):
    assert err(tmp_path, search={"metric": "linear_acc"}).startswith("search.metric: 'linear_acc' is not a metric")
    load_space(space_file(tmp_path, search={"metric": "layer/3/attn_distance", "mode": "max"}))
    assert "asha" in err(tmp_path, search={"metric": "val_linear_top1", "mode": "max"}, scheduler={"type": "asha"})
    load_space(space_file(tmp_path, search={"metric": "val_linear_top1", "mode": "max"}, scheduler={"type": "asha"}),
               ["eval.every=1"])
    load_space(space_file(tmp_path, scheduler={"type": "asha"}))  # loss is reported at every log step
    msg = err(tmp_path, space={"objective.lam": {"grid": [0.0, 1.0]}}, search={"metric": "loss_mocov3"})
    assert msg.startswith("search.metric:") and "objective.lam=0" in msg
    msg = err(tmp_path, base={"data": {"dataset": "digits"}}, search={"metric": "val_dense_miou"})
    assert msg.startswith("search.metric: val_dense_miou needs the synthetic set's masks") and "digits" in msg
    msg = err(tmp_path, base={"eval": {"dense_images": 0}, "optim": {"steps": 4}, "run": {"ckpt_every": 2}},
              search={"metric": "val_rankme"}, scheduler={"type": "asha", "metric": "val_dense_miou"})
    assert msg.startswith("scheduler.metric: val_dense_miou needs") and "eval.dense_images: 0" in msg
    msg = err(tmp_path, search={"metric": "val_finetune_top1", "mode": "max"})
    assert msg.startswith("search.metric:") and "eval.finetune.steps" in msg
    msg = err(tmp_path, search={"metric": "val_linear_top1", "mode": "max"}, base={"eval": {"val_samples": 0}})
    assert msg.startswith("search.metric: val_linear_top1 is read on the validation split") and "val_samples" in msg


@pytest.mark.parametrize("metric,suggested", [("linear_top1", "val_linear_top1"), ("knn_top1_cls", "val_knn_top1_cls"),
                                              ("finetune_top1", "val_finetune_top1"),
                                              ("layer/3/linear_top1_gap", "val_linear_top1_gap (the last layer's)"),
                                              ("layer/3/dense_miou", "val_dense_miou (the last layer's)"),
                                              ("layer/3/linear1pct_top1_cls", "val_linear_top1 (the last layer's)")])
def test_a_search_never_selects_on_the_evaluation_split_the_claims_read(tmp_path, metric, suggested):
    """Selecting on the split the claims and reported accuracies come from biases both; every selection reads the
    validation split, held out of the training labels."""
    assert err(tmp_path, search={"metric": metric, "mode": "max"}) == (
        f"search.metric: {metric} is read on the evaluation split the claims are read on; select on the "
        f"validation split: {suggested}")


@pytest.mark.parametrize("metric", ["shape_bias", "cue_match_cls"])
def test_no_selection_reads_the_cue_conflict_images_the_reports_read(tmp_path, metric):
    """Shape bias and cue match are read on the one cue-conflict set, which has no validation twin: a search or a
    scheduler on them would pick the configuration whose noise on those images the report then shows."""
    assert err(tmp_path, search={"metric": metric, "mode": "max"}) == (
        f"search.metric: {metric} is read on the cue-conflict images the reports read, which have no validation "
        "twin; select on val_linear_top1 or a label-free signal (val_rankme)")
    assert err(tmp_path, base={"optim": {"steps": 4}, "eval": {"every": 1}},
               scheduler={"type": "asha", "metric": metric}).startswith(f"scheduler.metric: {metric} is read on the")


@pytest.mark.integration
def test_every_reported_metric_is_a_valid_search_metric(tmp_path):

    from trainables.trainer import train
    from trainables.vocab import LAYER_METRIC, PROBE_METRICS, step_metrics

    final = train(load_config(tiny(), ["optim.steps=2", "eval.finetune.steps=2", "eval.dense_images=8",
                                       # every objective: every loss
                                       "objective.weights={simmim: 0.25, mocov3: 0.25, mae: 0.25, dino: 0.25}"]))
    reported = {k for k in final if k in step_metrics() + PROBE_METRICS or k.startswith("layer/")}
    assert set(step_metrics() + PROBE_METRICS) <= reported
    assert all(LAYER_METRIC.fullmatch(k) for k in reported if k.startswith("layer/"))


def test_cross_axis_combinations_are_checked(tmp_path):
    # graft_layer needs 0 < lam < 1: the lam = 1 corner of the range makes some trials invalid
    msg = err(tmp_path, space={"objective.lam": {"uniform": [0.2, 1.0]}, "objective.placement.graft_layer": 3})
    assert "graft_layer" in msg


def test_seeds_repeat_every_point_of_the_space(tmp_path):
    sp = load_space(space_file(tmp_path, seeds=3))
    assert sp.n_trials() == 6 and sp.axes()["run.seed"] == ("grid", [0, 1, 2])
    assert sorted({(r["objective.lam"], r["run.seed"]) for r in sample_table(sp)}) == [
        (lam, s) for lam in (0.0, 1.0) for s in range(3)]
    assert "run.seed" in err(tmp_path, seeds=2, space={"objective.lam": 0.0, "run.seed": {"grid": [0, 1]}})
    assert err(tmp_path, seeds=0).startswith("seeds")


def test_overrides_fix_keys(tmp_path):
    sp = load_space(space_file(tmp_path), ["optim.steps=2"])
    assert sp.fixed() == {"optim.steps": 2}
    with pytest.raises(SpaceError, match="optim.stepz"):
        load_space(space_file(tmp_path), ["optim.stepz=2"])


def test_unschedulable_resources_named(tmp_path):
    sp = load_space(space_file(tmp_path, resources={"workers": 2, "cpus_per_worker": 1}))
    with pytest.raises(SpaceError, match=r"needs 2.01 CPU .* the cluster has 2 CPU"):
        check_schedulable(sp, [{"CPU": 2.0}])
    check_schedulable(sp, [{"CPU": 3.0}])
    gpu = load_space(space_file(tmp_path, resources={"workers": 1, "gpus_per_worker": 1}))
    with pytest.raises(SpaceError, match="GPU"):
        check_schedulable(gpu, [{"CPU": 16.0}])
    quarter = load_space(space_file(tmp_path, resources={"workers": 1, "cpus_per_worker": 2, "gpus_per_worker": 0.25}))
    assert trial_bundles(quarter) == [{"CPU": 2, "GPU": 0.25}]  # four such trials share one GPU
    check_schedulable(quarter, [{"CPU": 8.0, "GPU": 1.0}])
    with pytest.raises(SpaceError, match="GPU"):
        check_schedulable(quarter, [{"CPU": 8.0}])
    split = load_space(space_file(tmp_path, resources={"workers": 1, "cpus_per_worker": 3}))
    with pytest.raises(SpaceError, match="on one node"):
        check_schedulable(split, [{"CPU": 2.0}, {"CPU": 2.0}])


def test_weight_spaces_grid_simplex_and_dirichlet(tmp_path):
    from orchestrator.space import trial_config

    sp = load_space(space_file(tmp_path, space={"objective.weights": {"simplex": {"objectives": ["simmim", "mae",
                                                                                                  "dino"],
                                                                                   "step": 0.5}}}))
    kind, points = sp.axes()["objective.weights"]
    assert kind == "grid" and len(points) == 6 and sp.n_trials() == 6  # (2 + 2 choose 2) points on the simplex
    assert {"simmim": 0.5, "dino": 0.5} in points and {"mae": 1.0} in points
    assert all(abs(sum(p.values()) - 1) < 1e-9 for p in points)
    assert trial_config(sp, {"objective.weights": points[1]}).objective.mix() == points[1]
    d = {"objective.weights": {"dirichlet": {"objectives": ["simmim", "mocov3", "mae", "dino"], "alpha": 1.0,
                                             "samples": 5}}}
    one, two = load_space(space_file(tmp_path, space=d)), load_space(space_file(tmp_path, space=d))
    draws = one.axes()["objective.weights"][1]
    assert len(draws) == 5 and draws == two.axes()["objective.weights"][1]  # seeded by search.seed
    assert all(abs(sum(p.values()) - 1) < 1e-6 for p in draws)
    other = load_space(space_file(tmp_path, space=d, search={"seed": 1})).axes()["objective.weights"][1]
    assert other != draws
    msg = err(tmp_path, space={"objective.weights": {"grid": [{"simmim": 1.0}, {"mae": 0.5, "dino": 0.4}]}})
    assert msg.startswith("space.objective.weights:") and "sum to 0.9" in msg
    msg = err(tmp_path, space={"objective.weights": {"simplex": {"objectives": ["simmim", "byol"], "step": 0.5}}})
    assert msg.startswith("space.objective.weights.simplex.objectives:")
    msg = err(tmp_path, space={"objective.weights": {"simplex": {"objectives": ["simmim", "mae"], "step": 0.3}}})
    assert msg.startswith("space.objective.weights.simplex.step:")
    msg = err(tmp_path, space={"optim.blr": {"simplex": {"objectives": ["simmim", "mae"], "step": 0.5}}})
    assert msg.startswith("space.optim.blr.simplex:") and "objective.weights only" in msg
    msg = err(tmp_path, space={"objective.weights": {"grid": [{"mae": 1.0}]}}, search={"metric": "loss_mocov3"})
    assert msg.startswith("search.metric:") and "reports no loss_mocov3" in msg


def test_a_yaml_alias_bomb_is_refused_at_once_and_errors_never_build_a_huge_repr(tmp_path):
    import time

    from trainables.errors import excerpt

    lines = ["space:", "  objective.lam: &a0 [0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5]"]
    lines += [f"  x{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
    p = tmp_path / "bomb.yaml"
    p.write_text("\n".join(lines) + "\n")
    t = time.time()
    with pytest.raises(SpaceError, match=r"holds 490,329,066 values once its YAML aliases are expanded"):
        load_space(p)
    p.write_text("space: &a {objective.lam: *a}\n")
    with pytest.raises(SpaceError, match="refers to itself"):
        load_space(p)
    nested = [0.5] * 9
    for _ in range(9):
        nested = [nested] * 9
    assert len(excerpt(nested, 60)) < 80
    assert time.time() - t < 5


def test_sections_of_the_wrong_type_are_one_line_errors(tmp_path):
    for key in ("search", "scheduler", "resources", "failure", "checkpoints"):
        assert err(tmp_path, **{key: [1, 2]}).startswith(f"{key}: expected a mapping")


def test_a_huge_grid_is_refused_fast_and_dry_run_summarises(tmp_path, capsys):
    from orchestrator.space import load_space

    axes = {"optim.blr": {"grid": [1e-4 * (i + 1) for i in range(100)]},
            "optim.weight_decay": {"grid": [0.01 * i for i in range(100)]},
            "run.seed": {"grid": list(range(100))}}
    p = tmp_path / "big.yaml"
    p.write_text(yaml.safe_dump({"space": axes}))
    t = time.time()
    with pytest.raises(UserError, match=r"1,000,000 trials .* max_trials"):
        load_space(p)
    p.write_text(yaml.safe_dump({"space": axes, "max_trials": 1_000_000_000}))
    assert load_space(p).n_trials() == 1_000_000  # allowed on purpose: validated without enumerating
    assert main(["sweep", str(p), "--dry-run"]) == 0
    assert "1,000,000 trial(s), dry run (first 50 shown)" in capsys.readouterr().out
    assert time.time() - t < 30


def test_schedulers_decide_on_their_own_metric_a_probe_or_a_label_free_one(tmp_path):
    """scheduler.metric defaults to the search metric; a label-free one (val_rankme, val_loss) or a validation probe
    is taken with its own direction; the evaluation split, an unknown metric, a probe never measured before the end,
    bohb without a model and a cap on live trials under a pausing scheduler are refused, naming the key."""
    every = {"base": {"optim": {"steps": 4}, "eval": {"every": 1}}}
    sp = load_space(space_file(tmp_path, **every, search={"metric": "val_linear_top1"},
                               scheduler={"type": "hyperband", "max_t": 4}))
    assert (sp.scheduler.metric, sp.scheduler.mode) == ("val_linear_top1", "max")
    sp = load_space(space_file(tmp_path, **every, search={"metric": "val_linear_top1"},
                               scheduler={"type": "asha", "metric": "val_loss"}))
    assert (sp.scheduler.metric, sp.scheduler.mode) == ("val_loss", "min")
    sp = load_space(space_file(tmp_path, **every, scheduler={"type": "hyperband", "metric": "val_rankme"}))
    assert (sp.scheduler.metric, sp.scheduler.mode) == ("val_rankme", "max")
    assert load_space(space_file(tmp_path)).scheduler.metric == ""  # fifo reads nothing
    assert "scheduler.metric: linear_top1 is read on the evaluation split" in err(
        tmp_path, **every, scheduler={"type": "asha", "metric": "linear_top1"})
    assert "scheduler.metric: 'val_nope' is not a metric" in err(tmp_path, **every,
                                                                   scheduler={"type": "asha", "metric": "val_nope"})
    assert "set eval.every" in err(tmp_path, scheduler={"type": "hyperband", "metric": "val_rankme"})
    assert "scheduler.metric: val_loss is read on the validation split, but the trial with objective.lam=0.0 has" in \
        err(tmp_path, base={"optim": {"steps": 4}, "eval": {"every": 1, "val_samples": 0}},
            scheduler={"type": "asha", "metric": "val_loss"})
    assert "scheduler.type: bohb needs a model" in err(tmp_path, **every, scheduler={"type": "bohb"})
    assert "max_concurrent: hyperband pauses trials" in err(tmp_path, **every, scheduler={"type": "hyperband"},
                                                            max_concurrent=2)
    assert "scheduler.typ: unknown key" in err(tmp_path, scheduler={"typ": "asha"})
    assert err(tmp_path, base={"optim": {"steps": 4}, "run": {"ckpt_every": 0}}, scheduler={"type": "asha"}).startswith(
        "run.ckpt_every: asha reads each trial's loss as of its newest stored checkpoint")


def test_pbt_mutates_weight_preserving_hyperparameters_of_a_population_that_differs_in_nothing_else(tmp_path):
    """scheduler.type: pbt takes mutations of keys that keep every weight's shape, each an axis of the space (the
    first values); any other varied key (the model, a placement) would make one trial's checkpoint unloadable in
    another and is refused, naming it; so are one-worker-less trials and a missing mutation list."""
    ok = {"base": {"optim": {"steps": 8}, "eval": {"every": 1}},
          "space": {"objective.lam": {"uniform": [0.2, 0.8]}, "optim.lr_scale": {"loguniform": [0.5, 2.0]}},
          "search": {"algorithm": "random", "metric": "val_rankme"}, "num_samples": 4, "seeds": 2,
          "scheduler": {"type": "pbt", "perturbation_interval": 1,
                        "mutations": {"objective.lam": {"uniform": [0.2, 0.8]},
                                      "optim.lr_scale": {"loguniform": [0.5, 2.0]}}}}
    sp = load_space(space_file(tmp_path, **ok))
    assert sp.scheduler.metric == "val_rankme" and set(sp.scheduler.mutations) == {"objective.lam", "optim.lr_scale"}
    bad = {**ok, "space": {**ok["space"], "model.variant": {"grid": ["micro/4", "nano/4"]}}}
    assert err(tmp_path, **bad).startswith("space.model.variant: pbt copies one trial's weights into another")
    mut = {**ok["scheduler"], "mutations": {"model.variant": {"choice": ["micro/4"]}}}
    assert err(tmp_path, **{**ok, "scheduler": mut}).startswith("scheduler.mutations.model.variant: pbt mutates")
    mut = {**ok["scheduler"], "mutations": {"optim.weight_decay": {"uniform": [0.0, 0.1]}}}
    assert "also give it as an axis of the space" in err(tmp_path, **{**ok, "scheduler": mut})
    assert "pbt needs the keys it mutates" in err(tmp_path, **{**ok, "scheduler": {"type": "pbt"}})
    assert err(tmp_path, **ok, resources={"workers": 2}).startswith("resources.workers: pbt runs one-worker trials")


def test_pb2_takes_the_same_population_rules_and_bounds_its_model_searches_on_a_linear_scale(tmp_path):
    """scheduler.type: pb2 is PBT with a model choosing the new values: the same population rules, named as pb2;
    each mutation is a uniform [lo, hi] (the model's bounds), so a loguniform or a choice is refused, naming the key
    and what to write instead."""
    muts = {"objective.lam": {"uniform": [0.2, 0.8]}, "optim.lr_scale": {"uniform": [0.5, 2.0]}}
    ok = {"base": {"optim": {"steps": 8}, "eval": {"every": 1}}, "space": dict(muts),
          "search": {"algorithm": "random", "metric": "val_rankme"}, "num_samples": 4,
          "scheduler": {"type": "pb2", "perturbation_interval": 1, "mutations": muts}}
    sp = load_space(space_file(tmp_path, **ok))
    assert sp.scheduler.type == "pb2" and sp.scheduler.mode == "max"
    log = {**ok["scheduler"], "mutations": {**muts, "optim.lr_scale": {"loguniform": [0.5, 2.0]}}}
    e = err(tmp_path, **{**ok, "scheduler": log})
    assert e.startswith("scheduler.mutations.optim.lr_scale: expected {uniform: [lo, hi]}") and "linear" in e
    bad = {**ok, "space": {**ok["space"], "model.variant": {"choice": ["micro/4", "nano/4"]}}}
    assert err(tmp_path, **bad).startswith("space.model.variant: pb2 copies one trial's weights into another")
    assert "search.algorithm: pb2 evolves a population" in err(tmp_path, **{**ok, "search": {
        "algorithm": "optuna", "metric": "val_rankme"}})


def test_a_multi_objective_search_names_two_or_more_metrics_each_with_a_direction(tmp_path):
    pytest.importorskip("optuna")
    choice = {"objective.lam": {"uniform": [0.0, 1.0]}}
    ok = load_space(space_file(tmp_path, space=choice, search={"algorithm": "nsga2",
                                                                "objectives": ["val_linear_top1", "train_flops"]}))
    assert ok.search.metric == "val_linear_top1"  # the best trial's and a resume's metric: the first objective
    assert plan_values(ok) is None  # proposed as results arrive
    msg = err(tmp_path, space=choice, search={"algorithm": "nsga2", "objectives": ["val_linear_top1"]})
    assert msg.startswith("search.objectives: nsga2 optimises two or more")
    msg = err(tmp_path, space=choice, search={"algorithm": "nsga2", "objectives": ["linear_top1", "train_flops"]})
    assert msg.startswith("search.objectives: linear_top1 is read on the evaluation split")
    msg = err(tmp_path, base={"optim": {"steps": 4}, "data": {"dataset": "digits"}}, space=choice,
              search={"algorithm": "nsga2", "objectives": ["val_linear_top1", "val_dense_miou", "train_flops"]})
    assert msg.startswith("search.objectives: val_dense_miou needs the synthetic set's masks")
    msg = err(tmp_path, space=choice, search={"algorithm": "nsga2", "objectives": ["val_linear_top1", "flops"]})
    assert msg.startswith("search.objectives: 'flops' is not a metric trials report")
    msg = err(tmp_path, space=choice, search={"algorithm": "nsga2",
                                              "objectives": ["val_linear_top1", "layer/6/attn_distance"]})
    assert msg.startswith("search.objectives: layer/6/attn_distance has no better direction")
    msg = err(tmp_path, space=choice, search={"algorithm": "optuna", "objectives": ["val_linear_top1", "params"]})
    assert msg.startswith("search.objectives: a multi-objective search is search.algorithm: nsga2")
    assert err(tmp_path, search={"algorithm": "nsga2", "objectives": ["val_linear_top1", "train_flops"]}).startswith(
        "search.algorithm: nsga2 cannot search a grid")
    assert err(tmp_path, search={"algorithm": "grid", "warm_start": ["earlier"]}).startswith(
        "search.warm_start: only a search that learns from results")
    assert err(tmp_path, space=choice, search={"algorithm": "optuna", "warm_start": "earlier"}).startswith(
        "search.warm_start: expected list, got 'earlier'")
