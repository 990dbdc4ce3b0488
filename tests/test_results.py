import json
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from sweeps import few_reports, table_cfg

from orchestrator.cli import main, show
from orchestrator.layout import SweepLayout, find_sweep
from orchestrator.query import QueryError, connect, query, relation
from orchestrator.rebuild import rebuild
from orchestrator.results import SCHEMA_VERSION, curves_from_results, read_manifest, write_trial_tables
from trainables.config import load_config, to_dict
from trainables.errors import UserError


def cfg(lam=0.5, variant="micro/4"):
    return to_dict(load_config({}, [f"objective.lam={lam}", f"model.variant={variant}"]))


def reports(n_steps=3, final=0.5, lam=0.5):
    out = [{"step": s, "epoch": s / 2, "loss": 2.0 - s * 0.1, "lr": 1e-3, "training_iteration": s}
           for s in range(1, n_steps + 1)]
    out.append({"step": n_steps, "epoch": n_steps / 2, "loss": 1.5, "knn_top1": final / 2, "linear_top1": final,
                "params": 1000, "train_flops_per_image": 1e6, "layer/1/nmi": 0.3, "layer/1/h0/attn_dist": 4.0,
                "layer/2/nmi": 0.1, "done": True})
    return out


def test_views_hold_latest_attempt_once(tmp_path):
    sweep = tmp_path / "s1"
    write_trial_tables(sweep, "t1", "ERROR", cfg(0.0), reports(2, 0.1), error="boom")
    write_trial_tables(sweep, "t1", "TERMINATED", cfg(0.0), reports(3, 0.4))  # a retry supersedes the first
    write_trial_tables(sweep, "t2", "TERMINATED", cfg(1.0), reports(3, 0.6))
    df = query("SELECT trial, status, linear_top1, objective, \"objective.lam\", schema_version FROM trials "
               "ORDER BY trial", tmp_path)
    assert list(df.trial) == ["t1", "t2"] and list(df.status) == ["TERMINATED", "TERMINATED"]
    assert list(df.linear_top1) == [0.4, 0.6] and list(df.objective) == ["simmim", "mocov3"]
    assert (df.schema_version == SCHEMA_VERSION).all()
    curves = query("SELECT trial, step, metric, count(*) AS n FROM curves GROUP BY ALL HAVING n > 1", tmp_path)
    assert len(curves) == 0  # no duplicate (trial, step, metric)
    assert query("SELECT max(step) AS s FROM curves WHERE trial = 't1'", tmp_path).s[0] == 3
    layers = query("SELECT layer, head, metric, value FROM layers WHERE trial = 't2' ORDER BY layer, metric",
                   tmp_path)
    assert layers.to_dict("records")[0] == {"layer": 1, "head": 0, "metric": "attn_dist", "value": 4.0}
    assert len(relation("trials", tmp_path).df()) == 2


def test_repeated_steps_keep_last_value():
    res = [{"step": 4, "loss": 1.0}, {"step": 8, "loss": 0.9}, {"step": 4, "loss": 0.7}]
    assert curves_from_results(res) == [(4, None, "loss", 0.7), (8, None, "loss", 0.9)]


def test_queries_are_read_only(tmp_path):
    write_trial_tables(tmp_path / "s", "t", "TERMINATED", cfg(), reports())
    for sql in ["DELETE FROM trials", "COPY trials TO 'x.parquet'", "CREATE TABLE x AS SELECT 1",
                "SELECT 1; SELECT 2", "DROP VIEW trials", "SELEC 1"]:
        with pytest.raises(QueryError):
            query(sql, tmp_path)
    assert len(list((tmp_path / "s" / "trials").glob("*.parquet"))) == 1


def test_empty_root_has_empty_views(tmp_path):
    assert len(query("SELECT * FROM trials", tmp_path)) == 0
    assert len(query("SELECT * FROM curves", tmp_path)) == 0


