"""Sweep overhead: wall time of a sweep versus the summed in-loop training time of the same trials, in one run.

The same N one-worker trials (micro/4, a few steps each) run three ways, one trial at a time:
  1. in a plain loop: ``trainables.trainer.train`` called N times in this process (the floor);
  2. as a sweep with in-process trials (``resources.mode: auto``, the default for one worker);
  3. as a sweep with every trial wrapping a one-worker Ray Train ``TorchTrainer`` (``resources.mode: train``).
Ray is started once, before any timing, on 127.0.0.1.

    python benchmarks/sweep_overhead.py --trials 4 --steps 8
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from orchestrator.space import load_space  # noqa: E402
from orchestrator.sweep import init_ray, run_sweep  # noqa: E402
from trainables.config import load_config  # noqa: E402
from trainables.trainer import train  # noqa: E402


def space_file(tmp: Path, trials: int, steps: int, mode: str) -> Path:
    lams = [round(i / max(1, trials - 1), 3) for i in range(trials)]
    raw = {"name": f"overhead-{mode}",
           "base": {"data": {"train_size": 256, "eval_size": 64, "batch_size": 32}, "eval": {"samples": 64},
                    "optim": {"steps": steps}, "run": {"log_every": max(1, steps // 2), "ckpt_every": steps}},
           "space": {"objective.lam": {"grid": lams}},
           "resources": {"workers": 1, "cpus_per_worker": 1, "mode": mode}, "max_concurrent": 1}
    p = tmp / f"{mode}.yaml"
    p.write_text(yaml.safe_dump(raw))
    return p


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=4)
    ap.add_argument("--steps", type=int, default=8)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="clmim-overhead-"))
    t = time.perf_counter()
    init_ray(None)
    print(f"ray start: {time.perf_counter() - t:.1f} s", flush=True)

    space = load_space(space_file(tmp, args.trials, args.steps, "auto"))
    loop = 0.0
    for lam in space.axes()["objective.lam"][1]:
        cfg = load_config(space.base, {"objective.lam": lam, "run.out_dir": str(tmp / f"loop-{lam}"),
                                       "run.threads": 1})
        t = time.perf_counter()
        train(cfg)
        loop += time.perf_counter() - t
    rows = [("plain loop (sum of train() calls)", loop)]
    for mode in ("auto", "train"):
        sp = load_space(space_file(tmp, args.trials, args.steps, mode))
        t = time.perf_counter()
        summary = run_sweep(sp, results=str(tmp / "results"))
        wall = time.perf_counter() - t
        assert all(r["status"] == "TERMINATED" for r in summary["rows"]), summary
        rows.append((f"sweep, {'in-process trials' if mode == 'auto' else 'Ray Train per trial'}", wall))
    n = args.trials
    print(f"\n{n} trials x {args.steps} steps, micro/4, one trial at a time")
    print(f"{'how':<38}{'wall s':>8}{'x loop':>8}{'overhead s/trial':>18}")
    for name, wall in rows:
        print(f"{name:<38}{wall:>8.1f}{wall / loop:>8.2f}{(wall - loop) / n:>18.1f}")


if __name__ == "__main__":
    main()
