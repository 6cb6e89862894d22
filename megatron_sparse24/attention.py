"""A fast attention core that needs no Transformer Engine: torch's scaled_dot_product_attention.

megatron's local ``DotProductAttention`` materialises the [b, n, s, s] scores; ``SDPAttention`` is a
drop-in subclass (same constructor, same checkpoint keys) that calls
``torch.nn.functional.scaled_dot_product_attention`` (flash / memory-efficient kernels on GPU) for
causal self-attention, and defers to the parent for anything else (padding masks, attention bias,
sliding windows, softmax offsets, query-key layer scaling).
"""

from __future__ import annotations

import torch.nn.functional as F

from megatron.core import tensor_parallel
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType


class SDPAttention(DotProductAttention):
    """DotProductAttention through ``F.scaled_dot_product_attention`` for causal masks."""

    def _sdpa_applies(self, query, key, attn_mask_type, attention_bias, packed_seq_params) -> bool:
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        return (
            mask_type == AttnMaskType.causal
            and attention_bias is None
            and packed_seq_params is None
            and self.softmax_offset is None
            and self.scale_mask_softmax.window_size is None
            and not self.config.apply_query_key_layer_scaling
            and query.shape[0] == key.shape[0]
        )

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        """[s, b, heads, d] query/key/value -> context [s, b, heads * d]."""
        if not self._sdpa_applies(query, key, attn_mask_type, attention_bias, packed_seq_params):
            return super().forward(query, key, value, attention_mask, attn_mask_type=attn_mask_type,
                                   attention_bias=attention_bias, packed_seq_params=packed_seq_params)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, d]
        p = self.attention_dropout.p if self.training else 0.0

        def attend():
            return F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True,
                                                  scale=self.softmax_scale, enable_gqa=q.shape[1] != k.shape[1])

        if p > 0 and not self.config.sequence_parallel:  # same RNG stream as the parent's dropout
            with tensor_parallel.get_cuda_rng_tracker().fork():
                out = attend()
        else:
            out = attend()
        s, b = query.shape[0], query.shape[1]
        return out.permute(2, 0, 1, 3).reshape(s, b, self.hidden_size_per_partition)


__all__ = ["SDPAttention"]
