"""Per-layer norms of weights, weight changes and gradients, exact when parameters are sharded.

A layer's norm is taken over all its parameters at once, as if they were one flat vector; a
parameter that appears twice in the layer (tied weights) counts once. Each layer is measured on
its own, so a tied output head reports the same value as the embedding it shares its weight with.

In a distributed run no rank ever gathers a full weight. Every rank computes a *partial* value
per layer over the tensor parts it counts, and one all-reduce over the default process group
combines them:

* ``"l2"``: partial sums of squares, reduced by sum; the norm is the square root of the total.
* ``"l1"``: partial sums of absolute values, reduced by sum.
* ``"linf"``: partial maxima of absolute values, reduced by max.

What a rank counts of a tensor (:func:`local_part`):

* a ``DTensor`` (FSDP2 ``fully_shard``, tensor parallelism): its local shard, ``to_local()``. On
  mesh dimensions where the tensor is replicated (the replicas of HSDP), only the rank at
  coordinate 0 counts it, so each shard enters the sum exactly once.
* a plain tensor, ``plain="replicated"`` (single device, DDP, DeepSpeed ZeRO-1/2): every rank holds
  the same full copy, so only global rank 0 counts it. This keeps the total exact: the other ranks
  add 0 instead of the sum being divided by the world size.
* a plain tensor, ``plain="sharded"`` (FSDP1 with ``use_orig_params=True``, where each rank holds a
  flat slice of every parameter): every rank counts its whole local tensor.

The all-reduce runs over the default (world) process group, so every replica of a tensor must be
visible in its placements: a ``DTensor`` replicated by something outside its mesh (e.g. plain DDP
wrapped around a tensor-parallel model) would be counted once per such replica.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal, get_args

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torchmetrics import Metric

from lightning_lisa.errors import LISAConfigError
from lightning_lisa.layers import find_layers, unique_parameters

#: The norms :func:`layer_norms` and the monitor compute.
NormType = Literal["l2", "l1", "linf"]
NORM_TYPES: tuple[str, ...] = get_args(NormType)

#: How plain (non-``DTensor``) tensors are laid out across ranks; see the module description.
PlainTensors = Literal["replicated", "sharded"]
PLAIN_TENSORS: tuple[str, ...] = get_args(PlainTensors)

#: What a :class:`NormRecord` holds per layer: the weights, their change since the start, the gradients.
Kind = Literal["weight", "change", "grad"]
KINDS: tuple[str, ...] = get_args(Kind)

_ORDERS: dict[str, float] = {"l2": 2.0, "l1": 1.0, "linf": math.inf}


@dataclass(frozen=True)
class NormRecord:
    """The per-layer values logged at one optimizer step.

    Attributes:
        step: The optimizer step (``trainer.global_step``) the values were measured at.
        weight: Layer name to the norm of its weights.
        change: Layer name to the norm of the change of its weights since the start of training
            (empty when changes are not tracked).
        grad: Layer name to the norm of its gradients at the optimizer step that led to ``step``
            (empty when gradients are not tracked, and at the step where training starts).
    """

    step: int
    weight: dict[str, float]
    change: dict[str, float] = field(default_factory=dict)
    grad: dict[str, float] = field(default_factory=dict)

    def values(self, kind: Kind) -> dict[str, float]:
        """The values of one kind: ``"weight"``, ``"change"`` or ``"grad"``."""
        if kind not in KINDS:
            raise ValueError(f"`kind={kind!r}` is not one of {list(KINDS)}.")
        values: dict[str, float] = getattr(self, kind)
        return values


class NormAccumulator(Metric):
    """Per-layer partial norms of one rank, combined across ranks by a single all-reduce.

    The state ``partials`` holds one value per layer: the sums of squares (``"l2"``) or of absolute
    values (``"l1"``) with ``dist_reduce_fx="sum"``, or the maxima of absolute values (``"linf"``)
    with ``dist_reduce_fx="max"``. Under ``torch.distributed``, :meth:`compute` all-reduces the
    state (one collective, every rank must call it) and finishes the norms.

    Args:
        num_layers: How many values the state holds.
        norm: ``"l2"``, ``"l1"`` or ``"linf"``.
        dtype: The dtype of the state; float64 keeps sums over billions of elements exact enough.
        kwargs: Passed on to :class:`torchmetrics.Metric` (e.g. ``process_group``).

    Examples:
        >>> acc = NormAccumulator(2)
        >>> acc.update(torch.tensor([9.0, 1.0]))  # shard 1: sums of squares
        >>> acc.update(torch.tensor([16.0, 0.0]))  # shard 2
        >>> acc.compute().tolist()
        [5.0, 1.0]
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = None
    partials: Tensor

    def __init__(
        self, num_layers: int, norm: NormType = "l2", dtype: torch.dtype = torch.float64, **kwargs: Any
    ) -> None:
        _check_choice("norm", norm, NORM_TYPES)
        op = "max" if norm == "linf" else "sum"
        kwargs.setdefault("dist_sync_fn", partial(_all_reduce, op=op))
        super().__init__(**kwargs)
        self.norm = norm
        self.add_state("partials", torch.zeros(num_layers, dtype=dtype), dist_reduce_fx=op)

    def update(self, partials: Tensor) -> None:
        """Add the partial values of more tensor parts (one per layer)."""
        partials = partials.to(self.partials)
        if self.norm == "linf":
            self.partials = torch.maximum(self.partials, partials)
        else:
            self.partials = self.partials + partials

    def compute(self) -> Tensor:
        """The norms, from the partial values of every rank."""
        return self.partials.sqrt() if self.norm == "l2" else self.partials.clone()


