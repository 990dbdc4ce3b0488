"""Ray nodes for tests: `ray start --block` as a child process (so a test stops exactly its own nodes, never
another Ray instance on the machine), optionally in a private mount namespace (a worker node of a multi-node
cluster on one machine, with its own /tmp)."""

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

from conftest import _free_port

BIN = Path(sys.executable).parent
# `ray start` for a worker node. Ray refuses to join a node to a cluster while RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0,
# and with it set to 1 it maps 127.0.0.1 to the machine's outward address (where the head, kept on the loopback, does
# not listen) and the node's agents bind that address. So only this process lifts the check and keeps 127.0.0.1 as
# given; the node's processes it starts inherit 0 and stay on the loopback.
JOIN = ("import sys; from ray._private import ray_constants, services; ray_constants.ENABLE_RAY_CLUSTER = True; "
        "services.resolve_ip_for_localhost = lambda host: host; "
        "from ray.scripts.scripts import main; sys.argv = ['ray', 'start', *sys.argv[1:]]; main()")


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                ppid = int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(p.name))
    return kids


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it."""
    kids, out, todo = _children(), [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += kids.get(p, [])
    return out


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a node's `ray start --block` process and everything it started."""
    pids = descendants(proc.pid)
    for p in reversed(pids):
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=30)


def _private_tmp() -> str:
    """Shell commands (run inside the node's own mount namespace) that put an empty tmpfs over /tmp, keeping the
    code visible: this checkout and the Python environment, when they live under /tmp (a CI checkout), are bound
    back in place, as a real node has the code installed but not the driver's files."""
    here = [Path(__file__).resolve().parents[1], Path(sys.prefix).resolve()]
    keep = [p for p in here if p.is_relative_to("/tmp")]
    keep = [p for p in keep if not any(p != q and p.is_relative_to(q) for q in keep)]
    steps = ["mount -t tmpfs tmpfs /mnt"] if keep else []
    steps += [f"mkdir /mnt/k{i} && mount --bind '{p}' /mnt/k{i}" for i, p in enumerate(keep)]
    steps.append("mount -t tmpfs tmpfs /tmp")
    steps += [f"mkdir -p '{p}' && mount --move /mnt/k{i} '{p}'" for i, p in enumerate(keep)]
    return " && ".join(steps)


def start_node(args: list[str], env: dict, namespace: bool) -> subprocess.Popen:
    """`ray start ... --block` (its processes stay its descendants, so the test can stop exactly them); in a
    private mount namespace with a tmpfs over /tmp for a worker node."""
    cmd = [str(BIN / "ray"), "start", *args, "--block", "--disable-usage-stats", "--node-ip-address=127.0.0.1",
           f"--dashboard-agent-listen-port={_free_port()}", "--num-gpus=0"]
    if namespace:  # a worker node: its own /tmp (the results root, Ray's temp dirs, scratch folders are there)
        cmd = ["unshare", "-m", "--propagation", "private", "sh", "-c", _private_tmp() + ' && exec "$@"',
               "sh", sys.executable, "-c", JOIN, *cmd[2:]]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "Ray runtime started" in line:
            break
    else:
        raise AssertionError("ray start failed:\n" + "".join(lines[-30:]))
    # keep draining its output so it never blocks on a full pipe
    threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()
    return proc


