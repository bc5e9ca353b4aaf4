"""What LISA and the monitor ask of a Lightning strategy, answered once per strategy by an adapter.

The callback never checks strategy types itself: it asks the adapter that :func:`adapter_for`
returns, at three moments of ``fit``:

* :meth:`StrategyAdapter.check` in ``setup``, before the model is wrapped: refuse what cannot work.
* :meth:`StrategyAdapter.prepare` in ``on_fit_start``, after wrapping: check the wrapped model.
* :meth:`StrategyAdapter.start` in ``on_train_start``, before the first freeze: anything that must
  see every parameter trainable (FSDP2's lazy initialization), and DDP's communication hook.

``prepare`` and ``start`` take the Trainer; what they do is in :meth:`StrategyAdapter.check_wrapped`
and :meth:`StrategyAdapter.begin`, which take the wrapped model, so that a Fabric loop (whose strategy
keeps no model) runs the same checks (:mod:`lightning_lisa.fabric`). An adapter answers for a
Trainer strategy (``lightning.pytorch.strategies``) or a Fabric one (``lightning.fabric.strategies``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from lightning.fabric.strategies.strategy import Strategy as FabricStrategy
from lightning.pytorch.strategies import Strategy
from torch import nn

from lightning_lisa.norms import PlainTensors

if TYPE_CHECKING:
    import lightning.pytorch as pl

    from lightning_lisa.layers import Unit
    from lightning_lisa.strategies.ddp import FrozenSkippingState


class StrategyAdapter:
    """The single-device behaviour, and the base of the adapters for distributed strategies.

    Attributes:
        plain_tensors: How this strategy lays out plain tensors (see :mod:`lightning_lisa.norms`).
        name: What messages call the strategy.
        strict_optimizer_loading: Whether the strategy loads optimizer state strictly (FSDP).
    """

    plain_tensors: PlainTensors = "replicated"
    name = "single device"
    #: Whether loading optimizer state insists on saved state for every parameter that requires gradients.
    strict_optimizer_loading = False

    def __init__(self, strategy: Strategy | FabricStrategy | None) -> None:
        self.strategy = strategy

    @property
    def fabric(self) -> bool:
        """Whether the strategy is a Fabric one (``lightning.fabric.strategies``)."""
        return isinstance(self.strategy, FabricStrategy)

    def check(self, units: Sequence[Unit] | None, granularity: str) -> None:
        """Raise for a configuration LISA cannot train with; runs before the model is wrapped.

        Args:
            units: What LISA samples, when the model exists already; ``None`` when it is built in
                ``configure_model``.
            granularity: LISA's ``granularity``, for the messages.
        """

    def prepare(self, trainer: pl.Trainer, units: Sequence[Unit]) -> None:
        """Check the wrapped model, after the strategy wrapped it.

        Args:
            trainer: The Trainer, at ``on_fit_start``.
            units: What LISA samples.
        """
        model = getattr(self.strategy, "model", None)
        if model is not None:
            self.check_wrapped(model, units)

    def check_wrapped(self, model: nn.Module, units: Sequence[Unit]) -> None:
        """Check the model after the strategy wrapped it; raise for what cannot work.

        Args:
            model: The wrapped model (e.g. the ``DistributedDataParallel`` module, or a module holding it).
            units: What LISA samples.
        """

    def start(self, trainer: pl.Trainer, comm_hook: bool) -> FrozenSkippingState | None:
        """Run what must happen while every parameter still trains; install DDP's communication hook.

        Args:
            trainer: The Trainer, at ``on_train_start``.
            comm_hook: Whether to install the hook that all-reduces only trainable gradients (DDP).

        Returns:
            The hook's counters, where one was installed.
        """
        model = getattr(self.strategy, "model", None)
        if model is None:
            return None
        return self.begin(model, trainer.world_size, comm_hook)

    def begin(self, model: nn.Module, world_size: int, comm_hook: bool) -> FrozenSkippingState | None:
        """What :meth:`start` does, given the wrapped model and the number of processes.

        Args:
            model: The wrapped model (or a module holding it).
            world_size: Processes training together.
            comm_hook: Whether to install the hook that all-reduces only trainable gradients (DDP).

        Returns:
            The hook's counters, where one was installed.
        """
        return None
