"""FSDP2 support: LISA under Lightning's ``ModelParallelStrategy`` with ``fully_shard``.

With ``torch.distributed.fsdp.fully_shard`` every parameter is a ``DTensor`` holding this rank's
shard, and LISA's mechanics carry over unchanged: FSDP2 reads ``requires_grad`` of the sharded
parameter again at every all-gather, parameters without a gradient are left out of the
reduce-scatter (a unit whose parameters are all frozen sends nothing), and popping a parameter's
entry from ``optimizer.state`` frees this rank's shard of its state. Three things need care:

* Mixed precision. FSDP2 fixes the original and the reduce dtype of each unit at its lazy
  initialization (normally the first forward), from the parameters that require gradients *then*.
  A block frozen at that moment has neither; with a ``MixedPrecisionPolicy(param_dtype=...)`` its
  first backward after it is sampled fails with ``attempting to assign a gradient with dtype
  'c10::BFloat16' to a tensor with grad_dtype 'Float'``. :func:`lazy_init` runs the lazy
  initialization while every parameter still trains; LISA calls it before it freezes anything.
* Byte counts. ``DTensor.numel()`` is the global size; what a rank holds is ``to_local()``
  (see :func:`~lightning_lisa.optimizer_state.optimizer_state_bytes`).
* Resuming. ``ModelParallelStrategy.load_checkpoint`` builds the optimizer state to load into from
  every parameter that requires gradients and then insists on finding each of them in the
  checkpoint, both for distributed (sharded) and for full checkpoints; LISA saves state only for
  the blocks it trained. :func:`load_partial_optimizer_state` makes the strategy leave out the
  parameters that have no saved state.

:func:`fully_shard_blocks` applies ``fully_shard`` in the usual layout, one unit per block. LISA's
savings do not depend on it (frozen parameters are never reduce-scattered, even in a unit that also
holds trainable ones), but per-block units keep only one block gathered at a time.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from lightning_lisa.layers import LayerInfo, find_layers

if TYPE_CHECKING:
    from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

_PATCHED = "_lisa_partial_optimizer_state"


def fully_shard_blocks(module: nn.Module, layers: str | Sequence[str] | None = None, **kwargs: Any) -> LayerInfo:
    """Apply ``fully_shard`` to every transformer block of ``module``, then to ``module`` itself.

    One FSDP unit per block keeps one block's parameters gathered at a time; the embeddings, the
    head and whatever else is outside the blocks form the root unit. Call it in the
    ``LightningModule``'s ``configure_model``.

    Args:
        module: The model to shard, e.g. the Hugging Face model held by the ``LightningModule``.
        layers: Dotted path(s) of the block list relative to ``module``; ``None`` detects it with
            :func:`~lightning_lisa.find_layers`.
        **kwargs: Passed to every ``fully_shard`` call (``mesh``, ``mp_policy``,
            ``reshard_after_forward``, ...).

    Returns:
        What :func:`~lightning_lisa.find_layers` found in ``module``.

    Examples:
        >>> import lightning.pytorch as pl
        >>> class Module(pl.LightningModule):
        ...     def configure_model(self) -> None:
        ...         fully_shard_blocks(self.model, mesh=self.device_mesh["data_parallel"])
    """
    from torch.distributed.fsdp import fully_shard

    info = find_layers(module, layers)
    for block in info.blocks:
        fully_shard(block, **kwargs)
    fully_shard(module, **kwargs)
    return info


def fsdp_roots(module: nn.Module) -> list[nn.Module]:
    """The outermost modules under ``module`` (itself included) that ``fully_shard`` was applied to."""
    if not torch.distributed.is_available():
        return []
    from torch.distributed.fsdp import FSDPModule

    roots: list[nn.Module] = []
    prefixes: list[str] = []
    for name, sub in module.named_modules():
        sharded = isinstance(sub, FSDPModule)  # not narrowed: FSDPModule is a mixin of nn.Module classes
        if sharded and not any(name.startswith(p) for p in prefixes):
            roots.append(sub)
            prefixes.append(f"{name}." if name else "")
    return roots


def lazy_init(module: nn.Module) -> int:
    """Run FSDP2's lazy initialization of every root under ``module`` now, instead of at the first forward.

    It must run while every parameter that will ever train requires gradients: FSDP2 takes each
    unit's mixed-precision dtypes from its trainable parameters at this point. It is a no-op for
    roots already initialized (by an earlier forward, e.g. the sanity check).

    Args:
        module: The module (e.g. the ``LightningModule``) that contains the FSDP2 roots.

    Returns:
        The number of FSDP2 roots found (0 when ``fully_shard`` was not used).
    """
    roots = fsdp_roots(module)
    for root in roots:
        state = getattr(root, "_get_fsdp_state", None)
        init: Callable[[], None] | None = getattr(state(), "_lazy_init", None) if callable(state) else None
        if init is None:
            rank_zero_warn(
                f"LISA could not run FSDP2's lazy initialization on `{type(root).__name__}` (this version of torch "
                "has no `_get_fsdp_state()._lazy_init()`). With a `MixedPrecisionPolicy`, blocks frozen at the first "
                "forward may fail when they are sampled later."
            )
            return len(roots)
        init()
    return len(roots)


def checkpoint_names(module: nn.Module) -> list[str]:
    """The name under which each parameter of ``module`` (in ``parameters()`` order) is saved in checkpoints.

    ``torch.distributed.checkpoint.state_dict`` drops wrapper prefixes that ``named_parameters()``
    keeps, e.g. ``_checkpoint_wrapped_module`` of activation checkpointing, ``_orig_mod`` of
    ``torch.compile`` and ``_fsdp_wrapped_module`` of FSDP1.
    """
    try:
        from torch.distributed.checkpoint.state_dict import _get_fqns
    except ImportError:  # pragma: no cover - older or newer torch
        return [_strip_wrappers(name) for name, _ in module.named_parameters()]
    return [next(iter(_get_fqns(module, name))) for name, _ in module.named_parameters()]


def _strip_wrappers(name: str) -> str:
    parts = name.split(".")
    return ".".join(p for p in parts if p not in ("_checkpoint_wrapped_module", "_orig_mod", "_fsdp_wrapped_module"))


def params_with_saved_state(
    path: str | Path, module: nn.Module, num_optimizers: int, weights_only: bool | None = None
) -> set[str]:
    """Names of the parameters of ``module`` that have optimizer state in a ``ModelParallelStrategy`` checkpoint.

    Args:
        path: A distributed checkpoint (a folder) or a full checkpoint (a file).
        module: The module the strategy saved (``strategy.model``).
        num_optimizers: How many optimizers the checkpoint holds (``optimizer_0``, ...).
        weights_only: Passed to ``torch.load`` for a full checkpoint (``None``: ``False``, as Lightning
            loads its own checkpoints).

    Returns:
        The names, as :func:`checkpoint_names` gives them, with an entry in the saved state of any of
        the optimizers.
    """
    names = checkpoint_names(module)
    known = set(names)
    path = Path(path)
    found: set[str] = set()
    if path.is_dir():
        from torch.distributed.checkpoint.filesystem import FileSystemReader

        keys = FileSystemReader(path).read_metadata().state_dict_metadata.keys()
        prefixes = [f"optimizer_{i}.state." for i in range(num_optimizers)]
        for key in keys:
            prefix = next((p for p in prefixes if key.startswith(p)), None)
            if prefix is None:
                continue
            rest = key[len(prefix) :]  # "<parameter name>.<state name>"
            while "." in rest and rest not in known:
                rest = rest.rsplit(".", 1)[0]
            if rest in known:
                found.add(rest)
        return found
    checkpoint = torch.load(path, mmap=True, map_location="cpu", weights_only=bool(weights_only))
    for state in checkpoint.get("optimizer_states", [])[:num_optimizers]:
        for key in state.get("state", {}):
            if isinstance(key, int) and 0 <= key < len(names):  # keyed by position in parameters()
                found.add(names[key])
            elif isinstance(key, str) and key in known:
                found.add(key)
    return found


def load_partial_optimizer_state(strategy: ModelParallelStrategy | FSDPStrategy) -> None:
    """Make ``strategy.load_checkpoint`` accept checkpoints whose optimizer state covers only some parameters.

    ``ModelParallelStrategy`` loads optimizer state strictly: it expects saved state for every
    parameter that requires gradients (a distributed checkpoint fails with ``Missing key in
    checkpoint state_dict: optimizer_0.state...``, a full one with ``Missing optimizer state for
    parameter ...``); FSDP1's ``FSDPStrategy`` likewise (``... is not in the optimizer state``).
    While it loads, this freezes the parameters that have no saved state, and
    unfreezes them right after, so they start without state as they would have in the saved run.
    Applied once per strategy; nothing changes for checkpoints with state for every parameter.

    Args:
        strategy: The ``ModelParallelStrategy`` or ``FSDPStrategy`` of the Trainer.
    """
    if getattr(strategy, _PATCHED, False):
        return
    original = strategy.load_checkpoint

    @functools.wraps(original)
    def load_checkpoint(checkpoint_path: str | Path, weights_only: bool | None = None) -> dict[str, Any]:
        module = strategy.model
        if module is None or not checkpoint_path:
            return original(checkpoint_path, weights_only=weights_only)
        path = strategy.broadcast(checkpoint_path)
        saved = params_with_saved_state(path, module, len(strategy.optimizers), weights_only)
        params = zip(checkpoint_names(module), module.parameters(), strict=True)
        frozen = [p for name, p in params if p.requires_grad and name not in saved] if saved else []
        for p in frozen:
            p.requires_grad_(False)
        try:
            return original(path, weights_only=weights_only)
        finally:
            for p in frozen:
                p.requires_grad_(True)

    strategy.load_checkpoint = load_checkpoint  # type: ignore[method-assign]
    setattr(strategy, _PATCHED, True)
