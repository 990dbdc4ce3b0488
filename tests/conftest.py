import os

import pytest
import torch

# `make test` runs two pytest-xdist workers: the Ray tests on one (they mostly wait on processes), everything else
# on the other; each worker's torch gets its share of the cores.
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1) // WORKERS))
# Ray reads these when first imported (by any test): loopback node addresses, token authentication on.
os.environ.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="token", RAY_AIR_NEW_OUTPUT="0")


# The evaluation settings of training tests that are not about evaluations: the probes, on few images, without the
# dense probe, CKA and the noise bands (they cost most of a tiny trial's time).
CHEAP_EVAL = {"eval__probe_images": 8, "eval__dense_images": 0, "eval__cka": False, "eval__noise__bands": 0,
              "eval__lowshot": False, "eval__attentive_steps": 0, "eval__grad_cosine": False}
# What an evaluation test turns back on (the product's defaults).
FULL_EVAL = {"eval__probe_images": 64, "eval__dense_images": 64, "eval__cka": True, "eval__noise__bands": 8,
             "eval__lowshot": True, "eval__attentive_steps": 300, "eval__grad_cosine": True}


def tiny(**over) -> dict:
    """A small, fast config tree for tests (micro/4 at 32 px, small synthetic set, ``CHEAP_EVAL``; a test of the
    evaluations passes ``**FULL_EVAL`` or the keys it needs)."""
    cfg = {
        "model": {"variant": "micro/4", "img_size": 32},
        "data": {"batch_size": 32, "train_size": 256, "eval_size": 64},
        "optim": {"steps": 6},
        "eval": {"samples": 64},
        "run": {"log_every": 2},
    }
    for dotted, value in {**CHEAP_EVAL, **over}.items():
        node = cfg
        keys = dotted.split("__")
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = value
    return cfg


@pytest.fixture
def tiny_cfg():
    return tiny


def wait_for(cond, timeout, what):
    """``cond()``'s first truthy value, polled every 0.5 s; an AssertionError naming ``what`` after ``timeout`` s."""
    import time

    t = time.time()
    while time.time() - t < timeout:
        got = cond()
        if got:
            return got
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def wait_http(url: str, timeout: float, what: str) -> None:
    """Wait until ``url`` answers 200 (a server a test started)."""
    import urllib.request

    def ok():
        try:
            return urllib.request.urlopen(url, timeout=2).status == 200
        except OSError:
            return False

    wait_for(ok, timeout, what)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def ray_address(tmp_path_factory):
    """One Ray head for the whole test session, started with `ray start --head` on 127.0.0.1 and stopped after."""
    import subprocess
    import sys
    from pathlib import Path

    from raynodes import kill_tree, start_node

    ray_bin = str(Path(sys.executable).parent / "ray")
    port = _free_port()
    env = dict(os.environ)  # loopback node addresses and token auth (set above)
    # `ray start --head` with token auth needs a token and does not create one (a fresh machine has none):
    # create ~/.ray/auth_token if missing (its output, the token, is captured and dropped).
    subprocess.run([ray_bin, "get-auth-token", "--generate"], check=True, capture_output=True, env=env, timeout=60)
    # `--block` keeps every process of the node below this one: the session stops exactly its own node, never
    # another Ray instance running on the machine (`ray stop` would kill them all)
    head = start_node(["--head", f"--port={port}", "--num-cpus=2", "--include-dashboard=true",
                       "--dashboard-host=127.0.0.1", f"--dashboard-port={_free_port()}",
                       f"--ray-client-server-port={_free_port()}"],
                      env, namespace=False)
    address = f"127.0.0.1:{port}"
    os.environ["RAY_ADDRESS"] = address
    try:
        yield address
    finally:
        import ray

        if ray.is_initialized():
            ray.shutdown()
        kill_tree(head)
        os.environ.pop("RAY_ADDRESS", None)


@pytest.hookimpl(tryfirst=True)  # before xdist's own, which turns the group mark into the id its scheduler reads
def pytest_collection_modifyitems(config, items):
    """Every test marked ``ray`` (a Ray head, or a cluster of nodes) runs on one xdist worker, in file order: one Ray
    instance per test session, and a cluster never beside another."""
    for item in items:
        uses_ray = {"ray_address", "cluster"} & set(getattr(item, "fixturenames", ()))
        if item.get_closest_marker("ray") is not None or uses_ray:
            item.add_marker(pytest.mark.xdist_group("ray"))
