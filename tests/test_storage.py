"""Storage (local and S3-compatible), the layout's paths in it, and the driver reading trials from it."""

import json
import time

import pytest
import yaml
from conftest import _free_port

from orchestrator.layout import SweepLayout, find_sweep
from orchestrator.query import query
from orchestrator.results import trial_row
from trainables.config import load_config, to_dict
from trainables.errors import UserError
from trainables.storage import Storage


@pytest.fixture(scope="module")
def s3():
    """An S3-compatible server (moto) on 127.0.0.1 with one bucket; stopped afterwards."""
    import os

    import boto3
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    before = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    endpoint = f"http://127.0.0.1:{port}"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="bkt")
    try:
        yield endpoint
    finally:
        server.stop()
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def test_parse_names_what_is_wrong(tmp_path, monkeypatch):
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    assert Storage.parse(None, None, tmp_path) == Storage(str(tmp_path))
    assert Storage.parse("s3://bucket/a/b/", None, tmp_path) == Storage("s3://bucket/a/b")
    assert Storage.parse(str(tmp_path / "x"), None, tmp_path).uri == str(tmp_path / "x")
    st = Storage.parse("s3://bucket", "http://127.0.0.1:9", tmp_path)
    assert st.endpoint == "http://127.0.0.1:9" and st.path("s", "tune") == "bucket/s/tune"
    for bad, flag in (("gs://bucket/x", "--storage"), ("s3://", "--storage"), ("s3://bkt/../x", "--storage")):
        with pytest.raises(UserError, match=flag):
            Storage.parse(bad, None, tmp_path)
    with pytest.raises(UserError, match="--storage-endpoint"):
        Storage.parse("s3://b", "ftp://host", tmp_path)


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_storage_files_round_trip(kind, tmp_path, s3):
    st = Storage(str(tmp_path / "store")) if kind == "local" else Storage("s3://bkt/prefix", s3)
    st.check_writable()
    p = st.path("sweep", "tune", "t1", "run", "config.yaml")
    assert st.read_text(p) is None and not st.exists(p)
    st.write_text(p, "a: 1\n")
    assert st.read_text(p) == "a: 1\n" and st.exists(p)
    local = tmp_path / "ckpt"
    local.mkdir()
    (local / "checkpoint.pt").write_bytes(b"x" * 1000)
    st.upload(local, st.path("sweep", "tune", "t1", "checkpoint_000001"))
    assert st.listdir(st.path("sweep", "tune", "t1")) == ["checkpoint_000001", "run"]
    assert st.size(st.path("sweep")) == 1000 + 5 and st.size(p) == 5 and st.size(st.path("none")) == 0
    back = st.download(st.path("sweep", "tune", "t1", "checkpoint_000001"), tmp_path / "back")
    assert (back / "checkpoint.pt").read_bytes() == b"x" * 1000
    st.rename(p, p + ".prev")
    assert st.read_text(p + ".prev") == "a: 1\n" and st.read_text(p) is None
    st.delete(st.path("sweep", "tune", "t1", "checkpoint_000001"))
    st.delete(st.path("nothing", "here"))  # no error for what is not there
    assert st.listdir(st.path("sweep", "tune", "t1")) == ["run"] and st.listdir(st.path("nope")) == []
    layout = SweepLayout(tmp_path / "root", "sweep", st)
    assert layout.trials() == ["t1"] and layout.checkpoint_paths("t1") == []


@pytest.mark.integration
def test_unusable_storage_is_a_one_line_error_before_anything_runs(tmp_path, s3):
    with pytest.raises(UserError, match=r"--storage: cannot write to s3://missing-bucket"):
        Storage("s3://missing-bucket/x", s3).check_writable()
    t = time.time()
    with pytest.raises(UserError, match=r"--storage: cannot write to s3://bkt.*endpoint http://127.0.0.1"):
        Storage("s3://bkt/x", f"http://127.0.0.1:{_free_port()}").check_writable()  # nothing listens there
    assert time.time() - t < 60
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match="--storage: cannot write to"):
        Storage(str(tmp_path / "file" / "sub")).check_writable()


