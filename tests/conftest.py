import os

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))


def tiny(**over) -> dict:
    """A small, fast config tree for tests (micro/4 at 32 px, small synthetic set)."""
    cfg = {
        "model": {"variant": "micro/4", "img_size": 32},
        "data": {"batch_size": 32, "train_size": 256, "eval_size": 64},
        "optim": {"steps": 6},
        "eval": {"samples": 64},
        "run": {"log_every": 2},
    }
    for dotted, value in over.items():
        node = cfg
        keys = dotted.split("__")
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = value
    return cfg


@pytest.fixture
def tiny_cfg():
    return tiny
