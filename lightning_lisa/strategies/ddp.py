"""DDP: the strategy checks, and a communication hook that all-reduces the gradients of trainable parameters only.

DDP must be built with ``find_unused_parameters=True`` (frozen blocks produce no gradients) and
without ``static_graph`` (the graph changes at every switch); :class:`DDPAdapter` refuses anything
else, naming ``strategy="ddp_find_unused_parameters_true"``.

Under DDP, frozen blocks still sit in gradient buckets, and the default hook all-reduces every bucket
whole: a LISA run communicates as much as full fine-tuning. This hook, which :class:`~lightning_lisa.LISA`
installs on the DDP model, looks at each bucket's parameters:

* all frozen: nothing is communicated (their gradients stay ``None``);
* all trainable: the bucket is averaged as by the default hook;
* mixed: only the trainable parameters' gradients are packed, averaged and unpacked.

Every rank freezes the same parameters (the schedule depends on ``(seed, period)`` only), so every
rank makes the same decision for each bucket and the collectives stay matched. The elements sent
per step are therefore those of the trainable parameters, whatever the bucket boundaries.
"""

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from lightning_lisa.errors import LISAConfigError
from lightning_lisa.layers import Unit
from lightning_lisa.strategies.base import StrategyAdapter

if TYPE_CHECKING:  # torch's stubs declare the class only in its C module; at run time we use the public name
    from torch._C._distributed_c10d import GradBucket
else:  # annotations here are evaluated (no `from __future__ import annotations`): DDP checks the hook's signature
    GradBucket = dist.GradBucket


@dataclass
class FrozenSkippingState:
    """State of :func:`frozen_skipping_hook`, with counters of what it communicated.

    Attributes:
        process_group: The group to all-reduce over; ``None`` for the default group.
        reduced_elements: Gradient elements all-reduced so far.
        bucket_elements: Gradient elements in all the buckets seen so far (what the default hook sends).
    """

    process_group: dist.ProcessGroup | None = None
    reduced_elements: int = 0
    bucket_elements: int = 0
    _world_size: int = field(default=0, repr=False)

    def world_size(self) -> int:
        """The number of processes gradients are averaged over."""
        if not self._world_size:
            self._world_size = dist.get_world_size(self.process_group)
        return self._world_size


def frozen_skipping_hook(state: FrozenSkippingState, bucket: GradBucket) -> torch.futures.Future[torch.Tensor]:
    """Average the gradients of the bucket's trainable parameters across ranks; skip frozen ones.

    Args:
        state: Counters and process group.
        bucket: The DDP gradient bucket.

    Returns:
        A future holding the bucket buffer with the trainable gradients averaged.
    """
    buffer = bucket.buffer()
    state.bucket_elements += buffer.numel()
    # The buffer is the gradients of bucket.parameters(), flattened and concatenated in that order.
    slices, offset = [], 0
    for param in bucket.parameters():
        if param.requires_grad:
            slices.append(buffer[offset : offset + param.numel()])
        offset += param.numel()
    if not slices:
        done: torch.futures.Future[torch.Tensor] = torch.futures.Future()
        done.set_result(buffer)
        return done
    whole = offset == buffer.numel() and sum(s.numel() for s in slices) == buffer.numel()
    packed = buffer if whole else torch.cat(slices)
    state.reduced_elements += packed.numel()
    packed.div_(state.world_size())

    def unpack(fut: torch.futures.Future[list[torch.Tensor]]) -> torch.Tensor:
        if not whole:
            reduced, start = fut.value()[0], 0
            for part in slices:
                part.copy_(reduced[start : start + part.numel()])
                start += part.numel()
        return buffer

    group = state.process_group if state.process_group is not None else dist.group.WORLD
    work = dist.all_reduce(packed, group=group, async_op=True)
    assert work is not None
    future: torch.futures.Future[torch.Tensor] = work.get_future().then(unpack)
    return future


class DDPAdapter(StrategyAdapter):
    """DDP: refuse a graph DDP cannot follow; install :func:`frozen_skipping_hook`."""

    name = "DDP"

    def check_wrapped(self, model: nn.Module, units: Sequence[Unit]) -> None:
        """Refuse a DDP model built without ``find_unused_parameters`` or with ``static_graph``."""
        ddp = find_ddp(model)
        if ddp is None:
            return
        where = "Fabric(strategy=" if self.fabric else "strategy="
        close = ")" if self.fabric else ""
        fix = (
            f"`{where}'ddp_find_unused_parameters_true'{close}` or `DDPStrategy(find_unused_parameters=True)`"
            if self.strategy is not None
            else "`DistributedDataParallel(model, find_unused_parameters=True)` without `static_graph`"
        )
        if ddp.static_graph:
            raise LISAConfigError(
                "LISA cannot run with `DDPStrategy(static_graph=True)`: the set of parameters that receive "
                f"gradients changes every `interval` steps. Use {fix}."
            )
        if not ddp.find_unused_parameters:
            raise LISAConfigError(
                "LISA needs DDP built with `find_unused_parameters=True`, because frozen blocks receive no "
                f"gradients (DDP would fail at the second batch). Use {fix}."
            )

    def begin(self, model: nn.Module, world_size: int, comm_hook: bool) -> FrozenSkippingState | None:
        """Register :func:`frozen_skipping_hook`, unless the strategy registered a hook of its own."""
        ddp = find_ddp(model)
        if not comm_hook or world_size < 2 or ddp is None:
            return None
        state = FrozenSkippingState(process_group=ddp.process_group)
        try:
            ddp.register_comm_hook(state, frozen_skipping_hook)
        except RuntimeError:  # DDP takes one hook: the user gave the strategy a `ddp_comm_hook`
            rank_zero_info(
                "LISA: the DDP strategy has its own `ddp_comm_hook`, so LISA does not install the hook that skips "
                "frozen gradients; every bucket is all-reduced."
            )
            return None
        return state


def find_ddp(model: nn.Module) -> DistributedDataParallel | None:
    """The outermost ``DistributedDataParallel`` module in ``model`` (itself included), or ``None``."""
    if isinstance(model, DistributedDataParallel):
        return model
    return next((m for m in model.modules() if isinstance(m, DistributedDataParallel)), None)
