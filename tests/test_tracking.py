

def test_trial_labels_are_readable(tmp_path):
    from orchestrator.space import space_from_dict
    from orchestrator.tracking import trial_label

    space = space_from_dict({"base": {"run": {"seed": 2}}, "space": {"objective.lam": {"grid": [0.25]},
                                                                    "optim.blr": {"grid": [1e-3]}}},
                            tmp_path / "s.yaml")
    assert trial_label(space, {"objective.lam": 0.25, "optim.blr": 1e-3}) == "lam=0.25 micro/4 seed=2 blr=0.001"
