"""Issue 11: reliability and security under attack (one test per numbered item; Ray-free, see also
test_sweep_ray.py for the cluster cases)."""

import errno
import json
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import tiny

from orchestrator.cli import main
from orchestrator.layout import SweepLayout
from orchestrator.records import read_error
from orchestrator.results import QueryError, query, write_trial_tables
from trainables.config import load_config, to_dict
from trainables.errors import UserError


def cfg(lam=0.5):
    return to_dict(load_config({}, [f"objective.lam={lam}"]))


def reports(final=0.5, steps=3):
    return [{"step": s, "loss": 2.0 - s / 10} for s in range(1, steps + 1)] + [
        {"step": steps, "linear_top1": final, "layer/1/attn_nmi": 0.3}]


class Evil:
    """A pickle that runs a shell command when loaded."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# ---------------------------------------------------------------------------------------- 1. checkpoints
def test_checkpoints_never_run_code(tmp_path, capsys):
    import torch

    from trainables.trainer import train

    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    torch.save({"model": Evil(marker), "config": {}, "step": 1}, evil)
    assert main(["analyze", str(evil), "--variant", "B/16"]) == 2
    assert "weights_only" in capsys.readouterr().err
    with pytest.raises(UserError, match="run.resume"):
        train(load_config(tiny(), [f"run.resume={evil}", "optim.steps=2"]))
    assert not marker.exists()


def test_checkpoint_with_rng_state_loads_weights_only(tmp_path):
    """Resume still works: every RNG state is stored as tensors and plain values."""
    import torch

    from trainables.trainer import train

    out = tmp_path / "run"
    train(load_config(tiny(), [f"run.out_dir={out}", "optim.steps=2", "eval.probe_images=8"]))
    ckpt = torch.load(next(out.glob("checkpoints/step_*/checkpoint.pt")), weights_only=True)
    assert set(ckpt["rng"]) == {"torch", "numpy", "python", "cuda"}


# ---------------------------------------------------------------------------------------- 2. queries
def test_queries_are_confined_to_the_results(tmp_path):
    root = tmp_path / "results"
    write_trial_tables(root / "s", "t", "TERMINATED", cfg(), reports())
    (root / "mlflow.db").write_bytes(b"SQLite format 3\0secret")
    secret = tmp_path / "home" / ".ray"
    secret.mkdir(parents=True)
    (secret / "auth_token").write_text("token-123")
    attacks = [f"SELECT * FROM read_text('{secret / 'auth_token'}')", "SELECT * FROM read_text('/etc/shadow')",
               "SELECT * FROM read_text('/proc/self/environ')", f"SELECT * FROM glob('{tmp_path / 'home'}/**')",
               f"SELECT * FROM read_blob('{root / 'mlflow.db'}')",
               f"SELECT * FROM sqlite_scan('{root / 'mlflow.db'}', 'x')",
               "SELECT * FROM read_parquet('https://example.com/x.parquet')",
               "SELECT * FROM read_csv('/etc/passwd')", "INSTALL httpfs", "LOAD httpfs", "ATTACH '/tmp/x.db' AS x",
               "SET enable_external_access = true"]
    t = time.time()
    for sql in attacks:
        with pytest.raises(QueryError):
            query(sql, root)
    assert time.time() - t < 20  # nothing tried to download an extension
    assert len(query("SELECT * FROM trials", root)) == 1  # the product's own files still read


# ---------------------------------------------------------------------------------------- 3. paths
@pytest.mark.parametrize("name", ["../../etc/x", "/abs/x", "a/b", "..", "x" * 101, "latest", ".hidden", "a b"])
def test_sweep_names_are_plain_names(tmp_path, name):
    from orchestrator.space import load_space
    from orchestrator.sweep import run_sweep

    with pytest.raises(UserError, match="sweep name"):
        run_sweep(load_space("search_spaces/quickstart.yaml"), name=name, results=str(tmp_path / "r"))
    assert not (tmp_path / "r").exists() and not (tmp_path / "etc").exists()


def test_a_results_root_with_a_quote_is_queried_as_data(tmp_path):
    root = tmp_path / "it's here"
    write_trial_tables(root / "s", "t", "TERMINATED", cfg(), reports())
    assert len(query("SELECT * FROM trials", root)) == 1 and len(query("SELECT * FROM curves", root)) == 4


def test_errors_quote_only_a_short_excerpt(tmp_path, capsys):
    space = tmp_path / "s.yaml"
    big = tmp_path / "big.txt"
    big.write_text("root:x:0:0:root:/root:/bin/bash\n" * 50)
    space.write_text(yaml.safe_dump({"base": str(big), "space": {"objective.lam": 0.5}}))
    assert main(["sweep", str(space), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert len(err) < 400 and err.count("root:x:0") <= 1


# ---------------------------------------------------------------------------------------- 4. disk full
def test_damaged_error_file_counts_as_an_error(tmp_path):
    from orchestrator.results import rebuild

    d = tmp_path / "s" / "tune" / "t1"
    d.mkdir(parents=True)
    (d / "error.json").write_text("")  # what a full disk left
    (d / "result.json").write_text(json.dumps({"step": 1, "loss": 1.0}) + "\n")
    layout = SweepLayout(tmp_path, "s")
    assert read_error(layout, "t1") == "unreadable error file"
    assert rebuild(layout) == 1
    df = query("SELECT status, error FROM trials", tmp_path)
    assert list(df.status) == ["ERROR"] and df.error[0] == "unreadable error file"


def test_driver_survives_a_failed_write(tmp_path, monkeypatch, capsys):
    import orchestrator.tracking as tracking
    from orchestrator.space import space_from_dict

    space = space_from_dict({"space": {"objective.lam": 0.5}}, tmp_path / "s.yaml")
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "sweep.json").write_text("{}")
    cb = tracking.ResultsCallback(SweepLayout(tmp_path, "s"), space, f"sqlite:///{tmp_path / 'mlflow.db'}")

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tracking, "write_trial_tables", full)

    class Trial:
        trial_id, status, config, last_result = "t1", "TERMINATED", {}, {}

        def get_error(self):
            return None

    cb.on_trial_complete(0, [], Trial())  # must not raise
    err = capsys.readouterr().err
    assert "No space left on device" in err and "clmim results rebuild s" in err


DISK_FULL_SCRIPT = """
import sys, errno
sys.path.insert(0, {repo!r})
from orchestrator.results import write_trial_tables, query
from trainables.config import load_config, to_dict
cfg = to_dict(load_config({{}}))
rows = [{{"step": s, "loss": 1.0, **{{f"layer/{{l}}/h{{h}}/attn_nmi": 0.1 for l in range(12) for h in range(12)}}}}
        for s in range(50)]
