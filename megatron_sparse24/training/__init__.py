"""Training entry points: Megatron-LM's loop with this package's additions (``megatron_lm``), the
package's own loop for megatron-core 0.16 (``loop``), and the checks both run first (``preflight``)."""

import warnings

__all__ = ["quiet_known_warnings"]


def quiet_known_warnings():
    """Silence, once, the known-harmless warnings megatron-core prints at import on machines without
    Transformer Engine or apex (it falls back to torch for each), and the "use a ModelConfig" notice
    of a ``pretrain()`` driven by a model provider, as Megatron-LM's own scripts are. Call it before
    importing megatron."""
    for pattern in (r"Transformer Engine and Apex are not installed", r"Apex is not installed",
                    r"Only transformer-engine>=", r"\s*It is recommended to use a ModelConfig",
                    r"Could not determine rank from torch.distributed"):
        warnings.filterwarnings("ignore", message=pattern)
