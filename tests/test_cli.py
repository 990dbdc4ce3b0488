import errno
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import tiny
from sweeps import make_sweep

from orchestrator.cli import main
from trainables.analysis import analyze
from trainables.config import load_config
from trainables.errors import UserError


def test_cli_bad_value_is_one_line_exit_2(capsys):
    assert main(["train", "--set", "objective.lam=2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "objective.lam" in err


def test_cli_unknown_key_and_missing_file(capsys, tmp_path):
    assert main(["train", "--set", "optim.stepz=3"]) == 2
    assert "optim.stepz: unknown key" in capsys.readouterr().err
    assert main(["train", str(tmp_path / "nope.yaml")]) == 2


@pytest.mark.integration
def test_cli_analyze_prints_per_layer_tables(tmp_path, capsys):
    from conftest import tiny

    from trainables.config import load_config
    from trainables.trainer import train

    out = tmp_path / "run"
    train(load_config(tiny(), [f"run.out_dir={out}", "optim.steps=2", "eval.probe_images=8"]))
    capsys.readouterr()
    assert main(["analyze", str(out)]) == 0
    text = capsys.readouterr().out
    assert "attn_nmi" in text and "fourier_dlogamp_pi" in text and "linear_top1" in text
    assert main(["analyze", str(tmp_path / "missing")]) == 2
    (tmp_path / "w.pt").write_bytes(b"not a checkpoint")
    assert main(["analyze", str(tmp_path / "w.pt")]) == 2


def test_cli_results_bad_input_exit_2(tmp_path, capsys):
    assert main(["results", "query", "DELETE FROM trials", "--results", str(tmp_path)]) == 2
    assert main(["results", "show", "nope", "--results", str(tmp_path)]) == 2
    assert main(["results", "rebuild", "nope", "--results", str(tmp_path)]) == 2
    assert main(["sweep", str(tmp_path / "missing.yaml")]) == 2
    err = capsys.readouterr().err
    assert all(line.startswith("clmim ") for line in err.strip().splitlines())


def test_progress_does_not_go_back_on_a_probe_report(capsys):
    """A probe report (no total_steps) after a log step must not reset a trial's progress (the ETA jumped)."""
    from types import SimpleNamespace

    from orchestrator.console import make_reporter

    reporter = make_reporter()
    trial = SimpleNamespace(trial_id="t", config={}, status="RUNNING", last_result={"step": 50, "total_steps": 100})
    reporter.report([trial], False)
    trial.last_result = {"step": 50, "linear_top1": 0.5}
    reporter.report([trial], False)
    lines = [x for x in capsys.readouterr().out.splitlines() if "trials" in x]
    assert len(lines) == 2
    assert reporter.printer._done["t"] == 0.5


def test_a_sweep_name_that_is_a_file_of_the_results_root_is_refused_before_ray(tmp_path, capsys, monkeypatch):
    import orchestrator.sweep as sweep_mod

    monkeypatch.setattr(sweep_mod, "init_ray", lambda address: (_ for _ in ()).throw(AssertionError("Ray started")))
    (tmp_path / "notes.txt").write_text("x")
    for name in ("mlflow.db", "mlartifacts", "notes.txt"):
        assert main(["sweep", "search_spaces/quickstart.yaml", "--name", name, "--results", str(tmp_path)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "--name" in err, err


def test_ray_that_does_not_start_is_one_line_saying_what_to_do(monkeypatch):
    import pytest
    import ray

    from orchestrator.sweep import ClusterError, init_ray

    def slow(**kw):
        raise TimeoutError("Timed out after 60 seconds waiting for node info.\nmore lines")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", slow)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)  # (the session's Ray head sets it on the worker it runs on)
    with pytest.raises(ClusterError, match=r"did not start \(TimeoutError: Timed out after 60 s.*ray start --head"):
        init_ray(None)
    with pytest.raises(ClusterError, match=r"--address 10.9.9.9:6379: cannot connect"):
        init_ray("10.9.9.9:6379")


def test_tune_failures_are_logged_as_one_line():
    import logging

    from orchestrator.sweep import TUNE_FAILURE_LOGGERS, _quiet_tune

    records = []

    class Keep(logging.Handler):  # on the loggers themselves: Ray's logging setup (a Ray test earlier in this
        def emit(self, record):   # process) stops its loggers' records from reaching pytest's root handler
            records.append(record)

    _quiet_tune()
    keep = Keep()
    for name in TUNE_FAILURE_LOGGERS:
        logging.getLogger(name).addHandler(keep)
    try:
        for name in TUNE_FAILURE_LOGGERS:
            log = logging.getLogger(name)
            try:
                raise OSError("When uploading to s3://b/x: AWS Error NETWORK_CONNECTION\ndetails")
            except OSError:
                log.error("Saving experiment state to storage at 's3://b' failed with exception: ", exc_info=True)
            log.warning("Last sync command failed with the following error:\nTraceback (most recent call last):\n"
                        "  File x\nOSError: endpoint down")
    finally:
        for name in TUNE_FAILURE_LOGGERS:
            logging.getLogger(name).removeHandler(keep)
    assert len(records) == 2 * len(TUNE_FAILURE_LOGGERS)
    for r in records:
        text = r.getMessage()
        assert "\n" not in text and r.exc_info is None and ("NETWORK_CONNECTION" in text or "endpoint down" in text)


@pytest.mark.integration
def test_repro_claims_says_a_sweep_has_no_finished_trials(tmp_path):
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "sweep.json").write_text("{}")
    r = subprocess.run([sys.executable, "benchmarks/repro_claims.py", "s", "--results", str(tmp_path)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr and "no finished trials" in r.stderr, r.stderr


def test_errors_quote_only_a_short_excerpt(tmp_path, capsys):
    space = tmp_path / "s.yaml"
    big = tmp_path / "big.txt"
    big.write_text("root:x:0:0:root:/root:/bin/bash\n" * 50)
    space.write_text(yaml.safe_dump({"base": str(big), "space": {"objective.lam": 0.5}}))
    assert main(["sweep", str(space), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert len(err) < 400 and err.count("root:x:0") <= 1


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


@pytest.mark.slow
@pytest.mark.extended
def test_analyze_is_deterministic_and_equals_what_the_trial_recorded(tmp_path, capsys):
    from trainables.trainer import train

    out = tmp_path / "run"
    # big enough that a probe fit from a random start (the old defect) gave different numbers each time
    reports = []
    final = train(load_config(tiny(), [f"run.out_dir={out}", "optim.steps=8", "eval.probe_images=8",
                                       "data.train_size=512", "data.eval_size=256", "eval.samples=256"]),
                  lambda metrics, checkpoint=None: reports.append(dict(metrics)))
    # the analysis sweep's task on the trial's export: the untrained encoder (step 0) and the trained one (at its
    # step) give every number the trial reported then
    analysed = analyze(str(out), [])
    recorded = {r["step"]: r for r in reports if "layer/1/attn_distance" in r}
    assert [r["step"] for r in analysed["results"]] == [0, 8] == sorted(recorded)
    for got_, want in zip(analysed["results"], (recorded[0], recorded[8]), strict=True):
        keys = [k for k in want if k.startswith(("layer/", "linear_top1", "knn_top1")) and k in got_]
        assert len(keys) > 10 and {k: got_[k] for k in keys} == pytest.approx({k: want[k] for k in keys}, abs=1e-4)
    assert analysed["final"]["step"] == 8 and analysed["config"]["optim"]["steps"] == 8  # a clmim file's config
    got = []
    for _ in range(2):
        capsys.readouterr()
        assert main(["analyze", str(out)]) == 0
        last = capsys.readouterr().out.strip().splitlines()[-1]
        got.append(dict(kv.split("=") for kv in last.split()))
    assert got[0] == got[1]
    for k in ("linear_top1", "knn_top1", "shape_bias"):
        assert float(got[0][k]) == pytest.approx(final[k], abs=1e-4), k


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


@pytest.mark.integration
def test_train_prints_its_plan_at_once_the_first_steps_rate_and_a_short_final_line_and_saves_its_config(tmp_path):
    """`clmim train` was silent until step 10 (minutes with defaults): the plan and the step-0 evaluation are
    announced before any work, step 1 reports its rate and an ETA, then every log step; the run folder keeps the
    resolved config (the file's keys, the --set ones and the defaults)."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"data": {"train_size": 128, "eval_size": 32, "batch_size": 32},
                                   "eval": {"samples": 32, "probe_images": 8, "dense_images": 0, "cka": False,
                                            "noise": {"bands": 0}, "attentive_steps": 0, "lowshot": False}}))
    sets = [a for kv in ["optim.steps=4", "run.log_every=2", "objective.lam=0.2"] for a in ("--set", kv)]
    out = tmp_path / "o"
    r = subprocess.run([sys.executable, "-m", "orchestrator.cli", "train", str(cfg), *sets, "--out", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.strip().splitlines()
    assert lines[1].startswith("plan: 4 steps, batch 32; loss every 2 steps; probes at step 0 (untrained) and the end")
    assert lines[2].startswith("building the data and model, then probing the untrained encoder (step 0)")
    assert lines[3].startswith("step 0 probed in ")
    assert re.match(r"step 1/4 \(25%, ETA (\d+m)?\d+s\)  loss=", lines[4]), lines
    assert re.match(r"step 2/4 \(50%, ETA (\d+m)?\d+s\)", lines[5]), lines
    assert max(len(ln) for ln in lines) < 300 and lines[-2].startswith("final: ")
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["objective"]["lam"] == 0.2 and saved["optim"]["steps"] == 4 and saved["model"]["variant"] == "micro/4"
    assert saved["data"]["train_size"] == 128


def test_train_config_error_is_fast_and_imports_no_torch():
    code = ("import sys; from orchestrator.cli import main; rc = main(['train', '--set', 'objective.lam=2']); "
            "print('torch' in sys.modules); sys.exit(rc)")
    t = time.time()
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stdout.strip() == "False" and "objective.lam" in r.stderr
    assert time.time() - t < 10


def test_start_up_loads_no_query_engine_analysis_or_torch():
    """The CLI's module imports stay light (a usage error or --help answers at once): DuckDB, pandas, scipy and torch
    load only in the commands that use them (the imports deferred in cli.py, each marked)."""
    code = ("import sys; import orchestrator.cli; "
            "print(sorted(m for m in ('duckdb', 'pandas', 'scipy', 'torch', 'ray') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr[-2000:]


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
