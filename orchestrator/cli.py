"""The ``clmim`` command line. Subcommands stay thin: they parse, validate, then call library functions.

Bad input (a config error, a missing file) prints one line naming what was wrong and exits with code 2 before
any expensive work starts.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


class UsageError(Exception):
    """Bad input from the user: reported as one line, exit code 2."""


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def cmd_train(args) -> int:
    from trainables.config import load_config
    from trainables.trainer import train

    overrides = list(args.set or [])
    cfg = load_config(args.config, overrides)
    if args.out:
        cfg.run.out_dir = args.out
    elif cfg.run.out_dir is None:
        cfg.run.out_dir = str(Path("runs") / time.strftime("%Y%m%d-%H%M%S"))
    print(f"clmim train: {cfg.model.variant} on {cfg.data.dataset}, lam={cfg.objective.lam}, "
          f"out={cfg.run.out_dir}", flush=True)

    def report(metrics, checkpoint=None):
        keys = [k for k in ("step", "epoch", "loss", "loss_mim", "loss_cl", "lr", "images_per_s") if k in metrics]
        line = "  ".join(f"{k}={_fmt(metrics[k])}" for k in keys)
        if checkpoint:
            line += f"  checkpoint={checkpoint}"
        print(line, flush=True)

    final = train(cfg, report)
    print("final: " + "  ".join(f"{k}={_fmt(v)}" for k, v in final.items()), flush=True)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="clmim", description="CL vs MIM sweeps for self-supervised ViTs.")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="one run, in-process, no Ray")
    t.add_argument("config", nargs="?", help="YAML config (default: the built-in CPU run)")
    t.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a dotted config key")
    t.add_argument("--out", help="output directory (default: runs/<timestamp>)")
    t.set_defaults(fn=cmd_train)
    return p


def main(argv: list[str] | None = None) -> int:
    from trainables.config import ConfigError

    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (ConfigError, UsageError, FileNotFoundError) as e:
        print(f"clmim {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"clmim {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
