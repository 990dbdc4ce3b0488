"""Ray Tune alone, the baseline of ``sweep_scale.py``: the same simulated trials (the product's trial entry point,
``trial.run_trial``, with the sweep's Tune settings) run by a bare ``Tuner`` with no clmim callback, no MLflow, no
tables and Tune's default console output.

    python benchmarks/tune_alone.py SPACE.yaml RESULTS ADDRESS
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ray import tune  # noqa: E402

from orchestrator.layout import SweepLayout  # noqa: E402
from orchestrator.records import Plan  # noqa: E402
from orchestrator.searcher import TrialSearcher  # noqa: E402
from orchestrator.space import load_space, plan_values  # noqa: E402
from orchestrator.sweep import _trainable, _tune_config, init_ray  # noqa: E402


def main() -> None:
    space_file, results, address = sys.argv[1:4]
    space = load_space(Path(space_file))
    layout = SweepLayout(Path(results), space.name)
    layout.sweep_dir.mkdir(parents=True, exist_ok=True)
    init_ray(address)
    plan = Plan.new(plan_values(space))
    searcher = TrialSearcher(list(plan.trials.items()), space.search.metric, space.search.mode,
                             prefix=plan.prefix, next_index=len(plan.trials))
    tuner = tune.Tuner(_trainable(space, layout), tune_config=_tune_config(space, searcher, space.max_concurrent),
                       run_config=tune.RunConfig(name="tune", storage_path=layout.experiment_path, verbose=1))
    tuner.fit()


if __name__ == "__main__":
    main()
