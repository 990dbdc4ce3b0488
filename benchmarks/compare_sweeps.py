"""Compare two runs of one space (e.g. before and after a refactor, same seeds): every trial's final encoder
weights bit for bit, matched by lam, and the tables equal except timings and ids.

    python benchmarks/compare_sweeps.py ROOT_BEFORE ROOT_AFTER    (each a results root holding one sweep)

Tables an earlier version wrote are read through today's migration (``trainables/migrate.py``)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from orchestrator.query import query  # noqa: E402
from trainables.checkpoints import load_weights  # noqa: E402

TIMING = ("wall_time_s", "images_per_s", "written_at", "attempt", "trial", "sweep", "run.out_dir", "schema_version")


def weights(root: Path) -> dict:
    """{lam: the final encoder state dict} of every trial under ``root``."""
    out = {}
    for f in sorted(root.glob("**/run/model.pt")):
        ckpt = load_weights(f)
        out[ckpt["config"]["objective"]["lam"]] = ckpt["model"]
    return out


def trials(root: Path):
    d = query("SELECT * FROM trials ORDER BY lam", root)
    return d.drop(columns=[c for c in d.columns if c in TIMING or c.startswith(("seconds_", "time"))])


def main() -> None:
    a, b = Path(sys.argv[1]), Path(sys.argv[2])
    wa, wb = weights(a), weights(b)
    if not wa or sorted(wa) != sorted(wb):
        raise SystemExit(f"compare_sweeps: different trials: {sorted(wa)} against {sorted(wb)}")
    for lam in sorted(wa):
        same = wa[lam].keys() == wb[lam].keys() and all(torch.equal(wa[lam][k], wb[lam][k]) for k in wa[lam])
        print(f"lam={lam}: {len(wa[lam])} tensors, bit-equal: {same}")
    ta, tb = trials(a), trials(b)
    cols = sorted(set(ta.columns) | set(tb.columns))
    differ = [c for c in cols if c not in ta or c not in tb
              or not ta[c].reset_index(drop=True).equals(tb[c].reset_index(drop=True))]
    print(f"trials: {len(ta)} / {len(tb)} rows, {len(cols)} columns, differing: {differ}")
    for t, order in (("curves", "step, metric"), ("layers", "step, layer, head, metric"),
                     ("robustness", "step, band, metric")):
        sql = (f"SELECT t.lam, x.* EXCLUDE (sweep, trial, attempt, schema_version) FROM {t} x JOIN trials t "
               "USING (sweep, trial) WHERE metric NOT LIKE 'seconds%' AND metric <> 'images_per_s' "
               f"ORDER BY t.lam, {order}")
        xa, xb = query(sql, a), query(sql, b)
        same = xa.shape == xb.shape and all(xa[c].equals(xb[c]) for c in xa.columns)
        print(f"{t}: {len(xa)} / {len(xb)} rows, equal: {same}")


if __name__ == "__main__":
    main()
