"""A minimal Lightning Fabric training loop, the same one the tests, the examples' checks and the benchmark use.

It trains a :class:`~lightning_lisa.testing.CausalLM` (or any module whose ``training_step`` returns a
loss) as the Trainer's automatic optimization does: the loss of each micro-batch is divided by the
number of micro-batches per step, gradients are accumulated without synchronization
(``fabric.no_backward_sync``) until the last one, then the optimizer steps and the gradients are
zeroed. With the same model, batches and optimizer, a Trainer with ``accumulate_grad_batches``
ends with the same weights.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from lightning.fabric import Fabric
from torch import Tensor
from torch.optim import Optimizer


def fabric_fit(
    fabric: Fabric,
    model: Any,
    optimizer: Optimizer,
    batches: Iterable[Any],
    max_steps: int,
    accumulate: int = 1,
    start_step: int = 0,
    after_step: Callable[[int], None] | None = None,
) -> int:
    """Train until ``max_steps`` optimizer steps were taken in all; return the steps taken.

    Args:
        fabric: The Fabric object.
        model: The model as ``fabric.setup`` returned it; its ``training_step(batch, index)`` gives the loss.
        optimizer: The optimizer as ``fabric.setup`` returned it.
        batches: The micro-batches, in order (moved to the device here).
        max_steps: Optimizer steps in all, counting ``start_step``.
        accumulate: Micro-batches per optimizer step.
        start_step: Steps already taken (a resumed run skips the batches of those steps).
        after_step: Called with the number of steps taken after each optimizer step.
    """
    step = start_step
    skip = start_step * accumulate
    for index, batch in enumerate(batches):
        if index < skip:
            continue
        if step >= max_steps:
            break
        last = (index + 1) % accumulate == 0
        with fabric.no_backward_sync(model, enabled=not last):
            loss: Tensor = model.training_step(fabric.to_device(batch), index)
            fabric.backward(loss / accumulate)
        if last:
            optimizer.step()
            optimizer.zero_grad()
            step += 1
            if after_step is not None:
                after_step(step)
    return step
