"""A DDP communication hook that all-reduces the gradients of trainable parameters only.

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

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

# The class torch.distributed.GradBucket, imported where type checkers can see it. Annotations here are
# evaluated (no `from __future__ import annotations`): DDP checks the hook's signature against the class.
from torch._C._distributed_c10d import GradBucket


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
