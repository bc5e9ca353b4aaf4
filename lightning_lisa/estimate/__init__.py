"""The memory estimate: full fine-tuning, LoRA and LISA for a model, without allocating it.

Run it as ``lightning-lisa estimate MODEL`` or ``python -m lightning_lisa.estimate MODEL``.
"""

from lightning_lisa.estimate.api import (
    DTYPES,
    OPTIMIZERS,
    SHAPES,
    ArmEstimate,
    MemoryEstimate,
    build_meta_model,
    estimate_memory,
    format_estimate,
    load_config,
    lora_targets,
    main,
    saved_activation_bytes,
)

__all__ = [
    "DTYPES",
    "OPTIMIZERS",
    "SHAPES",
    "ArmEstimate",
    "MemoryEstimate",
    "build_meta_model",
    "estimate_memory",
    "format_estimate",
    "load_config",
    "lora_targets",
    "main",
    "saved_activation_bytes",
]
