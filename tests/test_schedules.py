"""The schedule each PBT trial's final weights trained under, followed back through its exploits."""

import math

import pandas as pd

from orchestrator.schedules import ancestral_schedules, exploit_table

KEY = "objective.lam"


def _trials(**rows) -> pd.DataFrame:
    return pd.DataFrame([{"sweep": "p", "trial": t, "step": 12, KEY: lam} for t, lam in rows.items()])


def _lineage(*exploits) -> pd.DataFrame:
    """(trial, order, step, parent, at, before, after) -> the lineage table's rows (one mutated key)."""
    return pd.DataFrame([{"sweep": "p", "trial": t, "exploit": i, "exploit_id": f"{t}{i}", "step": s,
                          "parent": par, "exploited_at": at, "key": KEY, "before": b, "after": a}
                         for t, i, s, par, at, b, a in exploits])


def _schedule(df: pd.DataFrame, trial: str) -> list[tuple[int, float]]:
    return [(int(s), round(float(v), 6)) for s, v in df[df.trial == trial][["step", "value"]].itertuples(index=False)]


def test_an_exploiting_trial_inherits_its_parents_history_up_to_the_step_it_continued_from():
    # a: 0.2 until step 4, where it took b's checkpoint (b trained 0.8 from 0) and 0.96 from there; c took a's
    # step-8 checkpoint later with 0.5: its weights saw b's 0.8, a's 0.96, then its own 0.5
    trials = _trials(a=0.96, b=0.8, c=0.5)
    lineage = _lineage(("a", 0, 4, "b", 10.0, 0.2, 0.96), ("c", 0, 8, "a", 20.0, 0.6, 0.5))
    df = ancestral_schedules(trials, lineage)
    assert _schedule(df, "a") == [(0, 0.8), (4, 0.96), (12, 0.96)]
    assert _schedule(df, "b") == [(0, 0.8), (12, 0.8)]  # no exploit: its planned value throughout
    assert _schedule(df, "c") == [(0, 0.8), (4, 0.96), (8, 0.5), (12, 0.5)]


def test_a_parents_later_exploit_does_not_rewrite_the_history_a_child_already_took():
    # b exploits d at step 2 only after a has taken b's step-4 checkpoint (at 10): a's weights never saw d's values
    trials = _trials(a=0.96, b=0.3, d=0.1)
    lineage = _lineage(("a", 0, 4, "b", 10.0, 0.2, 0.96), ("b", 0, 2, "d", 30.0, 0.8, 0.3))
    df = ancestral_schedules(trials, lineage)
    assert _schedule(df, "a") == [(0, 0.8), (4, 0.96), (12, 0.96)]
    assert _schedule(df, "b") == [(0, 0.1), (2, 0.3), (12, 0.3)]


def test_no_exploits_no_schedules_and_a_cycle_in_damaged_records_ends():
    assert ancestral_schedules(_trials(a=0.2), _lineage()).empty
    # without wall times two trials exploiting each other would recurse for ever
    lineage = _lineage(("a", 0, 4, "b", math.nan, 0.2, 0.5), ("b", 0, 4, "a", math.nan, 0.8, 0.6))
    df = ancestral_schedules(_trials(a=0.5, b=0.6), lineage)
    assert _schedule(df, "a")[-2:] == [(4, 0.5), (12, 0.5)]


def test_the_exploit_table_shows_each_exploit_once_with_its_keys_before_and_after():
    t = exploit_table(_lineage(("a", 0, 4, "b", 10.0, 0.2, 0.96), ("a", 1, 8, "c", 20.0, 0.96, 0.5)))
    assert t.to_dict("records") == [{"trial": "a", "exploit": 0, "step": 4, "parent": "b", KEY: "0.2 → 0.96"},
                                    {"trial": "a", "exploit": 1, "step": 8, "parent": "c", KEY: "0.96 → 0.5"}]