def _writer(args):
    root, i = args
    write_trial_tables(Path(root) / f"sweep{i % 4}", f"trial{i:03d}", "TERMINATED", cfg(i % 2), reports(5, i / 100))
    # every 8th process also writes a second attempt of another process's trial, racing with it
    if i % 8 == 0:
        write_trial_tables(Path(root) / f"sweep{(i + 1) % 4}", f"trial{i + 1:03d}", "TERMINATED", cfg(),
                           reports(5, 0.99))


@pytest.mark.integration
def test_32_concurrent_writers_lose_and_duplicate_nothing(tmp_path):
    with mp.get_context("fork").Pool(32) as pool:
        pool.map(_writer, [(str(tmp_path), i) for i in range(32)], chunksize=1)
    df = query("SELECT sweep, trial FROM trials", tmp_path)
    assert len(df) == 32 and df.trial.nunique() == 32
    curves = query("SELECT count(*) AS n FROM curves", tmp_path).n[0]
    assert curves == 32 * (5 * 2 + 2)  # loss and lr per step, plus final knn/linear at step 5
    assert not list(tmp_path.rglob("*.tmp"))


def test_rebuild_from_tune_dirs_and_show(tmp_path):
    sweep = tmp_path / "rb"
    for i, (lam, ok) in enumerate([(0.0, True), (1.0, True), (0.5, False)]):
        d = sweep / "tune" / f"abc_0000{i}"
        (d / "run").mkdir(parents=True)
        (d / "run" / "config.yaml").write_text(yaml.safe_dump(cfg(lam)))
        (d / "result.json").write_text("\n".join(json.dumps(r) for r in reports(3, 0.3 + i / 10)) + "\n{torn")
        if not ok:
            (d / "error.json").write_text(json.dumps({"type": "ValueError", "message": "bad", "traceback": ""}))
    assert rebuild(SweepLayout(tmp_path, "rb")) == 3
    df = query("SELECT trial, status, error FROM trials ORDER BY trial", tmp_path)
    assert list(df.status) == ["TERMINATED", "TERMINATED", "ERROR"] and df.error[2] == "ValueError: bad"
    titles = [sec.title for sec in show(find_sweep("rb", tmp_path))]
    assert titles[0] == "status" and "failed or unfinished trials" in titles
    with pytest.raises(UserError, match="not found"):
        find_sweep("nope", tmp_path)
    assert connect(tmp_path).execute("SELECT count(*) FROM layers").fetchone()[0] == 3 * 3


@pytest.mark.integration
def test_compaction_keeps_every_row_once(tmp_path):
    from orchestrator.results import compact

    sweep = tmp_path / "c"
    for i in range(5):
        write_trial_tables(sweep, f"t{i}", "TERMINATED", cfg(i % 2), reports(3, i / 10))
    write_trial_tables(sweep, "t0", "TERMINATED", cfg(0), reports(3, 0.9))  # a later attempt of t0
    tables = ("trials", "curves", "layers", "robustness")
    before = {t: query(f"SELECT * FROM {t} ORDER BY ALL", tmp_path) for t in tables}

    def n_files():  # files a reader sees (the manifest's current files)
        m = read_manifest(sweep)
        return [len(m["current"][t]) for t in tables]

    def unchanged():
        for t, df in before.items():
            after = query(f"SELECT * FROM {t} ORDER BY ALL", tmp_path)
            assert after.equals(df), t

    # while a sweep runs: per-attempt files merged 4 at a time, 6 per table -> one merged file + 2 left
    assert compact(sweep, batch=4) == 16 and n_files() == [3, 3, 3, 3]
    assert compact(sweep, batch=4) == 0  # fewer than 4 per-attempt files left; merged files are not rewritten
    unchanged()
    assert compact(sweep) == 12 and n_files() == [1, 1, 1, 1]  # sweep end: everything into one file
    unchanged()
    # merged-away originals stay on disk for readers holding an older snapshot, then go after the grace period
    assert len(list((sweep / "trials").glob("*.parquet"))) == 6 + 2
    import orchestrator.results as results

    results.GRACE_S, grace = 0.0, results.GRACE_S
    try:
        compact(sweep)
    finally:
        results.GRACE_S = grace
    assert [len(list((sweep / t).glob("*.parquet"))) for t in tables] == [1, 1, 1, 1]
    unchanged()
    assert query("SELECT linear_top1 FROM trials WHERE trial = 't0'", tmp_path).linear_top1[0] == 0.9



