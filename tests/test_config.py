import pytest

from megatron_sparse24 import Sparse24Config


def test_defaults_are_the_paper_recipe():
    c = Sparse24Config()
    assert (c.method, c.dense_warmup_steps, c.dense_feature_fraction, c.token_permutation, c.backend) == (
        "naive", 1000, 0.05, True, "auto")
    assert c.forward_mask_in_backward
    assert c.switch == "steps"  # the paper's fixed switch unless asked for the measured one


def test_switch_flags_reach_the_config():
    import argparse

    from megatron_sparse24.arguments import add_sparse24_args, sparse24_config_from_args

    args = add_sparse24_args(argparse.ArgumentParser()).parse_args(
        ["--activation-sparse-switch", "measured", "--activation-sparse-switch-measure", "l2",
         "--activation-sparse-switch-threshold", "0.01", "--activation-sparse-switch-window", "50",
         "--activation-sparse-switch-max-steps", "5000"])
    c = sparse24_config_from_args(args)
    assert (c.switch, c.switch_measure, c.switch_threshold, c.switch_window, c.switch_max_steps) == (
        "measured", "l2", 0.01, 50, 5000)


@pytest.mark.parametrize("kwargs,match", [
    ({"method": "topk"}, "method"),
    ({"backend": "cutlas"}, "backend"),
    ({"dense_warmup_steps": -1}, "dense_warmup_steps"),
    ({"dense_warmup_steps": 1.5}, "dense_warmup_steps"),
    ({"dense_feature_fraction": 1.5}, "dense_feature_fraction"),
    ({"dense_feature_fraction": "0.05"}, "dense_feature_fraction"),
    ({"token_permutation": 1}, "token_permutation"),
    ({"forward_mask_in_backward": 0}, "forward_mask_in_backward"),
    ({"seed": 1.0}, "seed"),
    ({"switch": "auto"}, "switch"),
    ({"switch_measure": "l3"}, "switch_measure"),
    ({"switch_threshold": 0.0}, "switch_threshold"),
    ({"switch_threshold": 1.0}, "switch_threshold"),
    ({"switch_window": -1}, "switch_window"),
    ({"switch_max_steps": 10, "dense_warmup_steps": 20}, "switch_max_steps"),
])
def test_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Sparse24Config(**kwargs)
