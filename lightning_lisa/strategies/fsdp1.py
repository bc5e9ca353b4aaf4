"""FSDP1 support: LISA under Lightning's ``FSDPStrategy`` (``FullyShardedDataParallel``).

FSDP1 flattens the parameters of each FSDP unit into one ``FlatParameter``. With
``use_orig_params=True`` (Lightning's default) the original parameters stay visible as views into it,
keep their identity (so LISA and the optimizer hold the same objects before and after wrapping),
and may differ in ``requires_grad``; before every forward FSDP1 sets ``requires_grad`` of each flat
parameter to whether any of its original parameters requires it. What follows from that:

* A unit whose parameters are all frozen computes no weight gradients and sends nothing in the
  reduce-scatter (it is still gathered for the forward and backward passes, and gradients still
  flow through it to the layers below). LISA's compute and communication savings therefore need one FSDP unit per block
  (per attention/MLP module with ``granularity="module"``): :class:`LISAFSDPStrategy` wraps that way
  when it is given no ``auto_wrap_policy``, and :func:`lisa_auto_wrap_policy` gives the same policy.
* In a unit that mixes trainable and frozen parameters (e.g. a whole model wrapped as one unit),
  FSDP1 computes and reduces the gradient of the whole flat parameter, and only drops it for the
  frozen views afterwards: training is still correct and the optimizer state of frozen parameters is
  still freed, but nothing is saved in compute or communication. :func:`blocks_without_own_unit`
  finds such blocks after wrapping; LISA warns about them.
* ``use_orig_params=False`` hides the original parameters from the optimizer, so LISA cannot free
  their state; it is refused.
* Popping a parameter's entry from ``optimizer.state`` frees this rank's shard of its state: the
  original parameters are views of the local shard (empty on ranks that hold none of it).
* Checkpoints. FSDP1 saves optimizer state per flat parameter and insists on state for every
  original parameter of it that requires gradients at that moment. Between fits (e.g.
  ``trainer.save_checkpoint`` after ``fit``) every parameter requires gradients, but only the
  trained blocks have state: :class:`LISAFSDPStrategy` freezes the parameters without state while it
  saves, and the parameters without saved state while it loads; LISA requires it under FSDP1 (a plain
  ``FSDPStrategy`` is refused with that fix). It also writes each checkpoint beside its final name and
  moves it there once complete, so a run killed while saving never leaves a mixed checkpoint.
* ``sampling="weight_norm"``: each rank holds a slice of each parameter, so the norms of the units
  are summed over ranks (one all-reduce) before sampling.

FSDP1 runs on CUDA only (``FullyShardedDataParallel`` needs an accelerator, and Lightning checks
for CUDA). Its figures come from ``benchmarks/gpu/fsdp1_check.py``, so far run on one GPU only (world
size 1, where FSDP1 keeps its flat parameters unsharded).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from lightning_lisa.errors import LISAConfigError
from lightning_lisa.layers import Unit, find_layers, split_units
from lightning_lisa.norms import PlainTensors
from lightning_lisa.strategies.base import StrategyAdapter
from lightning_lisa.strategies.checkpoints import frozen_while, load_partial, save_complete

if TYPE_CHECKING:
    import lightning.pytorch as pl
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy


def wrap_classes(units: Sequence[Unit]) -> set[type[nn.Module]]:
    """The module classes to wrap so that every unit LISA samples is its own FSDP unit.

    Args:
        units: What LISA samples (:func:`~lightning_lisa.layers.split_units`).

    Returns:
        The class of each unit's main module: the block class, or the attention and MLP classes.
    """
    return {type(unit.modules[0]) for unit in units}


def lisa_auto_wrap_policy(
    module: nn.Module, layers: str | Sequence[str] | None = None, granularity: str = "block"
) -> ModuleWrapPolicy:
    """An FSDP1 ``auto_wrap_policy`` with one unit per transformer block (or per attention/MLP module).

    Pass it to ``LISAFSDPStrategy(auto_wrap_policy=...)``. The strategy chooses the same policy itself
    when it is given none, so this is only needed to combine it with settings of your own.

    Args:
        module: The model (the Hugging Face model or the ``LightningModule`` holding it).
        layers: Dotted path(s) of the block list; ``None`` detects it with
            :func:`~lightning_lisa.find_layers`.
        granularity: ``"block"`` or ``"module"``, as given to :class:`~lightning_lisa.LISA`.

    Returns:
        A ``ModuleWrapPolicy`` over the block class (or the attention and MLP classes).

    Examples:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        ...                      num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
        >>> policy = lisa_auto_wrap_policy(LlamaForCausalLM(config))
        >>> sorted(c.__name__ for c in policy._module_classes)
        ['LlamaDecoderLayer']
    """
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    if granularity not in ("block", "module"):
        raise ValueError(f"`granularity={granularity!r}` is not allowed; allowed: 'block', 'module'.")
    return ModuleWrapPolicy(wrap_classes(split_units(find_layers(module, layers), granularity)))


class LISAFSDPStrategy(FSDPStrategy):
    """Lightning's ``FSDPStrategy`` with what LISA needs: one FSDP unit per block, and partial optimizer state.

    It takes every argument of ``FSDPStrategy``. In addition:

    * Without an ``auto_wrap_policy``, it wraps each unit that the Trainer's :class:`~lightning_lisa.LISA`
      samples (each block, or each attention/MLP module with ``granularity="module"``) as an FSDP unit of
      its own, so that frozen ones compute and send no gradients. A policy you pass is kept.
    * Its ``load_checkpoint`` accepts checkpoints whose optimizer state covers only the trained blocks.
    * Its ``save_checkpoint`` writes a hidden sibling and moves it into place once complete: a run killed
      while saving leaves the previous checkpoint as it was.
    * Its ``optimizer_state`` accepts optimizers that hold state for only some parameters: FSDP1's
      ``optim_state_dict`` refuses a parameter that requires gradients but has no state when another
      parameter of its flat parameter has some, which is the case after ``fit`` (every parameter trains
      again, only the sampled blocks have state). Those parameters are frozen while the state is collected.

    Examples:
        >>> import lightning.pytorch as pl
        >>> from lightning_lisa import LISA
        >>> strategy = LISAFSDPStrategy(sharding_strategy="FULL_SHARD")
    """

    def setup(self, trainer: pl.Trainer) -> None:
        """Choose the wrapping policy from LISA's units, then set up as ``FSDPStrategy`` does."""
        if self.kwargs.get("auto_wrap_policy") is None:
            units = next((list(c.units) for c in trainer.callbacks if hasattr(c, "units") and c.units), [])  # type: ignore[attr-defined]
            if units:
                from torch.distributed.fsdp.wrap import ModuleWrapPolicy

                classes = wrap_classes(units)
                self.kwargs["auto_wrap_policy"] = ModuleWrapPolicy(classes)
                rank_zero_info(
                    f"LISA: one FSDP unit per sampled unit ({sorted(c.__name__ for c in classes)}), so that frozen "
                    "ones compute and send no gradients."
                )
        super().setup(trainer)

    def optimizer_state(self, optimizer: Any) -> dict[str, torch.Tensor]:
        """The optimizer's state for a checkpoint, with parameters that have no state left out."""
        inner = getattr(optimizer, "optimizer", optimizer)  # a LightningOptimizer wraps the optimizer
        params = [p for group in inner.param_groups for p in group["params"]]
        frozen = [p for p in dict.fromkeys(params) if p.requires_grad and not inner.state.get(p)]
        with frozen_while(frozen):
            return super().optimizer_state(optimizer)

    def load_checkpoint(self, checkpoint_path: str | Path, weights_only: bool | None = None) -> dict[str, Any]:
        """Load as ``FSDPStrategy`` does, leaving out parameters without saved optimizer state."""
        return load_partial(self, super().load_checkpoint, checkpoint_path, weights_only)

    def save_checkpoint(
        self, checkpoint: dict[str, Any], filepath: str | Path, storage_options: Any | None = None
    ) -> None:
        """Save as ``FSDPStrategy`` does, into a hidden sibling that is moved into place once complete.

        ``FSDPStrategy`` writes a sharded checkpoint's folder, or a full checkpoint's file, in place: a
        run killed halfway left a checkpoint of that name that was incomplete or mixed two steps. Here the
        ranks write a hidden sibling that rank 0 moves over ``filepath`` once all are done
        (:func:`~lightning_lisa.strategies.checkpoints.save_complete`).
        """
        save_complete(self, super().save_checkpoint, checkpoint, filepath, storage_options)