def _exploit(eid, step, parent, at, lam):
    return {"exploit": eid, "step": step, "parent": parent, "at": at,
            "before": {"objective.lam": 0.2, "optim.lr_scale": 1.0}, "after": {"objective.lam": lam,
                                                                              "optim.lr_scale": 1.2}}


def test_a_pbt_trials_exploits_land_in_the_lineage_view_once_and_a_newer_attempt_supersedes_them(tmp_path):
    from orchestrator.results import compact

    sweep = tmp_path / "p"
    write_trial_tables(sweep, "t1", "RUNNING", cfg(0.2), reports(2))
    assert not (sweep / "lineage").exists()  # no exploits: no lineage file (a non-PBT sweep writes none)
    first = [_exploit("e1", 4, "t2", 100.0, 0.8)]
    write_trial_tables(sweep, "t1", "TERMINATED", cfg(0.2), reports(3), lineage=first)
    # a resumed driver records the trial again, its lineage now with a second exploit: the newer attempt's rows only
    write_trial_tables(sweep, "t1", "TERMINATED", cfg(0.2), reports(3), lineage=[*first,
                                                                                _exploit("e2", 8, "t3", 200.0, 0.5)])
    write_trial_tables(sweep, "t2", "TERMINATED", cfg(0.8), reports(3))
    sql = "SELECT trial, exploit, exploit_id, step, parent, exploited_at, key, before, after FROM lineage ORDER BY ALL"
    df = query(sql, tmp_path)
    assert df.to_dict("records") == [
        {"trial": "t1", "exploit": 0, "exploit_id": "e1", "step": 4, "parent": "t2", "exploited_at": 100.0,
         "key": "objective.lam", "before": 0.2, "after": 0.8},
        {"trial": "t1", "exploit": 0, "exploit_id": "e1", "step": 4, "parent": "t2", "exploited_at": 100.0,
         "key": "optim.lr_scale", "before": 1.0, "after": 1.2},
        {"trial": "t1", "exploit": 1, "exploit_id": "e2", "step": 8, "parent": "t3", "exploited_at": 200.0,
         "key": "objective.lam", "before": 0.2, "after": 0.5},
        {"trial": "t1", "exploit": 1, "exploit_id": "e2", "step": 8, "parent": "t3", "exploited_at": 200.0,
         "key": "optim.lr_scale", "before": 1.0, "after": 1.2}]
    compact(sweep)
    assert query(sql, tmp_path).equals(df)
    assert len(read_manifest(sweep)["current"]["lineage"]) == 1

def test_trials_name_the_objective_mix_and_weights(tmp_path):
    from trainables.config import load_config, to_dict

    sweep = tmp_path / "s1"
    for trial, over in (("t1", ["objective.weights.mae=1"]), ("t2", ["objective.lam=0.25"]),
                        ("t3", ["objective.weights={simmim: 0.5, dino: 0.5}"])):
        write_trial_tables(sweep, trial, "TERMINATED", to_dict(load_config({}, over)), reports(3, 0.5))
    write_trial_tables(sweep, "t4", "TERMINATED", cfg(1.0), reports(3, 0.5))  # a config from before weights
    df = query("SELECT trial, objective, mix, lam, w_simmim, w_mocov3, w_mae, w_dino FROM trials ORDER BY trial",
               tmp_path)
    assert list(df.objective) == ["mae", "mix", "mix", "mocov3"]
    assert list(df["mix"]) == ["MAE", "lam=0.25", "mix 0.5 SimMIM + 0.5 DINO", "MoCo v3"]
    assert df.lam.isna().tolist() == [True, False, True, False] and df.lam[1] == 0.25
    assert df.w_mae.tolist() == [1.0, 0.0, 0.0, 0.0] and df.w_simmim.tolist() == [0.0, 0.75, 0.5, 0.0]
    assert df.w_dino.tolist() == [0.0, 0.0, 0.5, 0.0] and df.w_mocov3.tolist() == [0.0, 0.25, 0.0, 1.0]


