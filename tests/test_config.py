import pytest

from megatron_sparse24 import Sparse24Config


def test_defaults_are_the_paper_recipe():
    c = Sparse24Config()
    assert (c.method, c.dense_warmup_steps, c.dense_feature_fraction, c.token_permutation, c.backend) == (
        "naive", 1000, 0.05, True, "auto")
    assert c.forward_mask_in_backward


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
])
def test_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Sparse24Config(**kwargs)
