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


def cmd_sweep(args) -> int:
    from .space import load_space, sample_table
    from .sweep import run_sweep

    space = load_space(args.space, args.set)  # every trial config is validated here, before Ray starts
    name = args.name or space.name
    if args.dry_run:
        from .sweep import print_summary

        print_summary({"rows": [{"status": "planned", **r} for r in sample_table(space)]},
              f"sweep {name}: {space.n_trials()} trial(s), dry run")
        return 0
    cli_args = {k: v for k, v in vars(args).items() if k != "fn"}
    summary = run_sweep(space, name=name, results=args.results, address=args.address,
                        max_concurrent=args.max_concurrent, overrides=args.set or [], cli_args=cli_args,
                        mlflow_uri=args.mlflow_uri)
    return _finish(summary, name)


def _finish(summary: dict, name: str) -> int:
    from .sweep import print_summary

    print_summary(summary, f"sweep {name}")
    if summary["interrupted"]:
        print(f"sweep {name} was interrupted; continue it with: clmim resume {name}", file=sys.stderr)
        return 130
    return 0


def cmd_resume(args) -> int:
    from .sweep import resume_sweep

    return _finish(resume_sweep(args.name, results=args.results, address=args.address,
                                retry_errored=args.retry_errored), args.name)


def cmd_results_query(args) -> int:
    from .results import query
    from .sweep import results_root

    df = query(args.sql, results_root(args.results))
    if args.format == "csv":
        print(df.to_csv(index=False), end="")
    elif args.format == "json":
        print(df.to_json(orient="records", indent=2))
    else:
        _print_frame(df)
    return 0


def _print_frame(df, title: str | None = None) -> None:
    from .sweep import print_summary

    rows = [{k: (None if v != v else v) if isinstance(v, float) else v for k, v in r.items()}
            for r in df.to_dict(orient="records")]
    print_summary({"rows": rows}, title or f"{len(rows)} row(s)", counts=False)


def cmd_results_show(args) -> int:
    from .results import show
    from .sweep import results_root

    for title, df in show(args.name, results_root(args.results)):
        _print_frame(df, title)
    return 0


def cmd_results_rebuild(args) -> int:
    from .results import rebuild
    from .sweep import results_root

    sweep_dir = results_root(args.results) / args.name
    if not sweep_dir.is_dir():
        raise UsageError(f"sweep {args.name!r} not found under {sweep_dir.parent}")
    print(f"rebuilt the tables of {rebuild(sweep_dir)} trial(s) in {sweep_dir}")
    return 0