# ------------------------------------------------------------------------ a shared results root (issue 23, 2-4, 11)
def _forge(path, table, sweep, trial, **cols):
    """A Parquet file named and tagged like the product's (an attacker can copy both)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    t = pa.table({"schema_version": pa.array([SCHEMA_VERSION], pa.int32()), "sweep": [sweep], "trial": [trial],
                  "attempt": ["99999999999999999999-ffffffff"], "status": ["TERMINATED"], **cols})
    pq.write_table(t.replace_schema_metadata({"clmim_schema_version": str(SCHEMA_VERSION)}), path)


def test_manifest_entries_outside_their_table_folder_are_never_followed(tmp_path):
    from orchestrator.results import ResultsWarning, compact

    root = tmp_path / "results"
    write_trial_tables(root / "s", "t1", "TERMINATED", cfg(), reports())
    victims = [tmp_path / "VICTIM.txt", tmp_path / "abs" / "VICTIM"]
    for v in victims:
        v.parent.mkdir(exist_ok=True)
        v.write_text("keep me")
    secret = tmp_path / "secretdir"
    secret.mkdir()
    (secret / "token").write_text("s3cret")
    _forge(secret / "any.parquet", "trials", "s", "t1")
    m = json.loads((root / "s" / "manifest.json").read_text())
    m["retired"].update({"../../VICTIM.txt": 0, str(victims[1]): 0, "trials/../../../VICTIM.txt": 0})
    m["current"]["trials"].append("../../../secretdir/any.parquet")
    (root / "s" / "manifest.json").write_text(json.dumps(m))
    with pytest.warns(ResultsWarning, match="not clmim file names"):
        write_trial_tables(root / "s", "t2", "TERMINATED", cfg(), reports())  # changes the manifest
        compact(root / "s")
    assert all(v.read_text() == "keep me" for v in victims)
    m = json.loads((root / "s" / "manifest.json").read_text())
    assert not any(".." in k or k.startswith("/") for k in [*m["retired"], *m["current"]["trials"]])
    with pytest.raises(QueryError):
        query(f"SELECT * FROM read_text('{secret / 'token'}')", root)
    assert len(query("SELECT * FROM trials", root)) == 2


def test_duckdb_reads_only_the_table_folders_and_no_temp_directory(tmp_path, monkeypatch):
    root = tmp_path / "results"
    write_trial_tables(root / "s", "t1", "TERMINATED", cfg(), reports())
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".tmp").mkdir()
    (tmp_path / ".tmp" / "secret.txt").write_text("s3cret")  # DuckDB's default temp directory: <cwd>/.tmp
    for sql in ("SELECT * FROM read_text('.tmp/secret.txt')", f"SELECT * FROM read_text('{tmp_path}/.tmp/*')",
                f"SELECT * FROM read_text('{root}/s/manifest.json')"):
        with pytest.raises(QueryError):
            query(sql, root)
    assert len(query("SELECT * FROM curves", root)) > 0


def test_a_query_has_a_time_limit_the_user_can_raise(tmp_path, capsys):
    import time


    write_trial_tables(tmp_path / "s", "t1", "TERMINATED", cfg(), reports())
    t = time.time()
    with pytest.raises(QueryError, match="stopped after 1 s"):
        query("SELECT count(*) FROM range(100000000000000)", tmp_path, timeout=1)
    assert time.time() - t < 10
    assert main(["results", "query", "SELECT count(*) AS n FROM range(10)", "--results", str(tmp_path),
                 "--timeout", "5", "--format", "csv"]) == 0
    assert capsys.readouterr().out.split() == ["n", "10"]


def test_without_a_manifest_only_the_products_files_of_that_sweep_are_read(tmp_path):
    from orchestrator.results import ResultsWarning

    write_trial_tables(tmp_path / "s", "t0", "TERMINATED", cfg(), reports(final=0.4))
    for manifest in ("", "{garbage"):
        (tmp_path / "s" / "manifest.json").write_text(manifest) if manifest else (
            tmp_path / "s" / "manifest.json").unlink(missing_ok=True)
        # forged: our name pattern and footer, a later attempt id, but a text `loss` / another sweep's rows
        _forge(tmp_path / "s" / "trials" / "t0.99999999999999999999-ffffffff.parquet", "trials", "s", "t0",
               loss=["boom"])
        _forge(tmp_path / "s" / "trials" / "t7.99999999999999999999-ffffffff.parquet", "trials", "other", "t7",
               loss=[0.1])
        with pytest.warns(ResultsWarning):
            df = query("SELECT trial, loss, linear_top1 FROM trials", tmp_path)
        assert list(df.trial) == ["t0"] and list(df.linear_top1) == [0.4] and str(df.loss.dtype) == "float64"


def test_a_missing_listed_file_is_named_and_the_other_sweeps_still_answer(tmp_path, capsys):
    from orchestrator.results import ResultsWarning

    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "sweep.json").write_text(json.dumps({"name": name, "n_trials": 1}))
        write_trial_tables(tmp_path / name, "t1", "TERMINATED", cfg(), reports())
    gone = next((tmp_path / "a" / "trials").glob("t1.*.parquet"))
    gone.unlink()
    with pytest.warns(ResultsWarning, match=rf"sweep a: 1 listed file\(s\) missing \(trials/{gone.name}\)"):
        df = query("SELECT sweep FROM trials", tmp_path)
    assert list(df.sweep) == ["b"]
    assert main(["results", "list", "--results", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err and "b" in captured.out


def test_a_merge_killed_before_it_listed_its_file_is_cleaned_up_silently(tmp_path):
    import warnings

    from orchestrator.results import compact

    write_trial_tables(tmp_path / "s", "t1", "TERMINATED", cfg(), reports())
    orphan = tmp_path / "s" / "trials" / "_merged.00000000000000000001-00000000.parquet"
    orphan.write_bytes(next((tmp_path / "s" / "trials").glob("t1.*")).read_bytes())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning on every query
        assert len(query("SELECT * FROM trials", tmp_path)) == 1
    write_trial_tables(tmp_path / "s", "t2", "TERMINATED", cfg(), reports())
    compact(tmp_path / "s", batch=64)
    assert not orphan.exists()


def test_queries_are_confined_to_the_results(tmp_path):
    root = tmp_path / "results"
    write_trial_tables(root / "s", "t", "TERMINATED", table_cfg(), few_reports())
    (root / "mlflow.db").write_bytes(b"SQLite format 3\0secret")
    secret = tmp_path / "home" / ".ray"
    secret.mkdir(parents=True)
    (secret / "auth_token").write_text("token-123")
    attacks = [f"SELECT * FROM read_text('{secret / 'auth_token'}')", "SELECT * FROM read_text('/etc/shadow')",
               "SELECT * FROM read_text('/proc/self/environ')", f"SELECT * FROM glob('{tmp_path / 'home'}/**')",
               f"SELECT * FROM read_blob('{root / 'mlflow.db'}')",
               f"SELECT * FROM sqlite_scan('{root / 'mlflow.db'}', 'x')",
               "SELECT * FROM read_parquet('https://example.com/x.parquet')",
               "SELECT * FROM read_csv('/etc/passwd')", "INSTALL httpfs", "LOAD httpfs", "ATTACH '/tmp/x.db' AS x",
               "SET enable_external_access = true"]
    t = time.time()
    for sql in attacks:
        with pytest.raises(QueryError):
            query(sql, root)
    assert time.time() - t < 20  # nothing tried to download an extension
    assert len(query("SELECT * FROM trials", root)) == 1  # the product's own files still read


def test_a_results_root_with_a_quote_is_queried_as_data(tmp_path):
    root = tmp_path / "it's here"
    write_trial_tables(root / "s", "t", "TERMINATED", table_cfg(), few_reports())
    assert len(query("SELECT * FROM trials", root)) == 1 and len(query("SELECT * FROM curves", root)) == 4


DISK_FULL_SCRIPT = """
import sys, errno
sys.path.insert(0, {repo!r})
from orchestrator.results import write_trial_tables
from orchestrator.query import query
from trainables.config import load_config, to_dict
cfg = to_dict(load_config({{}}))
rows = [{{"step": s, "loss": 1.0, **{{f"layer/{{l}}/h{{h}}/attn_nmi": 0.1 for l in range(12) for h in range(12)}}}}
        for s in range(50)]
