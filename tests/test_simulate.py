import subprocess
import sys

import pytest
from conftest import FULL_EVAL, tiny

from trainables.config import ConfigError, load_config
from trainables.simulate import checkpoint_step, simulate
from trainables.trainer import train


def shapes(reports: list[tuple[dict, object]]) -> list[tuple[int, frozenset, bool]]:
    """(step, keys, with a checkpoint) of each report, the values left out."""
    return [(m["step"], frozenset(m), ckpt is not None) for m, ckpt in reports]


@pytest.mark.integration
@pytest.mark.parametrize("over", [
    pytest.param({"objective__lam": 0.5, "eval__every": 2, **FULL_EVAL, "eval__probe_images": 8},
                 marks=[pytest.mark.slow, pytest.mark.extended]),  # (every evaluation: make test-extended)
    {"objective__weights": {"mae": 0.5, "dino": 0.5}, "optim__steps": 5, "run__log_every": 3},
], ids=["simmim+mocov3, every evaluation", "mae+dino, cheap evaluations"])
def test_simulated_trial_reports_the_trainers_keys_at_the_trainers_steps(tmp_path, over):
    """The simulation is only worth its numbers if the driver receives what it would from a real trial: the same
    reports (steps, metric names, layer rows, noise bands), with checkpoints at the same steps."""
    over = {**over, "data__train_size": 128, "run__ckpt_every": 3}
    real, sim = [], []
    train(load_config(tiny(**over), [f"run.out_dir={tmp_path / 'real'}"]),
          lambda m, checkpoint=None: real.append((m, checkpoint)))
    cfg = load_config(tiny(**over), [f"run.out_dir={tmp_path / 'sim'}", "run.simulate.seconds_per_step=0",
                                     "run.simulate.checkpoint_mb=0.01"])
    simulate(cfg, lambda m, checkpoint=None: sim.append((m, checkpoint)), sleep=lambda s: None)
    assert shapes(sim) == shapes(real)
    ckpts = [c for _, c in sim if c is not None]
    assert checkpoint_step(ckpts[-1] / "checkpoint.pt") == sim[-1][0]["step"]
    assert (ckpts[-1] / "checkpoint.pt").stat().st_size == int(0.01 * 2**20)


def test_simulated_trial_resumes_from_its_checkpoint(tmp_path):
    """A resumed simulated trial reports the steps after its checkpoint only, as a resumed real trial does."""
    over = ["run.simulate.seconds_per_step=0", "run.simulate.checkpoint_mb=0", f"run.out_dir={tmp_path}"]
    cfg = load_config(tiny(**{"optim__steps": 8, "run__ckpt_every": 4}), over)
    first = []
    simulate(cfg, lambda m, checkpoint=None: first.append((m, checkpoint)), sleep=lambda s: None)
    at4 = next(c for m, c in first if c is not None and m["step"] == 4)
    cfg.run.resume = str(at4 / "checkpoint.pt")
    again = []
    simulate(cfg, lambda m, checkpoint=None: again.append((m, checkpoint)), sleep=lambda s: None)
    assert [m["step"] for m, _ in again] == [m["step"] for m, _ in first if m["step"] > 4]
    assert again[-1][0]["resumed_from"] == 4


def test_simulated_trial_sleeps_its_steps_and_evaluations():
    slept = []
    cfg = load_config(tiny(**{"optim__steps": 6}), ["run.simulate.seconds_per_step=0.5",
                                                    "run.simulate.seconds_per_eval=2"])
    simulate(cfg, lambda m, checkpoint=None: None, sleep=slept.append)
    assert sum(slept) == pytest.approx(6 * 0.5 + 2 * 2)  # the steps, the untrained and the final evaluation


@pytest.mark.parametrize("setting, says", [
    ("stages=[{steps: 2, set: {objective.lam: 0}}, {steps: 2, set: {objective.lam: 1}}]", "staged runs"),
    ("eval.finetune.steps=4", "fine-tuning"),
    ("data.dataset=digits", "only data.dataset synthetic"),
])
def test_what_is_not_simulated_is_refused_when_the_config_loads(setting, says):
    with pytest.raises(ConfigError, match=f"run.simulate: {says}"):
        load_config(tiny(), ["run.simulate.seconds_per_step=0.1", *(["optim.steps=null"] if "stages" in setting
                                                                    else []), setting])


def test_a_simulated_trial_imports_no_torch():
    """Hundreds of simulated trials share a few cores: their processes must not pay torch's import."""
    code = ("import sys; from trainables.config import load_config; from trainables.simulate import simulate; "
            "import orchestrator.trial; "
            "simulate(load_config({'optim': {'steps': 2}, 'run': {'simulate': {'seconds_per_step': 0}}}), "
            "lambda m, checkpoint=None: None); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
