"""What happens to the optimizer state of parameters that LISA freezes.

Flipping ``requires_grad`` alone leaves the Adam moments of every block ever trained allocated, so
memory creeps up to full fine-tuning. Here, for a parameter that becomes frozen:

* ``"drop"`` pops its entry from ``optimizer.state``; torch optimizers and bitsandbytes re-create it
  lazily (step and bias correction restart) when the block is sampled again.
* ``"offload"`` moves its state tensors to CPU memory and moves them back when it trains again. The
  offloaded entries stay in ``optimizer.state``, so checkpoints hold them. On CUDA the host buffers are
  pinned and reused, and the copies run without blocking on a side stream; :meth:`OptimizerStateHandler.prefetch`
  starts copying back the state of the next period's blocks before the switch (the schedule is known
  in advance), so the switch finds it on the device. On CPU the same path runs with plain copies.
* ``"keep"`` leaves it (the naive behaviour, for comparison).

The optimizer's parameter groups are never changed, so parameter ids and checkpoints stay stable.

Under FSDP2 the state tensors of a sharded parameter are ``DTensor`` objects: popping the entry frees
this rank's shard, and bytes are counted on the local shard (``DTensor.numel()`` is the global size).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Literal, get_args

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.optim import Optimizer

OptimizerStateMode = Literal["drop", "offload", "keep"]
OPTIMIZER_STATE_MODES: tuple[str, ...] = get_args(OptimizerStateMode)


def optimizer_state_bytes(optimizers: Iterable[Optimizer], device: torch.device | str | None = None) -> int:
    """Bytes held by the state tensors of ``optimizers`` (optionally only those on ``device``) on this rank.

    A sharded ``DTensor`` state tensor counts with its local shard, what this rank holds.

    Examples:
        >>> import torch
        >>> layer = torch.nn.Linear(4, 4, bias=False)
        >>> opt = torch.optim.AdamW(layer.parameters())
        >>> layer(torch.ones(1, 4)).sum().backward(); opt.step()
        >>> optimizer_state_bytes([opt]) # exp_avg + exp_avg_sq (2 x 16 floats) + the step counter
        132
    """
    wanted = None if device is None else torch.device(device)
    total = 0
    seen: set[int] = set()
    for optimizer in optimizers:
        for state in optimizer.state.values():
            for value in state.values():
                if isinstance(value, torch.Tensor) and id(value) not in seen:
                    seen.add(id(value))
                    local = local_tensor(value)
                    if wanted is None or _same_device(local.device, wanted):
                        total += local.numel() * local.element_size()
    return total


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """What this rank holds of ``tensor``: the local shard of a ``DTensor``, else ``tensor`` itself."""
    if torch.distributed.is_available():
        from torch.distributed.tensor import DTensor

        if isinstance(tensor, DTensor):
            return tensor.to_local()
    return tensor


def is_paged(optimizer: Optimizer) -> bool:
    """Whether ``optimizer`` is a bitsandbytes *paged* optimizer, whose buffers are never released."""
    return bool(getattr(optimizer, "is_paged", False))


class OptimizerStateHandler:
    """Frees, offloads or keeps the optimizer state of parameters as they are frozen and unfrozen.

    Args:
        mode: One of ``"drop"``, ``"offload"``, ``"keep"``.

    Examples:
        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
        >>> opt = torch.optim.AdamW(model.parameters())
        >>> model(torch.ones(1, 4)).sum().backward(); opt.step()
        >>> OptimizerStateHandler("drop").release([opt], model[0].parameters())
        >>> len(opt.state)  # only the second layer's weight and bias keep state
        2
    """

    def __init__(self, mode: OptimizerStateMode) -> None:
        if mode not in OPTIMIZER_STATE_MODES:
            raise ValueError(f"`optimizer_state={mode!r}` is not one of {list(OPTIMIZER_STATE_MODES)}.")
        self.mode: OptimizerStateMode = mode
        #: State tensors moved back from copies :meth:`prefetch` started (the others were copied at the switch).
        self.prefetch_hits = 0
        #: State tensors :meth:`restore` had to copy itself.
        self.prefetch_misses = 0
        self._warned_paged: set[int] = set()
        # The device of each offloaded state tensor, to move it back exactly where it was.
        self._devices: dict[tuple[int, str], torch.device] = {}
        # One host buffer per offloaded state tensor (pinned on CUDA), reused at every offload.
        self._host: dict[tuple[int, str], torch.Tensor] = {}
        # Device copies started by `prefetch`, and the streams that make them.
        self._prefetched: dict[tuple[int, str], torch.Tensor] = {}
        self._streams: dict[torch.device, torch.cuda.Stream] = {}

    def release(self, optimizers: Sequence[Optimizer], params: Iterable[torch.nn.Parameter]) -> None:
        """Apply the mode to ``params``, which have just been frozen."""
        if self.mode == "keep":
            return
        params = list(params)
        for optimizer in self._releasing(optimizers):
            for p in params:
                if p not in optimizer.state:
                    continue
                if self.mode == "drop":
                    del optimizer.state[p]
                else:
                    optimizer.state[p] = self._offload(p, optimizer.state[p])

    def restore(self, optimizers: Sequence[Optimizer], params: Iterable[torch.nn.Parameter]) -> None:
        """Undo :meth:`release` for ``params``, which have just been unfrozen (``"offload"`` only).

        State that :meth:`prefetch` already copied is used as it is; the rest is copied now. Prefetched
        copies of parameters that were not unfrozen (a wrong guess) are freed.
        """
        if self.mode != "offload":
            return
        params = list(params)
        for optimizer in optimizers:
            for p in params:
                if p in optimizer.state:
                    optimizer.state[p] = {key: self._back(p, key, value) for key, value in optimizer.state[p].items()}
        self._prefetched.clear()

    def prefetch(self, optimizers: Sequence[Optimizer], params: Iterable[torch.nn.Parameter]) -> int:
        """Start copying the offloaded state of ``params`` back to its device, before they are unfrozen.

        On CUDA the copies run on a side stream from pinned memory and overlap the training steps
        until :meth:`restore` installs them; elsewhere they are plain copies. Only state that is
        offloaded is copied (``"offload"`` only).

        Returns:
            The bytes whose copy was started.

        Examples:
            >>> import torch
            >>> layer = torch.nn.Linear(4, 4)
            >>> opt = torch.optim.AdamW(layer.parameters())
            >>> layer(torch.ones(1, 4)).sum().backward(); opt.step()
            >>> handler = OptimizerStateHandler("offload")
            >>> handler.release([opt], [layer.weight])
            >>> handler.prefetch([opt], [layer.weight])  # exp_avg, exp_avg_sq and the step counter
            132
            >>> handler.restore([opt], [layer.weight]); handler.prefetch_hits
            3
        """
        if self.mode != "offload":
            return 0
        started = 0
        for optimizer in optimizers:
            for p in params:
                for key, value in optimizer.state.get(p, {}).items():
                    k = (id(p), key)
                    if not isinstance(value, torch.Tensor) or k not in self._devices or k in self._prefetched:
                        continue
                    if local_tensor(value) is not value:  # DTensor shards come back at the switch
                        continue
                    device = self._devices[k]
                    if device.type == "cuda":
                        stream = self._stream(device)
                        with torch.cuda.stream(stream):  # after the offload copies queued on the same stream
                            self._prefetched[k] = value.to(device, non_blocking=True)
                    else:
                        self._prefetched[k] = value.to(device, copy=True)
                    started += value.numel() * value.element_size()
        return started

    def synchronize(self) -> None:
        """Wait for the copies in flight (before the host buffers are read, e.g. by a checkpoint)."""
        for stream in self._streams.values():
            stream.synchronize()

    def _back(self, p: torch.nn.Parameter, key: str, value: Any) -> Any:
        k = (id(p), key)
        if not isinstance(value, torch.Tensor) or k not in self._devices:
            return value
        device = self._devices.pop(k)
        copy = self._prefetched.pop(k, None)
        if copy is None:
            self.prefetch_misses += 1
            if local_tensor(value) is not value:  # a DTensor shard, as it was moved
                return value.to(device)
            return value.to(device, non_blocking=value.is_pinned(), copy=True)
        self.prefetch_hits += 1
        if device.type == "cuda":  # made on the side stream, used and freed on the current one
            current = torch.cuda.current_stream(device)
            current.wait_stream(self._stream(device))
            copy.record_stream(current)
        return copy

    def _offload(self, p: torch.nn.Parameter, state: dict[str, Any]) -> dict[str, Any]:
        moved: dict[str, Any] = {}
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and (id(p), key) not in self._devices:
                k = (id(p), key)
                self._devices[k] = value.device
                if local_tensor(value) is not value:  # a DTensor shard: moved as a whole, as DTensor.to does
                    moved[key] = value.to("cpu")
                    continue
                host = self._host.get(k)
                if host is None or host.shape != value.shape or host.dtype != value.dtype:
                    host = torch.empty(value.shape, dtype=value.dtype, pin_memory=value.is_cuda)
                    self._host[k] = host
                if value.is_cuda:
                    stream = self._stream(value.device)
                    stream.wait_stream(torch.cuda.current_stream(value.device))  # after the last update
                    with torch.cuda.stream(stream):
                        host.copy_(value, non_blocking=True)
                    value.record_stream(stream)  # not reused by the allocator before the copy is done
                else:
                    host.copy_(value)
                value = host
            moved[key] = value
        return moved

    def _stream(self, device: torch.device) -> torch.cuda.Stream:
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device)  # type: ignore[no-untyped-call]
        return self._streams[device]

    def _releasing(self, optimizers: Sequence[Optimizer]) -> list[Optimizer]:
        """The optimizers whose state can really be released; warns once about the others."""
        releasing = []
        for optimizer in optimizers:
            if not is_paged(optimizer):
                releasing.append(optimizer)
            elif id(optimizer) not in self._warned_paged:
                self._warned_paged.add(id(optimizer))
                rank_zero_warn(
                    f"LISA(optimizer_state={self.mode!r}): {type(optimizer).__name__} is a bitsandbytes paged "
                    "optimizer, whose buffers are never released, so its state is kept (as with "
                    "optimizer_state='keep'). Use a non-paged optimizer (e.g. bitsandbytes.optim.AdamW8bit) "
                    "to save its memory."
                )
        return releasing


def _same_device(a: torch.device, b: torch.device) -> bool:
    return a.type == b.type and (b.index is None or a.index == b.index)
