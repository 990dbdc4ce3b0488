from orchestrator.cli import main


def test_damaged_sweep_json_is_a_one_line_error_on_resume(tmp_path, capsys):
    for text in ("", "{}", '{"space": {"spa'):
        d = tmp_path / "s"
        (d / "tune").mkdir(parents=True, exist_ok=True)
        (d / "sweep.json").write_text(text)
        assert main(["resume", "s", "--results", str(tmp_path)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "sweep.json" in err and "cannot be resumed" in err
