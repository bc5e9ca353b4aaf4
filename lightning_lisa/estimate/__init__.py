"""The memory estimate: full fine-tuning, LoRA and LISA for a model, without allocating it.

Run it as ``lightning-lisa estimate MODEL`` or ``python -m lightning_lisa.estimate MODEL``.

* :mod:`~lightning_lisa.estimate.api`: :func:`estimate_memory`, its result and its table;
* :mod:`~lightning_lisa.estimate.shapes`: :data:`SHAPES` and the models built on the meta device;
* :mod:`~lightning_lisa.estimate.activations`: the tensors saved for the backward pass, traced on meta;
* :mod:`~lightning_lisa.estimate.measure`: the same quantities measured during real steps, to check it;
* ``__main__``: the command line.
"""

from lightning_lisa.estimate.__main__ import main
from lightning_lisa.estimate.activations import ActivationProfile, saved_activation_bytes, trace_activations
from lightning_lisa.estimate.api import (
    DTYPES,
    OPTIMIZERS,
    ArmEstimate,
    MemoryEstimate,
    estimate_memory,
    format_estimate,
    optimizer_state_nbytes,
)
from lightning_lisa.estimate.shapes import SHAPES, build_meta_model, load_config, lora_targets

__all__ = [
    "DTYPES",
    "OPTIMIZERS",
    "SHAPES",
    "ActivationProfile",
    "ArmEstimate",
    "MemoryEstimate",
    "build_meta_model",
    "estimate_memory",
    "format_estimate",
    "load_config",
    "lora_targets",
    "main",
    "optimizer_state_nbytes",
    "saved_activation_bytes",
    "trace_activations",
]
