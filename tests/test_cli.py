import subprocess
import sys

import yaml

from orchestrator.cli import main


def test_cli_bad_value_is_one_line_exit_2(capsys):
    assert main(["train", "--set", "objective.lam=2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "objective.lam" in err


def test_cli_unknown_key_and_missing_file(capsys, tmp_path):
    assert main(["train", "--set", "optim.stepz=3"]) == 2
    assert "optim.stepz: unknown key" in capsys.readouterr().err
    assert main(["train", str(tmp_path / "nope.yaml")]) == 2


def test_cli_train_runs_and_saves_resolved_config(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"data": {"train_size": 128, "eval_size": 32, "batch_size": 32},
                                   "eval": {"samples": 32, "probe_images": 8, "dense_images": 0, "cka": False,
                                            "noise": {"bands": 0}}}))
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "orchestrator.cli", "train", str(cfg), "--set", "optim.steps=2",
                        "--set", "objective.lam=0.2", "--out", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "final:" in r.stdout
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["objective"]["lam"] == 0.2 and saved["optim"]["steps"] == 2 and saved["model"]["variant"] == "micro/4"


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
    with pytest.raises(ClusterError, match=r"did not start \(TimeoutError: Timed out after 60 s.*ray start --head"):
        init_ray(None)
    with pytest.raises(ClusterError, match=r"--address 10.9.9.9:6379: cannot connect"):
        init_ray("10.9.9.9:6379")


def test_tune_failures_are_logged_as_one_line(caplog):
    import logging

    from orchestrator.sweep import TUNE_FAILURE_LOGGERS, _quiet_tune

    _quiet_tune()
    for name in TUNE_FAILURE_LOGGERS:
        log = logging.getLogger(name)
        try:
            raise OSError("When uploading to s3://b/x: AWS Error NETWORK_CONNECTION\ndetails")
        except OSError:
            log.error("Saving experiment state to storage at 's3://b' failed with exception: ", exc_info=True)
        log.warning("Last sync command failed with the following error:\nTraceback (most recent call last):\n"
                    "  File x\nOSError: endpoint down")
    assert len(caplog.records) == 2 * len(TUNE_FAILURE_LOGGERS)
    for r in caplog.records:
        text = r.getMessage()
        assert "\n" not in text and r.exc_info is None and ("NETWORK_CONNECTION" in text or "endpoint down" in text)


def test_repro_claims_says_a_sweep_has_no_finished_trials(tmp_path):
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "sweep.json").write_text("{}")
    r = subprocess.run([sys.executable, "benchmarks/repro_claims.py", "s", "--results", str(tmp_path)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr and "no finished trials" in r.stderr, r.stderr