ok = 0
try:
    for i in range(10000):
        write_trial_tables(__import__("pathlib").Path({root!r}) / "s", f"t{{i}}", "TERMINATED", cfg, rows)
        ok += 1
except OSError as e:
    assert e.errno == errno.ENOSPC, e
print("written", ok)
n = len(query("SELECT * FROM trials", {root!r}))
print("readable", n)
"""


@pytest.mark.integration
@pytest.mark.skipif(shutil.which("unshare") is None or os.geteuid() != 0, reason="needs root and unshare")
def test_a_full_disk_leaves_no_partial_file_and_readable_tables(tmp_path):
    """On a real 2 MB tmpfs (private mount namespace): writing fails with ENOSPC, every table stays readable
    and holds exactly the attempts whose write completed."""
    root = tmp_path / "mnt"
    root.mkdir()
    script = tmp_path / "fill.py"
    script.write_text(DISK_FULL_SCRIPT.format(repo=str(Path(__file__).resolve().parents[1]), root=str(root)))
    r = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c",
                        f"mount -t tmpfs -o size=2m none {root} && {sys.executable} {script}"],
                       capture_output=True, text=True, timeout=300)
    if "mount" in r.stderr and r.returncode != 0 and "written" not in r.stdout:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()[:200]}")
    assert r.returncode == 0, r.stderr[-2000:]
    written = int(r.stdout.split("written")[1].split()[0])
    assert written > 0 and f"readable {written}" in r.stdout


def test_foreign_files_are_skipped_with_a_warning(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from orchestrator.results import ResultsWarning

    write_trial_tables(tmp_path / "s", "t1", "TERMINATED", table_cfg(), few_reports(0.4))
    write_trial_tables(tmp_path / "other", "t9", "TERMINATED", table_cfg(), few_reports(0.6))
    (tmp_path / "s" / "trials" / "x.parquet").write_text("garbage")
    # a foreign file named like ours with a later attempt id and a text `loss`
    pq.write_table(pa.table({"sweep": ["s"], "trial": ["t1"], "attempt": ["99999999999999999999-ffffffff"],
                             "status": ["TERMINATED"], "loss": ["boom"]}),
                   tmp_path / "s" / "trials" / "t1.99999999999999999999-ffffffff.parquet")
    with pytest.warns(ResultsWarning) as caught:
        df = query("SELECT sweep, trial, loss, linear_top1 FROM trials ORDER BY sweep", tmp_path)
    assert list(df.trial) == ["t9", "t1"] and list(df.linear_top1) == [0.6, 0.4]
    assert str(df.loss.dtype) == "float64"
    text = " ".join(str(w.message) for w in caught)
    assert "x.parquet" in text and "t1.99999999999999999999-ffffffff.parquet" in text


def _churn(root: str, seconds: float) -> None:
    from orchestrator.results import compact

    t, i = time.time(), 0
    while time.time() - t < seconds:
        write_trial_tables(Path(root) / "s", f"t{i:04d}", "TERMINATED", table_cfg(i % 2), few_reports(i / 1000))
        if i % 3 == 0:
            compact(Path(root) / "s", batch=4)
        if i % 17 == 0:
            compact(Path(root) / "s")
        i += 1


def _read(root: str, seconds: float, out) -> None:
    t, failed, inconsistent, n = time.time(), 0, 0, 0
    while time.time() - t < seconds:
        try:
            row = query("""SELECT (SELECT count(*) FROM trials) AS rows, (SELECT count(DISTINCT trial) FROM trials)
                AS trials, (SELECT count(*) FROM curves) AS curves, (SELECT count(*) FROM layers) AS layers""",
                        root).iloc[0]
            n += 1
            # every trial exactly once, with its 3 + 1 curve rows and 1 layer row
            if not (row.rows == row.trials and row.curves == 4 * row.trials and row.layers == row.trials):
                inconsistent += 1
        except Exception:  # noqa: BLE001
            failed += 1
    out.put((n, failed, inconsistent))


@pytest.mark.integration
def test_readers_see_one_consistent_snapshot_while_files_merge(tmp_path):
    ctx = mp.get_context("fork")
    out = ctx.Queue()
    seconds = 8
    writer = ctx.Process(target=_churn, args=(str(tmp_path), seconds))
    readers = [ctx.Process(target=_read, args=(str(tmp_path), seconds, out)) for _ in range(3)]
    write_trial_tables(tmp_path / "s", "seed", "TERMINATED", table_cfg(), few_reports())
    for p in [writer, *readers]:
        p.start()
    results = [out.get(timeout=seconds + 120) for _ in readers]
    for p in [writer, *readers]:
        p.join(timeout=60)
    n = sum(r[0] for r in results)
    assert n > 10 and sum(r[1] for r in results) == 0 and sum(r[2] for r in results) == 0, results


def test_an_unchanged_root_is_read_once_and_a_new_write_is_seen_by_the_next_query(tmp_path):
    """The database of a snapshot is kept: the second query of an unchanged root reuses it (``trials`` then a table
    in memory), and a write changes the snapshot, so the next query sees it at once."""
    from orchestrator import query as q

    write_trial_tables(tmp_path / "s", "t1", "TERMINATED", table_cfg(), few_reports())
    sql = "SELECT trial, status FROM trials ORDER BY trial"
    assert list(query(sql, tmp_path).trial) == ["t1"]
    assert list(query(sql, tmp_path).trial) == ["t1"]
    kept = [db for key, db in q._OPEN.items() if key[0] == str(tmp_path)]
    assert len(kept) == 1 and kept[0].kept
    write_trial_tables(tmp_path / "s", "t2", "RUNNING", table_cfg(), few_reports()[:1])
    write_trial_tables(tmp_path / "s", "t1", "ERROR", table_cfg(), few_reports())  # a newer attempt of t1
    df = query(sql, tmp_path)
    assert list(df.trial) == ["t1", "t2"] and list(df.status) == ["ERROR", "RUNNING"]
    assert list(query(sql, tmp_path).status) == ["ERROR", "RUNNING"]  # (the kept table: the same answer)
    assert query("SELECT count(*) AS n FROM curves WHERE trial = 't1'", tmp_path).n[0] == len(
        curves_from_results(few_reports()))  # the long tables follow the kept trials table: one attempt's rows
