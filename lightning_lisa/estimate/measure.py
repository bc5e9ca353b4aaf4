"""Measured counterparts of the estimate: the peak bytes of tensors during real steps, on any device.

On CUDA, ``torch.cuda.max_memory_allocated`` measures a peak; on CPU, the resident set size mixes in
the allocator, Python and the libraries. :class:`TensorPeak` counts instead the storages of the tensors
that PyTorch's operators create while it is active (a :class:`~torch.utils._python_dispatch.TorchDispatchMode`),
each until its last tensor is freed, plus the tensors it is told to track: the peak of the bytes alive
at once is what an exact allocator would need. That is what the estimate models, so the two can be
compared at small shapes on a CPU.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode  # where torch defines it; no public alias


class TensorPeak(TorchDispatchMode):  # type: ignore[no-untyped-call]
    """The peak bytes of tensor storages alive at once while active.

    Storages created by operators while the mode is active are counted until their last tensor is
    freed; storages that exist before (weights, gradients, optimizer state) count only if given to
    :meth:`track`. Views and in-place results share their input's storage and count once. Tensors on
    the meta device are ignored.

    Attributes:
        current: Bytes alive now.
        peak: The largest ``current`` seen.

    Examples:
        >>> a = torch.ones(1000, 1000)  # 4 MB, created before: not counted unless tracked
        >>> with TensorPeak() as peak:
        ...     peak.track([a])
        ...     b = a @ a  # 4 MB more
        ...     c = b * 2  # and 4 MB more
        ...     del b
        ...     d = c + 1  # b was freed: still 12 MB at most
        >>> peak.peak // 10**6, peak.current // 10**6
        (12, 12)
    """

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._live: dict[int, list[int]] = {}  # storage address -> [bytes, tensors alive]
        self.current = 0
        self.peak = 0

    def track(self, tensors: Iterable[torch.Tensor]) -> None:
        """Count ``tensors`` that already exist, until they are freed (each storage once).

        A tracked storage counts until the tensor objects given here are freed, so give the tensors that
        own it (``model.parameters()``, ``p.grad``, the optimizer's state), not copies that die at once:
        ``model.state_dict()`` returns detached tensors, which would be released as soon as the
        dictionary is dropped.
        """
        for tensor in tensors:
            self._add(tensor, inputs=())

    def __torch_dispatch__(
        self, func: Any, types: Any, args: Sequence[Any] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        out = func(*args, **(kwargs or {}))
        inputs = {_address(t) for t in _tensors((args, kwargs))}
        for tensor in _tensors(out):
            self._add(tensor, inputs)
        return out

    def _add(self, tensor: torch.Tensor, inputs: Iterable[int]) -> None:
        if tensor.device.type == "meta":
            return
        key = _address(tensor)
        if key == 0:
            return
        entry = self._live.get(key)
        if entry is None:
            if key in inputs:  # a view or an in-place result of an untracked tensor
                return
            nbytes = tensor.untyped_storage().nbytes()
            entry = self._live[key] = [nbytes, 0]
            self.current += nbytes
            self.peak = max(self.peak, self.current)
        entry[1] += 1
        weakref.finalize(tensor, self._release, key)

    def _release(self, key: int) -> None:
        entry = self._live.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self._live[key]


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    """The tensors in ``value``, through lists, tuples and dicts (an operator's arguments and results)."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _tensors(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)


def _address(tensor: torch.Tensor) -> int:
    return int(tensor.untyped_storage().data_ptr())
