"""An analysis sweep: saved or released checkpoints x data sets probed on Ray, into a training sweep's tables.

The paper's own workflow: Park et al. trained nothing; they probed the released MoCo v3 and SimMIM ViT-B/16 on
ImageNet validation images. ``clmim analyze CKPT... --data DS --sweep NAME`` runs one Ray task per (checkpoint, data
set) (a GPU each when the cluster has GPUs), each ``trainables.analysis.analyze``: the checkpoint and the untrained
encoder of its architecture, every evaluation a trial runs. The driver writes each task's reports as a trial of
sweep NAME (``results.write_attempts``: ``trials`` with the checkpoint as ``source``, ``curves``, ``layers``,
``robustness``; step 0 the untrained encoder, then the checkpoint: at its step for a clmim file, at step 1 for a
released one), so ``clmim results show``, the claims table
and ``clmim report`` read released models as they read trained ones.

How the claims read it: the trials' objective comes from the layout (MoCo v3 and DINO are CL, SimMIM and MAE MIM;
iBOT, DINOv2 and plain timm weights are groups of their own, in no claim); checkpoints of one objective and model
size are that group's replicates (``n`` counts checkpoints, ``compare.SOURCE``), so one released model a side is
"not testable (1 seed)", with the difference still shown. The architecture (``source_arch``) is recorded: a
BEiT-style SimMIM against a plain-ViT MoCo v3 differs in more than the objective, as in the paper.

Trial ids are derived from (checkpoint, network, data set), so running the command again skips what already
ended (TERMINATED) and runs what is new or errored; the sweep's probe settings (``--set``, ``--img-size``,
``--network``) must then be the same. No MLflow run is logged: the tables are the record.
"""

from __future__ import annotations

import hashlib
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs
import ray

from trainables.analysis import analyze
from trainables.config import load_config
from trainables.errors import UserError
from trainables.storage import Storage

from . import sweep_record
from .console import duration, fmt, print_next_steps
from .layout import SweepLayout, has_results, validate_sweep_name
from .query import query
from .records import Status
from .results import Attempt, write_attempts
from .sweep import init_ray

HEARTBEAT_S = 60.0  # with no trial ended for this long, a progress line says the sweep is alive

@dataclass(frozen=True)
class Job:
    """One trial of an analysis sweep: a checkpoint on a data set (None: the checkpoint's own, or the default)."""

    trial: str
    checkpoint: str
    dataset: str | None

    def overrides(self, base: list[str]) -> list[str]:
        return [*base, f"data.dataset={self.dataset}"] if self.dataset else list(base)


GENERIC = re.compile(r"run|model|checkpoint|step_\d+")  # clmim's own names: the folder above says which trial


def trial_id(checkpoint: str, dataset: str | None, network: str) -> str:
    """'<file stem>-<data set>-<8 hex>': readable, and the same for the same (checkpoint, network, data set); a
    clmim trial's ``run`` folder or ``model.pt`` is named by its trial folder too."""
    path = Path(checkpoint.rstrip("/"))
    stem = path.name.split(".")[0]
    if GENERIC.fullmatch(stem) and path.parent.name:
        stem = f"{path.parent.name}-{stem}"
    stem = re.sub(r"[^A-Za-z0-9_-]+", "-", stem).strip("-_")[:40]
    digest = hashlib.sha1(f"{checkpoint}\0{network}\0{dataset}".encode()).hexdigest()[:8]
    return f"{stem or 'checkpoint'}-{dataset or 'default'}-{digest}"


def plan(checkpoints: list[str], datasets: list[str], network: str) -> list[Job]:
    """Every checkpoint on every data set, in the order given (a repeated pair once)."""
    jobs = [Job(trial_id(c, d, network), c, d) for c in checkpoints for d in datasets or [None]]
    return list({j.trial: j for j in jobs}.values())


def _check_inputs(jobs: list[Job], overrides: list[str]) -> None:
    """Bad input before Ray starts: every data set and override a valid config (the error names the key), every
    local checkpoint present and every s3:// one listed."""
    for dataset in dict.fromkeys(j.dataset for j in jobs):
        load_config({}, Job("", "", dataset).overrides(overrides))
    for c in dict.fromkeys(j.checkpoint for j in jobs):
        if c.startswith("s3://"):
            st = Storage.parse(c, None, Path.cwd())
            try:
                missing = st.fs.get_file_info(st.path()).type == pafs.FileType.NotFound
            except OSError as e:
                raise UserError(f"checkpoint: cannot read {c} ({str(e).splitlines()[0][:200]})") from None
            if missing:
                raise UserError(f"checkpoint: nothing at {c}")
        elif not Path(c).exists():
            raise UserError(f"checkpoint: {c!r} does not exist")


def _task(checkpoint: str, overrides: list[str], img_size: int | None, network: str) -> dict:
    return analyze(checkpoint, overrides, img_size, network)