def local_part(tensor: Tensor, plain: PlainTensors = "replicated", rank: int | None = None) -> Tensor | None:
    """The part of ``tensor`` that this rank counts, or ``None`` when another rank counts it.

    Args:
        tensor: A parameter, gradient or other tensor; a ``DTensor`` or a plain tensor.
        plain: How plain tensors are laid out: ``"replicated"`` (every rank holds the same full
            tensor: only rank 0 counts it) or ``"sharded"`` (each rank holds its own part).
        rank: The global rank; ``None`` reads it from ``torch.distributed`` (0 when not initialized).

    Returns:
        The local shard of a ``DTensor`` (if this rank is its first replica), the tensor itself, or
        ``None``.

    Raises:
        ValueError: For a ``DTensor`` with a ``Partial`` placement: its norm needs the summed value.

    Examples:
        >>> t = torch.ones(3)
        >>> local_part(t, rank=0) is t, local_part(t, rank=1), local_part(t, "sharded", rank=1) is t
        (True, None, True)
    """
    if hasattr(tensor, "to_local"):
        placements = tuple(tensor.placements)  # type: ignore[attr-defined]
        if any(p.is_partial() for p in placements):
            raise ValueError(f"A DTensor with placements {placements} holds partial values; its norm is undefined.")
        coordinate = tensor.device_mesh.get_coordinate()  # type: ignore[attr-defined]
        if coordinate is None:  # this rank is not in the tensor's mesh
            return None
        if any(p.is_replicate() and c != 0 for p, c in zip(placements, coordinate, strict=True)):
            return None
        local: Tensor = tensor.to_local()
        return local
    if plain == "sharded":
        return tensor
    if rank is None:
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    return tensor if rank == 0 else None


def partial_norm(tensors: Iterable[Tensor], norm: NormType = "l2", device: torch.device | None = None) -> Tensor:
    """The partial value of ``tensors`` (already local parts) for ``norm``, as a float64 scalar.

    Args:
        tensors: The tensor parts this rank counts, e.g. from :func:`local_part`.
        norm: ``"l2"`` gives the sum of squares, ``"l1"`` the sum of absolute values, ``"linf"``
            the largest absolute value (0 when there are no elements).
        device: Where the result lives (float32 on MPS, which has no float64); by default the
            device of the first tensor, else the CPU.

    Examples:
        >>> partial_norm([torch.tensor([3.0]), torch.tensor([4.0, 0.0])]).item()
        25.0
    """
    order = _ORDERS[norm]
    values = []
    for t in tensors:
        if t.numel() == 0:
            continue
        device = device if device is not None else t.device
        value = torch.linalg.vector_norm(t.detach(), order, dtype=torch.float32)
        values.append(value.to(device=device, dtype=accumulator_dtype(device)))
    device = device if device is not None else torch.device("cpu")
    if not values:
        return torch.zeros((), dtype=accumulator_dtype(device), device=device)
    stacked = torch.stack(values)
    if norm == "linf":
        return stacked.amax()
    return (stacked.square() if norm == "l2" else stacked).sum()


def partial_norms(
    groups: Sequence[Sequence[Tensor]],
    norm: NormType = "l2",
    plain: PlainTensors = "replicated",
    device: torch.device | None = None,
) -> Tensor:
    """One partial value per group of tensors (e.g. per layer), over the parts this rank counts.

    Args:
        groups: Per layer, its parameters (or gradients); ``DTensor`` or plain tensors.
        norm: ``"l2"``, ``"l1"`` or ``"linf"``.
        plain: How plain tensors are laid out across ranks; see :func:`local_part`.
        device: Where the result lives (see :func:`partial_norm`).

    Returns:
        A 1-D tensor with one partial value per group, ready for :class:`NormAccumulator`.
    """
    values = []
    for group in groups:
        parts = [part for t in group if (part := local_part(t, plain)) is not None]
        values.append(partial_norm(parts, norm, device))
    if not values:
        return torch.zeros(0, dtype=torch.float64, device=device)
    device = device if device is not None else values[0].device
    return torch.stack([v.to(device) for v in values])