def cmd_analyze(args) -> int:
    import pandas as pd
    import torch

    from trainables.config import load_config
    from trainables.data import build_data
    from trainables.model import ViT
    from trainables.objectives import build_objective
    from trainables.probes import run_probes
    from trainables.trainer import find_checkpoint

    path = find_checkpoint(args.checkpoint)
    if path is None:
        raise UsageError(f"checkpoint: nothing loadable at {args.checkpoint!r}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unreadable file is a usage error
        raise UsageError(f"checkpoint: {str(path)!r} is not a torch file ({type(e).__name__})") from None
    overrides = list(args.set or []) + ([f"data.dataset={args.data}"] if args.data else [])
    if isinstance(ckpt, dict) and "model" in ckpt and "config" in ckpt:  # a clmim checkpoint
        cfg = load_config(ckpt["config"], overrides)
        objective = build_objective(cfg)
        objective.load_state_dict(ckpt["model"])
        encoder = objective.encoder
    else:  # timm VisionTransformer weights
        if not args.variant:
            raise UsageError("--variant: needed for plain timm weights (e.g. --variant B/16 --img-size 224)")
        cfg = load_config({"model": {"variant": args.variant, "img_size": args.img_size}}, overrides)
        encoder = ViT(cfg.model.variant, cfg.model.img_size)
        state = ckpt.get("state_dict", ckpt.get("model", ckpt)) if isinstance(ckpt, dict) else ckpt
        missing, _ = encoder.vit.load_state_dict(state, strict=False)
        if any(k.startswith("blocks.") for k in missing):
            raise UsageError(f"checkpoint: weights do not fit {cfg.model.variant} at {cfg.model.img_size} px "
                             f"(missing {missing[0]})")
    print(f"clmim analyze: {path} ({cfg.model.variant}, data {cfg.data.dataset})", flush=True)
    rows, summary = run_probes(encoder, build_data(cfg), cfg)
    df = pd.DataFrame([r for r in rows if r[1] is None], columns=["layer", "head", "metric", "value"])
    table = df.pivot_table(index="layer", columns="metric", values="value").reset_index()
    _print_frame(table, "per-layer probes (attention metrics: mean over heads)")
    print("  ".join(f"{k}={_fmt(v)}" for k, v in summary.items()))
    return 0


def cmd_scaling(args) -> int:
    from .scaling import scaling_table
    from .sweep import results_root

    table, what = scaling_table(args.name, results_root(args.results), x=args.x, y=args.y, offset=args.offset)
    _print_frame(table, f"power-law fits, {what}, 95% interval of b")
    fitted = table.dropna(subset=["b"]) if "b" in table else table.iloc[0:0]
    if len(fitted) >= 2:
        order = fitted.sort_values("b")
        print(f"steepest scaling: {order.group.iloc[0]} (b = {order.b.iloc[0]:.3g}); "
              f"shallowest: {order.group.iloc[-1]} (b = {order.b.iloc[-1]:.3g}); more negative b = error falls "
              "faster with " + args.x)
    elif len(fitted) < len(table):
        print("some groups have too few points to fit (see note)")
    return 0


def cmd_report(args) -> int:
    from .report import attach_to_mlflow, build_report
    from .sweep import results_root
    from .tracking import default_mlflow_uri

    root = results_root(args.results)
    path = build_report(args.name, root, args.out)
    print(f"report: {path} (figures as PNG beside it)")
    if attach_to_mlflow(args.name, root, path, default_mlflow_uri(root, args.mlflow_uri)):
        print("attached to the sweep's MLflow parent run (artifacts/report)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="clmim", description="CL vs MIM sweeps for self-supervised ViTs.")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="one run, in-process, no Ray")
    t.add_argument("config", nargs="?", help="YAML config (default: the built-in CPU run)")
    t.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a dotted config key")
    t.add_argument("--out", help="output directory (default: runs/<timestamp>)")
    t.set_defaults(fn=cmd_train)

    s = sub.add_parser("sweep", help="run a search space on Ray Tune")
    s.add_argument("space", help="search space YAML (see search_spaces/)")
    s.add_argument("--set", action="append", metavar="KEY=VALUE", help="fix a dotted config key for every trial")
    s.add_argument("--name", help="sweep name (default: the space's name)")
    s.add_argument("--results", help="results root (default: $CLMIM_RESULTS or ./clmim-results)")
    s.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local instance)")
    s.add_argument("--mlflow-uri", help="MLflow tracking URI (default: sqlite under the results root)")
    s.add_argument("--max-concurrent", type=int, help="cap on trials running at once")
    s.add_argument("--dry-run", action="store_true", help="print the trials as a table and exit")
    s.set_defaults(fn=cmd_sweep)

    r = sub.add_parser("resume", help="continue an interrupted sweep")
    r.add_argument("name")
    r.add_argument("--results", help="results root (default: $CLMIM_RESULTS or ./clmim-results)")
    r.add_argument("--address", help="Ray cluster address")
    r.add_argument("--retry-errored", action="store_true", help="also run errored trials again")
    r.set_defaults(fn=cmd_resume)

    a = sub.add_parser("analyze", help="run every probe on a saved model and print per-layer tables")
    a.add_argument("checkpoint", help="a clmim checkpoint (file, step dir or run dir) or timm ViT weights")
    a.add_argument("--data", help="data set to probe on (default: the checkpoint's)")
    a.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (e.g. data.path)")
    a.add_argument("--variant", help="for plain timm weights: scale/patch, e.g. B/16")
    a.add_argument("--img-size", type=int, default=224, help="for plain timm weights")
    a.set_defaults(fn=cmd_analyze)

    sc = sub.add_parser("scaling", help="power-law fits of a metric per objective group")
    sc.add_argument("name")
    sc.add_argument("--x", default="params", choices=["params", "flops", "samples"])
    sc.add_argument("--y", default="linear_top1", help="a trials column (accuracies are fitted as 1 - accuracy)")
    sc.add_argument("--offset", action="store_true", help="fit y = a * x^b + c")
    sc.add_argument("--results", help="results root")
    sc.set_defaults(fn=cmd_scaling)

    rp = sub.add_parser("report", help="one self-contained HTML page for a sweep")
    rp.add_argument("name")
    rp.add_argument("--out", help="HTML path (default: <results>/<sweep>/report/report.html)")
    rp.add_argument("--results", help="results root")
    rp.add_argument("--mlflow-uri", help="MLflow tracking URI (default: as for the sweep)")
    rp.set_defaults(fn=cmd_report)

    res = sub.add_parser("results", help="query the results tables")
    rsub = res.add_subparsers(dest="results_command", required=True)
    q = rsub.add_parser("query", help="run SQL over the views trials, curves, layers (every sweep)")
    q.add_argument("sql")
    q.add_argument("--results", help="results root")
    q.add_argument("--format", choices=["table", "csv", "json"], default="table")
    q.set_defaults(fn=cmd_results_query)
    sh = rsub.add_parser("show", help="summary of one sweep")
    sh.add_argument("name")
    sh.add_argument("--results", help="results root")
    sh.set_defaults(fn=cmd_results_show)
    rb = rsub.add_parser("rebuild", help="rebuild a sweep's Parquet tables from Tune's trial directories")
    rb.add_argument("name")
    rb.add_argument("--results", help="results root")
    rb.set_defaults(fn=cmd_results_rebuild)
    return p


def main(argv: list[str] | None = None) -> int:
    from trainables.config import ConfigError

    from .results import QueryError
    from .space import SpaceError

    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (ConfigError, SpaceError, QueryError, UsageError, FileNotFoundError) as e:
        print(f"clmim {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"clmim {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
