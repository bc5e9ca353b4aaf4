"""FSDP1 support: LISA under Lightning's ``FSDPStrategy`` (``FullyShardedDataParallel``).

FSDP1 flattens the parameters of each FSDP unit into one ``FlatParameter``. With
``use_orig_params=True`` (Lightning's default) the original parameters stay visible as views into it,
keep their identity (so LISA and the optimizer hold the same objects before and after wrapping),
and may differ in ``requires_grad``; before every forward FSDP1 sets ``requires_grad`` of each flat
parameter to whether any of its original parameters requires it. What follows from that:

* A unit whose parameters are all frozen computes no weight gradients and sends nothing in the
  reduce-scatter (it is still gathered for the forward and backward passes, and gradients still
  flow through it to the layers below). LISA's compute and communication savings therefore need one FSDP unit per block
  (per attention/MLP module with ``granularity="module"``): :func:`lisa_auto_wrap_policy` gives that
  policy, and LISA sets it on the strategy when it has none.
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
  trained blocks have state: :func:`save_partial_optimizer_state` freezes the parameters without
  state while the strategy saves. FSDP1's loading skips parameters without saved state by itself;
  LISA applies :func:`~lightning_lisa.strategies.fsdp2.load_partial_optimizer_state` as under FSDP2 (that is how
  the resume check ran).
* ``sampling="weight_norm"``: each rank holds a slice of each parameter, so the norms of the units
  are summed over ranks (one all-reduce) before sampling.

FSDP1 runs on CUDA only (``FullyShardedDataParallel`` needs an accelerator, and Lightning checks
for CUDA). Its figures come from ``benchmarks/gpu/fsdp1_check.py``, so far run on one GPU only (world
size 1, where FSDP1 keeps its flat parameters unsharded).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from lightning_lisa.errors import LISAConfigError
from lightning_lisa.layers import Unit, find_layers, split_units
from lightning_lisa.strategies.fsdp2 import load_partial_optimizer_state

if TYPE_CHECKING:
    from lightning.pytorch.strategies import FSDPStrategy
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

_PATCHED = "_lisa_partial_optimizer_state_save"


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

    Pass it to ``FSDPStrategy(auto_wrap_policy=...)``. LISA sets the same policy itself when the
    strategy has none, so this is only needed to combine it with settings of your own.

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


def prepare_fsdp1(strategy: FSDPStrategy, units: Sequence[Unit] | None, granularity: str) -> None:
    """Check an ``FSDPStrategy`` before it wraps the model, and give it one unit per block if it has no policy.

    Also makes the strategy save and load checkpoints whose optimizer state covers only the trained
    parameters (:func:`save_partial_optimizer_state`,
    :func:`~lightning_lisa.strategies.fsdp2.load_partial_optimizer_state`).

    Args:
        strategy: The Trainer's ``FSDPStrategy``, not yet set up.
        units: What LISA samples, or ``None`` when the model is built later (in ``configure_model``).
        granularity: LISA's ``granularity``, for the messages.

    Raises:
        LISAConfigError: For ``use_orig_params=False``.
    """
    kwargs = strategy.kwargs
    save_partial_optimizer_state(strategy)
    load_partial_optimizer_state(strategy)
    if not kwargs.get("use_orig_params", False):
        raise LISAConfigError(
            f"LISA needs `FSDPStrategy(use_orig_params=True)` (Lightning's default), got "
            f"`use_orig_params={kwargs.get('use_orig_params')!r}`: without it the optimizer holds FSDP's flat "
            "parameters, and the optimizer state of frozen blocks cannot be freed."
        )
    if kwargs.get("auto_wrap_policy") is not None:
        return
    if units is None:
        rank_zero_warn(
            "LISA: the `FSDPStrategy` has no `auto_wrap_policy` and the model is built in `configure_model`, so "
            "LISA cannot set one. Pass `auto_wrap_policy={<your block class>}` to the strategy; without one unit "
            "per block, frozen blocks still compute and reduce gradients."
        )
        return
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    classes = wrap_classes(units)
    kwargs["auto_wrap_policy"] = ModuleWrapPolicy(classes)
    rank_zero_info(
        f"LISA: set the `FSDPStrategy`'s `auto_wrap_policy` to one FSDP unit per {granularity} "
        f"({sorted(c.__name__ for c in classes)}), so that frozen ones compute and send no gradients."
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


def save_partial_optimizer_state(strategy: FSDPStrategy) -> None:
    """Make ``strategy.optimizer_state`` accept optimizers with state for only some parameters.

    FSDP1's ``optim_state_dict`` raises ``... is not in the optimizer state`` for a parameter that
    requires gradients but has no state, when another parameter of its flat parameter has some. While
    the strategy collects the state, this freezes the parameters without state, and unfreezes them
    right after. Applied once per strategy.

    Args:
        strategy: The Trainer's ``FSDPStrategy``.
    """
    if getattr(strategy, _PATCHED, False):
        return
    original = strategy.optimizer_state

    @functools.wraps(original)
    def optimizer_state(optimizer: Any) -> dict[str, Any]:
        inner = getattr(optimizer, "_optimizer", optimizer)  # a LightningOptimizer wraps the optimizer
        params = [p for group in inner.param_groups for p in group["params"]]
        frozen = [p for p in dict.fromkeys(params) if p.requires_grad and not inner.state.get(p)]
        for p in frozen:
            p.requires_grad_(False)
        try:
            return original(optimizer)
        finally:
            for p in frozen:
                p.requires_grad_(True)

    strategy.optimizer_state = optimizer_state  # type: ignore[method-assign]
    setattr(strategy, _PATCHED, True)