def layer_norms(
    named_modules: Mapping[str, nn.Module] | Iterable[tuple[str, nn.Module]],
    norm: NormType = "l2",
    plain: PlainTensors = "replicated",
    device: torch.device | None = None,
) -> dict[str, float]:
    """The norm of each module's weights, every parameter of a module counted once.

    Under ``torch.distributed`` every rank must call it (it all-reduces one small tensor) and all
    get the same values.

    Args:
        named_modules: Name to module, or ``(name, module)`` pairs, e.g. from :func:`monitored_layers`.
        norm: ``"l2"`` (default), ``"l1"`` or ``"linf"``.
        plain: How plain tensors are laid out across ranks; see :func:`local_part`.
        device: Where the reduction runs (it must suit the process group's backend: CUDA for NCCL);
            by default the device of the first parameter.

    Returns:
        Module name to norm, in the order given.

    Examples:
        >>> layer = nn.Linear(3, 1, bias=False)
        >>> _ = nn.init.constant_(layer.weight, 2.0)
        >>> {name: round(value, 4) for name, value in layer_norms({"proj": layer}).items()}
        {'proj': 3.4641}
    """
    _check_choice("norm", norm, NORM_TYPES)
    _check_choice("plain", plain, PLAIN_TENSORS)
    items = list(named_modules.items() if isinstance(named_modules, Mapping) else named_modules)
    groups = [unique_parameters([m]) for _, m in items]
    if device is None:
        device = next((p.device for group in groups for p in group), torch.device("cpu"))
    partials = partial_norms(groups, norm, plain, device)
    accumulator = NormAccumulator(len(items), norm, dtype=accumulator_dtype(device)).to(device)
    accumulator.update(partials)
    values = accumulator.compute().reshape(-1).tolist()
    return {name: float(v) for (name, _), v in zip(items, values, strict=True)}


def monitored_layers(module: nn.Module, layers: str | Sequence[str] | None = None) -> list[tuple[str, nn.Module]]:
    """The layers whose norms are monitored, in model order, with their names relative to ``module``.

    In order: the input embeddings, then for each block list its blocks and its final norm (see
    :attr:`~lightning_lisa.LayerInfo.final_norm_names`), then the output head. A tied head shares its weight with the
    embeddings and is listed under its own name all the same.

    Args:
        module: The model, e.g. the ``LightningModule``.
        layers: Passed to :func:`~lightning_lisa.find_layers`: dotted path(s) of the block lists, or
            ``None`` to detect them.

    Raises:
        LISAConfigError: From :func:`~lightning_lisa.find_layers`, when ``layers`` names
            no ``nn.ModuleList`` or no block list can be found.

    Examples:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        ...                      num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
        >>> [name for name, _ in monitored_layers(LlamaForCausalLM(config))]
        ['model.embed_tokens', 'model.layers.0', 'model.layers.1', 'model.norm', 'lm_head']
    """
    info = find_layers(module, layers)
    names: list[str] = list(info.embedding_names)
    for path in info.block_paths:
        names.extend(name for name in info.block_names if name.rpartition(".")[0] == path)
        parent = path.rpartition(".")[0]
        names.extend(name for name in info.final_norm_names if name.rpartition(".")[0] == parent)
    names.extend(info.head_names)
    unique = list(dict.fromkeys(names))
    return [(name, module.get_submodule(name)) for name in unique]


def accumulator_dtype(device: torch.device) -> torch.dtype:
    """float64 for partial sums, except on MPS, which has no float64."""
    return torch.float32 if device.type == "mps" else torch.float64


def _all_reduce(tensor: Tensor, group: Any = None, op: str = "sum") -> list[Tensor]:
    """All-reduce ``tensor``; shaped as a torchmetrics ``dist_sync_fn`` (a one-element "gather")."""
    reduced = tensor.clone()
    dist.all_reduce(reduced, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM, group=group)
    return [reduced]


def _check_choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise LISAConfigError(f"`{name}={value!r}` is not allowed; `{name}` must be one of {list(allowed)}.")


def __getattr__(name: str) -> object:
    if name == "LayerNormAccumulator":  # the old name of NormAccumulator, kept for one release
        import warnings

        warnings.warn(
            "`LayerNormAccumulator` is now `NormAccumulator` (it accumulates vector norms, not layer normalization).",
            DeprecationWarning,
            stacklevel=2,
        )
        return NormAccumulator
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
