"""Strategy adapters: what LISA and the monitor need from each Lightning strategy, behind one small protocol.

:func:`adapter_for` returns the :class:`~lightning_lisa.strategies.base.StrategyAdapter` of a
strategy; the callback and the monitor ask it instead of checking strategy types.

=====================================  ==========================================================
strategy                                what its adapter does
=====================================  ==========================================================
single device                           nothing
DDP (``ddp``, ``ddp_spawn``, ...)       refuses ``find_unused_parameters=False`` and ``static_graph``;
                                        installs the hook that all-reduces only trainable gradients
FSDP2 (:class:`LISAModelParallelStrategy`)  runs FSDP2's lazy initialization before the first freeze;
                                        loads checkpoints with partial optimizer state; a plain
                                        ``ModelParallelStrategy`` is refused with that fix
FSDP1 (:class:`LISAFSDPStrategy`)       one FSDP unit per block; partial optimizer state saved and
                                        loaded; a plain ``FSDPStrategy`` is refused with that fix
DeepSpeed                               refused by LISA (flat optimizer partitions); read by the monitor
=====================================  ==========================================================

Fabric's strategies of the same names (``lightning.fabric.strategies``) get the same adapters; there
LISA needs no strategy subclass, because its own :meth:`~lightning_lisa.LISA.save` and
:meth:`~lightning_lisa.LISA.load` freeze what has no optimizer state around Fabric's ``save`` and ``load``
(:mod:`lightning_lisa.fabric`).
"""

from __future__ import annotations

from lightning.fabric.strategies.ddp import DDPStrategy as FabricDDPStrategy
from lightning.fabric.strategies.fsdp import FSDPStrategy as FabricFSDPStrategy
from lightning.fabric.strategies.model_parallel import ModelParallelStrategy as FabricModelParallelStrategy
from lightning.fabric.strategies.strategy import Strategy as FabricStrategy
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, ModelParallelStrategy, Strategy

from lightning_lisa.errors import LISAConfigError
from lightning_lisa.norms import PlainTensors
from lightning_lisa.strategies.base import StrategyAdapter
from lightning_lisa.strategies.ddp import DDPAdapter, FrozenSkippingState, frozen_skipping_hook
from lightning_lisa.strategies.fsdp1 import FSDP1Adapter, LISAFSDPStrategy, lisa_auto_wrap_policy
from lightning_lisa.strategies.fsdp2 import FSDP2Adapter, LISAModelParallelStrategy, fully_shard_blocks

#: Strategies LISA refuses, by class name (no import of optional back-ends needed), with the reason.
UNSUPPORTED_STRATEGIES: dict[str, str] = {
    "DeepSpeedStrategy": (
        "DeepSpeed ZeRO keeps optimizer state in flat partitions, so the state of frozen blocks cannot "
        "be freed, and parameters frozen when the engine is built are excluded from training for good"
    ),
}

__all__ = [
    "UNSUPPORTED_STRATEGIES",
    "DDPAdapter",
    "FSDP1Adapter",
    "FSDP2Adapter",
    "FrozenSkippingState",
    "LISAFSDPStrategy",
    "LISAModelParallelStrategy",
    "PlainTensors",
    "StrategyAdapter",
    "adapter_for",
    "check_supported",
    "frozen_skipping_hook",
    "fully_shard_blocks",
    "lisa_auto_wrap_policy",
    "unsupported_reason",
]


def adapter_for(strategy: Strategy | FabricStrategy) -> StrategyAdapter:
    """The adapter that answers for ``strategy``, a Trainer or a Fabric strategy.

    Examples:
        >>> from lightning.pytorch.strategies import SingleDeviceStrategy
        >>> type(adapter_for(SingleDeviceStrategy("cpu"))).__name__
        'StrategyAdapter'
        >>> from lightning.fabric.strategies import DDPStrategy as FabricDDP
        >>> type(adapter_for(FabricDDP())).__name__
        'DDPAdapter'
    """
    if isinstance(strategy, FSDPStrategy | FabricFSDPStrategy):
        return FSDP1Adapter(strategy)
    if isinstance(strategy, ModelParallelStrategy | FabricModelParallelStrategy):
        return FSDP2Adapter(strategy)
    if isinstance(strategy, DDPStrategy | FabricDDPStrategy):
        return DDPAdapter(strategy)
    return StrategyAdapter(strategy)


def unsupported_reason(strategy: Strategy | FabricStrategy) -> str | None:
    """Why LISA cannot train under ``strategy``, or ``None`` when it can."""
    return next(
        (UNSUPPORTED_STRATEGIES[c.__name__] for c in type(strategy).__mro__ if c.__name__ in UNSUPPORTED_STRATEGIES),
        None,
    )


def check_supported(strategy: Strategy | FabricStrategy) -> None:
    """Raise :class:`~lightning_lisa.errors.LISAConfigError` for a strategy LISA refuses."""
    reason = unsupported_reason(strategy)
    if reason is not None:
        supported = (
            "a single device, DDP (`strategy='ddp_find_unused_parameters_true'`), FSDP2 (`ModelParallelStrategy`) or "
            "FSDP1 (`FSDPStrategy`)"
            if isinstance(strategy, FabricStrategy)
            else "a single device, DDP (`strategy='ddp_find_unused_parameters_true'`), FSDP2 "
            "(`lightning_lisa.LISAModelParallelStrategy`) or FSDP1 (`lightning_lisa.LISAFSDPStrategy`)"
        )
        raise LISAConfigError(
            f"LISA does not support `strategy={type(strategy).__name__}`: {reason}. Supported: {supported}."
        )
