"""DDP without Ray: two gloo processes on the CPU train the same config as one process."""

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import tiny

from trainables.config import load_config
from trainables.trainer import train


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, tree, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        cfg = load_config(tree)
        cfg.run.out_dir = None
        captured = {}

        import trainables.trainer as tr

        real = tr.evaluate

        def grab(encoder, data, cfg):  # capture the trained encoder's weights on every rank
            captured.update({k: v.detach().clone() for k, v in encoder.state_dict().items()})
            return real(encoder, data, cfg)

        tr.evaluate = grab
        train(cfg)
        torch.save(captured, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_rank_ddp_keeps_replicas_identical(tmp_path):
    tree = tiny(**{"objective__lam": 0.0, "optim__steps": 4})
    mp.spawn(_worker, args=(2, _free_port(), tree, str(tmp_path)), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt")
    r1 = torch.load(tmp_path / "rank1.pt")
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k
    # and training moved them away from the common initialisation
    torch.manual_seed(0)
    from trainables.objectives import build_objective

    init = build_objective(load_config(tree)).encoder.state_dict()
    assert any(not torch.equal(init[k], r0[k]) for k in r0)
