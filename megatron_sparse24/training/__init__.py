"""Training entry points: Megatron-LM's loop with this package's additions (``megatron_lm``), the
package's own loop for megatron-core 0.16 (``loop``), and the checks both run first (``preflight``)."""

import logging
import warnings

__all__ = ["quiet_known_warnings"]

_HARMLESS_LOG_RECORDS = (
    "Unable to save MockGPTDataset indexes",  # mock data has nothing worth caching
    "GPTModel IS DEPRECATED",  # megatron-core's GPTModel is what Megatron-LM's pretrain_gpt.py builds too
)


class _DropHarmless(logging.Filter):
    def filter(self, record):
        return not any(text in record.getMessage() for text in _HARMLESS_LOG_RECORDS)


def quiet_known_warnings():
    """Silence, once, the known-harmless warnings megatron-core prints on machines without Transformer
    Engine or apex (it falls back to torch for each), the "use a ModelConfig" notice of a ``pretrain()``
    driven by a model provider (as Megatron-LM's own scripts are), an experimental-API notice raised by
    merely importing megatron, and the log records listed above. Call it before importing megatron."""
    for pattern in (r"Transformer Engine and Apex are not installed", r"Apex is not installed",
                    r"Only transformer-engine>=", r"\s*It is recommended to use a ModelConfig",
                    r"Could not determine rank from torch.distributed", r"MimoModelConfig is experimental"):
        warnings.filterwarnings("ignore", message=pattern)
    for name in ("megatron.core.datasets.gpt_dataset", "megatron.core.models.gpt.gpt_model"):
        log = logging.getLogger(name)
        if not any(isinstance(f, _DropHarmless) for f in log.filters):
            log.addFilter(_DropHarmless())
