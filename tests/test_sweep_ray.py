"""Integration tests on a real Ray head (started once per session by the `ray_address` fixture). The longest (kills,
resumes, Ray Train, a tracking server) are marked slow: `make test-slow` runs them, and CI runs both tiers."""

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import wait_for, wait_http

from orchestrator.layout import SweepLayout
from orchestrator.query import query, sweep_frames
from orchestrator.records import lineage_path, read_lineage
from orchestrator.schedules import ancestral_schedules
from orchestrator.space import SpaceError, load_space
from orchestrator.summary import sections
from orchestrator.sweep import run_sweep
from trainables.checkpoints import export_weights, find_checkpoint, load_weights
from trainables.config import load_config
from trainables.trainer import train

pytestmark = pytest.mark.ray

# (the evaluations these sweeps do not test off, as conftest's CHEAP_EVAL: the attentive probe's 300 steps alone
# were a large share of the quickstart test)
SMALL = ["optim.steps=8", "data.train_size=256", "data.eval_size=64", "data.batch_size=32", "eval.samples=64",
         "run.log_every=4", "run.ckpt_every=4", "eval.attentive_steps=0", "eval.lowshot=false",
         "eval.grad_cosine=false", "eval.noise.bands=0"]  # (the noise bands: test_cli's quickstart run has them)


def write_space(tmp_path, name="s", **over):
    raw = {"name": name,
           "base": {"data": {"train_size": 256, "eval_size": 64, "batch_size": 32},
                    "eval": {"samples": 64, "probe_images": 8, "dense_images": 0, "cka": False, "noise": {"bands": 0},
                             "attentive_steps": 0, "lowshot": False, "grad_cosine": False},
                    "optim": {"steps": 8}, "run": {"log_every": 4, "ckpt_every": 4}},
           "space": {"objective.lam": {"grid": [0.0, 1.0]}},
           "resources": {"workers": 1, "cpus_per_worker": 1}}
    raw.update(over)
    p = tmp_path / f"{name}.yaml"
    p.write_text(yaml.safe_dump(raw))
    return p


def results_lines(trial_dir: Path) -> list[dict]:
    f = trial_dir / "result.json"
    return [json.loads(line) for line in f.read_text().splitlines() if line.strip()] if f.is_file() else []


def trial_dirs(sweep_dir: Path) -> list[Path]:
    tune_dir = sweep_dir / "tune"
    return sorted(p for p in tune_dir.iterdir() if p.is_dir()) if tune_dir.is_dir() else []


