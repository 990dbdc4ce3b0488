"""The report's parts at screen width: figures in a grid, one untrained line per group where they differ, tables
in their own scrolling box without empty columns, a note where matched budgets read the untrained encoder."""

import io

import pandas as pd
from PIL import Image

from orchestrator.report import PANELS_PER_ROW, _table_html, _untrained_lines, layer_figure


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


def test_seven_layer_panels_come_in_rows_of_three():
    untrained = _layers({0.0: 1.0, 1.0: 2.0})
    png, per_row = layer_figure(untrained.assign(step=10), 0.125, untrained, ["mix"])
    w, h = Image.open(io.BytesIO(png)).size
    assert per_row == PANELS_PER_ROW == 3 and w < 1700 and h > w / 2  # 3 rows, not one strip 3,200 px wide


def test_tables_scroll_in_their_own_box_without_empty_columns():
    df = pd.DataFrame({"trial": ["t0"], "objective.placement.simmim_layers": [None], "linear_top1": [0.5]})
    html = _table_html(df)
    assert html.startswith('<div class="scroll">') and "placement" not in html and "linear_top1" in html


def test_matched_budgets_that_fall_back_to_step_0_say_so(tmp_path):
    import json

    from orchestrator.layout import SweepLayout
    from orchestrator.report import build_report
    from orchestrator.results import write_trial_tables
    from trainables.config import load_config, to_dict

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
