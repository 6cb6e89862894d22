"""megatron_sparse24: 2:4 activation sparsity for squared-ReLU FFNs in megatron-core.

Layers, bottom up: ``kernels`` (Triton + PyTorch references, the packed format) -> ``ops`` and
``backends`` (op API, sparse GEMMs) -> ``functional`` (the FFN's autograd function).
"""

from .config import Sparse24Config
from .functional import sparse24_ffn

__version__ = "0.1.0"
__all__ = ["Sparse24Config", "sparse24_ffn", "__version__"]