def clmim(*args, **kw):
    return subprocess.Popen([sys.executable, "-m", "orchestrator.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kw)


def test_quickstart_sweep_completes(ray_address, tmp_path, capsys):
    space = load_space("search_spaces/quickstart.yaml", SMALL)
    summary = run_sweep(space, results=str(tmp_path), address=ray_address)
    out = capsys.readouterr().out
    # the console says where results go, shows compact progress (no Tune trial table, no Ray temp dir)
    assert f"results: {tmp_path / 'quickstart'}" in out and "mlflow ui --backend-store-uri sqlite:///" in out
    assert "trials 4/4 done (0 errored), 0 running, 0 pending" in out, out[-3000:]
    assert "Result logdir" not in out and "Tuner.restore" not in out
    assert sum(line.startswith("[") and "trials " in line for line in out.splitlines()) < 40
    rows = summary["rows"]
    assert len(rows) == 4 and not summary["interrupted"]
    assert all(r["status"] == "TERMINATED" for r in rows), rows
    assert sorted(r["objective.lam"] for r in rows) == [0.0, 0.25, 0.75, 1.0]
    assert all(0 <= r["linear_top1"] <= 1 and r["step"] == 8 for r in rows)
    info = json.loads((tmp_path / "quickstart" / "sweep.json").read_text())
    assert info["space"]["space"]["objective.lam"] == {"grid": [0.0, 0.25, 0.75, 1.0]}
    # every trial (reused actors too) keeps its run files inside the sweep; each ended trial keeps one copy of
    # its weights (the encoder export), no full checkpoint (checkpoints.keep: 0) and nothing in a scratch folder
    for d in trial_dirs(tmp_path / "quickstart"):
        assert {p.name for p in (d / "run").iterdir()} == {"config.yaml", "final_metrics.json", "model.pt",
                                                           "reports.jsonl"}, d
        assert not list(d.glob("checkpoint_*")), d
        assert set(torch.load(d / "run" / "model.pt", weights_only=True)) == {"step", "config", "model"}
    assert not list((Path(tempfile.gettempdir()) / "clmim" / "quickstart").glob("*/*"))
    # Parquet views: one row per trial, curves and per-layer probe rows
    df = query("SELECT \"objective.lam\" AS lam, status, linear_top1, variant FROM trials ORDER BY lam", tmp_path)
    assert list(df.lam) == [0.0, 0.25, 0.75, 1.0] and set(df.status) == {"TERMINATED"}
    assert set(df.variant) == {"micro/4"}
    n_layers = query("SELECT count(DISTINCT layer) AS n FROM layers WHERE metric = 'attn_nmi'", tmp_path).n[0]
    assert n_layers == 6
    # every trial has its untrained baseline (step 0) and its final probes (step 8)
    steps = query("SELECT trial, list(DISTINCT step ORDER BY step) AS s FROM layers GROUP BY trial", tmp_path)
    assert len(steps) == 4 and all(list(s) == [0, 8] for s in steps.s)
    # the default MLflow store: SQLite under the results root, one parent and one child per trial
    check_mlflow(f"sqlite:///{tmp_path / 'mlflow.db'}", "quickstart", 4)
    check_printed_commands(tmp_path, summary, out, ray_address, capsys)  # (they build the report too)
    check_report(tmp_path)


REPO = Path(__file__).resolve().parents[1]


def check_printed_commands(root: Path, summary: dict, header: str, address: str, capsys) -> None:
    """Every command the sweep prints and the README's post-demo block runs verbatim from the repository root (the
    virtual environment is not on PATH after `make demo`); the MLflow UI command serves the runs it points at."""
    import re
    import shlex
    import urllib.request

    from orchestrator.cli import _finish
    from orchestrator.console import program

    if not (REPO / ".venv" / "bin" / "clmim").exists():  # (make test creates it)
        print("the printed commands are not run: no .venv in the repository")
        return
    assert _finish(summary, str(root), address) == 0
    printed = capsys.readouterr().out.split("next:\n", 1)[1]
    commands = [line.strip() for line in printed.splitlines() if line.startswith("  ")]
    readme = (REPO / "README.md").read_text()
    after_demo = readme.split("After `make demo`", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    repro = readme.split("## A CPU reproduction", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    commands += [line.split("#")[0].strip() for line in after_demo.splitlines() if line.strip()]
    commands += [line.split("#")[0].strip() for line in repro.splitlines() if "repro_claims" in line]
    assert len(commands) == 7 and all(c.startswith((program(), ".venv/bin/")) for c in commands), commands
    env = {**os.environ, "CLMIM_RESULTS": str(root)}
    procs = [(c, subprocess.Popen(c, shell=True, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True)) for c in commands]
    for c, proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0 and out.strip(), (c, err[-2000:])
    # the header's resume command finds this sweep again: its results root and the cluster
    resume = re.search(r"continue with: (.*)", header).group(1)
    assert resume == f"{program()} resume quickstart --results {root} --address {address}", resume
    # the MLflow UI command, verbatim: it serves, and the page it names lists the sweep's runs
    browse = re.search(r"browse: (.*) then open (http://\S+)", header)
    ui, page = browse.group(1), browse.group(2)
    assert ui.startswith(f"{program('mlflow')} ui ") and "--workers 1" in ui
    exp_id = re.search(r"#/experiments/(\w+)/runs$", page).group(1)
    server = subprocess.Popen(shlex.split(ui), cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        api = f"http://127.0.0.1:5000/ajax-api/2.0/mlflow/experiments/get?experiment_id={exp_id}"
        wait_http(api, 90, "mlflow ui")
        exp = json.loads(urllib.request.urlopen(api, timeout=10).read())["experiment"]
        assert exp["name"] == "clmim/quickstart"
        # MLflow 3 opens a model-training experiment on its runs, not on the GenAI overview
        assert {"key": "mlflow.experimentKind", "value": "custom_model_development"} in exp["tags"]
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def check_report(root):
    """The quickstart report (built by the printed `report` command, or here if it did not run) renders in headless
    Chromium: not blank, every figure decoded, attached to MLflow."""
    import re

    import numpy as np
    from browser import render
    from PIL import Image

    from orchestrator.cli import main

    page = root / "quickstart" / "report" / "report.html"
    if not page.is_file():
        assert main(["report", "quickstart", "--results", str(root)]) == 0
    assert {"layers.png", "lam.png"} <= {p.name for p in page.parent.glob("*.png")}
    assert "http" not in re.sub(r"https?://(www\.)?w3\.org", "", page.read_text()).replace("data:image", "")
    shot, dom = render(page, root)
    m = re.search(r'data-figures="(\d+)/(\d+)"', dom)
    assert m and m.group(1) == m.group(2) and int(m.group(2)) >= 2, dom[-500:]
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=float)
    assert pixels.std() > 10 and (pixels < 128).mean() > 0.005  # text and plots, not a blank page
    # readable at 1,400 px: each per-layer panel renders at least 400 px wide (7 panels in one row were ~190), and
    # no table widens the page (wide ones scroll inside their own box)
    panels = dict(kv.split(":") for kv in re.search(r'data-panel-px="([^"]*)"', dom).group(1).split(","))
    assert int(panels["layers"]) >= 400, panels
    assert int(re.search(r'data-page-px="(\d+)"', dom).group(1)) <= 1400

    client_uri = f"sqlite:///{root / 'mlflow.db'}"
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=client_uri)
    exp = client.get_experiment_by_name("clmim/quickstart")
    parent = client.search_runs([exp.experiment_id], filter_string="tags.`clmim.role` = 'sweep'")[0]
    names = {f.path for f in client.list_artifacts(parent.info.run_id, "report")}
    assert "report/report.html" in names


def check_mlflow(uri, sweep, n_trials):
    import mlflow

    # mlflow.set_tracking_uri also sets MLFLOW_TRACKING_URI for this process: undo it for the next tests
    before = os.environ.get("MLFLOW_TRACKING_URI")
    try:
        mlflow.set_tracking_uri(uri)
        runs = mlflow.search_runs(experiment_names=[f"clmim/{sweep}"])
    finally:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
        if before is not None:
            os.environ["MLFLOW_TRACKING_URI"] = before
    parents = runs[runs["tags.clmim.role"] == "sweep"]
    children = runs[runs["tags.clmim.role"] == "trial"]
    assert len(parents) == 1 and len(children) == n_trials
    assert (children["tags.mlflow.parentRunId"] == parents.run_id.iloc[0]).all()
    assert children["params.objective.lam"].notna().all() and children["params.model.variant"].notna().all()
    assert children["metrics.linear_top1"].between(0, 1).all()
    assert children.status.eq("FINISHED").all()
    assert "metrics.layer/6/attn_nmi" in children
    # readable child names; the parent carries the sweep's outcome
    assert children["tags.mlflow.runName"].str.fullmatch(r"lam=[\d.]+ micro/4 seed=\d+.*").all()
    parent = parents.iloc[0]
    assert parent["metrics.trials_terminated"] == n_trials and parent["metrics.trials_error"] == 0
    assert parent["tags.clmim.best_trial"] in set(children["tags.clmim.trial_id"])


@pytest.mark.slow
@pytest.mark.extended
def test_sweep_logs_to_a_real_mlflow_server(ray_address, tmp_path):

    from conftest import _free_port

    port = _free_port()
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}", "--artifacts-destination",
         str(tmp_path / "server-artifacts"), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        uri = f"http://127.0.0.1:{port}"

        wait_http(f"{uri}/health", 300, "the MLflow server")  # its start-up takes minutes on a loaded machine
        p = write_space(tmp_path, "mlf", space={"objective.lam": 0.5})
        summary = run_sweep(load_space(p), results=str(tmp_path), address=ray_address, mlflow_uri=uri)
        assert all(r["status"] == "TERMINATED" for r in summary["rows"])
        check_mlflow(uri, "mlf", 1)
        assert not (tmp_path / "mlflow.db").exists()  # nothing went to the default store
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def test_unschedulable_space_fails_fast(ray_address, tmp_path):
    p = write_space(tmp_path, "big", resources={"workers": 2, "cpus_per_worker": 1, "mode": "train"})
    t = time.time()
    with pytest.raises(SpaceError, match=r"needs 2.01 CPU"):
        run_sweep(load_space(p), results=str(tmp_path), address=ray_address)
    assert time.time() - t < 20
    assert not (tmp_path / "big" / "tune").exists()


@pytest.mark.slow
@pytest.mark.extended
def test_an_erroring_trial_is_recorded_the_sweep_goes_on_and_retry_errored_runs_it_again(ray_address, tmp_path):
    import numpy as np
    from PIL import Image

    from orchestrator.sweep import resume_sweep

    folder = tmp_path / "imgs"  # an existing but empty image folder passes validation and fails inside the trial
    folder.mkdir()
    p = write_space(tmp_path, "err", space={"data.dataset": {"grid": ["synthetic", "imagefolder"]},
                                           "data.path": str(folder), "objective.lam": 0.0, "data.workers": 0})
    summary = run_sweep(load_space(p), results=str(tmp_path), address=ray_address)
    by = {r["data.dataset"]: r for r in summary["rows"]}
    assert by["synthetic"]["status"] == "TERMINATED"
    assert by["imagefolder"]["status"] == "ERROR" and "not an image folder" in by["imagefolder"]["error"]
    done = by["synthetic"]["trial"]
    pid = (tmp_path / "err" / "tune" / done / "pid").read_text()
    rng = np.random.default_rng(0)  # fix the cause: a real image folder
    for c in ("a", "b"):
        (folder / c).mkdir()
        for i in range(80):
            Image.fromarray(rng.integers(0, 255, (36, 36, 3), dtype=np.uint8)).save(folder / c / f"{i}.png")
    summary = resume_sweep("err", results=str(tmp_path), address=ray_address, retry_errored=True)
    by = {r["data.dataset"]: r for r in summary["rows"]}
    assert by["imagefolder"]["status"] == "TERMINATED" and by["imagefolder"]["step"] == 8, by
    assert (tmp_path / "err" / "tune" / by["imagefolder"]["trial"] / "error.prev.json").is_file()
    assert (tmp_path / "err" / "tune" / done / "pid").read_text() == pid  # the finished one did not run again


@pytest.mark.slow
@pytest.mark.extended
def test_a_two_worker_trial_killed_on_rank_0_resumes_in_sync_and_a_failing_one_names_its_workers_error(
        ray_address, tmp_path):
    """Ray Train trials (DDP over two gloo ranks, a hybrid): SIGKILL of rank 0's process is a lost worker, Tune
    reruns the trial and its new TorchTrainer resumes from the Ray Train checkpoint with every replica identical;
    a trial whose workers raise ends ERROR with the lowest rank's own error, not Ray Train's wrapper."""
    empty = tmp_path / "empty"
    empty.mkdir()
    p = write_space(tmp_path, "ddp", space={"objective.lam": 0.5, "optim.steps": 20, "run.ckpt_every": 5,
                                           "run.log_every": 5, "data.path": str(empty),
                                           "data.dataset": {"grid": ["synthetic", "imagefolder"]}},
                    resources={"workers": 2, "cpus_per_worker": 0.5, "mode": "train"}, max_concurrent=1)
    proc = clmim("sweep", str(p), "--results", str(tmp_path), "--address", ray_address)
    sweep_dir = tmp_path / "ddp"

    def checkpointed():  # Ray Train has registered a checkpoint of the first (synthetic) trial in its storage
        dirs = trial_dirs(sweep_dir)
        if not (dirs and (dirs[0] / "pid").is_file()):
            return None
        train_dir = sweep_dir / "train" / dirs[0].name
        registered = (train_dir / "checkpoint_manager_snapshot.json").is_file() and any(
            train_dir.glob("checkpoint_*/checkpoint.pt"))
        return registered and dirs[0]

    trial = wait_for(checkpointed, 180, "a first checkpoint")
    os.kill(int((trial / "pid").read_text()), signal.SIGKILL)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 1, out[-3000:]  # one trial ended in ERROR
    final = json.loads((trial / "run" / "final_metrics.json").read_text())
    assert final["step"] == 20 and final["resumed_from"] >= 5, final
    assert final["world_size"] == 2 and final["replicas_in_sync"] is True
    [failed] = [d for d in trial_dirs(sweep_dir) if d != trial]
    recorded = json.loads((failed / "error.json").read_text())
    assert recorded["type"] == "ConfigError" and "not an image folder" in recorded["message"]
    row = query("SELECT status, error FROM trials WHERE trial = ?", tmp_path, [failed.name]).iloc[0]
    assert row.status == "ERROR" and "not an image folder" in row.error


@pytest.mark.slow
def test_a_killed_trial_is_retried_from_its_checkpoint_and_out_of_retries_ends_as_error_everywhere(
        ray_address, tmp_path):
    """failure.max_failures: 1. Trial A's process is killed once: retried from its checkpoint, it finishes. Trial B's
    is killed twice: ERROR in the summary, the tables and MLflow ("retries exhausted"), exit code 1, and a resume
    does not run it again."""
    p = write_space(tmp_path, "lost", space={"objective.lam": {"grid": [0.0, 1.0]}, "optim.steps": 40,
                                            "run.ckpt_every": 5, "run.log_every": 5},
                    resources={"workers": 1, "cpus_per_worker": 0.5}, failure={"max_failures": 1})
    proc = clmim("sweep", str(p), "--results", str(tmp_path), "--address", ray_address)
    sweep_dir = tmp_path / "lost"

    def running(d, not_pid=None):
        pid = (d / "pid").read_text() if (d / "pid").is_file() else None
        return pid and pid != not_pid and any(d.glob("checkpoint_*/reports.jsonl")) and int(pid)

    def both_running():
        dirs = trial_dirs(sweep_dir)
        return len(dirs) == 2 and all(running(d) for d in dirs) and dirs

    a, b = wait_for(both_running, 180, "two running trials with checkpoints")
    pid_a, pid_b = running(a), running(b)
    os.kill(pid_a, signal.SIGKILL)
    os.kill(pid_b, signal.SIGKILL)
    second = wait_for(lambda: running(b, str(pid_b)), 120, "trial B running again")
    os.kill(second, signal.SIGKILL)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 1, out[-3000:]
    assert "was interrupted" not in out and "stopped before every trial ended" not in out
    final = json.loads((a / "run" / "final_metrics.json").read_text())
    assert final["step"] == 40 and final["resumed_from"] >= 5, final  # A: continued from its checkpoint
    row = query("SELECT status, error FROM trials WHERE trial = ?", tmp_path, [b.name]).iloc[0]
    assert row.status == "ERROR" and "retries exhausted (failure.max_failures=1)" in row.error
    pid = (b / "pid").read_text()
    r = subprocess.run([sys.executable, "-m", "orchestrator.cli", "resume", "lost", "--results", str(tmp_path),
                        "--address", ray_address], capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-2000:]
    assert (b / "pid").read_text() == pid  # not run past its retry limit
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("clmim/lost")
    [child] = client.search_runs([exp.experiment_id], filter_string=f"tags.`clmim.trial_id` = '{b.name}'")
    assert child.info.status == "FAILED" and "retries exhausted" in child.data.tags["clmim.error"]


@pytest.mark.slow
def test_ctrl_c_then_a_killed_driver_resume_each_trial_once_lose_no_step_and_run_no_planted_code(ray_address,
                                                                                              tmp_path):
    """Ctrl-C while one trial has finished and one has a checkpoint: exit 130, one line naming `clmim resume`.
    The resumed driver is then SIGKILLed mid-trial and pickles are planted in Tune's files; a second resume runs
    nothing planted, each trial once (finished ones are not run again), each continuing from its checkpoint, with
    every reported step in the tables and in MLflow."""
    from test_records import plant_tune_pickles

    # (the attentive and low-shot probes stay on here: their seconds in the final evaluation keep a trial running
    # past its checkpoints while the test signals the driver)
    p = write_space(tmp_path, "intr", space={"objective.lam": {"grid": [0.0, 0.5, 1.0]}, "optim.steps": 20,
                                            "run.ckpt_every": 5, "run.log_every": 5, "eval.attentive_steps": 300,
                                            "eval.lowshot": True}, max_concurrent=1)
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "sweep", str(p), "--results", str(tmp_path),
                             "--address", ray_address], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sweep_dir = tmp_path / "intr"

    def finished(d):
        return (d / "run" / "final_metrics.json").is_file()

    def one_finished_one_checkpointed():  # Ctrl-C while a trial has a checkpoint and is still training
        dirs = trial_dirs(sweep_dir)
        done = [d for d in dirs if finished(d)]
        mid = [d for d in dirs if not finished(d) and any(d.glob("checkpoint_*/reports.jsonl"))]
        return done and mid and (done, mid[0])

    done_before, interrupted = wait_for(one_finished_one_checkpointed, 240, "a finished and a checkpointed trial")
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, (out + err)[-3000:]
    hint = [line for line in err.splitlines() if "clmim resume" in line]
    # the hint runs as printed: this cluster's address too (without it a resume would start a private Ray)
    assert len(hint) == 1 and hint[0].endswith(f"clmim resume intr --results {tmp_path} --address {ray_address}"), \
        err[-2000:]
    # no traceback from the driver; trial processes that Ray stops may print their own shutdown noise, forwarded
    # with a "(run_trial pid=...)" prefix
    assert "Tuner.restore" not in out + err, err[-3000:]
    assert not any(line.startswith("Traceback") for line in err.splitlines()), err[-3000:]
    pids = {d.name: (d / "pid").read_text() for d in done_before}
    resume = [sys.executable, "-m", "orchestrator.cli", "resume", "intr", "--results", str(tmp_path), "--address",
              ray_address]
    proc = subprocess.Popen(resume, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    last = wait_for(lambda: next((d for d in trial_dirs(sweep_dir) if not finished(d) and d != interrupted
                                  and (d / "checkpoint_0000010" / "reports.jsonl").is_file()), None), 240,
                    "the last trial checkpointed at step 10")
    proc.kill()  # the driver's machine is gone: no clean shutdown
    proc.communicate(timeout=60)
    marker = tmp_path / "pwned"
    plant_tune_pickles(sweep_dir / "tune", marker)
    for d in trial_dirs(sweep_dir):
        (d / "params.pkl").write_bytes((sweep_dir / "tune" / "tuner.pkl").read_bytes())
    r = subprocess.run(resume, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert not marker.exists()
    assert "3 terminated" in r.stdout
    dirs = trial_dirs(sweep_dir)
    assert len(dirs) == 3 and all(finished(d) for d in dirs)
    for name, pid in pids.items():  # finished trials were not run again (a new attempt writes a new pid)
        assert (sweep_dir / "tune" / name / "pid").read_text() == pid
    assert json.loads((interrupted / "run" / "final_metrics.json").read_text())["resumed_from"] >= 5
    assert json.loads((last / "run" / "final_metrics.json").read_text())["resumed_from"] >= 10
    # every view has each trial exactly once, every step of each, no step twice
    assert len(query("SELECT * FROM trials WHERE sweep = 'intr'", tmp_path)) == 3
    for table, keys in (("curves", "step, metric"), ("layers", "step, layer, head, metric")):
        dup = query(f"SELECT trial, {keys}, count(*) AS n FROM {table} GROUP BY ALL HAVING n > 1", tmp_path)
        assert len(dup) == 0, table
    steps = query("SELECT trial, list(DISTINCT step ORDER BY step) AS s FROM curves WHERE metric = 'loss' "
                  "GROUP BY trial", tmp_path)
    layers = query("SELECT trial, list(DISTINCT step ORDER BY step) AS s FROM layers GROUP BY trial", tmp_path)
    assert len(steps) == 3 and all(list(s) == [1, 5, 10, 15, 20] for s in steps.s), steps
    assert len(layers) == 3 and all(list(s) == [0, 20] for s in layers.s), layers  # the untrained baseline too
    check_mlflow(f"sqlite:///{tmp_path / 'mlflow.db'}", "intr", 3)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("clmim/intr")
    for run in client.search_runs([exp.experiment_id], filter_string="tags.`clmim.role` = 'trial'"):
        assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "loss")) == [1, 5, 10, 15, 20]
        assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "layer/6/attn_nmi")) == [0, 20]