class FSDP1Adapter(StrategyAdapter):
    """FSDP1 (``FSDPStrategy``): refuse what cannot work, warn when blocks share FSDP units."""

    plain_tensors: PlainTensors = "sharded"
    name = "FSDP1 (FSDPStrategy)"
    strict_optimizer_loading = True

    def check(self, units: Sequence[Unit] | None, granularity: str) -> None:
        """Refuse ``use_orig_params=False`` and a plain ``FSDPStrategy``; say when no policy can be chosen."""
        strategy = self.strategy
        if self.fabric:  # Fabric's FSDPStrategy forces use_orig_params=True; the policy is the user's
            return
        assert isinstance(strategy, FSDPStrategy)
        if not strategy.kwargs.get("use_orig_params", False):
            raise LISAConfigError(
                f"LISA needs `FSDPStrategy(use_orig_params=True)` (Lightning's default), got "
                f"`use_orig_params={strategy.kwargs.get('use_orig_params')!r}`: without it the optimizer holds FSDP's "
                "flat parameters, and the optimizer state of frozen blocks cannot be freed."
            )
        if not isinstance(strategy, LISAFSDPStrategy):
            raise LISAConfigError(
                f"LISA under FSDP1 needs `strategy=lightning_lisa.LISAFSDPStrategy(...)` (it takes every argument of "
                f"`FSDPStrategy`), got `{type(strategy).__name__}`: it wraps one FSDP unit per {granularity} and saves "
                "checkpoints whose optimizer state covers only the blocks that trained."
            )
        if strategy.kwargs.get("auto_wrap_policy") is None and units is None:
            rank_zero_warn(
                "LISA: the `FSDPStrategy` has no `auto_wrap_policy` and the model is built in `configure_model`, so "
                "no policy can be chosen for it. Pass `auto_wrap_policy={<your block class>}` to the strategy; "
                "without one unit per block, frozen blocks still compute and reduce gradients."
            )

    def check_wrapped(self, model: nn.Module, units: Sequence[Unit]) -> None:
        """Warn when sampled units share FSDP units."""
        shared = blocks_without_own_unit(model, units)
        if shared:
            fix = (
                "Use `LISAFSDPStrategy()` without an `auto_wrap_policy`, or "
                "`auto_wrap_policy=lightning_lisa.lisa_auto_wrap_policy(model)`."
                if not self.fabric
                else "Pass `auto_wrap_policy=lightning_lisa.lisa_auto_wrap_policy(model)` (or the block class) to "
                "Fabric's `FSDPStrategy`."
            )
            rank_zero_warn(
                f"LISA: {len(shared)} of the {len(units)} sampled units (e.g. {shared[:3]}) are not FSDP units of "
                "their own, so they compute and reduce-scatter gradients even while frozen (their optimizer state is "
                f"still freed). {fix}"
            )


def blocks_without_own_unit(root: nn.Module, units: Sequence[Unit]) -> list[str]:
    """Names of the units whose main module is not wrapped as an FSDP1 unit of its own.

    Args:
        root: The wrapped model (``strategy.model``).
        units: What LISA samples.

    Returns:
        The unit names, in order; empty when ``root`` holds no ``FullyShardedDataParallel`` at all.
    """
    from torch.distributed.fsdp import FullyShardedDataParallel

    units_fsdp = [m for m in root.modules() if isinstance(m, FullyShardedDataParallel)]
    if not units_fsdp:
        return []
    # a model inspected after wrapping holds the wrappers themselves, one inspected before their contents
    wrapped = {id(m.module) for m in units_fsdp} | {id(m) for m in units_fsdp}
    return [u.name for u in units if id(u.modules[0]) not in wrapped]
