import pytest
import torch

from trainables.errors import NonFiniteLossError
from trainables.model import param_groups
from trainables.steps import read_log, set_lr


def test_set_lr_scales_each_group_and_decays_only_the_decaying_ones():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    opt = torch.optim.AdamW(param_groups(model, lambda name, p, decay: (0, 0.5) if name.startswith("0.") else (1, 1.0),
                                         0.05), lr=0.0)
    set_lr(opt, 0.1, 0.05)
    got = sorted((g["lr"], g["weight_decay"], g["decay"]) for g in opt.param_groups)
    assert got == sorted([(0.05, 0.05, True), (0.05, 0.0, False), (0.1, 0.0, False)])


def test_read_log_is_one_sync_that_stops_on_any_non_finite_loss_since_the_last_log():
    ok = read_log({"loss": torch.tensor(2.0), "loss_mae": torch.tensor(1.5)}, torch.tensor(False), 1, "x")
    assert ok == {"loss": 2.0, "loss_mae": 1.5}
    # an earlier step's NaN counts, though this step's loss is finite; the message names the logged value
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss by step 4 \(loss=2.0\)"):
        read_log({"loss": torch.tensor(2.0)}, torch.tensor(True), 1, "by step 4 (loss={loss})")
    with pytest.raises(NonFiniteLossError, match="fine-tuning step 2"):
        read_log({"finetune_loss": torch.tensor(float("inf"))}, torch.tensor(False), 1, "by fine-tuning step 2")
