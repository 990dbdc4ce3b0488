"""Issue 10: defects found by using the product as a new user would (one test per defect, no Ray needed)."""

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny

from orchestrator.cli import main
from orchestrator.results import write_trial_tables
from trainables.config import load_config, to_dict


def cfg(lam=0.5, seed=0):
    return to_dict(load_config({}, [f"objective.lam={lam}", f"run.seed={seed}"]))


def reports(final=0.5):
    untrained = {"step": 0, "linear_top1": 0.125, "layer/6/attn_distance": 16.5, "layer/6/attn_nmi": 0.0,
                 "layer/6/linear_top1_gap": 0.125, "layer/0/linear_top1_gap": 0.125}
    return [untrained] + [{"step": s, "loss": 2.0 - s / 10, "total_steps": 3} for s in (1, 2, 3)] + [
        {"step": 3, "loss": 1.7, "linear_top1": final, "knn_top1": final / 2, "layer/6/attn_distance": 9.0,
         "layer/6/attn_nmi": 0.2, "layer/6/linear_top1_gap": final, "layer/0/linear_top1_gap": 0.2}]


def make_sweep(root: Path, name: str, n: int = 2) -> Path:
    sweep = root / name
    sweep.mkdir(parents=True)
    (sweep / "sweep.json").write_text(json.dumps({"name": name, "created": "2026-11-29T10:00:00", "n_trials": n}))
    for i in range(n):
        write_trial_tables(sweep, f"t{i}", "TERMINATED", cfg(lam=float(i % 2), seed=i // 2), reports(0.3 + i / 10))
    return sweep


# ---------------------------------------------------------------------------------------- 1. Ctrl-C
def test_summary_of_an_interrupted_sweep_comes_from_the_tables_and_the_plan(tmp_path):
    """The old summary read ``r.config`` of every Tune result and crashed on trials that never started; a planned
    trial that never started is PENDING with its values, read from the sweep's plan (never Tune's state)."""
    from orchestrator import sweep as sweep_mod
    from orchestrator.layout import SweepLayout
    from orchestrator.records import Plan, write_plan
    from orchestrator.space import space_from_dict

    make_sweep(tmp_path, "s", n=1)
    space = space_from_dict({"space": {"objective.lam": {"grid": [0.0, 1.0]}}}, tmp_path / "s.yaml")
    write_plan(SweepLayout(tmp_path, "s"), Plan("t", {"t0": {"objective.lam": 0.0}, "t1": {"objective.lam": 1.0}}))
    summary = sweep_mod.summarize(SweepLayout(tmp_path, "s"), space)
    by = {r["trial"]: r for r in summary["rows"]}
    assert by["t0"]["status"] == "TERMINATED" and by["t0"]["linear_top1"] == 0.3
    assert by["t1"]["status"] == "PENDING" and by["t1"]["objective.lam"] == 1.0 and summary["interrupted"]


def test_restarted_trial_resumes_from_its_newest_complete_checkpoint(tmp_path):
    """A (re)started trial continues from the newest checkpoint in its storage folder, whatever Tune's saved state
    says (it can lag: on Ctrl-C, or when the driver dies); a torn newer one (a process killed mid-copy) is skipped."""
    import shutil

    from orchestrator.layout import SweepLayout
    from orchestrator.stored_checkpoints import resume_point
    from trainables.trainer import train

    run = tmp_path / "scratch" / "run"
    train(load_config(tiny(), [f"run.out_dir={run}", "optim.steps=4", "run.ckpt_every=2", "eval.probe_images=8"]))
    layout = SweepLayout(tmp_path, "s")
    trial = Path(layout.trial_path("t1"))
    for i, step in enumerate(sorted((run / "checkpoints").glob("step_*"))):  # what Tune copied into the storage
        shutil.copytree(step, trial / f"checkpoint_00000{i}")
    (trial / "checkpoint_000002").mkdir()
    (trial / "checkpoint_000002" / "checkpoint.pt").write_bytes(b"torn")

    got = resume_point(layout, "t1", tmp_path / "local")
    assert got == str(tmp_path / "local" / "checkpoint_000001" / "checkpoint.pt")
    assert torch.load(got, weights_only=True)["step"] == 4
    assert resume_point(layout, "fresh", tmp_path / "local2") is None


# ---------------------------------------------------------------------------------------- 2. report --out
def test_report_out_attaches_only_its_own_files(tmp_path):
    from mlflow.tracking import MlflowClient

    make_sweep(tmp_path, "rep", n=2)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("clmim/rep", artifact_location=(tmp_path / "art").as_uri())
    parent = client.create_run(exp, tags={"clmim.role": "sweep"}).info.run_id
    out = tmp_path / "elsewhere"
    out.mkdir()
    (out / "unrelated.bin").write_bytes(os.urandom(4096))  # someone else's files beside the report
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(out / "a.sock"))  # copying a socket crashed the old attach
    try:
        assert main(["report", "rep", "--results", str(tmp_path), "--out", str(out / "report.html"),
                     "--mlflow-uri", uri]) == 0
    finally:
        sock.close()
    names = {Path(f.path).name for f in client.list_artifacts(parent, "report")}
    assert "report.html" in names and "unrelated.bin" not in names and "a.sock" not in names
    assert names == {"report.html"} | {p.name for p in out.glob("*.png")}


def test_report_has_units_chance_line_loss_curves_and_a_summary(tmp_path):
    from orchestrator.layout import SweepLayout
    from orchestrator.report import build_report

    make_sweep(tmp_path, "rep", n=4)
    page, _ = build_report(SweepLayout(tmp_path, "rep"))
    text = page.read_text()
    assert "What differed between objectives" in text and "Chance level is 0.125" in text  # 8 synthetic classes
    assert "SimMIM, 2 trial(s): linear top-1 0.4 ± 0.1" in text  # mean ± SE of 0.3 and 0.5
    assert "fewer than 3 trials" in text
    assert ("untrained encoder (step 0, same seeds) gives linear top-1 (GAP) 0.125, last-layer attention distance "
            "16.5") in text
    assert "dashed: untrained encoder" in text
    # the fair-comparison sections: the paper's claims (pure MIM vs pure CL, with the untrained encoder) and the
    # linear probe at matched steps (FLOPs are unknown here: these fake trials report no cost)
    assert "<h2>Paper claims</h2>" in text and "last-layer linear probe (GAP): CL &gt; MIM" in text
    assert "<h2>Matched budgets</h2>" in text and "± 1 SE over seeds" in text
    assert (page.parent / "loss.png").is_file() and (page.parent / "layers.png").is_file()


# ---------------------------------------------------------------------------------------- 3. analyze
def test_analyze_is_deterministic_and_equals_what_the_trial_recorded(tmp_path, capsys):
    from trainables.trainer import train

    out = tmp_path / "run"
    # big enough that a probe fit from a random start (the old defect) gave different numbers each time
    final = train(load_config(tiny(), [f"run.out_dir={out}", "optim.steps=8", "eval.probe_images=8",
                                       "data.train_size=512", "data.eval_size=256", "eval.samples=256"]))
    got = []
    for _ in range(3):
        capsys.readouterr()
        assert main(["analyze", str(out)]) == 0
        last = capsys.readouterr().out.strip().splitlines()[-1]
        got.append(dict(kv.split("=") for kv in last.split()))
    assert got[0] == got[1] == got[2]
    for k in ("linear_top1", "knn_top1", "shape_bias"):
        assert float(got[0][k]) == pytest.approx(final[k], abs=1e-4), k


# ---------------------------------------------------------------------------------------- 4. names
def test_results_list_and_not_found_names_the_closest_sweeps(tmp_path, capsys):
    make_sweep(tmp_path, "quickstart-20261129-101010", n=2)
    time.sleep(0.01)
    make_sweep(tmp_path, "lambda", n=1)
    assert main(["results", "list", "--results", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "quickstart-20261129-101010" in out and "lambda" in out and "storage_mb" in out
    assert main(["results", "show", "quickstart", "--results", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "closest: quickstart-20261129-101010" in err
    assert main(["results", "show", "latest", "--results", str(tmp_path)]) == 0  # the newest: lambda
    assert "lambda" in capsys.readouterr().out


def test_latest_is_the_newest_sweep_with_results_and_a_running_or_interrupted_one_says_so(tmp_path, capsys):
    """A second sweep started after the demo has no rows yet: ``latest`` still names the demo (with a note saying
    so), ``results list`` shows each sweep's state, and asking for the running sweep says it runs, not "rebuild"."""
    import os
    import socket

    from orchestrator.layout import SweepLayout
    from orchestrator.records import Plan, write_plan

    make_sweep(tmp_path, "demo", n=2)
    write_plan(SweepLayout(tmp_path, "demo"), Plan("t", {"t0": {}, "t1": {}}))
    for t in ("t0", "t1"):  # both ended: the driver wrote their status
        (tmp_path / "demo" / "tune" / t).mkdir(parents=True)
        (tmp_path / "demo" / "tune" / t / "status.json").write_text('{"status": "TERMINATED"}')
    for name, alive in (("second", True), ("third", False)):
        time.sleep(0.01)
        (tmp_path / name).mkdir()
        (tmp_path / name / "sweep.json").write_text(json.dumps({"name": name, "created": "x", "n_trials": 2}))
        write_plan(SweepLayout(tmp_path, name), Plan("u", {"u0": {}, "u1": {}}))
        if alive:  # a driver holds its lease: this process, renewed now
            (tmp_path / name / "driver.json").write_text(json.dumps(
                {"token": "x", "host": socket.gethostname(), "pid": os.getpid(), "renewed": time.time()}))
    assert main(["results", "show", "latest", "--results", str(tmp_path)]) == 0
    cap = capsys.readouterr()
    assert "latest: demo, the newest sweep with finished trials" in cap.err and "third" in cap.err
    assert main(["results", "list", "--results", str(tmp_path)]) == 0
    rows = {line.split()[1]: line for line in capsys.readouterr().out.splitlines() if line.startswith("│")}
    assert "finished" in rows["demo"] and "running" in rows["second"]
    assert "interrupted (resumable)" in rows["third"]
    assert main(["results", "show", "second", "--results", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "is running (0 of 2 trials ended" in err and "rebuild" not in err
    assert main(["report", "third", "--results", str(tmp_path)]) == 2
    assert "clmim resume third" in capsys.readouterr().err


def test_a_query_without_rows_says_0_rows(tmp_path, capsys):
    make_sweep(tmp_path, "s", n=1)
    assert main(["results", "query", "SELECT trial, status FROM trials WHERE false", "--results",
                 str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == "0 rows (columns: trial, status)"


def test_readme_commands_after_make_demo_name_sweeps_that_exist():
    """After `make demo` the README's follow-up commands use `latest` (the demo's name carries a timestamp)."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    follow_up = re.findall(r"clmim (?:results show|report) (\S+)", readme.split("## Sweeps")[0])
    assert follow_up and all(name == "latest" for name in follow_up), follow_up


# ---------------------------------------------------------------------------------------- 5. chromium
def test_browser_helper_skips_outside_ci_and_fails_under_ci(monkeypatch):
    import browser

    monkeypatch.setattr(browser.shutil, "which", lambda name: None)
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="apt-get install chromium"):
        browser.require_chromium()
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="apt-get install chromium"):
        browser.require_chromium()


# ---------------------------------------------------------------------------------------- 6. console
def test_progress_line_counts_best_and_running_share():
    from orchestrator.console import progress_line, trial_progress, with_clock

    statuses = ["TERMINATED", "ERROR", "RUNNING", "PENDING"]
    fractions = [trial_progress(s, r) for s, r in zip(statuses, [{}, {}, {"step": 5, "total_steps": 10}, {}],
                                                      strict=True)]
    line = progress_line(statuses, fractions, best=("linear_top1", 0.4453, "lam=0.25"))
    assert line.startswith("trials 2/4 done (1 errored), 1 running (50% of its steps), 1 pending")
    assert "best linear_top1 0.4453 (lam=0.25)" in line
    assert with_clock(line, 100.0, 60.0).endswith("| 1m40s elapsed, ETA 1m00s")


def test_train_prints_its_plan_at_once_the_first_steps_rate_and_a_short_final_line(tmp_path):
    """`clmim train` was silent until step 10 (minutes with defaults): the plan and the step-0 evaluation are
    announced before any work, step 1 reports its rate and an ETA, then every log step."""
    cheap = ["eval.dense_images=0", "eval.cka=false", "eval.noise.bands=0", "eval.probe_images=8"]
    sets = [a for kv in ["optim.steps=4", "run.log_every=2", "data.train_size=128", "eval.samples=32",
                         "data.eval_size=32", "data.batch_size=32", *cheap] for a in ("--set", kv)]
    r = subprocess.run([sys.executable, "-m", "orchestrator.cli", "train", *sets, "--out", str(tmp_path / "o")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.strip().splitlines()
    assert lines[1].startswith("plan: 4 steps, batch 32; loss every 2 steps; probes at step 0 (untrained) and the end")
    assert lines[2].startswith("building the data and model, then probing the untrained encoder (step 0)")
    assert lines[3].startswith("step 0 probed in ")
    assert re.match(r"step 1/4 \(25%, ETA (\d+m)?\d+s\)  loss=", lines[4]), lines
    assert re.match(r"step 2/4 \(50%, ETA (\d+m)?\d+s\)", lines[5]), lines
    assert max(len(ln) for ln in lines) < 300 and lines[-2].startswith("final: ")


# ---------------------------------------------------------------------------------------- 7. errors
def test_train_config_error_is_fast_and_imports_no_torch():
    code = ("import sys; from orchestrator.cli import main; rc = main(['train', '--set', 'objective.lam=2']); "
            "print('torch' in sys.modules); sys.exit(rc)")
    t = time.time()
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stdout.strip() == "False" and "objective.lam" in r.stderr
    assert time.time() - t < 10


def test_yaml_errors_give_line_numbers(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nspace:\n  objective.lam: {grid: [0, 1]\nbase: {}\n")
    assert main(["sweep", str(bad), "--dry-run"]) == 2
    assert re.search(r"line \d+, column \d+", capsys.readouterr().err)
    assert main(["train", str(bad)]) == 2
    assert re.search(r"line \d+, column \d+", capsys.readouterr().err)


def test_set_typo_is_reported_as_the_key_the_user_typed(capsys):
    assert main(["sweep", "search_spaces/quickstart.yaml", "--set", "objective.lamm=0.3", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "error: --set objective.lamm:" in err and "space.objective.lam:" not in err


@pytest.mark.parametrize("argv", [["results", "show", "nope"], ["report", "nope"], ["results", "rebuild", "nope"],
                                  ["resume", "nope"], ["scaling", "nope"]])
def test_sweep_not_found_is_one_error_type_everywhere(tmp_path, capsys, argv):
    from orchestrator.layout import find_sweep
    from trainables.errors import UserError

    make_sweep(tmp_path, "there", n=1)
    with pytest.raises(UserError):
        find_sweep("nope", tmp_path)
    assert main([*argv, "--results", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "sweep 'nope' not found" in err


def test_only_user_errors_are_usage_errors(monkeypatch):
    """A FileNotFoundError from inside the code is a bug to show, not a usage error (exit 2) to hide."""
    import orchestrator.cli as cli

    def boom(args):
        raise FileNotFoundError("internal")

    monkeypatch.setattr(cli, "cmd_results_list", boom)
    with pytest.raises(FileNotFoundError):
        cli.main(["results", "list"])


# ---------------------------------------------------------------------------------------- 8. MLflow names
def test_trial_labels_are_readable(tmp_path):
    from orchestrator.space import space_from_dict
    from orchestrator.tracking import trial_label

    space = space_from_dict({"base": {"run": {"seed": 2}}, "space": {"objective.lam": {"grid": [0.25]},
                                                                    "optim.blr": {"grid": [1e-3]}}},
                            tmp_path / "s.yaml")
    assert trial_label(space, {"objective.lam": 0.25, "optim.blr": 1e-3}) == "lam=0.25 micro/4 seed=2 blr=0.001"



def test_results_show_gives_mean_and_se_per_group_matched_budgets_and_claims(tmp_path, capsys):
    make_sweep(tmp_path, "cmp", n=4)  # lam 0 and 1, two seeds each
    assert main(["results", "show", "cmp", "--results", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "per group: mean ±" in out and "SimMIM" in out and "MoCo v3" in out
    assert "0.4 ± 0.1" in out  # MIM's linear probe: mean ± SE of 0.3 and 0.5
    assert "linear probe at matched steps" in out
    assert "paper's" in out and "late-layer" in out  # rich wraps cells at the terminal's width