def test_lost_worker_vs_training_error_classification():
    # No cluster needed: the exceptions Ray Train 2.60 raises from trainer.fit(), built by hand.
    from ray.exceptions import ActorDiedError
    from ray.train import WorkerGroupError

    from orchestrator.ray_private import lost_worker_errors
    from orchestrator.trial import describe_error as _describe_error
    from orchestrator.trial import is_lost_worker as _is_lost_worker
    from trainables.errors import NonFiniteLossError

    health_check_failed = lost_worker_errors()[0]
    user = NonFiniteLossError("non-finite loss by step 4\n(more)")  # Ray Train keeps the worker's own exception
    dead = health_check_failed("worker 1 died", ActorDiedError())
    assert not _is_lost_worker(WorkerGroupError("rank 0 raised", {0: user, 1: user}))
    assert _is_lost_worker(WorkerGroupError("rank 1 died", {0: user, 1: dead}))  # rank 0's error is collateral
    assert _is_lost_worker(ActorDiedError())
    assert not _is_lost_worker(ValueError("bad"))
    assert _describe_error(WorkerGroupError("rank 0 raised", {1: dead, 0: user})) == (
        "NonFiniteLossError", "non-finite loss by step 4")
    assert _describe_error(ValueError("bad\nmore")) == ("ValueError", "bad")


