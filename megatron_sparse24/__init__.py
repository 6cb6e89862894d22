"""megatron_sparse24: 2:4 activation sparsity for squared-ReLU FFNs in megatron-core.

Layers, bottom up: ``kernels`` (Triton + PyTorch references, the packed format) -> ``ops`` and
``backends`` (op API, sparse GEMMs) -> ``functional`` (the FFN's autograd function) -> megatron
glue (``mlp.Sparse24MLP``, ``specs``, ``attention``, ``cpu_support``).
"""

from .config import Sparse24Config
from .functional import sparse24_ffn

__version__ = "0.1.0"
__all__ = ["Sparse24Config", "sparse24_ffn", "step", "set_step", "bridge_step_callback", "__version__"]


def step(model) -> int:
    """Advance every Sparse24MLP's dense-warmup counter by one optimizer step (call once per
    optimizer step; see ``mlp.step``). Imports megatron-core lazily."""
    from .mlp import step as _step

    return _step(model)


def set_step(model, optimizer_steps: int) -> int:
    """Set every Sparse24MLP's optimizer-step counter (see ``mlp.set_step``)."""
    from .mlp import set_step as _set_step

    return _set_step(model, optimizer_steps)


def bridge_step_callback(context) -> int:
    """Megatron-Bridge callback: register it for ``on_train_step_start``
    (``CallbackManager().register("on_train_step_start", megatron_sparse24.bridge_step_callback)``, then
    ``pretrain(config, forward_step, callbacks=manager)``) and every layer's dense-warmup counter
    follows Bridge's ``train_state.step`` (optimizer steps done; restored on resume)."""
    return set_step(context.model, context.state.train_state.step)
