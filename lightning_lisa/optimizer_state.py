"""What happens to the optimizer state of parameters that LISA freezes.

Flipping ``requires_grad`` alone leaves the Adam moments of every block ever trained allocated, so
memory creeps up to full fine-tuning. Here, for a parameter that becomes frozen:

* ``"drop"`` pops its entry from ``optimizer.state``; torch optimizers and bitsandbytes re-create it
  lazily (step and bias correction restart) when the block is sampled again.
* ``"offload"`` moves its state tensors to CPU memory and moves them back when it trains again. The
  offloaded entries stay in ``optimizer.state``, so checkpoints hold them.
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
        self._warned_paged: set[int] = set()
        # The device of each offloaded state tensor, to move it back exactly where it was.
        self._devices: dict[tuple[int, str], torch.device] = {}

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
        """Undo :meth:`release` for ``params``, which have just been unfrozen (``"offload"`` only)."""
        if self.mode != "offload":
            return
        params = list(params)
        for optimizer in optimizers:
            for p in params:
                if p in optimizer.state:
                    optimizer.state[p] = {
                        key: value.to(self._devices.pop((id(p), key)))
                        if isinstance(value, torch.Tensor) and (id(p), key) in self._devices
                        else value
                        for key, value in optimizer.state[p].items()
                    }

    def _offload(self, p: torch.nn.Parameter, state: dict[str, Any]) -> dict[str, Any]:
        moved: dict[str, Any] = {}
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and value.device.type != "cpu":
                self._devices[(id(p), key)] = value.device
                value = value.to("cpu")
            moved[key] = value
        return moved

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