@pytest.mark.slow
@pytest.mark.extended
def test_no_address_starts_a_private_instance_beside_a_running_cluster(ray_address):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    code = ("from orchestrator.sweep import init_ray; init_ray(None); import ray; "
            "print('GCS', ray.get_runtime_context().gcs_address); ray.shutdown()")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    gcs = r.stdout.split("GCS ")[1].split()[0]
    assert gcs != ray_address and gcs.startswith("127.0.0.1:"), r.stdout
    assert "private local instance" in r.stdout


@pytest.mark.slow
@pytest.mark.extended
def test_address_sends_the_clusters_token_and_a_wrong_one_is_one_line(ray_address, tmp_path):
    """A `ray start` cluster keeps token auth on: --address works without RAY_AUTH_MODE in the environment (it used
    to fail with ~20 lines of InvalidAuthToken), and a wrong token is one line naming the file it came from."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_ADDRESS")}
    code = ("import sys; from orchestrator.sweep import init_ray; init_ray(sys.argv[1]); import ray; "
            "print('nodes', len(ray.nodes())); ray.shutdown()")
    r = subprocess.run([sys.executable, "-c", code, ray_address], capture_output=True, text=True, timeout=180, env=env)
    assert r.returncode == 0 and "nodes 1" in r.stdout, r.stderr[-3000:]
    wrong = tmp_path / "wrong_token"
    wrong.write_text("0" * 32)
    r = subprocess.run([sys.executable, "-m", "orchestrator.cli", "sweep", "search_spaces/quickstart.yaml",
                        "--results", str(tmp_path), "--address", ray_address], capture_output=True, text=True,
                       timeout=180, env={**env, "RAY_AUTH_TOKEN_PATH": str(wrong)})
    err = [line for line in r.stderr.splitlines() if line.startswith("clmim")]
    assert r.returncode == 2 and len(err) == 1 and str(wrong) in err[0] and "refused" in err[0], r.stderr[-3000:]


@pytest.mark.slow
def test_hyperband_pauses_trials_on_a_label_free_signal_and_resumes_them_from_their_checkpoints(ray_address,
                                                                                                 tmp_path):
    """HyperBand (max_t 4 epochs, halving by 2) on val_rankme, six trials: Tune's first bracket runs three to the
    end, its second runs three for 2 epochs, pausing the first two to get there, then resumes the better two from
    their checkpoints (a new process) and stops the third. A resumed trial has the weights of its config trained
    straight, bit for bit; every trial's reports land once; the scheduler's keys reach no table."""
    p = write_space(tmp_path, "hb", space={"objective.lam": {"grid": [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]}},
                    base={"data": {"train_size": 128, "eval_size": 64, "batch_size": 32},
                          "eval": {"samples": 64, "probe_images": 8, "dense_images": 0, "cka": False,
                                   "noise": {"bands": 0}, "every": 1, "val_samples": 32, "attentive_steps": 0,
                                   "lowshot": False, "grad_cosine": False},
                          "optim": {"steps": 16}, "run": {"log_every": 4, "ckpt_every": 4}},
                    scheduler={"type": "hyperband", "metric": "val_rankme", "max_t": 4, "reduction_factor": 2})
    summary = run_sweep(load_space(p), results=str(tmp_path), address=ray_address)
    rows = {r["trial"]: r for r in summary["rows"]}
    assert len(rows) == 6 and all(r["status"] == "TERMINATED" for r in rows.values()), rows
    assert sorted(r["step"] for r in rows.values()) == [8, 16, 16, 16, 16, 16], rows  # one stopped at the rung
    sweep_dir = tmp_path / "hb"
    finals = {d.name: json.loads((d / "run" / "final_metrics.json").read_text())
              for d in trial_dirs(sweep_dir) if (d / "run" / "final_metrics.json").is_file()}
    resumed = sorted(t for t, f in finals.items() if f["step"] == 16 and f["resumed_from"] == 8)
    assert resumed, finals  # paused at the rung, resumed from its checkpoint
    winner = resumed[0]
    cfg = load_config(str(sweep_dir / "tune" / winner / "run" / "config.yaml"))
    cfg.run.out_dir, cfg.run.threads, cfg.run.resume = str(tmp_path / "straight"), 1, None
    train(cfg)
    ours = load_weights(sweep_dir / "tune" / winner / "run" / "model.pt")["model"]
    straight = load_weights(export_weights(find_checkpoint(tmp_path / "straight"), tmp_path / "straight.pt"))["model"]
    assert ours.keys() == straight.keys() and all(torch.equal(ours[k], straight[k]) for k in ours)
    # every report once: the winner's evaluations at steps 0, 4, 8, 12, 16 (its pauses repeated none)
    evals = query("SELECT step, count(*) AS n FROM layers WHERE trial = ? AND metric = 'rankme_gap' AND layer = 0 "
                  "GROUP BY step ORDER BY step", tmp_path, [winner])
    assert list(evals.step) == [0, 4, 8, 12, 16] and set(evals.n) == {1}
    assert query("SELECT count(*) AS n FROM curves WHERE metric LIKE 'sched_%'", tmp_path).n[0] == 0
    assert query("SELECT count(*) AS n FROM curves WHERE metric = 'val_rankme'", tmp_path).n[0] > 0


@pytest.mark.slow
def test_pbt_exploits_through_the_trials_own_checkpoints_and_records_each_trials_lineage_once_over_a_driver_kill(
        ray_address, tmp_path):
    """PBT over lam and the lr scale (four trials, an exploit / explore step every epoch on val_rankme), its driver
    SIGKILLed as soon as a first exploit is recorded, then resumed: every trial runs its 16 steps; an exploiting
    trial continues from its parent's checkpoint with the mutated keys perturbed, each exploit recorded once in its
    lineage (parent, step, before and after) and once in the ``lineage`` table; the trials table shows the values
    each ended with, and the report's schedules follow each trial's weights back through its exploits."""
    p = write_space(tmp_path, "pbt", space={"objective.lam": {"uniform": [0.2, 0.8]},
                                            "optim.lr_scale": {"loguniform": [0.3, 3.0]}},
                    base={"data": {"train_size": 128, "eval_size": 64, "batch_size": 32},
                          "eval": {"samples": 64, "probe_images": 8, "dense_images": 0, "cka": False,
                                   "noise": {"bands": 0}, "every": 1, "val_samples": 32, "attentive_steps": 0,
                                   "lowshot": False, "grad_cosine": False},
                          "optim": {"steps": 16}, "run": {"log_every": 4, "ckpt_every": 4}},
                    search={"algorithm": "random", "metric": "val_rankme", "seed": 3}, num_samples=4,
                    scheduler={"type": "pbt", "perturbation_interval": 1, "quantile_fraction": 0.25,
                               "mutations": {"objective.lam": {"uniform": [0.2, 0.8]},
                                             "optim.lr_scale": {"loguniform": [0.3, 3.0]}}})
    layout = SweepLayout(tmp_path, "pbt")
    proc = clmim("sweep", str(p), "--results", str(tmp_path), "--address", ray_address)
    wait_for(lambda: any(layout.store.exists(lineage_path(layout, t)) for t in layout.trials()), 300,
             "a first exploit")
    proc.kill()  # the driver is gone mid-exploit: no clean shutdown
    proc.communicate(timeout=60)
    r = subprocess.run([sys.executable, "-m", "orchestrator.cli", "resume", "pbt", "--results", str(tmp_path),
                        "--address", ray_address], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    trials = query("SELECT trial, status, step FROM trials WHERE sweep = 'pbt'", tmp_path)
    assert len(trials) == 4 and set(trials.status) == {"TERMINATED"} and set(trials.step) == {16}, trials
    rows = set(trials.trial)
    lineage = {t: read_lineage(layout, t) for t in rows}
    exploits = [(t, row) for t, rs in lineage.items() for row in rs]
    assert exploits, "no trial exploited another"
    for t, row in exploits:
        assert row["parent"] in rows and row["parent"] != t and 0 < row["step"] < 16
        assert set(row["before"]) == set(row["after"]) == {"objective.lam", "optim.lr_scale"}
        assert len({r["exploit"] for r in lineage[t]}) == len(lineage[t])  # each exploit once
    # the table: every recorded exploit's keys once, nothing else
    table = query("SELECT trial, exploit_id, key, count(*) AS n FROM lineage GROUP BY ALL", tmp_path)
    assert set(table.n) == {1}
    assert sorted(zip(table.trial, table.exploit_id, table.key, strict=True)) == sorted(
        (t, row["exploit"], k) for t, row in exploits for k in row["after"])
    t, rs = next((t, rs) for t, rs in lineage.items() if rs)
    got = query("SELECT \"optim.lr_scale\" AS lr FROM trials WHERE trial = ?", tmp_path, [t]).lr[0]
    assert got == pytest.approx(rs[-1]["after"]["optim.lr_scale"])
    frames = sweep_frames(tmp_path, ["pbt"])
    schedules = ancestral_schedules(frames.done, frames.lineage)
    mine = schedules[(schedules.trial == t) & (schedules.key == "optim.lr_scale")]
    assert mine.value.iloc[-1] == pytest.approx(got) and mine.step.iloc[-1] == 16
    assert "lineage" in {s.key for s in sections(frames)}


TINY = {"data": {"train_size": 128, "eval_size": 64, "batch_size": 32},  # 4 steps an epoch, an evaluation each
        "eval": {"samples": 64, "probe_images": 8, "dense_images": 0, "cka": False, "noise": {"bands": 0}, "every": 1,
                 "val_samples": 32, "attentive_steps": 0, "lowshot": False, "grad_cosine": False},
        "optim": {"steps": 16}, "run": {"log_every": 4, "ckpt_every": 4}}


@pytest.mark.slow
@pytest.mark.extended
def test_pb2_exploits_through_the_trials_own_checkpoints_with_its_models_values_within_the_bounds(ray_address,
                                                                                                  tmp_path):
    """PB2 over lam and the lr scale (four trials, an exploit every epoch on val_rankme): every trial runs its 16
    steps; each exploit continues from another trial's checkpoint with both keys inside their bounds, recorded once
    in the trial's lineage and once in the ``lineage`` table; the trials table shows the values each ended with."""
    bounds = {"objective.lam": [0.2, 0.8], "optim.lr_scale": [0.3, 3.0]}
    p = write_space(tmp_path, "pb2", space={k: {"uniform": v} for k, v in bounds.items()}, base=TINY,
                    search={"algorithm": "random", "metric": "val_rankme", "seed": 3}, num_samples=4,
                    scheduler={"type": "pb2", "perturbation_interval": 1, "quantile_fraction": 0.25,
                               "mutations": {k: {"uniform": v} for k, v in bounds.items()}})
    run_sweep(load_space(p), results=str(tmp_path), address=ray_address)
    layout = SweepLayout(tmp_path, "pb2")
    trials = query("SELECT * FROM trials WHERE sweep = 'pb2'", tmp_path)
    assert len(trials) == 4 and set(trials.status) == {"TERMINATED"} and set(trials.step) == {16}, trials
    lineage = {t: read_lineage(layout, t) for t in trials.trial}
    exploits = [(t, row) for t, rs in lineage.items() for row in rs]
    assert exploits, "no trial exploited another"
    for t, row in exploits:
        assert row["parent"] in lineage and row["parent"] != t and 0 < row["step"] < 16
        assert all(lo <= row["after"][k] <= hi for k, (lo, hi) in bounds.items()), row
    table = query("SELECT trial, exploit_id, key, count(*) AS n FROM lineage GROUP BY ALL", tmp_path)
    assert set(table.n) == {1} and len(table) == 2 * len(exploits)
    for t, rs in lineage.items():
        if rs:
            row = trials[trials.trial == t].iloc[0]
            assert [row[k] for k in bounds] == pytest.approx([rs[-1]["after"][k] for k in bounds])


