"""Counter-based RNG: the tensor version equals the scalar definition; uniforms look uniform."""

import torch

from megatron_sparse24.kernels import rng


def _bits_scalar(counter, k1, k2):
    return rng.fmix32_int((rng.fmix32_int((counter & rng.MASK32) ^ k1) + k2) & rng.MASK32)


def test_hash_matches_scalar_definition():
    k1, k2 = rng.seed_keys(123456789)
    counters = torch.tensor([0, 1, 2, 12345, 2**31 - 1, 2**31, 2**32 - 1, 2**32 + 5])
    got = rng.hash_bits(counters, k1, k2)
    assert got.tolist() == [_bits_scalar(int(c), k1, k2) for c in counters]


def test_seed_keys_are_31_bit_and_seed_sensitive():
    keys = {rng.seed_keys(s) for s in range(1000)}
    assert len(keys) == 1000
    assert all(0 <= k < 2**31 for pair in keys for k in pair)
    assert rng.seed_keys(2**40) != rng.seed_keys(0)  # high bits matter


def test_mix_seed_order_sensitive():
    assert rng.mix_seed(1, 2, 3) != rng.mix_seed(3, 2, 1)
    assert rng.mix_seed(1, 2) == rng.mix_seed(1, 2)


def test_uniform_distribution():
    k1, k2 = rng.seed_keys(7)
    u = rng.uniform(torch.arange(200_000), k1, k2)
    assert u.dtype == torch.float32 and float(u.min()) >= 0.0 and float(u.max()) < 1.0
    hist = torch.histc(u, bins=20, min=0.0, max=1.0)
    assert float((hist - 10_000).abs().max()) < 600  # ~6 sigma for 10k per bin
    assert abs(float(torch.corrcoef(torch.stack([u[:-1], u[1:]]))[0, 1])) < 0.01
