"""The ``clmim`` command line. Subcommands stay thin: they parse, validate, then call library functions.

Bad input raises ``trainables.errors.UserError`` (config keys, space files, sweep names, SQL, paths): it is
printed as one line naming what was wrong and the exit code is 2, before any expensive work starts (configs are
validated before torch is imported). Exit codes: 0 done, 1 a sweep with errored trials, 2 bad input, 130
interrupted (resumable).

Imports marked ``(start-up)`` load in the command that needs them: torch, Ray, DuckDB, pandas and scipy take
seconds to import, and ``clmim --help`` or a usage error should answer at once
(``tests/test_cli.py::test_start_up_loads_no_query_engine_analysis_or_torch``).
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

from orchestrator.console import duration
from trainables.config import load_config
from trainables.errors import UserError
from trainables.files import write_bytes_atomic
from trainables.vocab import loss_keys, objective_label

from .console import fmt as _fmt
from .console import print_next_steps, print_summary, resume_command
from .layout import find_sweep, results_root
from .rebuild import rebuild
from .results import storage_bytes, write_scaling
from .space import load_space, sample_table


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {v}")
    return v


def cmd_train(args) -> int:
    cfg = load_config(args.config, list(args.set or []))  # validated before torch is imported (below)
    if args.out:
        cfg.run.out_dir = args.out
    elif cfg.run.out_dir is None:
        cfg.run.out_dir = str(Path("runs") / time.strftime("%Y%m%d-%H%M%S"))

    print(f"clmim train: {cfg.model.variant} on {cfg.data.dataset}, {objective_label(cfg.objective.mix())}, "
          f"out={cfg.run.out_dir}", flush=True)
    o, e = cfg.optim, cfg.eval
    length = (f"{o.steps} steps" if o.steps else f"{o.epochs:g} epochs" if o.epochs else
              f"{o.flops_budget:.3g} training FLOPs" if o.flops_budget else "the recipe's length")
    evals = "step 0 (untrained)" + (f", every {e.every} epochs" if e.every else "") + " and the end"
    print(f"plan: {length}, batch {cfg.data.batch_size}; loss every {cfg.run.log_every} steps; probes at {evals}"
          + (f"; checkpoints every {cfg.run.ckpt_every} steps" if cfg.run.ckpt_every else "; a checkpoint at the end")
          + (f"; resuming from {cfg.run.resume}" if cfg.run.resume else ""), flush=True)
    if not cfg.run.resume:
        print("building the data and model, then probing the untrained encoder (step 0) ...", flush=True)
    from trainables.trainer import train  # (start-up)

    t0 = time.time()
    clock: dict[str, float] = {}  # the step-0 evaluation's duration; when and at which step the first log came

    def report(metrics, checkpoint=None):
        step, total = metrics.get("step"), metrics.get("total_steps")
        now = time.time()
        if step == 0:
            clock["eval"] = now - t0
        if "knn_top1" in metrics:  # a probe report (eval.every, or the final one): printed once at the end
            if step == 0:
                print(f"step 0 probed in {duration(now - t0)}; training ...", flush=True)
            return
        head = f"step {step}/{total}" if total else f"step {step}"
        if total and step:
            # seconds per step: from step 1's end on; at step 1 from its own throughput. The end's evaluation is
            # taken to cost what step 0's did.
            if "first" not in clock:  # step 1 (or a resume's first log step)
                clock["first"], clock["first_step"] = now, step
                sps = cfg.data.batch_size / metrics["images_per_s"] if metrics.get("images_per_s") else 0.0
            else:
                sps = (now - clock["first"]) / (step - clock["first_step"])
            head += f" ({100 * step / total:.0f}%, ETA {duration((total - step) * sps + clock.get('eval', 0.0))})"
        keys = [k for k in ("loss", *loss_keys().values(), "lr", "images_per_s", "finetune_loss", "finetune_lr",
                            "finetune_top1") if k in metrics]
        line = "  ".join([head] + [f"{k}={_fmt(metrics[k])}" for k in keys])
        if checkpoint:
            line += "  (checkpoint saved)"
        print(line, flush=True)

    final = train(cfg, report)
    keys = ("loss", "linear_top1", "knn_top1", "shape_bias", "finetune_top1", "params", "train_flops_per_image")
    print("final: " + "  ".join(f"{k}={_fmt(final[k])}" for k in keys if k in final), flush=True)
    n_layer = sum(k.startswith("layer/") for k in final)
    print(f"{n_layer} per-layer probe values and the rest in {Path(cfg.run.out_dir) / 'final_metrics.json'}; "
          f"per-layer tables: clmim analyze {cfg.run.out_dir}", flush=True)
    return 0


def cmd_sweep(args) -> int:
    space = load_space(args.space, args.set)  # trial configs are validated here, before Ray starts
    name = args.name or space.name
    if args.dry_run:
        limit = 50
        rows = sample_table(space, limit=limit)
        n = space.n_trials()
        print_summary({"rows": [{"status": "planned", **r} for r in rows]},
                      f"sweep {name}: {n:,} trial(s), dry run" + (f" (first {len(rows)} shown)" if n > len(rows)
                                                                   else ""))
        return 0
    from .sweep import run_sweep  # (start-up)

    cli_args = {k: v for k, v in vars(args).items() if k != "fn"}
    summary = run_sweep(space, name=name, results=args.results, address=args.address,
                        max_concurrent=args.max_concurrent, overrides=args.set or [], cli_args=cli_args,
                        mlflow_uri=args.mlflow_uri, storage=args.storage, storage_endpoint=args.storage_endpoint)
    return _finish(summary, args.results, args.address)


def _finish(summary: dict, results_arg: str | None, address: str | None) -> int:
    """Print the summary and what to do next (commands that run as printed); the exit code says how it ended."""
    layout = summary["layout"]
    print_summary(summary, f"sweep {layout.name}")
    resume = resume_command(layout.name, results_arg, address, layout.storage)
    if summary["interrupted"]:
        print(f"sweep {layout.name} stopped before every trial ended; continue it with: {resume}", file=sys.stderr)
        return 130
    print_next_steps(layout, results_arg)
    if summary["errored"]:
        print(f"sweep {layout.name}: {summary['errored']} trial(s) ended in ERROR (reasons above); after fixing the "
              f"cause: {resume} --retry-errored", file=sys.stderr)
        return 1
    return 0


def cmd_resume(args) -> int:
    from .sweep import resume_sweep  # (start-up)

    return _finish(resume_sweep(args.name, results=args.results, address=args.address,
                                retry_errored=args.retry_errored, storage=args.storage,
                                storage_endpoint=args.storage_endpoint), args.results, args.address)


def cmd_results_query(args) -> int:
    from .query import query  # (DuckDB: see show)

    df = query(args.sql, results_root(args.results), timeout=args.timeout or None)
    if args.format == "csv":
        print(df.to_csv(index=False), end="")
    elif args.format == "json":
        print(df.to_json(orient="records", indent=2))
    elif df.empty:  # a table of nothing renders as a blank line
        print(f"0 rows (columns: {', '.join(map(str, df.columns))})")
    else:
        _print_frame(df)
    return 0


def _print_frame(df, title: str | None = None) -> None:
    rows = [{k: (None if v != v else v) if isinstance(v, float) else v for k, v in r.items()}
            for r in df.to_dict(orient="records")]
    print_summary({"rows": rows}, title or f"{len(rows)} row(s)", counts=False)


def cmd_results_list(args) -> int:
    root = results_root(args.results)
    from .query import list_table  # (DuckDB: see show)

    df = list_table(root)
    if df.empty:
        print(f"no sweeps under {root} yet (start one: clmim sweep search_spaces/quickstart.yaml)")
        return 0
    _print_frame(df, f"sweeps under {root} (oldest first; `latest`: the newest with finished trials)")
    return 0


# The claims' columns a terminal shows (the HTML report and the Markdown show them all).
CONSOLE_CLAIM_COLUMNS = ["group", "pair", "claim", "MIM", "CL", "untrained", "MIM − untrained", "CL − untrained",
                 "difference [95% CI]", "p (Holm)", "verdict"]


def show(layout):
    """What ``clmim results show`` prints for one sweep: ``summary.sections`` of its frames, the claims narrowed to
    ``CONSOLE_CLAIM_COLUMNS``, then what it stores where."""
    # (DuckDB, pandas, scipy: only the commands that read results pay for them; test_cli.py checks start-up)
    import pandas as pd

    from .query import no_results, sweep_frames  # (start-up)
    from .summary import Section, sections  # (start-up)

    frames = sweep_frames(layout.root, [layout.name])
    if frames.trials.empty:
        raise no_results(layout)
    claims = ("claims", "claims_literature", "evaluations")
    out = [Section(s.key, s.title, s.table[CONSOLE_CLAIM_COLUMNS]) if s.key in claims else s
           for s in sections(frames)]
    b = storage_bytes(layout)
    n = max(1, b["trials"])
    parts = [("results root (tables, reports" + ("" if layout.storage else ", trial files") + ")", b["driver"])]
    if layout.storage:
        parts.append((f"storage {layout.store.display(layout.experiment_path)}", b["storage"]))
    parts.append(("  of which checkpoints and final weights", b["checkpoints"]))
    storage = pd.DataFrame([{"sweep": layout.name, "part": p, "MB": round(v / 1e6, 1),
                             "MB per trial": round(v / n / 1e6, 2)} for p, v in parts])
    return out + [Section("storage", "storage", storage)]


def cmd_results_show(args) -> int:
    for section in show(find_sweep(args.name, results_root(args.results))):
        _print_frame(section.table, section.title)
    return 0


def cmd_results_rebuild(args) -> int:
    layout = find_sweep(args.name, results_root(args.results), need="tune")
    print(f"rebuilt the tables of {rebuild(layout)} trial(s) in {layout.sweep_dir}")
    return 0


def cmd_analyze(args) -> int:
    if args.out and not args.out.endswith((".csv", ".parquet")):
        raise UserError(f"--out: {args.out!r} is not a .csv or .parquet file")
    datasets = args.data or []
    if args.sweep or len(args.checkpoint) > 1 or len(datasets) > 1:
        if not args.sweep:
            raise UserError("analyze: several checkpoints or data sets are an analysis sweep: name it with --sweep "
                            "NAME (its tables go under --results)")
        if args.out:
            raise UserError("--out: for one checkpoint; an analysis sweep writes its rows to the sweep's tables "
                            "(clmim results query)")
        from .analysis import analysis_sweep  # (start-up: Ray)

        return analysis_sweep(args.sweep, results_root(args.results), args.checkpoint, datasets,
                              list(args.set or []), img_size=args.img_size, network=args.network,
                              address=args.address)
    return _analyze_one(args, datasets[0] if datasets else None)


def _analyze_one(args, dataset: str | None) -> int:
    import pandas as pd  # (start-up)

    from trainables.analysis import load_saved  # (start-up: torch)
    from trainables.data import build_data  # (start-up)
    from trainables.probes import run_probes  # (start-up)

    overrides = list(args.set or []) + ([f"data.dataset={dataset}"] if dataset else [])
    saved = load_saved(args.checkpoint[0], overrides, args.img_size, args.network)
    cfg = saved.cfg
    if cfg.run.threads:  # the trial's thread count: the same numbers as the trial recorded
        import torch  # (start-up)

        torch.set_num_threads(cfg.run.threads)
    read = args.checkpoint[0] + (f" -> {saved.file}" if saved.file != args.checkpoint[0] else "")
    print(f"clmim analyze: {read} ({saved.found}; data {cfg.data.dataset} at {cfg.model.img_size} px)", flush=True)
    rows, summary = run_probes(saved.encoder, build_data(cfg), cfg)
    if args.out:  # every row, per head too: what a script reads (the tables below are for reading)
        every = pd.DataFrame(rows, columns=["layer", "head", "metric", "value"]).astype({"head": "Int64"})
        write_bytes_atomic(Path(args.out), every.to_csv(index=False).encode() if args.out.endswith(".csv")
                           else every.to_parquet(index=False))
    df = pd.DataFrame([r for r in rows if r[1] is None], columns=["layer", "head", "metric", "value"])
    table = df.pivot_table(index="layer", columns="metric", values="value").reset_index()
    # one table per kind of probe, so each fits a terminal; a column goes to the first kind it matches
    kinds = {"per-layer attention probes (mean over heads) and, in a mix, gradient cosines": ("attn_", "grad_"),
             "per-layer token and feature-rank probes": ("fourier_", "token_", "effective_", "rankme_"),
             "per-layer probes on GAP features (attentive: all of the last layer's tokens)": ("_gap", "attentive_"),
             "per-layer probes on CLS features": ("_cls",),
             "per-layer, other": ("",)}
    placed: dict[str, list[str]] = {t: [] for t in kinds}
    for c in table.columns.drop("layer"):
        placed[next(t for t, marks in kinds.items() if any(m in c for m in marks))].append(c)
    for title, cols in placed.items():
        if cols:
            _print_frame(table[["layer", *cols]], title)
    print("  ".join(f"{k}={_fmt(v)}" for k, v in summary.items()))
    return 0


def cmd_compare(args) -> int:
    from .cka import compare  # (start-up)

    if (args.trial_b is None) == (not args.untrained):
        raise UserError("compare: give a second SWEEP/TRIAL, or --untrained to compare a trial with its untrained "
                        "encoder")
    table, path = compare(args.trial_a, args.trial_b, results_root(args.results), samples=args.samples)
    grid = table.pivot(index="layer_a", columns="layer_b", values="cka").round(3).reset_index()
    grid.columns = ["layer", *(f"{c}" for c in grid.columns[1:])]
    _print_frame(grid, f"linear CKA, rows: layers of {args.trial_a}; columns: layers of "
                       f"{args.trial_b or 'its untrained encoder'}")
    print(f"table: {path} (heatmap: {path.with_suffix('.png')})")
    return 0


def cmd_data_prepare(args) -> int:
    from .prepare import prepare  # (start-up)

    prepare(args.source, args.dest, args.size, shard_mb=args.shard_mb, overrides=args.set or [],
            endpoint=args.storage_endpoint, address=args.address, verify=args.verify)
    return 0


def cmd_scaling(args) -> int:
    from .query import no_results, sweep_frames  # (DuckDB: see show)
    from .scaling import scaling_table  # (start-up)

    layout = find_sweep(args.name, results_root(args.results))
    frames = sweep_frames(layout.root, [layout.name])
    if frames.trials.empty:
        raise no_results(layout)
    table, what = scaling_table(frames.done, x=args.x, y=args.y, offset=args.offset)
    write_scaling(layout.sweep_dir, table, args.x, args.y, what)
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
    from .report import attach_to_mlflow, build_report  # (start-up)
    from .tracking import default_mlflow_uri  # (start-up)

    layout = find_sweep(args.name, results_root(args.results))
    path, files = build_report(layout, args.out)
    print(f"report: {path} (figures as PNG beside it)")
    if attach_to_mlflow(layout.name, files, default_mlflow_uri(layout.root, args.mlflow_uri)):
        print("attached to the sweep's MLflow parent run (artifacts/report)")
    return 0


def _storage_args(p: argparse.ArgumentParser, resume: bool = False) -> None:
    p.add_argument("--storage", metavar="URI", help=(
        "where the sweep's trial files are (default: as recorded; needed on a machine that never saw the sweep)"
        if resume else "where trials write checkpoints and run files: a path every node mounts, or "
        "s3://BUCKET/PREFIX (default: the results root, for one machine)"))
    p.add_argument("--storage-endpoint", metavar="URL",
                   help="S3-compatible endpoint, e.g. http://127.0.0.1:9000 (default: $AWS_ENDPOINT_URL, else AWS)")


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
    s.add_argument("--max-concurrent", type=_positive_int, help="cap on trials running at once")
    _storage_args(s)
    s.add_argument("--dry-run", action="store_true", help="print the trials as a table and exit")
    s.set_defaults(fn=cmd_sweep)

    r = sub.add_parser("resume", help="continue an interrupted sweep")
    r.add_argument("name")
    r.add_argument("--results", help="results root (default: $CLMIM_RESULTS or ./clmim-results)")
    r.add_argument("--address", help="Ray cluster address")
    r.add_argument("--retry-errored", action="store_true", help="also run errored trials again")
    _storage_args(r, resume=True)
    r.set_defaults(fn=cmd_resume)

    a = sub.add_parser("analyze", help="run every probe on a saved model and print per-layer tables; on several "
                       "(--sweep NAME), an analysis sweep on Ray writing a training sweep's tables")
    a.add_argument("checkpoint", nargs="+", help="a clmim checkpoint (file, step dir or a trial's run dir, also "
                   "s3://...) or a released one: MoCo v3, SimMIM, MAE, DINO, iBOT, DINOv2 or timm ViT weights (its "
                   "layout is recognised and printed)")
    a.add_argument("--data", action="append", help="data set to probe on (default: the checkpoint's; repeat for "
                   "several, with --sweep)")
    a.add_argument("--sweep", metavar="NAME", help="an analysis sweep: every checkpoint x data set a Ray task (a GPU "
                   "each when there are some), the untrained encoder of its architecture beside it, into the tables "
                   "of sweep NAME under --results (results show, the claims and the report read it)")
    a.add_argument("--results", help="results root (default: $CLMIM_RESULTS or ./clmim-results)")
    a.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local instance)")
    a.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (e.g. data.path)")
    a.add_argument("--img-size", type=int, help="released checkpoints: probe at this size (default: the size it "
                   "was trained at; an absolute position embedding is resampled)")
    a.add_argument("--network", choices=("teacher", "student"), default="teacher",
                   help="DINO / iBOT full checkpoints: which network (default: the teacher, as they evaluate)")
    a.add_argument("--out", metavar="FILE", help="also write every per-layer (and per-head) row to FILE "
                   "(.csv or .parquet)")
    a.set_defaults(fn=cmd_analyze)

    cp = sub.add_parser("compare", help="linear CKA between the layers of two trials (or one and its untrained "
                        "encoder)")
    cp.add_argument("trial_a", metavar="SWEEP/TRIAL")
    cp.add_argument("trial_b", metavar="SWEEP/TRIAL", nargs="?")
    cp.add_argument("--untrained", action="store_true", help="compare SWEEP/TRIAL with its own untrained encoder")
    cp.add_argument("--samples", type=_positive_int, default=512, help="eval images (default 512)")
    cp.add_argument("--results", help="results root")
    cp.set_defaults(fn=cmd_compare)

    da = sub.add_parser("data", help="prepare data sets")
    dsub = da.add_subparsers(dest="data_command", required=True)
    dp = dsub.add_parser("prepare", help="decode and resize a data set once into a sharded store (on Ray Data)")
    dp.add_argument("source", help="an ImageFolder tree (train/ and val/, or class folders), or synthetic, digits, "
                    "cifar10, cifar100")
    dp.add_argument("dest", help="the store's folder (a path every node mounts) or s3://BUCKET/PREFIX")
    dp.add_argument("--size", type=int, required=True, help="stored image side in pixels (>= model.img_size)")
    dp.add_argument("--shard-mb", type=float, default=256, help="pixels per shard file, in MB (default 256)")
    dp.add_argument("--set", action="append", metavar="KEY=VALUE", help="data.* setting of a built-in SOURCE")
    dp.add_argument("--storage-endpoint", metavar="URL", help="S3-compatible endpoint (default: $AWS_ENDPOINT_URL)")
    dp.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local instance)")
    dp.add_argument("--verify", action="store_true", help="then check every shard against the index (shapes, "
                    "labels, sha256), also when the store was already prepared")
    dp.set_defaults(fn=cmd_data_prepare)

    sc = sub.add_parser("scaling", help="power-law fits of a metric per objective group")
    sc.add_argument("name")
    sc.add_argument("--x", default="params", choices=["params", "flops", "samples", "data"],
                    help="data: the training set's size (data.fraction, data.train_size)")
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
    q.add_argument("--timeout", type=float, default=60.0, metavar="SECONDS",
                   help="stop a query running longer than this (default 60; 0: no limit)")
    q.set_defaults(fn=cmd_results_query)
    ls = rsub.add_parser("list", help="every sweep: status counts, start date, storage size")
    ls.add_argument("--results", help="results root")
    ls.set_defaults(fn=cmd_results_list)
    sh = rsub.add_parser("show", help="summary of one sweep")
    sh.add_argument("name", help="a sweep name, or `latest`")
    sh.add_argument("--results", help="results root")
    sh.set_defaults(fn=cmd_results_show)
    rb = rsub.add_parser("rebuild", help="rebuild a sweep's Parquet tables from Tune's trial directories")
    rb.add_argument("name")
    rb.add_argument("--results", help="results root")
    rb.set_defaults(fn=cmd_results_rebuild)
    return p


def _one_line_warning(message, category, filename, lineno, file=None, line=None):
    print(f"clmim: warning: {message}", file=file or sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    warnings.showwarning = _one_line_warning
    try:
        return args.fn(args)
    except UserError as e:
        print(f"clmim {args.command}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        name = args.name if args.command == "resume" else getattr(args, "name", None) or "NAME"
        resume = resume_command(name, getattr(args, "results", None), getattr(args, "address", None))
        hint = f"; continue it with: {resume}" + (
            " (clmim results list shows the name)" if name == "NAME" else "") if args.command in (
            "resume", "sweep") else ""
        print(f"clmim {args.command}: interrupted{hint}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