@pytest.mark.slow
@pytest.mark.extended
def test_bohb_pauses_the_trials_its_model_proposes_and_resumes_the_best_from_their_checkpoints(ray_address,
                                                                                                tmp_path):
    """BOHB (HyperBand's brackets, max_t 4 epochs halving by 2, with optuna's TPE proposing lam) on val_rankme, six
    trials: every trial ends; some stop at a rung and at least one is paused at a rung and resumed from its
    checkpoint in a new process to run its 16 steps; each trial's evaluations land once, its pauses repeating
    none; the values the model proposed are the ones the trials ran with."""
    pytest.importorskip("optuna")
    p = write_space(tmp_path, "bohb", space={"objective.lam": {"uniform": [0.0, 1.0]}}, base=TINY,
                    search={"algorithm": "optuna", "metric": "val_rankme", "seed": 0}, num_samples=6,
                    scheduler={"type": "bohb", "max_t": 4, "reduction_factor": 2})
    summary = run_sweep(load_space(p), results=str(tmp_path), address=ray_address)
    rows = {r["trial"]: r for r in summary["rows"]}
    assert len(rows) == 6 and all(r["status"] == "TERMINATED" for r in rows.values()), rows
    steps = sorted(r["step"] for r in rows.values())
    assert steps[0] < 16 and steps[-1] == 16, steps
    sweep_dir = tmp_path / "bohb"
    finals = {d.name: json.loads((d / "run" / "final_metrics.json").read_text())
              for d in trial_dirs(sweep_dir) if (d / "run" / "final_metrics.json").is_file()}
    assert any(f["step"] == 16 and f["resumed_from"] for f in finals.values()), finals
    evals = query("SELECT trial, step, count(*) AS n FROM layers WHERE metric = 'rankme_gap' AND layer = 0 "
                  "GROUP BY ALL", tmp_path)
    assert set(evals.n) == {1} and len(evals) == sum(s // 4 + 1 for s in steps)
    ran = query("SELECT trial, \"objective.lam\" AS lam FROM trials WHERE sweep = 'bohb'", tmp_path)
    for t, lam in zip(ran.trial, ran.lam, strict=True):
        cfg = load_config(str(sweep_dir / "tune" / t / "run" / "config.yaml"))
        assert cfg.objective.lam == pytest.approx(lam) and 0.0 <= lam <= 1.0


def _simulated_space(tmp_path, name: str, search: dict) -> Path:
    """Four simulated trials (``run.simulate``: the trainer's reports at its steps, random values, no training)
    over lam: what a search's plumbing needs, in seconds."""
    raw = {"name": name,
           "base": {"model": {"variant": "micro/4", "img_size": 32},
                    "data": {"dataset": "synthetic", "batch_size": 32, "train_size": 256, "eval_size": 64},
                    "optim": {"steps": 4}, "eval": {"samples": 64, "val_samples": 32, "dense_images": 0,
                                                    "cka": False, "noise": {"bands": 0}},
                    "run": {"log_every": 2, "ckpt_every": 2, "simulate": {"seconds_per_step": 0.05}}},
           "space": {"objective.lam": {"uniform": [0.0, 1.0]}}, "search": search, "num_samples": 4,
           "resources": {"workers": 1, "cpus_per_worker": 0.5}}
    p = tmp_path / f"{name}.yaml"
    p.write_text(yaml.safe_dump(raw))
    return p


@pytest.mark.slow
@pytest.mark.extended
def test_nsga2_warm_starts_from_an_earlier_sweep_and_the_summary_shows_its_pareto_front(ray_address, tmp_path,
                                                                                        capsys):
    """A random search's four finished trials are told to NSGA-II (validation linear probe against training FLOPs)
    before it proposes four of its own; every finished trial reports both objectives, and the summary's Pareto
    front is the trials nothing beats on both."""
    pytest.importorskip("optuna")
    run_sweep(load_space(_simulated_space(tmp_path, "first", {"algorithm": "random", "metric": "val_linear_top1"})),
              results=str(tmp_path), address=ray_address)
    objectives = ["val_linear_top1", "train_flops"]
    p = _simulated_space(tmp_path, "pareto", {"algorithm": "nsga2", "objectives": objectives, "seed": 1,
                                              "warm_start": ["first"]})
    summary = run_sweep(load_space(p), results=str(tmp_path), address=ray_address)
    assert "warm start: 4 of the 4 finished trials of first told to nsga2" in capsys.readouterr().out
    assert len(summary["rows"]) == 4 and all(r["status"] == "TERMINATED" for r in summary["rows"])
    frames = sweep_frames(tmp_path, ["pareto"])
    assert frames.objectives == {"val_linear_top1": "max", "train_flops": "min"}
    assert frames.done[objectives].notna().all().all()
    [front] = [s.table for s in sections(frames) if s.key == "pareto"]
    d = frames.done.set_index("trial")
    for t in d.index:  # on the front exactly when no trial is at least as good on both and better on one
        beaten = ((d.val_linear_top1 >= d.val_linear_top1[t]) & (d.train_flops <= d.train_flops[t])
                  & ((d.val_linear_top1 > d.val_linear_top1[t]) | (d.train_flops < d.train_flops[t]))).any()
        assert (t in set(front.trial)) != beaten, t
