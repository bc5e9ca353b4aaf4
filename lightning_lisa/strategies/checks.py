"""Which Lightning strategies LISA runs under, checked in ``setup`` before the model is wrapped.

* Single device: works.
* DDP (``ddp``, ``ddp_spawn``, ...): frozen blocks produce no gradients, so DDP must be built with
  ``find_unused_parameters=True``. LISA sets it (with a notice) when the user did not; an explicit
  ``static_graph=True`` cannot work (the graph changes at every switch) and is refused. Once the
  model is wrapped, LISA installs :func:`~lightning_lisa.strategies.ddp.frozen_skipping_hook` so only
  trainable gradients are all-reduced (unless the strategy already has a communication hook).
* FSDP2 (``ModelParallelStrategy`` with ``fully_shard`` in ``configure_model``, e.g. through
  :func:`~lightning_lisa.strategies.fsdp2.fully_shard_blocks`): works; only the gradients of the sampled blocks
  and the always-active modules are reduce-scattered. LISA makes the strategy's checkpoint loading
  accept optimizer state for only some parameters
  (:func:`~lightning_lisa.strategies.fsdp2.load_partial_optimizer_state`).
* FSDP1 (``FSDPStrategy``, CUDA only): works with ``use_orig_params=True`` (Lightning's default);
  LISA gives the strategy one FSDP unit per block when it has no ``auto_wrap_policy``, and warns
  when blocks share a unit after wrapping (see :mod:`lightning_lisa.strategies.fsdp1`).
* DeepSpeed is refused (see :data:`UNSUPPORTED_STRATEGIES`).
"""

from __future__ import annotations

from collections.abc import Sequence

from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, ModelParallelStrategy, Strategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.nn.parallel import DistributedDataParallel

from lightning_lisa.errors import LISAConfigError
from lightning_lisa.layers import Unit
from lightning_lisa.strategies.ddp import FrozenSkippingState, frozen_skipping_hook
from lightning_lisa.strategies.fsdp1 import blocks_without_own_unit, prepare_fsdp1
from lightning_lisa.strategies.fsdp2 import load_partial_optimizer_state

#: Strategies LISA refuses, by class name (no import of optional back-ends needed), with the reason.
UNSUPPORTED_STRATEGIES: dict[str, str] = {
    "DeepSpeedStrategy": (
        "DeepSpeed ZeRO keeps optimizer state in flat partitions, so the state of frozen blocks cannot "
        "be freed, and parameters frozen when the engine is built are excluded from training for good"
    ),
}


def check_strategy(strategy: Strategy, units: Sequence[Unit] | None = None, granularity: str = "block") -> None:
    """Raise for strategies LISA cannot run under; make DDP, FSDP1 and FSDP2 tolerate frozen blocks.

    Must run before the strategy wraps the model (a callback's ``setup`` hook does).

    Args:
        strategy: The Trainer's strategy.
        units: What LISA samples, when the model exists already (for FSDP1's wrapping policy).
        granularity: LISA's ``granularity``.

    Raises:
        LISAConfigError: For DeepSpeed, FSDP1 with ``use_orig_params=False``, and DDP with
            ``static_graph=True``.
    """
    for cls in type(strategy).__mro__:
        if cls.__name__ in UNSUPPORTED_STRATEGIES:
            raise LISAConfigError(
                f"LISA does not support `strategy={type(strategy).__name__}`: {UNSUPPORTED_STRATEGIES[cls.__name__]}."
                " Supported: a single device, DDP (`strategy='ddp'`, `'ddp_spawn'`, "
                "`'ddp_find_unused_parameters_true'`), FSDP2 (`ModelParallelStrategy`) or FSDP1 (`'fsdp'`)."
            )
    if isinstance(strategy, DDPStrategy):
        _prepare_ddp(strategy)
    if isinstance(strategy, ModelParallelStrategy):
        load_partial_optimizer_state(strategy)
    if isinstance(strategy, FSDPStrategy):
        prepare_fsdp1(strategy, units, granularity)


def check_wrapped(strategy: Strategy, units: Sequence[Unit]) -> None:
    """After wrapping: warn when FSDP1 put sampled units into shared FSDP units (no compute savings)."""
    if not isinstance(strategy, FSDPStrategy) or strategy.model is None:
        return
    shared = blocks_without_own_unit(strategy.model, units)
    if shared:
        rank_zero_warn(
            f"LISA: {len(shared)} of the {len(units)} sampled units (e.g. {shared[:3]}) are not FSDP units of "
            "their own, so they compute and reduce-scatter gradients even while frozen (their optimizer state is "
            "still freed). Use `FSDPStrategy(auto_wrap_policy=lightning_lisa.lisa_auto_wrap_policy(model))`."
        )


def _prepare_ddp(strategy: DDPStrategy) -> None:
    kwargs = getattr(strategy, "_ddp_kwargs", None)
    if not isinstance(kwargs, dict):
        raise LISAConfigError(
            "LISA could not check this DDP strategy's `find_unused_parameters`; use "
            "`strategy='ddp_find_unused_parameters_true'` or DDPStrategy(find_unused_parameters=True)."
        )
    if kwargs.get("static_graph"):
        raise LISAConfigError(
            "LISA cannot run with `DDPStrategy(static_graph=True)`: the set of parameters that receive "
            "gradients changes every `interval` steps. Use `strategy='ddp_find_unused_parameters_true'`."
        )
    if not kwargs.get("find_unused_parameters"):
        kwargs["find_unused_parameters"] = True
        rank_zero_info(
            "LISA: set `find_unused_parameters=True` on the DDP strategy, because frozen blocks receive no "
            "gradients. Pass `strategy='ddp_find_unused_parameters_true'` to make this explicit."
        )


def install_comm_hook(strategy: Strategy) -> FrozenSkippingState | None:
    """Register the frozen-skipping hook on a wrapped DDP model; ``None`` where it does not apply.

    It does not apply to other strategies, to a single process, or when the user gave the DDP
    strategy a communication hook of their own (which is kept, and then all buckets are reduced).
    """
    if not isinstance(strategy, DDPStrategy) or strategy.world_size < 2:
        return None
    model = strategy.model
    if not isinstance(model, DistributedDataParallel):
        return None
    if getattr(strategy, "_ddp_comm_hook", None) is not None:
        rank_zero_info(
            "LISA: the DDP strategy has its own `ddp_comm_hook`, so LISA does not install the hook that skips "
            "frozen gradients; every bucket is all-reduced."
        )
        return None
    state = FrozenSkippingState(process_group=model.process_group)
    model.register_comm_hook(state, frozen_skipping_hook)
    return state
