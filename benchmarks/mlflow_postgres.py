"""An MLflow tracking server over PostgreSQL on 127.0.0.1, for a sweep with many trials (``--mlflow-uri``).

SQLite is the embedded default: one file under the results root, written by the driver alone. For a cluster's
sweep, or several drivers and many readers at once, the documented choice is a tracking server over a real
database: Debian's ``postgresql`` package (``apt-get install postgresql``) and ``pip install 'clmim[postgres]'``.

    python benchmarks/mlflow_postgres.py runs/mlflow-pg      # prints the URI; Ctrl-C stops both servers
    clmim sweep SPACE --mlflow-uri http://127.0.0.1:PORT

The database cluster and the artifacts live under the given folder, so a second start continues them. PostgreSQL
refuses to run as root: as root, its processes run as the ``postgres`` user, which owns the database folder.
Both servers are stopped by process id.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

PG_BIN = next((p for p in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)), None) \
    if Path("/usr/lib/postgresql").is_dir() else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_postgres() -> list[str]:
    """Run a PostgreSQL program as the ``postgres`` user when this process is root (it refuses root)."""
    return ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []


def _wait(check, timeout: float, what: str, log: Path) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if check():
            return
        time.sleep(0.2)
    raise RuntimeError(f"{what} did not start in {timeout:.0f} s; its log: {log}\n" + log.read_text()[-2000:])


class MlflowServer:
    """PostgreSQL and an ``mlflow server`` over it, both on 127.0.0.1 (free ports), stopped by process id."""

    def __init__(self, folder: Path, workers: int = 2):
        if PG_BIN is None:
            raise RuntimeError("PostgreSQL is not installed (Debian: apt-get install postgresql)")
        self.folder, self.workers = Path(folder).resolve(), workers
        self.pg: subprocess.Popen | None = None
        self.mlflow: subprocess.Popen | None = None
        self.db_uri = self.uri = ""

    def start(self, timeout: float = 180) -> str:
        """Start both servers; return the tracking URI. ``timeout``: seconds the tracking server may take to answer
        (its workers import MLflow: minutes on a machine busy with trials)."""
        pg_home = self.folder
        pg_home.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            uid = pwd.getpwnam("postgres")
            os.chown(pg_home, uid.pw_uid, uid.pw_gid)
            if subprocess.run([*_as_postgres(), "test", "-w", str(pg_home)]).returncode != 0:
                # a folder the postgres user cannot reach (a parent only root may enter): a folder of its own
                pg_home = Path(tempfile.mkdtemp(prefix="clmim-pg-"))
                os.chown(pg_home, uid.pw_uid, uid.pw_gid)
                print(f"PostgreSQL's files: {pg_home} (the postgres user cannot reach {self.folder})", file=sys.stderr)
        data, sock = pg_home / "pgdata", pg_home / "sock"
        self.pg_home = pg_home
        if not (data / "PG_VERSION").is_file():
            out = subprocess.run([*_as_postgres(), str(PG_BIN / "initdb"), "-D", str(data), "-U", "postgres",
                                  "--auth=trust", "-E", "UTF8"], capture_output=True, text=True)
            if out.returncode != 0:
                raise RuntimeError(f"initdb failed: {(out.stderr or out.stdout).strip()[-500:]}")
        sock.mkdir(exist_ok=True)
        if os.geteuid() == 0:
            os.chown(sock, pwd.getpwnam("postgres").pw_uid, -1)
        pg_port = free_port()
        log = pg_home / "postgres.log"
        with open(log, "a") as out:
            if os.geteuid() == 0:
                os.chown(log, pwd.getpwnam("postgres").pw_uid, -1)
            self.pg = subprocess.Popen([*_as_postgres(), str(PG_BIN / "postgres"), "-D", str(data), "-p", str(pg_port),
                                        "-h", "127.0.0.1", "-k", str(sock), "-c", "fsync=on"],
                                       stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        ready = [str(PG_BIN / "pg_isready"), "-h", "127.0.0.1", "-p", str(pg_port)]
        _wait(lambda: subprocess.run(ready, capture_output=True).returncode == 0, 60, "PostgreSQL", log)
        psql = [str(PG_BIN / "psql"), "-h", "127.0.0.1", "-p", str(pg_port), "-U", "postgres", "-tAc"]
        if subprocess.run([*psql, "SELECT 1 FROM pg_database WHERE datname = 'mlflow'"], capture_output=True,
                          text=True).stdout.strip() != "1":
            subprocess.run([*psql, "CREATE DATABASE mlflow"], check=True, capture_output=True)
        self.db_uri = f"postgresql+psycopg://postgres@127.0.0.1:{pg_port}/mlflow"
        port = free_port()
        self.uri = f"http://127.0.0.1:{port}"
        mlog = self.folder / "mlflow.log"
        with open(mlog, "a") as out:
            self.mlflow = subprocess.Popen(
                [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri", self.db_uri,
                 "--artifacts-destination", str(self.folder / "artifacts"), "--host", "127.0.0.1", "--port",
                 str(port), "--workers", str(self.workers),
                 # uvicorn kills a worker that has not answered its health check in 5 s: on a machine busy with
                 # trials a worker importing MLflow takes longer, and the server never comes up (seen in a test)
                 "--uvicorn-opts", "--timeout-worker-healthcheck 120"],
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

        def up() -> bool:
            try:
                return urllib.request.urlopen(f"{self.uri}/health", timeout=2).status == 200
            except OSError:
                return False

        _wait(up, timeout, "mlflow server", mlog)
        return self.uri

    def stop(self) -> None:
        """Stop the tracking server and PostgreSQL (their process groups, by process id)."""
        for proc in (self.mlflow, self.pg):
            if proc is None or proc.poll() is not None:
                continue
            try:
                os.killpg(proc.pid, signal.SIGTERM)  # (PostgreSQL: a "smart" shutdown; its children follow)
                proc.wait(timeout=60)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
        self.mlflow = self.pg = None
        home = getattr(self, "pg_home", self.folder)
        if home != self.folder:  # (a folder of its own: see start)
            shutil.rmtree(home, ignore_errors=True)


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit("usage: python benchmarks/mlflow_postgres.py FOLDER")
    server = MlflowServer(Path(sys.argv[1]))
    try:
        print(f"MLflow over PostgreSQL: {server.start()}  (database: {server.db_uri}); Ctrl-C stops", flush=True)
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
        shutil.rmtree(Path(sys.argv[1]) / "sock", ignore_errors=True)


if __name__ == "__main__":
    main()
