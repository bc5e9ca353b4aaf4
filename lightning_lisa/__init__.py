"""LISA (Layerwise Importance Sampled AdamW) for PyTorch Lightning.

Add :class:`LISA` to a Trainer's callbacks to fine-tune only the embeddings, the head and a few
randomly sampled transformer blocks at a time, at a fraction of full fine-tuning's memory.
"""

from typing import TYPE_CHECKING, Any

from lightning_lisa.callback import LISA, Switch
from lightning_lisa.compact import CompactAdamW, compact_adamw
from lightning_lisa.errors import LISAConfigError
from lightning_lisa.layers import BLOCK_LISTS, LayerInfo, Unit, find_layers, split_units
from lightning_lisa.monitoring import WeightNormMonitor, plot_heatmap, plot_layer_means
from lightning_lisa.norms import NormRecord, layer_norms, monitored_layers
from lightning_lisa.optimizer_state import OptimizerStateHandler, optimizer_state_bytes
from lightning_lisa.sampling import sample_layers
from lightning_lisa.step_in_backward import StepInBackward
from lightning_lisa.strategies.fsdp1 import LISAFSDPStrategy, lisa_auto_wrap_policy
from lightning_lisa.strategies.fsdp2 import LISAModelParallelStrategy, fully_shard_blocks

if TYPE_CHECKING:
    from lightning_lisa.estimate import estimate_memory

__version__ = "0.1.0"

__all__ = [
    "BLOCK_LISTS",
    "LISA",
    "CompactAdamW",
    "LISAConfigError",
    "LISAFSDPStrategy",
    "LISAModelParallelStrategy",
    "LayerInfo",
    "NormRecord",
    "OptimizerStateHandler",
    "StepInBackward",
    "Switch",
    "Unit",
    "WeightNormMonitor",
    "compact_adamw",
    "estimate_memory",
    "find_layers",
    "fully_shard_blocks",
    "layer_norms",
    "lisa_auto_wrap_policy",
    "monitored_layers",
    "optimizer_state_bytes",
    "plot_heatmap",
    "plot_layer_means",
    "sample_layers",
    "split_units",
]


def __getattr__(name: str) -> Any:
    # The estimate is imported on first use: it is an application of the core, which never imports it.
    if name == "estimate_memory":
        from lightning_lisa.estimate import estimate_memory

        return estimate_memory
    raise AttributeError(f"module 'lightning_lisa' has no attribute {name!r}")
