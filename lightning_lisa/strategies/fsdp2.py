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
  the blocks it trained. :class:`LISAModelParallelStrategy` holds back the parameters without saved
  state while the checkpoint loads, so LISA requires it (a plain ``ModelParallelStrategy`` is refused
  with that fix).

:func:`fully_shard_blocks` applies ``fully_shard`` in the usual layout, one unit per block. LISA's
savings do not depend on it (frozen parameters are never reduce-scattered, even in a unit that also
holds trainable ones), but per-block units keep only one block gathered at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from lightning_lisa.errors import LISAConfigError
from lightning_lisa.layers import LayerInfo, find_layers
from lightning_lisa.strategies.base import StrategyAdapter
from lightning_lisa.strategies.checkpoints import load_partial, save_complete

if TYPE_CHECKING:
    import lightning.pytorch as pl

    from lightning_lisa.layers import Unit
    from lightning_lisa.strategies.ddp import FrozenSkippingState


class LISAModelParallelStrategy(ModelParallelStrategy):
    """Lightning's ``ModelParallelStrategy`` that resumes from checkpoints with partial optimizer state.

    It takes every argument of ``ModelParallelStrategy``. LISA saves optimizer state only for the
    blocks that trained; ``ModelParallelStrategy`` insists on state for every parameter that requires
    gradients when it loads. This strategy freezes the parameters without saved state while it loads
    (see :mod:`lightning_lisa.strategies.checkpoints`); checkpoints with state for every parameter load
    as before.

    Examples:
        >>> strategy = LISAModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    """

    def load_checkpoint(self, checkpoint_path: str | Path, weights_only: bool | None = None) -> dict[str, Any]:
        """Load as ``ModelParallelStrategy`` does, leaving out parameters without saved optimizer state."""
        return load_partial(self, super().load_checkpoint, checkpoint_path, weights_only)

    def save_checkpoint(
        self, checkpoint: dict[str, Any], filepath: str | Path, storage_options: Any | None = None
    ) -> None:
        """Save as ``ModelParallelStrategy`` does, into a hidden sibling that is moved into place once complete.

        A distributed checkpoint is a folder that every rank writes its shards into, and
        ``ModelParallelStrategy`` writes it in place, over the previous checkpoint of that name: a run
        killed halfway left a folder mixing the new shards with the old metadata, which loaded without
        an error. Here the ranks write a hidden sibling that rank 0 moves over ``filepath`` once all are
        done (:func:`~lightning_lisa.strategies.checkpoints.save_complete`).
        """
        save_complete(self, super().save_checkpoint, checkpoint, filepath, storage_options)


class FSDP2Adapter(StrategyAdapter):
    """FSDP2 (``ModelParallelStrategy``): lazy initialization before the first freeze; the resuming subclass."""

    name = "FSDP2 (ModelParallelStrategy)"
    strict_optimizer_loading = True

    def check(self, units: Sequence[Unit] | None, granularity: str) -> None:
        """Refuse a plain ``ModelParallelStrategy`` in a Trainer: it cannot resume from LISA's checkpoints.

        Fabric's ``ModelParallelStrategy`` is accepted as it is: :meth:`LISA.load <lightning_lisa.LISA.load>`
        loads its checkpoints.
        """
        if not self.fabric and not isinstance(self.strategy, LISAModelParallelStrategy):
            raise LISAConfigError(
                f"LISA under FSDP2 needs `strategy=lightning_lisa.LISAModelParallelStrategy(...)` (it takes every "
                f"argument of `ModelParallelStrategy`), got `{type(self.strategy).__name__}`: LISA's checkpoints hold "
                "optimizer state for the trained blocks only, which `ModelParallelStrategy` refuses to load."
            )

    def start(self, trainer: pl.Trainer, comm_hook: bool) -> FrozenSkippingState | None:
        """Run FSDP2's lazy initialization while every parameter still trains."""
        return self.begin(trainer.lightning_module, trainer.world_size, comm_hook)

    def begin(self, model: nn.Module, world_size: int, comm_hook: bool) -> FrozenSkippingState | None:
        """Run FSDP2's lazy initialization of the roots in ``model`` while every parameter still trains."""
        lazy_init(model)
        return None


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
        # FSDP2 has no public way to run its lazy initialization early (pytorch#186998): the private
        # ``_get_fsdp_state()._lazy_init()`` is what its first forward calls. Where it is missing, LISA warns.
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
