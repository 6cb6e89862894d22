"""Counter-based random numbers shared bit-for-bit by the Triton kernels and the references.

The MVUE sparsifier needs two uniforms per group of 4. They come from a stateless hash of
(seed, counter), written with 32-bit integer arithmetic only, so the Triton kernel (uint32 ops) and
the PyTorch reference (int64 ops masked to 32 bits) draw exactly the same numbers on every device
and every Triton version. Seeds are framework-controlled integers (config seed, layer, step);
nothing here touches Python's ``random`` or a global generator.

    bits(counter) = fmix32(fmix32(counter ^ k1) + k2)      (all mod 2**32)
    uniform       = (bits >> 8) * 2**-24                     in [0, 1), exact in fp32

``fmix32`` is MurmurHash3's finalizer. Counters are 32-bit: 2*group_index + {0, 1}.
"""

from __future__ import annotations

import torch

MASK32 = 0xFFFFFFFF
FMIX_C1 = 0x85EBCA6B
FMIX_C2 = 0xC2B2AE35


def fmix32_int(x: int) -> int:
    x &= MASK32
    x ^= x >> 16
    x = (x * FMIX_C1) & MASK32
    x ^= x >> 13
    x = (x * FMIX_C2) & MASK32
    x ^= x >> 16
    return x


def seed_keys(seed: int) -> tuple[int, int]:
    """Two 31-bit hash keys from a 64-bit seed (31 bits so they pass as int32 kernel arguments)."""
    s = int(seed) & 0xFFFFFFFFFFFFFFFF
    k1 = fmix32_int((s & MASK32) ^ 0x9E3779B9)
    k2 = fmix32_int((s >> 32) ^ k1 ^ 0x7F4A7C15)
    return k1 & 0x7FFFFFFF, k2 & 0x7FFFFFFF


def mix_seed(*parts: int) -> int:
    """Combine integers (config seed, layer, step, ...) into one 64-bit seed, order-sensitive."""
    h = 0x243F6A8885A308D3
    for p in parts:
        p = int(p) & 0xFFFFFFFFFFFFFFFF
        lo, hi = p & MASK32, p >> 32
        h = ((h ^ fmix32_int(lo)) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
        h = ((h ^ fmix32_int(hi ^ 0x5BD1E995)) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    # x < 2**32 held in int64; split c in 16-bit halves so no product overflows int64.
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & MASK32


def _fmix32(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = _mul32(x, FMIX_C1)
    x = x ^ (x >> 13)
    x = _mul32(x, FMIX_C2)
    return x ^ (x >> 16)


def hash_bits(counter: torch.Tensor, k1: int, k2: int) -> torch.Tensor:
    """32-bit hash of integer counters (any int tensor; taken mod 2**32), as int64 in [0, 2**32)."""
    c = counter.to(torch.int64) & MASK32
    return _fmix32((_fmix32(c ^ k1) + k2) & MASK32)


def uniform(counter: torch.Tensor, k1: int, k2: int) -> torch.Tensor:
    """fp32 uniforms in [0, 1) with 24 random bits, one per counter."""
    return (hash_bits(counter, k1, k2) >> 8).to(torch.float32) * (1.0 / 16777216.0)