def _error_text(e: Exception) -> str:
    """One line: a ``UserError``'s message as raised in the task, else the last line of the task's traceback."""
    cause = getattr(e, "cause", None)
    if isinstance(cause, UserError):
        return str(cause)
    lines = [line for line in str(e).splitlines() if line.strip()]
    return lines[-1][:500] if lines else type(e).__name__


def analysis_sweep(name: str, root: Path, checkpoints: list[str], datasets: list[str], overrides: list[str],
                   img_size: int | None = None, network: str = "teacher", address: str | None = None) -> int:
    """Run (or continue) analysis sweep ``name`` under ``root``; the exit code: 0 every trial analysed, 1 some ended
    in ERROR (the reasons printed and in the ``trials`` table), 130 interrupted (what ended is kept)."""
    validate_sweep_name(name, "--sweep")
    layout = SweepLayout(Path(root), name)
    record = sweep_record.read(layout.sweep_dir)
    settings = {"overrides": list(overrides), "img_size": img_size, "network": network}
    if record.analysis is None and (record.info or (layout.sweep_dir / "tune").exists()
                                    or (layout.sweep_dir / "trials").exists()):
        raise UserError(f"--sweep: {name!r} is a training sweep under {root}; give the analysis sweep its own name")
    if record.analysis is not None and {k: record.analysis.get(k) for k in settings} != settings:
        old = {k: record.analysis.get(k) for k in settings}
        raise UserError(f"--sweep: {name!r} was analysed with {old}, not {settings}: its trials must be comparable; "
                        "repeat those settings or name another sweep")
    jobs = plan(checkpoints, datasets, network)
    _check_inputs(jobs, overrides)
    done = set()
    if has_results(layout.sweep_dir):
        done = set(query("SELECT trial FROM trials WHERE sweep = ? AND status = ?", root,
                         [name, Status.TERMINATED.value]).trial)
    before = record.analysis or {}
    sweep_record.write_analysis(layout.sweep_dir, list(dict.fromkeys([*before.get("checkpoints", []), *checkpoints])),
                                list(dict.fromkeys([*before.get("datasets", []), *datasets])), settings,
                                {"results": str(root), "address": address})
    todo = [j for j in jobs if j.trial not in done]
    print(f"clmim analyze: sweep {name}: {len(todo)} trial(s) to analyse"
          + (f", {len(jobs) - len(todo)} already analysed" if len(todo) < len(jobs) else ""), flush=True)
    errors = 0
    if todo:
        init_ray(address)
        gpus = ray.cluster_resources().get("GPU", 0)
        task = ray.remote(_task).options(num_cpus=1, num_gpus=1 if gpus else 0)
        pending = {task.remote(j.checkpoint, j.overrides(overrides), img_size, network): j for j in todo}
        start = time.monotonic()
        try:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=HEARTBEAT_S)
                if not ready:  # long probes (ImageNet val on a CPU): say the sweep is alive
                    print(f"[{len(todo) - len(pending)}/{len(todo)}, {duration(time.monotonic() - start)}] "
                          f"{len(pending)} trial(s) analysing or waiting for a worker", flush=True)
                    continue
                job = pending.pop(ready[0])
                ok, line = _record(layout, job, ready[0])
                errors += not ok
                print(f"[{len(todo) - len(pending)}/{len(todo)}, {duration(time.monotonic() - start)}] {line}",
                      flush=True)
        except KeyboardInterrupt:
            for ref in pending:
                ray.cancel(ref, force=True)
            print(f"sweep {name}: interrupted with {len(pending)} trial(s) unfinished; what ended is kept, and the "
                  "same command analyses the rest", file=sys.stderr)
            return 130
    print_next_steps(layout, str(root))
    if errors:
        print(f"sweep {name}: {errors} trial(s) ended in ERROR (reasons above); the same command runs them again",
              file=sys.stderr)
        return 1
    return 0


def _record(layout: SweepLayout, job: Job, ref) -> tuple[bool, str]:
    """Write one finished task's trial (TERMINATED, or ERROR with its reason): (whether it ran, a line saying so)."""
    try:
        out = ray.get(ref)
    except (ray.exceptions.RayError, UserError) as e:
        error = _error_text(e)
        config = {"data": {"dataset": job.dataset}} if job.dataset else {}
        write_attempts(layout.sweep_dir, [Attempt(job.trial, Status.ERROR.value, config, [], error=error,
                                                  source={"source": job.checkpoint})])
        return False, f"{job.trial}: ERROR: {error}"
    write_attempts(layout.sweep_dir, [Attempt(job.trial, Status.TERMINATED.value, out["config"], out["results"],
                                              final=out["final"], wall_time_s=out["wall_time_s"],
                                              source=out["source"])])
    trained, untrained = out["final"].get("linear_top1"), out["results"][0].get("linear_top1")
    return True, (f"{job.trial}: {out['found']}; linear_top1 {fmt(trained)} (untrained {fmt(untrained)}), "
                  f"{duration(out['wall_time_s'])}")
