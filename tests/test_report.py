"""The report's parts at screen width: figures in a grid, one untrained line per group where they differ, tables
in their own scrolling box without empty columns, a note where matched budgets read the untrained encoder."""

import io
import json
import os
import socket
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image
from sweeps import make_sweep

from orchestrator.cli import main
from orchestrator.report import PANELS_PER_ROW, _table_html, _untrained_lines, layer_figure
from orchestrator.results import write_trial_tables
from trainables.config import load_config, to_dict


def _layers(step0_by_group: dict[float, float]) -> pd.DataFrame:
    rows = []
    for lam, u in step0_by_group.items():
        for trial in (f"a{lam}", f"b{lam}"):
            for layer in range(3):
                for metric in ("attn_distance", "attn_nmi", "fourier_dlogamp_pi", "linear_top1_gap",
                               "linear_top1_cls", "dense_miou", "cka_untrained"):
                    rows.append({"trial": trial, "lam": lam, "mix": f"lam={lam}", "layer": layer, "metric": metric,
                                 "step": 0, "value": u + layer})
    return pd.DataFrame(rows)


def test_one_grey_untrained_line_when_groups_share_their_encoder_else_one_per_group():
    same = _untrained_lines(_layers({0.0: 1.0, 1.0: 1.0}), "attn_distance", ["mix"])
    assert [label for label, _, color in same] == ["untrained (step 0)"] and same[0][2] == "grey"
    differ = _untrained_lines(_layers({0.0: 1.0, 1.0: 2.0}), "attn_distance", ["mix"])
    assert [label for label, *_ in differ] == ["untrained: lam=0.0", "untrained: lam=1.0"]
    assert differ[0][2] != differ[1][2] and list(differ[1][1].values) == [2.0, 3.0, 4.0]


@pytest.mark.integration
def test_seven_layer_panels_come_in_rows_of_three():
    untrained = _layers({0.0: 1.0, 1.0: 2.0})
    png, per_row = layer_figure(untrained.assign(step=10), 0.125, untrained, ["mix"])
    w, h = Image.open(io.BytesIO(png)).size
    assert per_row == PANELS_PER_ROW == 3 and w < 1700 and h > w / 2  # 3 rows, not one strip 3,200 px wide


def test_tables_scroll_in_their_own_box_without_empty_columns():
    df = pd.DataFrame({"trial": ["t0"], "objective.placement.simmim_layers": [None], "linear_top1": [0.5]})
    html = _table_html(df)
    assert html.startswith('<div class="scroll">') and "placement" not in html and "linear_top1" in html


@pytest.mark.integration
def test_matched_budgets_that_fall_back_to_step_0_say_so(tmp_path):

    from orchestrator.layout import SweepLayout
    from orchestrator.report import build_report

    sweep = tmp_path / "s"
    sweep.mkdir()
    (sweep / "sweep.json").write_text(json.dumps({"name": "s", "created": "x", "n_trials": 4}))
    for i, (lam, steps) in enumerate([(0.0, 3), (1.0, 3), (0.0, 5), (1.0, 5)]):
        config = to_dict(load_config({}, [f"objective.lam={lam}", f"optim.steps={steps}", f"run.seed={i // 2}"]))
        untrained = {"step": 0, "linear_top1": 0.125, "layer/6/linear_top1_gap": 0.125}
        end = {"step": steps, "loss": 1.0, "linear_top1": 0.3 + lam / 10, "knn_top1": 0.2,
               "layer/6/linear_top1_gap": 0.3 + lam / 10}
        write_trial_tables(sweep, f"t{i}", "TERMINATED", config, [untrained, end])
    text = build_report(SweepLayout(tmp_path, "s"))[0].read_text()
    assert "<h2>Matched budgets</h2>" in text and "some rows read step 0, the untrained encoder" in text


@pytest.mark.integration
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


@pytest.mark.integration
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
