"""Integration tests on a real Ray head (started once per session by the `ray_address` fixture)."""

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

from orchestrator.results import query
from orchestrator.space import SpaceError, load_space
from orchestrator.sweep import run_sweep

pytestmark = pytest.mark.ray

SMALL = ["optim.steps=8", "data.train_size=256", "data.eval_size=64", "data.batch_size=32", "eval.samples=64",
         "run.log_every=4", "run.ckpt_every=4"]


def write_space(tmp_path, name="s", **over):
    raw = {"name": name,
           "base": {"data": {"train_size": 256, "eval_size": 64, "batch_size": 32},
                    "eval": {"samples": 64, "probe_images": 8, "dense_images": 0, "cka": False, "noise": {"bands": 0}},
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
    check_report(tmp_path)


def check_report(root):
    """The quickstart report renders in headless Chromium: not blank, every figure decoded, attached to MLflow."""
    import re

    import numpy as np
    from browser import render
    from PIL import Image

    from orchestrator.cli import main

    assert main(["report", "quickstart", "--results", str(root)]) == 0
    page = root / "quickstart" / "report" / "report.html"
    assert {"layers.png", "lam.png"} <= {p.name for p in page.parent.glob("*.png")}
    assert "http" not in re.sub(r"https?://(www\.)?w3\.org", "", page.read_text()).replace("data:image", "")
    shot, dom = render(page, root)
    m = re.search(r'data-figures="(\d+)/(\d+)"', dom)
    assert m and m.group(1) == m.group(2) and int(m.group(2)) >= 2, dom[-500:]
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=float)
    assert pixels.std() > 10 and (pixels < 128).mean() > 0.005  # text and plots, not a blank page

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

        wait_http(f"{uri}/health", 120, "the MLflow server")
        p = write_space(tmp_path, "mlf")
        summary = run_sweep(load_space(p), results=str(tmp_path), address=ray_address, mlflow_uri=uri)
        assert all(r["status"] == "TERMINATED" for r in summary["rows"])
        check_mlflow(uri, "mlf", 2)
        assert not (tmp_path / "mlflow.db").exists()  # nothing went to the default store
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def test_two_worker_ddp_trial_keeps_replicas_identical(ray_address, tmp_path):
    p = write_space(tmp_path, "ddp", space={"objective.lam": 0.5},
                    resources={"workers": 2, "cpus_per_worker": 0.5, "mode": "train"})
    summary = run_sweep(load_space(p), results=str(tmp_path), address=ray_address)
    assert [r["status"] for r in summary["rows"]] == ["TERMINATED"]
    final = [m for m in results_lines(trial_dirs(tmp_path / "ddp")[0]) if "resumed_from" in m]
    assert final and final[-1]["world_size"] == 2 and final[-1]["replicas_in_sync"] is True


def test_unschedulable_space_fails_fast(ray_address, tmp_path):
    p = write_space(tmp_path, "big", resources={"workers": 2, "cpus_per_worker": 1, "mode": "train"})
    t = time.time()
    with pytest.raises(SpaceError, match=r"needs 2.01 CPU"):
        run_sweep(load_space(p), results=str(tmp_path), address=ray_address)
    assert time.time() - t < 20
    assert not (tmp_path / "big" / "tune").exists()


def test_erroring_trial_is_recorded_and_sweep_goes_on(ray_address, tmp_path):
    # an existing but empty image folder passes validation and fails inside the trial
    empty = tmp_path / "empty"
    empty.mkdir()
    p = write_space(tmp_path, "err", space={"data.dataset": {"grid": ["synthetic", "imagefolder"]},
                                           "data.path": str(empty), "objective.lam": 0.0})
    summary = run_sweep(load_space(p), results=str(tmp_path), address=ray_address)
    by = {r["data.dataset"]: r for r in summary["rows"]}
    assert by["synthetic"]["status"] == "TERMINATED"
    assert by["imagefolder"]["status"] == "ERROR" and "not an image folder" in by["imagefolder"]["error"]


def test_erroring_multi_worker_trial_reports_the_workers_error(ray_address, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    p = write_space(tmp_path, "err2", space={"data.dataset": "imagefolder", "data.path": str(empty),
                                            "objective.lam": 0.0},
                    resources={"workers": 2, "cpus_per_worker": 0.5, "mode": "train"})
    summary = run_sweep(load_space(p), results=str(tmp_path), address=ray_address)
    [row] = summary["rows"]
    assert row["status"] == "ERROR" and "not an image folder" in row["error"], row["error"]
    recorded = json.loads(next((tmp_path / "err2" / "tune").glob("*/error.json")).read_text())
    assert recorded["type"] == "ConfigError" and "not an image folder" in recorded["message"]


@pytest.mark.parametrize("resources", [{"workers": 1, "cpus_per_worker": 1},
                                       {"workers": 2, "cpus_per_worker": 0.5, "mode": "train"}],
                         ids=["in-process", "ray-train-2-workers"])
def test_killed_trial_process_is_retried_from_checkpoint(ray_address, tmp_path, resources):
    # Multi-worker: SIGKILL of rank 0's process is a lost worker; Tune reruns the trial and its new TorchTrainer
    # resumes from the Ray Train checkpoint in the sweep's storage.
    p = write_space(tmp_path, "kill", space={"objective.lam": 1.0, "optim.steps": 40, "run.ckpt_every": 5,
                                            "run.log_every": 5}, resources=resources)
    proc = clmim("sweep", str(p), "--results", str(tmp_path), "--address", ray_address)
    sweep_dir = tmp_path / "kill"

    def checkpointed():
        dirs = trial_dirs(sweep_dir)
        if not (dirs and (dirs[0] / "pid").is_file()):
            return None
        if resources["workers"] > 1:  # Ray Train has registered a checkpoint in its storage
            train_dir = sweep_dir / "train" / dirs[0].name
            registered = (train_dir / "checkpoint_manager_snapshot.json").is_file() and any(
                train_dir.glob("checkpoint_*/checkpoint.pt"))
        else:  # the trial has copied a checkpoint into its storage folder
            registered = any(dirs[0].glob("checkpoint_*/checkpoint.pt"))
        return registered and dirs[0]

    trial = wait_for(checkpointed, 120, "a first checkpoint")
    os.kill(int((trial / "pid").read_text()), signal.SIGKILL)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    final = [m for m in results_lines(trial) if "resumed_from" in m]
    assert len(final) == 1 and final[0]["step"] == 40 and final[0]["resumed_from"] >= 5, final


def test_interrupted_sweep_resumes_each_trial_exactly_once(ray_address, tmp_path):
    p = write_space(tmp_path, "intr", space={"objective.lam": {"grid": [0.0, 0.5, 1.0]}, "optim.steps": 40},
                    max_concurrent=1)
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "sweep", str(p), "--results", str(tmp_path),
                             "--address", ray_address], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sweep_dir = tmp_path / "intr"

    def finished(d):
        return any("resumed_from" in m for m in results_lines(d))

    def one_finished_one_checkpointed():  # Ctrl-C while a trial has a checkpoint and is still training
        dirs = trial_dirs(sweep_dir)
        done = [d for d in dirs if finished(d)]
        mid = [d for d in dirs if not finished(d) and any(d.glob("checkpoint_*/checkpoint.pt"))]
        return done and mid and (done, mid[0])

    done_before, interrupted = wait_for(one_finished_one_checkpointed, 240, "a finished and a checkpointed trial")
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, (out + err)[-3000:]
    hint = [line for line in err.splitlines() if "clmim resume" in line]
    assert len(hint) == 1 and hint[0].endswith(f"clmim resume intr --results {tmp_path}"), err[-2000:]
    # no traceback from the driver (the old summary crashed); trial processes that Ray stops may print their own
    # shutdown noise, forwarded with a "(run_trial pid=...)" prefix
    assert "Tuner.restore" not in out + err, err[-3000:]
    assert not any(line.startswith("Traceback") for line in err.splitlines()), err[-3000:]
    lines_before = {d.name: len(results_lines(d)) for d in done_before}
    r = subprocess.run([sys.executable, "-m", "orchestrator.cli", "resume", "intr", "--results", str(tmp_path),
                        "--address", ray_address], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    dirs = trial_dirs(sweep_dir)
    assert len(dirs) == 3
    for d in dirs:
        finals = [m for m in results_lines(d) if "resumed_from" in m]
        assert len(finals) == 1, (d.name, finals)
    for name, n in lines_before.items():  # finished trials were not run again
        assert len(results_lines(sweep_dir / "tune" / name)) == n
    final = [m for m in results_lines(interrupted) if "resumed_from" in m][-1]
    assert final["resumed_from"] >= 4, final  # continued from its checkpoint, not from step 0
    assert "3 terminated" in r.stdout
    # every view has each trial exactly once (and no step twice)
    assert len(query("SELECT * FROM trials WHERE sweep = 'intr'", tmp_path)) == 3
    dup = query("SELECT trial, step, metric, count(*) AS n FROM curves GROUP BY ALL HAVING n > 1", tmp_path)
    assert len(dup) == 0
    dup = query("SELECT trial, step, layer, head, metric, count(*) AS n FROM layers GROUP BY ALL HAVING n > 1",
                tmp_path)
    assert len(dup) == 0
    assert query("SELECT count(DISTINCT trial) AS n FROM curves", tmp_path).n[0] == 3
    check_mlflow(f"sqlite:///{tmp_path / 'mlflow.db'}", "intr", 3)


def test_lost_worker_vs_training_error_classification():
    # No cluster needed: the exceptions Ray Train 2.60 raises from trainer.fit(), built by hand.
    from ray.exceptions import ActorDiedError
    from ray.train import WorkerGroupError

    from orchestrator.ray_private import lost_worker_errors
    from orchestrator.trial import describe_error as _describe_error
    from orchestrator.trial import is_lost_worker as _is_lost_worker
    from trainables.trainer import NonFiniteLossError

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


def test_exhausted_retries_end_as_error_everywhere(ray_address, tmp_path):
    """A lost trial process with no retries left is ERROR in the summary, the tables and MLflow; the exit code
    says so; a resume does not run it again."""
    p = write_space(tmp_path, "lost", space={"objective.lam": 1.0, "optim.steps": 60, "run.ckpt_every": 5,
                                            "run.log_every": 5}, failure={"max_failures": 0})
    proc = clmim("sweep", str(p), "--results", str(tmp_path), "--address", ray_address)
    sweep_dir = tmp_path / "lost"
    trial = wait_for(lambda: next((d for d in trial_dirs(sweep_dir) if (d / "pid").is_file()
                                   and results_lines(d)), None), 120, "a running trial")
    os.kill(int((trial / "pid").read_text()), signal.SIGKILL)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 1, out[-3000:]
    assert "was interrupted" not in out and "stopped before every trial ended" not in out
    row = query("SELECT status, error FROM trials WHERE sweep = 'lost'", tmp_path).iloc[0]
    assert row.status == "ERROR" and "retries exhausted" in row.error
    n = len(results_lines(trial))
    r = subprocess.run([sys.executable, "-m", "orchestrator.cli", "resume", "lost", "--results", str(tmp_path),
                        "--address", ray_address], capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-2000:]
    assert len(results_lines(trial)) == n  # not run past its retry limit
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("clmim/lost")
    [child] = client.search_runs([exp.experiment_id], filter_string="tags.`clmim.role` = 'trial'")
    assert child.info.status == "FAILED" and "retries exhausted" in child.data.tags["clmim.error"]


def test_retry_errored_really_runs_the_trial_again(ray_address, tmp_path):
    import numpy as np
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    p = write_space(tmp_path, "retry", space={"data.dataset": "imagefolder", "data.path": str(folder),
                                             "objective.lam": 0.0, "data.workers": 0})
    summary = run_sweep(load_space(p), results=str(tmp_path), address=ray_address)
    assert summary["rows"][0]["status"] == "ERROR"
    rng = np.random.default_rng(0)  # fix the cause: a real image folder
    for c in ("a", "b"):
        (folder / c).mkdir()
        for i in range(80):
            Image.fromarray(rng.integers(0, 255, (36, 36, 3), dtype=np.uint8)).save(folder / c / f"{i}.png")
    from orchestrator.sweep import resume_sweep

    summary = resume_sweep("retry", results=str(tmp_path), address=ray_address, retry_errored=True)
    [row] = summary["rows"]
    assert row["status"] == "TERMINATED" and row["step"] == 8, row
    assert next((tmp_path / "retry" / "tune").glob("*/error.prev.json")).is_file()


def test_no_address_starts_a_private_instance_beside_a_running_cluster(ray_address):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    code = ("from orchestrator.sweep import init_ray; init_ray(None); import ray; "
            "print('GCS', ray.get_runtime_context().gcs_address); ray.shutdown()")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    gcs = r.stdout.split("GCS ")[1].split()[0]
    assert gcs != ray_address and gcs.startswith("127.0.0.1:"), r.stdout
    assert "private local instance" in r.stdout


def test_a_killed_driver_loses_no_step_and_resume_runs_no_code_from_tunes_files(ray_address, tmp_path):
    """SIGKILL of the driver mid-trial, pickles planted in Tune's files, then `clmim resume`: nothing planted runs,
    and the interrupted trial has every step in the tables and in MLflow, as the trial that was not interrupted."""
    from test_records import plant_tune_pickles

    p = write_space(tmp_path, "k9", space={"objective.lam": {"grid": [0.0, 1.0]}, "optim.steps": 20,
                                          "run.ckpt_every": 5, "run.log_every": 5}, max_concurrent=1)
    proc = clmim("sweep", str(p), "--results", str(tmp_path), "--address", ray_address)
    sweep_dir = tmp_path / "k9"
    first = wait_for(lambda: next((d for d in trial_dirs(sweep_dir) if (d / "checkpoint_0000010").is_dir()
                                   and not (d / "run" / "final_metrics.json").exists()), None), 240,
                     "a trial checkpointed at step 10")
    proc.kill()
    proc.communicate(timeout=60)
    marker = tmp_path / "pwned"
    plant_tune_pickles(sweep_dir / "tune", marker)
    for d in trial_dirs(sweep_dir):
        (d / "params.pkl").write_bytes((sweep_dir / "tune" / "tuner.pkl").read_bytes())
    r = subprocess.run([sys.executable, "-m", "orchestrator.cli", "resume", "k9", "--results", str(tmp_path),
                        "--address", ray_address], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert not marker.exists()
    final = json.loads((first / "run" / "final_metrics.json").read_text())
    assert final["resumed_from"] >= 10  # continued from its checkpoint
    steps = query("SELECT trial, list(DISTINCT step ORDER BY step) AS s FROM curves WHERE metric = 'loss' "
                  "GROUP BY trial", tmp_path)
    layers = query("SELECT trial, list(DISTINCT step ORDER BY step) AS s FROM layers GROUP BY trial", tmp_path)
    assert len(steps) == 2 and all(list(s) == [5, 10, 15, 20] for s in steps.s), steps
    assert len(layers) == 2 and all(list(s) == [0, 20] for s in layers.s), layers  # the untrained baseline too
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("clmim/k9")
    children = client.search_runs([exp.experiment_id], filter_string="tags.`clmim.role` = 'trial'")
    assert len(children) == 2
    for run in children:
        assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "loss")) == [5, 10, 15, 20]
        assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "layer/6/attn_nmi")) == [0, 20]


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
