"""What LISA and the monitor ask of a Lightning strategy, answered once per strategy by an adapter.

The callback never checks strategy types itself: it asks the adapter that :func:`adapter_for`
returns, at three moments of ``fit``:

* :meth:`StrategyAdapter.check` in ``setup``, before the model is wrapped: refuse what cannot work.
* :meth:`StrategyAdapter.prepare` in ``on_fit_start``, after wrapping and before a checkpoint is
  loaded: check the wrapped model; under sharded strategies, hold back the parameters that have no
  optimizer state in the checkpoint (:func:`params_without_saved_state`) so the strategy loads what
  was saved.
* :meth:`StrategyAdapter.start` in ``on_train_start``, before the first freeze: anything that must
  see every parameter trainable (FSDP2's lazy initialization), and DDP's communication hook.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
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

    def prepare(self, trainer: pl.Trainer, units: Sequence[Unit]) -> list[torch.nn.Parameter]:
        """Check the wrapped model; return parameters to hold frozen while a checkpoint loads.

        Args:
            trainer: The Trainer, after the strategy wrapped the model.
            units: What LISA samples.

        Returns:
            Trainable parameters without optimizer state in ``trainer.ckpt_path``, which the caller freezes
            until ``on_train_start``, so that a strategy that loads optimizer state strictly finds no
            parameter missing. Empty for strategies that load partial state by themselves.
        """
        return []

    def start(self, trainer: pl.Trainer, comm_hook: bool) -> FrozenSkippingState | None:
        """Run what must happen while every parameter still trains; install DDP's communication hook.

        Args:
            trainer: The Trainer, at ``on_train_start``.
            comm_hook: Whether to install the hook that all-reduces only trainable gradients (DDP).

        Returns:
            The hook's counters, where one was installed.
        """
        return None


def held_parameters(trainer: pl.Trainer) -> list[torch.nn.Parameter]:
    """The trainable parameters of the wrapped model without optimizer state in ``trainer.ckpt_path``."""
    from lightning_lisa.strategies.checkpoints import params_without_saved_state

    model = trainer.strategy.model
    if not trainer.ckpt_path or model is None:
        return []
    path = trainer.strategy.broadcast(trainer.ckpt_path)
    return params_without_saved_state(path, model, len(trainer.optimizers))
