"""A real multi-node cluster on this machine: a head and two worker nodes started with `ray start` on 127.0.0.1,
each worker node in its own mount namespace with a private tmpfs over /tmp (the results root, Ray's temp dirs and
every scratch folder live there), so a worker node cannot see the driver's disk, as on a real cluster. Storage is
an S3-compatible server (moto) started here on 127.0.0.1. The head has no CPUs: every trial runs on a worker node.

The tests run in file order on one cluster: (a) a sweep lands every trial once, with its true config; (c) a killed
driver, resumed from a fresh working directory; (b) last, a worker node killed mid-trial.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from conftest import _free_port, wait_for, wait_http
from raynodes import BIN, cmdline, descendants, kill_tree, start_node

from orchestrator.query import query

pytestmark = [pytest.mark.ray, pytest.mark.slow]
BUCKET = "clmim-test"
def _can_unshare() -> bool:
    r = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", "mount -t tmpfs tmpfs /mnt"],
                       capture_output=True)
    return r.returncode == 0


def alive_nodes(address: str, env: dict) -> int:
    r = subprocess.run([str(BIN / "ray"), "status", f"--address={address}"], capture_output=True, text=True,
                       env=env, timeout=60)
    active = r.stdout.split("Active:")[1].split("Pending:")[0] if "Active:" in r.stdout else ""
    return sum(" node_" in line for line in active.splitlines())


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if not _can_unshare():
        pytest.skip("needs `unshare -m` and mount (root, or a user namespace) to give worker nodes their own disk")
    moto_port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1",
               AWS_ENDPOINT_URL=f"http://127.0.0.1:{moto_port}", RAY_AUTH_MODE="token",
               RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
               # a lost node is noticed in seconds, not half a minute
               RAY_health_check_period_ms="1000", RAY_health_check_failure_threshold="3")
    procs, temp = [], tempfile.mkdtemp(prefix="cmn-", dir="/tmp")  # short: Ray's socket paths live below it
    moto = subprocess.Popen([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(moto_port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    procs.append(moto)
    try:
        wait_http(f"http://127.0.0.1:{moto_port}/", 60, "the S3 server")
        import boto3

        boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                     aws_access_key_id="testing", aws_secret_access_key="testing").create_bucket(Bucket=BUCKET)
        port = _free_port()
        head = start_node(["--head", f"--port={port}", "--num-cpus=0", f"--temp-dir={temp}",
                           "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={_free_port()}",
                           f"--ray-client-server-port={_free_port()}"], env, namespace=False)
        procs.append(head)
        address = f"127.0.0.1:{port}"
        workers = {}
        for name in ("node_a", "node_b"):
            workers[name] = start_node([f"--address={address}", "--num-cpus=1",
                                        f"--resources={json.dumps({name: 1})}"], env, namespace=True)
            procs.append(workers[name])
        wait_for(lambda: alive_nodes(address, env) == 3, 120, "three live nodes")
        listening = subprocess.run(["ss", "-ltnp"], capture_output=True, text=True).stdout.splitlines()
        ray_pids = {str(p) for proc in procs[1:] for p in descendants(proc.pid)}
        wide = [line for line in listening if any(f"pid={p}," in line for p in ray_pids)
                and not any(a in line.split()[3] for a in ("127.0.0.1", "[::1]"))]
        assert not wide, wide  # every node, like the driver, only on the loopback
        yield {"address": address, "env": env, "workers": workers, "root": tmp_path_factory.mktemp("driver")}
    finally:
        for p in reversed(procs):
            kill_tree(p)
        shutil.rmtree(temp, ignore_errors=True)


def clmim(cluster, *args, cwd=None, **kw):
    return subprocess.Popen([sys.executable, "-m", "orchestrator.cli", *args, "--address", cluster["address"]],
                            env={**cluster["env"], "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
                            cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def s3(cluster):
    from trainables.storage import Storage

    return Storage(f"s3://{BUCKET}", cluster["env"]["AWS_ENDPOINT_URL"])


def stored_results(cluster, sweep: str, trial: str) -> list[dict]:
    text = s3(cluster).read_text(f"{BUCKET}/{sweep}/tune/{trial}/result.json") or ""
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def write_space(path: Path, name: str, base_extra: dict, space: dict, **over) -> Path:
    raw = {"name": name,
           "base": {"model": {"variant": "micro/4", "img_size": 32},
                    "data": {"train_size": 256, "eval_size": 64, "batch_size": 32},
                    "eval": {"samples": 64, "probe_images": 8, "dense_images": 0, "cka": False, "noise": {"bands": 0},
                             "attentive_steps": 0, "lowshot": False, "grad_cosine": False},
                    "optim": {"steps": 8}, "run": {"log_every": 4, "ckpt_every": 4}, **base_extra},
           "space": space, "resources": {"workers": 1, "cpus_per_worker": 1}, **over}
    f = path / f"{name}.yaml"
    f.write_text(yaml.safe_dump(raw))
    return f


@pytest.mark.extended
def test_a_sweep_on_worker_nodes_lands_every_trial_once_with_its_true_config(cluster, tmp_path):
    """lam = 0.5 is fixed in the space's base, not sampled: the old driver read the config back from files on its
    own disk, found none, and labelled these trials lam 0 / "mim"."""
    root = cluster["root"]
    p = write_space(tmp_path, "mn", {"objective": {"lam": 0.5}},
                    {"objective.placement.graft_layer": {"grid": [2, 4]}})
    proc = clmim(cluster, "sweep", str(p), "--results", str(root), "--storage", f"s3://{BUCKET}")
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-4000:]
    assert f"storage: s3://{BUCKET}/mn" in out
    assert not (root / "mn" / "tune").exists()  # nothing of the trials is on the driver's disk
    df = query("SELECT trial, status, lam, objective, \"objective.placement.graft_layer\" AS g FROM trials "
               "WHERE sweep = 'mn' ORDER BY g", root)
    assert list(df.g) == [2, 4] and set(df.status) == {"TERMINATED"}
    assert list(df.lam) == [0.5, 0.5] and set(df.objective) == {"mix"}
    for table in ("curves", "layers"):
        n = query(f"SELECT count(DISTINCT trial) AS n FROM {table} WHERE sweep = 'mn'", root).n[0]
        assert n == 2, table
    store = s3(cluster)
    for tid in df.trial:
        files = {f"{BUCKET}/mn/tune/{tid}/run/{f}" for f in ("config.yaml", "final_metrics.json", "model.pt")}
        assert all(store.exists(f) for f in files), tid
        assert not [d for d in store.listdir(f"{BUCKET}/mn/tune/{tid}") if d.startswith("checkpoint_")]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    exp = client.get_experiment_by_name("clmim/mn")
    runs = client.search_runs([exp.experiment_id], filter_string="tags.`clmim.role` = 'trial'")
    assert len(runs) == 2 and {r.data.params["objective.lam"] for r in runs} == {"0.5"}
    assert {r.info.status for r in runs} == {"FINISHED"}
    r = subprocess.run([sys.executable, "-m", "orchestrator.cli", "results", "show", "mn", "--results", str(root)],
                       capture_output=True, text=True, env=cluster["env"], timeout=120)
    assert r.returncode == 0 and f"s3://{BUCKET}/mn" in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]


def test_c_killed_driver_resumes_from_a_fresh_working_directory(cluster, tmp_path):
    root = cluster["root"]
    # (the attentive and low-shot probes stay on here: their seconds in the final evaluation keep a trial running
    # past its checkpoints while the test kills the driver)
    p = write_space(tmp_path, "drv", {}, {"objective.lam": {"grid": [0.0, 1.0]}, "optim.steps": 40,
                                         "run.ckpt_every": 5, "run.log_every": 5, "eval.attentive_steps": 300,
                                         "eval.lowshot": True}, max_concurrent=1)
    proc = clmim(cluster, "sweep", str(p), "--results", str(root), "--storage", f"s3://{BUCKET}")
    store = s3(cluster)

    def one_done_one_checkpointed():
        try:
            done = set(query("SELECT trial FROM trials WHERE sweep = 'drv' AND status = 'TERMINATED'", root).trial)
        except Exception:  # noqa: BLE001 - no table yet
            return None
        trials = store.listdir(f"{BUCKET}/drv/tune")
        mid = [t for t in trials if t not in done and any(  # a complete copy (reports.jsonl is uploaded last)
            d.startswith("checkpoint_") and store.exists(f"{BUCKET}/drv/tune/{t}/{d}/reports.jsonl")
            for d in store.listdir(f"{BUCKET}/drv/tune/{t}"))]
        return done and mid and (done, mid[0])

    done, mid = wait_for(one_done_one_checkpointed, 400, "a finished and a checkpointed trial")
    pids = {t: store.read_text(f"{BUCKET}/drv/tune/{t}/pid") for t in done}
    time.sleep(3)
    proc.kill()  # the driver's machine is gone: no clean shutdown, no final sync
    proc.communicate(timeout=60)
    fresh = tmp_path / "elsewhere"
    fresh.mkdir()
    env = {k: v for k, v in cluster["env"].items() if k != "CLMIM_RESULTS"}
    r = subprocess.run([sys.executable, "-m", "orchestrator.cli", "resume", "drv", "--storage", f"s3://{BUCKET}",
                        "--address", cluster["address"]], cwd=fresh, capture_output=True, text=True,
                       env={**env, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}, timeout=600)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    new_root = fresh / "clmim-results"
    df = query("SELECT trial, status, lam, step FROM trials WHERE sweep = 'drv' ORDER BY lam", new_root)
    assert list(df.lam) == [0.0, 1.0] and set(df.status) == {"TERMINATED"} and set(df.step) == {40}, df
    finals = {t: json.loads(store.read_text(f"{BUCKET}/drv/tune/{t}/run/final_metrics.json")) for t in df.trial}
    assert all(f["step"] == 40 for f in finals.values())
    assert finals[mid]["resumed_from"] >= 5  # continued from its checkpoint in the object store
    for t, pid in pids.items():  # a trial that had finished was not trained again (a new run writes a new pid)
        assert store.read_text(f"{BUCKET}/drv/tune/{t}/pid") == pid
    dup = query("SELECT trial, step, metric, count(*) AS n FROM curves GROUP BY ALL HAVING n > 1", new_root)
    assert len(dup) == 0
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{new_root / 'mlflow.db'}")
    exp = client.get_experiment_by_name("clmim/drv")
    runs = client.search_runs([exp.experiment_id], filter_string="tags.`clmim.role` = 'trial'")
    assert sorted(r.data.tags["clmim.trial_id"] for r in runs) == sorted(df.trial)


@pytest.mark.extended
def test_b_lost_worker_node_retries_the_trial_on_the_other_node_from_its_checkpoint(cluster, tmp_path):
    root = cluster["root"]
    p = write_space(tmp_path, "node", {}, {"objective.lam": 1.0, "optim.steps": 40, "run.ckpt_every": 5,
                                          "run.log_every": 5})
    proc = clmim(cluster, "sweep", str(p), "--results", str(root), "--storage", f"s3://{BUCKET}")
    store = s3(cluster)

    def running_with_checkpoint():
        trials = store.listdir(f"{BUCKET}/node/tune")
        if not trials:
            return None
        t = trials[0]
        pid = store.read_text(f"{BUCKET}/node/tune/{t}/pid")
        # a complete copy: its files are uploaded in name order, reports.jsonl after checkpoint.pt
        ckpt = any(d.startswith("checkpoint_") and store.exists(f"{BUCKET}/node/tune/{t}/{d}/reports.jsonl")
                   for d in store.listdir(f"{BUCKET}/node/tune/{t}"))
        return pid and ckpt and (t, int(pid))

    trial, pid = wait_for(running_with_checkpoint, 300, "a running trial with a checkpoint")
    [(lost, node)] = [(n, w) for n, w in cluster["workers"].items() if pid in descendants(w.pid)]
    [raylet] = [p for p in descendants(node.pid) if cmdline(p).split(" ")[0].endswith("raylet")]
    os.kill(raylet, signal.SIGKILL)  # the node is gone
    [other] = [w for n, w in cluster["workers"].items() if n != lost]

    def retried_elsewhere():  # checked while the retry runs (its process is gone once the sweep ends)
        new = store.read_text(f"{BUCKET}/node/tune/{trial}/pid")
        return new and int(new) != pid and int(new) in descendants(other.pid)

    wait_for(retried_elsewhere, 120, "the trial running again on the other node")
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-4000:]
    finals = [m for m in stored_results(cluster, "node", trial) if "resumed_from" in m]
    assert len(finals) == 1 and finals[0]["step"] == 40 and finals[0]["resumed_from"] >= 5, finals
    row = query("SELECT status, lam FROM trials WHERE sweep = 'node'", root).iloc[0]
    assert row.status == "TERMINATED" and row.lam == 1.0