ok = 0
try:
    for i in range(10000):
        write_trial_tables(__import__("pathlib").Path({root!r}) / "s", f"t{{i}}", "TERMINATED", cfg, rows)
        ok += 1
except OSError as e:
    assert e.errno == errno.ENOSPC, e
print("written", ok)
n = len(query("SELECT * FROM trials", {root!r}))
print("readable", n)
"""


@pytest.mark.skipif(shutil.which("unshare") is None or os.geteuid() != 0, reason="needs root and unshare")
def test_a_full_disk_leaves_no_partial_file_and_readable_tables(tmp_path):
    """On a real 2 MB tmpfs (private mount namespace): writing fails with ENOSPC, every table stays readable
    and holds exactly the attempts whose write completed."""
    root = tmp_path / "mnt"
    root.mkdir()
    script = tmp_path / "fill.py"
    script.write_text(DISK_FULL_SCRIPT.format(repo=str(Path(__file__).resolve().parents[1]), root=str(root)))
    r = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c",
                        f"mount -t tmpfs -o size=2m none {root} && {sys.executable} {script}"],
                       capture_output=True, text=True, timeout=300)
    if "mount" in r.stderr and r.returncode != 0 and "written" not in r.stdout:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()[:200]}")
    assert r.returncode == 0, r.stderr[-2000:]
    written = int(r.stdout.split("written")[1].split()[0])
    assert written > 0 and f"readable {written}" in r.stdout


def test_damaged_sweep_json_is_a_one_line_error_on_resume(tmp_path, capsys):
    for text in ("", "{}", '{"space": {"spa'):
        d = tmp_path / "s"
        (d / "tune").mkdir(parents=True, exist_ok=True)
        (d / "sweep.json").write_text(text)
        assert main(["resume", "s", "--results", str(tmp_path)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "sweep.json" in err and "cannot be resumed" in err


# ---------------------------------------------------------------------------------------- 5. retry errored
def test_retry_errored_moves_the_error_record_aside(tmp_path):
    from orchestrator.sweep import retire_errors
    from orchestrator.trial import TrialError, raise_recorded

    layout = SweepLayout(tmp_path, "s")
    d = Path(layout.trial_path("t1"))
    d.mkdir(parents=True)
    (d / "error.json").write_text(json.dumps({"type": "ConfigError", "message": "data.path"}))
    with pytest.raises(TrialError):
        raise_recorded(layout, "t1")
    assert retire_errors(layout) == ["t1"]
    raise_recorded(layout, "t1")  # a retried trial now really runs
    assert (d / "error.prev.json").is_file()


# ---------------------------------------------------------------------------------------- 6. one status
class FakeTrial:
    def __init__(self, tid, status="TERMINATED", error=None):
        self.trial_id, self.status, self.config, self.last_result, self._error = tid, status, {}, {}, error

    def get_error(self):
        return self._error


def _callback(tmp_path):
    from orchestrator.space import space_from_dict
    from orchestrator.tracking import ResultsCallback

    space = space_from_dict({"space": {"objective.lam": 0.5}, "failure": {"max_failures": 1}}, tmp_path / "s.yaml")
    (tmp_path / "s").mkdir(exist_ok=True)
    (tmp_path / "s" / "sweep.json").write_text("{}")
    return ResultsCallback(SweepLayout(tmp_path, "s"), space, f"sqlite:///{tmp_path / 'mlflow.db'}")


def test_exhausted_retries_are_recorded_so_resume_does_not_rerun_them(tmp_path):
    from orchestrator.trial import TrialError, raise_recorded

    cb = _callback(tmp_path)
    trial = FakeTrial("t1", "ERROR", error="Traceback ...\nRayActorError: the actor died unexpectedly")
    cb.on_trial_start(0, [], trial)
    cb.on_trial_error(0, [], trial)
    with pytest.raises(TrialError, match="retries exhausted"):  # a resume re-raises it at once
        raise_recorded(SweepLayout(tmp_path, "s"), "t1")
    row = query("SELECT status, error FROM trials", tmp_path).iloc[0]
    assert row.status == "ERROR" and "failure.max_failures=1" in row.error
    run = cb.client.get_run(cb.child_run("t1", {}))
    assert run.info.status == "FAILED" and "retries exhausted" in run.data.tags["clmim.error"]


def test_mlflow_never_logs_a_step_twice_and_drops_a_stale_error_tag(tmp_path):
    cb = _callback(tmp_path)
    trial = FakeTrial("t1")
    for step in (5, 10):
        cb.on_trial_result(0, [], trial, {"step": step, "loss": 1.0 / step})
    cb2 = _callback(tmp_path)  # a new driver after a kill: the resumed trial repeats steps after its checkpoint
    for step in (5, 10, 15):
        cb2.on_trial_result(0, [], trial, {"step": step, "loss": 2.0 / step})
    run_id = cb2.child_run("t1", {})
    assert [m.step for m in cb2.client.get_metric_history(run_id, "loss")] == [5, 10, 15]
    cb2.client.set_tag(run_id, "clmim.error", "from an earlier attempt")
    cb2.on_trial_complete(0, [], trial)
    run = cb2.client.get_run(run_id)
    assert "clmim.error" not in run.data.tags and run.info.status == "FINISHED"


# ---------------------------------------------------------------------------------------- 8. grid size
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


# ---------------------------------------------------------------------------------------- 9. bad values
@pytest.mark.parametrize("space,key", [
    ({"space": {"objective.lam": float("nan")}}, "objective.lam"),
    ({"space": {"objective.lam": {"grid": [0.5, float("nan")]}}}, "objective.lam"),
    ({"space": {"optim.blr": float("nan")}}, "optim.blr"),
    ({"space": {"objective.mocov3.temperature": float("nan")}}, "objective.mocov3.temperature"),
    ({"resources": {"cpus_per_worker": float("nan")}}, "resources.cpus_per_worker"),
    ({"resources": {"workers": True}}, "resources.workers"),
    ({"failure": {"max_failures": "notanumber"}}, "failure.max_failures"),
    ({"failure": {"max_failures": -1}}, "failure.max_failures"),
    ({"failure": {"max_failures": 2.7}}, "failure.max_failures"),
    ({"num_samples": True}, "num_samples"),
    ({"max_concurrent": True}, "max_concurrent"),
])
def test_bad_values_are_one_line_errors_before_ray(tmp_path, capsys, space, key):
    p = tmp_path / "s.yaml"
    p.write_text(yaml.safe_dump(space))
    assert main(["sweep", str(p), "--results", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and key in err, err
    assert not (tmp_path / "r").exists()  # nothing started, nothing written


def test_more_bad_input_is_refused_before_ray(tmp_path, capsys):
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert main(["sweep", str(empty)]) == 2 and "is empty" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["sweep", "search_spaces/quickstart.yaml", "--max-concurrent", "-1"])
    assert e.value.code == 2
    afile = tmp_path / "afile"
    afile.write_text("x")
    t = time.time()
    assert main(["sweep", "search_spaces/quickstart.yaml", "--results", str(afile)]) == 2
    assert "is a file" in capsys.readouterr().err and time.time() - t < 10
    assert main(["results", "query", "SELECT 1", "--results", str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_unwritable_results_root_is_refused_before_ray(tmp_path, monkeypatch):
    from orchestrator import sweep as sweep_mod
    from orchestrator.space import load_space

    def read_only(*a, **k):
        raise PermissionError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(sweep_mod.tempfile, "NamedTemporaryFile", read_only)
    monkeypatch.setattr(sweep_mod, "init_ray", lambda address: pytest.fail("Ray started"))
    with pytest.raises(UserError, match="cannot write to .*Read-only file system"):
        sweep_mod.run_sweep(load_space("search_spaces/quickstart.yaml"), results=str(tmp_path))


# ---------------------------------------------------------------------------------------- 10. foreign files
def test_foreign_files_are_skipped_with_a_warning(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from orchestrator.results import ResultsWarning

    write_trial_tables(tmp_path / "s", "t1", "TERMINATED", cfg(), reports(0.4))
    write_trial_tables(tmp_path / "other", "t9", "TERMINATED", cfg(), reports(0.6))
    (tmp_path / "s" / "trials" / "x.parquet").write_text("garbage")
    # a foreign file named like ours with a later attempt id and a text `loss`
    pq.write_table(pa.table({"sweep": ["s"], "trial": ["t1"], "attempt": ["99999999999999999999-ffffffff"],
                             "status": ["TERMINATED"], "loss": ["boom"]}),
                   tmp_path / "s" / "trials" / "t1.99999999999999999999-ffffffff.parquet")
    with pytest.warns(ResultsWarning) as caught:
        df = query("SELECT sweep, trial, loss, linear_top1 FROM trials ORDER BY sweep", tmp_path)
    assert list(df.trial) == ["t9", "t1"] and list(df.linear_top1) == [0.6, 0.4]
    assert str(df.loss.dtype) == "float64"
    text = " ".join(str(w.message) for w in caught)
    assert "x.parquet" in text and "t1.99999999999999999999-ffffffff.parquet" in text


# ---------------------------------------------------------------------------------------- 11. merge races
def _churn(root: str, seconds: float) -> None:
    from orchestrator.results import compact

    t, i = time.time(), 0
    while time.time() - t < seconds:
        write_trial_tables(Path(root) / "s", f"t{i:04d}", "TERMINATED", cfg(i % 2), reports(i / 1000))
        if i % 3 == 0:
            compact(Path(root) / "s", batch=4)
        if i % 17 == 0:
            compact(Path(root) / "s")
        i += 1


def _read(root: str, seconds: float, out) -> None:
    t, failed, inconsistent, n = time.time(), 0, 0, 0
    while time.time() - t < seconds:
        try:
            row = query("""SELECT (SELECT count(*) FROM trials) AS rows, (SELECT count(DISTINCT trial) FROM trials)
                AS trials, (SELECT count(*) FROM curves) AS curves, (SELECT count(*) FROM layers) AS layers""",
                        root).iloc[0]
            n += 1
            # every trial exactly once, with its 3 + 1 curve rows and 1 layer row
            if not (row.rows == row.trials and row.curves == 4 * row.trials and row.layers == row.trials):
                inconsistent += 1
        except Exception:  # noqa: BLE001
            failed += 1
    out.put((n, failed, inconsistent))


def test_readers_see_one_consistent_snapshot_while_files_merge(tmp_path):
    ctx = mp.get_context("fork")
    out = ctx.Queue()
    seconds = 8
    writer = ctx.Process(target=_churn, args=(str(tmp_path), seconds))
    readers = [ctx.Process(target=_read, args=(str(tmp_path), seconds, out)) for _ in range(3)]
    write_trial_tables(tmp_path / "s", "seed", "TERMINATED", cfg(), reports())
    for p in [writer, *readers]:
        p.start()
    results = [out.get(timeout=seconds + 120) for _ in readers]
    for p in [writer, *readers]:
        p.join(timeout=60)
    n = sum(r[0] for r in results)
    assert n > 10 and sum(r[1] for r in results) == 0 and sum(r[2] for r in results) == 0, results