@pytest.mark.integration
def test_a_trial_whose_files_are_not_on_the_drivers_disk_lands_with_its_true_config(tmp_path, s3):
    """lam = 0.5 is fixed in the space's base; Tune's params.json on the driver holds only the sampled key. The old
    driver read run/config.yaml from its own disk, found none, fell back to params.json, and recorded the trial
    without lam (a default of 0 / "mim" before that)."""
    from orchestrator.callbacks import SweepCallback, Tables
    from orchestrator.space import space_from_dict
    from orchestrator.tracking import MlflowLog

    space = space_from_dict({"base": {"objective": {"lam": 0.5}, "model": {"variant": "micro/4", "img_size": 32}},
                             "space": {"objective.placement.graft_layer": {"grid": [2, 4]}}}, tmp_path / "p.yaml")
    layout = SweepLayout(tmp_path / "root", "p", Storage("s3://bkt/clusters", s3))
    layout.sweep_dir.mkdir(parents=True)
    (layout.sweep_dir / "sweep.json").write_text("{}")
    driver_trial = layout.sweep_dir / "tune" / "t2"  # what Tune's driver side has: params.json only
    driver_trial.mkdir(parents=True)
    (driver_trial / "params.json").write_text(json.dumps({"objective.placement.graft_layer": 2}))
    cfg = to_dict(load_config(space.base, {"objective.placement.graft_layer": 2, "run.seed": 7}))
    layout.store.write_text(f"{layout.run_path('t2')}/config.yaml", yaml.safe_dump(cfg))  # written by the trial
    layout.store.write_text(f"{layout.trial_path('t2')}/result.json", json.dumps({"step": 4, "loss": 1.0}) + "\n")

    class Trial:
        def __init__(self, tid):
            self.trial_id, self.status, self.last_result = tid, "TERMINATED", {}
            self.config = {"objective.placement.graft_layer": 4 if tid == "t4" else 2}

        def get_error(self):
            return None

    cb = SweepCallback(layout, space, [Tables(layout, space),
                                       MlflowLog(layout, space, f"sqlite:///{tmp_path / 'mlflow.db'}")])
    for tid in ("t2", "t4"):  # t4 never wrote its config: resolved from the space, as the trial would
        cb.on_trial_start(0, [], Trial(tid))
        cb.on_trial_complete(0, [], Trial(tid))
    cb.close()
    df = query("SELECT trial, lam, objective, \"objective.placement.graft_layer\" AS g, \"run.seed\" AS seed "
               "FROM trials ORDER BY trial", layout.root)
    assert list(df.lam) == [0.5, 0.5] and list(df.objective) == ["mix", "mix"] and list(df.g) == [2, 4]
    assert list(df.seed) == [7, 0]  # t2's row is what t2 ran with (its own file), not a re-resolution


def test_trial_row_never_invents_a_config_value():
    row = trial_row("s", "t", "a", "TERMINATED", {}, {"step": 3})
    assert row["lam"] is None and row["objective"] is None and row["variant"] is None
    assert not any(k.startswith(("objective.", "model.", "optim.")) for k in row)


def test_resume_on_a_fresh_machine_finds_the_sweep_in_its_storage(tmp_path, s3):
    st = Storage("s3://bkt/resumable", s3)
    with pytest.raises(UserError, match="not found under .* or in --storage s3://bkt/resumable"):
        find_sweep("gone", tmp_path / "fresh", storage=st)
    st.write_text(st.path("there", "sweep.json"), "{}")
    st.write_text(st.path("there", "tune", "experiment_state-x.json"), "{}")
    layout = find_sweep("there", tmp_path / "fresh", need="tune", storage=st)
    assert layout.storage == st and layout.tune_path == "bkt/resumable/there/tune"


@pytest.mark.integration
def test_analyze_reads_a_trials_final_weights_from_the_object_store(tmp_path, s3, monkeypatch, capsys):
    """A finished trial keeps only run/model.pt (its encoder) in the storage; `clmim analyze` takes its URI."""
    from conftest import tiny

    from orchestrator.cli import main
    from trainables.checkpoints import export_weights
    from trainables.trainer import train

    run = tmp_path / "run"
    train(load_config(tiny(), [f"run.out_dir={run}", "optim.steps=2", "run.ckpt_every=2", "eval.probe_images=8"]))
    export = export_weights(run / "checkpoints" / "step_0000002" / "checkpoint.pt", tmp_path / "out" / "model.pt")
    assert export.stat().st_size < (run / "checkpoints" / "step_0000002" / "checkpoint.pt").stat().st_size / 2
    st = Storage("s3://bkt/analyze", s3)
    st.upload(export.parent, st.path("sweep", "tune", "t1", "run"))
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3)
    assert main(["analyze", "s3://bkt/analyze/sweep/tune/t1/run", "--set", "eval.probe_images=8"]) == 0
    out = capsys.readouterr().out
    assert "clmim analyze:" in out and "model.pt" in out and "attn_nmi" in out
    assert main(["analyze", "s3://bkt/analyze/nothing"]) == 2
    assert "checkpoint: nothing at s3://bkt/analyze/nothing" in capsys.readouterr().err
