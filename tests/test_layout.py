import json
import os
import socket
import time

import pytest
from sweeps import make_sweep

from orchestrator.cli import main
from orchestrator.layout import SweepLayout
from trainables.errors import UserError


@pytest.mark.parametrize("name", ["../../etc/x", "/abs/x", "a/b", "..", "x" * 101, "latest", ".hidden", "a b"])
def test_sweep_names_are_plain_names(tmp_path, name):
    from orchestrator.space import load_space
    from orchestrator.sweep import run_sweep

    with pytest.raises(UserError, match="sweep name"):
        run_sweep(load_space("search_spaces/quickstart.yaml"), name=name, results=str(tmp_path / "r"))
    assert not (tmp_path / "r").exists() and not (tmp_path / "etc").exists()


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
