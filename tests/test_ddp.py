"""DDP without Ray: two gloo processes on the CPU train the same config as one process."""

import os
import socket

import pytest
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

        real, real_noise = tr.evaluate, tr.finetune_noise_accuracy

        def grab(run, step, final=False):  # capture the trained objective (encoder, heads, EMA copies, DINO's centre)
            captured.update({k: v.detach().clone() for k, v in run.objective.state_dict().items()})
            return real(run, step, final)

        def grab_tuned(model, data, cfg):  # and the fine-tuned classifier's
            captured.update({f"finetuned.{k}": v.detach().clone() for k, v in model.state_dict().items()})
            return real_noise(model, data, cfg)

        tr.evaluate, tr.finetune_noise_accuracy = grab, grab_tuned
        captured["finetune_top1"] = torch.tensor(train(cfg)["finetune_top1"])
        torch.save(captured, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


# lam = 1: MoCo v3's heads normalise over both ranks' rows; MAE + DINO: DINO's centre averages both ranks' teachers
# The two single-objective cases run in the extended tier; the MAE+DINO mix (two heads, a teacher, routed crops)
# covers the most parts in CI's slow tier (make test's 12-minute budget).
@pytest.mark.integration
@pytest.mark.parametrize("mix", [pytest.param({"lam": 0.0}, marks=[pytest.mark.slow, pytest.mark.extended]),
                                 pytest.param({"lam": 1.0}, marks=[pytest.mark.slow, pytest.mark.extended]),
                                 pytest.param({"weights": {"mae": 0.5, "dino": 0.5}}, marks=pytest.mark.slow)])
def test_two_rank_ddp_keeps_replicas_identical(tmp_path, mix):
    tree = tiny(**{f"objective__{k}": v for k, v in mix.items()}, optim__steps=4, eval__finetune__steps=2,
                eval__noise__bands=2, objective__dino__local_crops=2)
    mp.spawn(_worker, args=(2, _free_port(), tree, str(tmp_path)), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt")
    r1 = torch.load(tmp_path / "rank1.pt")
    assert any(k.startswith("finetuned.") for k in r0)  # fine-tuning ran under DDP too, in sync
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k
    # and training moved them away from the common initialisation
    torch.manual_seed(0)
    from trainables.objectives.mixture import build_objective

    init = build_objective(load_config(tree)).encoder.state_dict()
    assert any(not torch.equal(init[k], r0[f"encoder.{k}"]) for k in init)
    if "weights" in mix:
        assert r0["dino.center"].abs().sum() > 0  # the centre moved, identically on both ranks (above)


def _bn_worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from trainables.objectives.common import GlobalBatchNorm1d

        torch.manual_seed(0)
        x = torch.randn(8, 5) * 3 + 1  # the same global batch on every rank; each takes its half
        bn = GlobalBatchNorm1d(5)
        with torch.no_grad():
            bn.weight.copy_(torch.linspace(0.5, 1.5, 5))
        mine = x[rank * 4:(rank + 1) * 4].clone().requires_grad_(True)
        y = bn(mine)
        (y * torch.arange(5.0)).pow(2).sum().backward()
        torch.save({"y": y.detach(), "grad": mine.grad, "running_var": bn.running_var}, f"{out}/bn{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.integration
def test_global_batchnorm_on_cpu_ranks_equals_batchnorm_over_the_whole_batch(tmp_path):
    """MoCo v3 normalises its MLP heads over the global batch (SyncBatchNorm); torch's SyncBatchNorm needs GPUs, so
    CPU multi-worker runs use GlobalBatchNorm1d: outputs, input gradients and running stats equal one BatchNorm
    over both ranks' rows."""
    mp.spawn(_bn_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    parts = [torch.load(tmp_path / f"bn{r}.pt") for r in range(2)]
    torch.manual_seed(0)
    x = (torch.randn(8, 5) * 3 + 1).requires_grad_(True)
    ref = torch.nn.BatchNorm1d(5)
    with torch.no_grad():
        ref.weight.copy_(torch.linspace(0.5, 1.5, 5))
    y = ref(x)
    (y * torch.arange(5.0)).pow(2).sum().backward()
    torch.testing.assert_close(torch.cat([p["y"] for p in parts]), y.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat([p["grad"] for p in parts]), x.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(parts[0]["running_var"], ref.running_var, atol=1e-5, rtol=1e-5)
