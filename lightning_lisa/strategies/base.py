"""What LISA and the monitor ask of a Lightning strategy, answered once per strategy by an adapter.

The callback never checks strategy types itself: it asks the adapter that :func:`adapter_for`
returns, at three moments of ``fit``:

* :meth:`StrategyAdapter.check` in ``setup``, before the model is wrapped: refuse what cannot work.
* :meth:`StrategyAdapter.prepare` in ``on_fit_start``, after wrapping: check the wrapped model.
* :meth:`StrategyAdapter.start` in ``on_train_start``, before the first freeze: anything that must
  see every parameter trainable (FSDP2's lazy initialization), and DDP's communication hook.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from lightning.pytorch.strategies import Strategy

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
    """

    plain_tensors: PlainTensors = "replicated"
    name = "single device"

    def __init__(self, strategy: Strategy) -> None:
        self.strategy = strategy

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

    def start(self, trainer: pl.Trainer, comm_hook: bool) -> FrozenSkippingState | None:
        """Run what must happen while every parameter still trains; install DDP's communication hook.

        Args:
            trainer: The Trainer, at ``on_train_start``.
            comm_hook: Whether to install the hook that all-reduces only trainable gradients (DDP).

        Returns:
            The hook's counters, where one was installed.
        """
        return None
