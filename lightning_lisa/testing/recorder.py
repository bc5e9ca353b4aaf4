"""A callback that records, for every optimizer step, what changed and what holds optimizer state."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import torch

from lightning_lisa.callback import LISA
from lightning_lisa.optimizer_state import local_tensor, optimizer_state_bytes


@dataclass
class StepRecord:
    """What one optimizer step did.

    Attributes:
        step: ``trainer.global_step`` after the step.
        active_layers: LISA's active units during the step.
        changed: Names of the parameters whose (local) values changed.
        trainable: Names of the parameters that required gradients before the step.
        with_state: Names of the parameters with optimizer state after the step.
        state_bytes: Optimizer-state bytes on this rank after the step.
        full_state_bytes: Free for a caller's own reference figure.
    """

    step: int
    active_layers: tuple[int, ...]
    changed: set[str]
    trainable: set[str]
    with_state: set[str]
    state_bytes: int
    full_state_bytes: int = 0


@dataclass
class Recorder(pl.Callback):
    """Snapshot the weights before each optimizer step and compare after it.

    Sharded parameters (``DTensor``) are compared on this rank's shard.
    """

    lisa: LISA
    steps: list[StepRecord] = field(default_factory=list)
    batch_starts: list[tuple[int, int, tuple[int, ...]]] = field(default_factory=list)
    _before: dict[str, torch.Tensor] | None = None
    _trainable: set[str] = field(default_factory=set)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """Record which units are active at the start of each micro-batch."""
        self.batch_starts.append((batch_idx, trainer.global_step, tuple(self.lisa.active_layers)))

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        """Snapshot the weights and what trains."""
        self._before = {n: local_tensor(p.detach()).clone() for n, p in pl_module.named_parameters()}
        self._trainable = {n for n, p in pl_module.named_parameters() if p.requires_grad}

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Compare with the snapshot after an optimizer step."""
        if self._before is None:
            return
        params = dict(pl_module.named_parameters())
        changed = {n for n, p in params.items() if not torch.equal(local_tensor(p.detach()), self._before[n])}
        with_state = {
            n for n, p in params.items() if any(p in opt.state and opt.state[p] for opt in trainer.optimizers)
        }
        self.steps.append(
            StepRecord(
                step=trainer.global_step,
                active_layers=tuple(self.lisa.active_layers),
                changed=changed,
                trainable=self._trainable,
                with_state=with_state,
                state_bytes=optimizer_state_bytes(trainer.optimizers),
            )
        )
        self._before = None


def block_of(name: str, prefix: str = "model.model.layers.") -> int | None:
    """The block index in a parameter name under ``prefix``, or ``None``.

    Examples:
        >>> block_of("model.model.layers.3.mlp.up_proj.weight"), block_of("model.lm_head.weight")
        (3, None)
    """
    if not name.startswith(prefix):
        return None
    return int(name[len(prefix) :].split(".")[0])
