"""Activation tracing: the tensors autograd saves for the backward pass, counted on the meta device.

:func:`trace_activations` runs a model's forward pass on PyTorch's ``meta`` device (nothing is computed
or allocated) inside :func:`torch.autograd.graph.saved_tensors_hooks` and a scoped
:class:`torch.overrides.TorchFunctionMode`, :class:`MetaTraceMode`, that

* replaces ``scaled_dot_product_attention`` by a stand-in of a fused kernel (flash or memory-efficient
  attention: it saves queries, keys, values, the output and a float32 log-sum-exp, never the
  ``seq_len x seq_len`` matrix), and
* with ``autocast=torch.bfloat16``, emulates ``torch.autocast`` (which does not act on meta tensors):
  matrix products and attention run in the lower precision, on copies of their float32 inputs
  (trainable weights cast once per forward pass, as autocast's cache does), and softmax, the losses
  and normalizations run in float32.

The result, an :class:`ActivationProfile`, says where the saved bytes were saved: in each block, and
from the output head on (the head, the logits and the loss). From it come the activations with Hugging
Face gradient checkpointing (each block keeps only its input; one block is recomputed at a time in the
backward pass) and with a chunked loss (the head's part is replaced by its input).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional
from torch.overrides import TorchFunctionMode

from lightning_lisa.layers import LayerInfo

#: Name under which the fused-attention stand-in is registered in ``transformers``' ``AttentionInterface``.
FUSED_ATTENTION = "lightning_lisa_meta_fused"

# Functions autocast runs in the lower precision, and those it runs in float32 (torch's CUDA lists, as
# far as Hugging Face models call them).
_LOWER_PRECISION: frozenset[Any] = frozenset(
    {
        functional.linear,
        functional.scaled_dot_product_attention,
        torch.matmul,
        torch.Tensor.matmul,
        torch.Tensor.__matmul__,
        torch.mm,
        torch.Tensor.mm,
        torch.bmm,
        torch.Tensor.bmm,
        torch.baddbmm,
        torch.addmm,
    }
)
_FLOAT32: frozenset[Any] = frozenset(
    {
        functional.softmax,
        torch.softmax,
        torch.Tensor.softmax,
        functional.log_softmax,
        torch.log_softmax,
        torch.Tensor.log_softmax,
        functional.cross_entropy,
        functional.nll_loss,
        functional.layer_norm,
        functional.group_norm,
        torch.exp,
        torch.Tensor.exp,
        torch.log,
        torch.Tensor.log,
        torch.rsqrt,
        torch.Tensor.rsqrt,
        torch.pow,
        torch.Tensor.pow,
    }
)


class _FusedAttention(torch.autograd.Function):
    """Stand-in for a fused attention kernel on the meta device: saves q, k, v, output and log-sum-exp."""

    @staticmethod
    def forward(ctx: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *extra: torch.Tensor) -> Any:
        if query.dim() == 4:  # fused kernels write (batch, seq, heads, dim) and return it transposed
            batch, heads, seq, _ = query.shape
            out = query.new_empty((batch, seq, heads, value.shape[-1])).transpose(1, 2)
        else:
            out = query.new_empty((*query.shape[:-1], value.shape[-1]))
        lse = query.new_empty(query.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(query, key, value, out, lse, *extra)
        return out

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> Any:  # pragma: no cover - never run
        raise RuntimeError("the meta-device attention stand-in only counts saved tensors")


def _fused_attention_interface(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """A ``transformers`` attention function: a fused kernel (as flash-attention, softcapping included)."""
    apply: Callable[..., torch.Tensor] = _FusedAttention.apply
    return apply(query, key, value).transpose(1, 2), None  # (batch, seq, heads, dim), as the interface returns


class MetaTraceMode(TorchFunctionMode):
    """A scoped stand-in for fused attention and autocast while tracing a forward pass on the meta device.

    Args:
        unfused_dropout: Attention with dropout keeps the unfused implementation (which saves the
            attention matrix and the dropout mask), as PyTorch's CPU kernels do.
        autocast: Emulate ``torch.autocast`` to this dtype (``None``: no autocast).

    Examples:
        >>> x = torch.empty(2, 8, device="meta")
        >>> layer = nn.Linear(8, 8, device="meta")
        >>> with MetaTraceMode(autocast=torch.bfloat16):
        ...     layer(x).dtype, torch.softmax(layer(x), -1).dtype
        (torch.bfloat16, torch.float32)
    """

    def __init__(self, unfused_dropout: bool = False, autocast: torch.dtype | None = None) -> None:
        super().__init__()
        self.unfused_dropout = unfused_dropout
        self.autocast = autocast
        self._cache: dict[int, torch.Tensor] = {}

    def __torch_function__(
        self, func: Any, types: Any, args: Sequence[Any] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = dict(kwargs or {})
        if self.autocast is not None and func in _LOWER_PRECISION:
            args, kwargs = self._cast(args, kwargs, self.autocast)
        elif self.autocast is not None and func in _FLOAT32:
            args, kwargs = self._cast(args, kwargs, torch.float32)
        if func is functional.scaled_dot_product_attention:
            dropout = kwargs.get("dropout_p", args[4] if len(args) > 4 else 0.0)
            if not (self.unfused_dropout and dropout > 0):  # PyTorch's CPU kernels run dropout unfused
                mask = kwargs.get("attn_mask", args[3] if len(args) > 3 else None)
                extra = (mask,) if isinstance(mask, torch.Tensor) else ()
                apply: Callable[..., Any] = _FusedAttention.apply
                return apply(args[0], args[1], args[2], *extra)
        return func(*args, **kwargs)

    def _cast(
        self, args: Sequence[Any], kwargs: dict[str, Any], dtype: torch.dtype
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        def cast(value: Any) -> Any:
            if not isinstance(value, torch.Tensor) or not value.is_floating_point() or value.dtype == dtype:
                return value
            if value.is_leaf and value.requires_grad and dtype != torch.float32:  # autocast caches these
                key = id(value)
                if key not in self._cache:
                    self._cache[key] = value.to(dtype)
                return self._cache[key]
            return value.to(dtype)

        return tuple(cast(a) for a in args), {k: cast(v) for k, v in kwargs.items()}


@dataclass(frozen=True)
class ActivationProfile:
    """Bytes of the tensors autograd saves in one forward pass, by where they were saved.

    Attributes:
        total: Every saved tensor (parameters and buffers excluded, shared storages once).
        blocks: Saved inside each block (0 for a block no gradient passes through).
        block_inputs: Bytes of each block's input hidden states.
        head: Saved from the output head's forward pass on: the head's input, the logits and the loss.
        hidden: Bytes of the head's input (the last hidden states).
    """

    total: int
    blocks: tuple[int, ...]
    block_inputs: tuple[int, ...]
    head: int
    hidden: int

    def saved(self, checkpointing: bool = False, chunked_loss: bool = False) -> int:
        """Saved bytes kept through the forward pass.

        With ``checkpointing``, each block through which the gradient passes keeps only its input (Hugging
        Face's gradient checkpointing); with ``chunked_loss``, the head's part is only its input, which the
        chunked loss keeps to recompute the logits chunk by chunk.

        Examples:
            >>> profile = ActivationProfile(total=100, blocks=(30, 30), block_inputs=(4, 4), head=20, hidden=4)
            >>> profile.saved(), profile.saved(checkpointing=True), profile.saved(True, chunked_loss=True)
            (100, 48, 32)
        """
        kept = self.total
        if checkpointing:
            kept += sum(i for i, b in zip(self.block_inputs, self.blocks, strict=True) if b) - sum(self.blocks)
        if chunked_loss:
            kept += self.hidden - self.head
        return kept

    def recompute(self, checkpointing: bool = False) -> int:
        """With ``checkpointing``: the saved bytes of the largest block, rebuilt in the backward pass."""
        return max(self.blocks, default=0) if checkpointing else 0


def saved_activation_bytes(model: nn.Module, run: Callable[[], Any], exclude: Sequence[torch.Tensor] = ()) -> int:
    """Bytes of the tensors autograd saves for backward while ``run()`` runs, parameters and buffers excluded.

    Storages shared by several saved tensors count once. Works on any device, the meta device included
    (where nothing is computed).

    Args:
        model: Its parameters and buffers are not counted.
        run: The forward computation.
        exclude: More tensors not to count (e.g. parameters that are not in ``model``).

    Examples:
        >>> layer = nn.Linear(8, 8)
        >>> x = torch.ones(4, 8)
        >>> saved_activation_bytes(layer, lambda: layer(x).relu())  # the input of the linear and the relu output
        256
    """
    return _SavedTensors(model, exclude).count(run).total


class _SavedTensors:
    """Counts saved tensors by where they were saved: in block ``i``, in the head and loss, or elsewhere."""

    def __init__(self, model: nn.Module, exclude: Sequence[torch.Tensor] = ()) -> None:
        self.excluded = {_storage_key(t) for t in [*model.parameters(), *model.buffers(), *exclude]}
        self.sizes: dict[int, tuple[int, str]] = {}
        self.where = "other"
        self.inputs: list[int] = []
        self.hidden = 0

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        key = _storage_key(tensor)
        if key not in self.excluded:
            nbytes = tensor.untyped_storage().nbytes()
            where = self.sizes[key][1] if key in self.sizes else self.where
            self.sizes[key] = (max(self.sizes.get(key, (0, ""))[0], nbytes), where)
        return tensor

    def count(
        self, run: Callable[[], Any], info: LayerInfo | None = None, head: nn.Module | None = None
    ) -> ActivationProfile:
        handles = []
        if info is not None:
            for i, block in enumerate(info.blocks):
                handles.append(block.register_forward_pre_hook(self._enter(i), with_kwargs=True))
                handles.append(block.register_forward_hook(self._leave))
            self.inputs = [0] * info.num_blocks
        if head is not None:
            handles.append(head.register_forward_pre_hook(self._enter_head))
        try:
            with torch.autograd.graph.saved_tensors_hooks(self.pack, _identity):
                run()
        finally:
            for handle in handles:
                handle.remove()
        blocks = [0] * len(self.inputs)
        head_bytes = 0
        for nbytes, where in self.sizes.values():
            if where.isdigit():
                blocks[int(where)] += nbytes
            elif where == "head":
                head_bytes += nbytes
        return ActivationProfile(
            total=sum(n for n, _ in self.sizes.values()),
            blocks=tuple(blocks),
            block_inputs=tuple(self.inputs),
            head=head_bytes,
            hidden=self.hidden,
        )

    def _enter(self, index: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            hidden = args[0] if args else kwargs.get("hidden_states")
            if isinstance(hidden, torch.Tensor):
                self.inputs[index] = hidden.untyped_storage().nbytes()
            self.where = str(index)

        return hook

    def _leave(self, module: nn.Module, args: Any, output: Any) -> None:
        self.where = "other"

    def _enter_head(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        if args and isinstance(args[0], torch.Tensor):
            self.hidden = args[0].untyped_storage().nbytes()
        self.where = "head"


def _storage_key(tensor: torch.Tensor) -> int:
    return int(tensor.untyped_storage()._cdata)  # the storage's identity; no public accessor gives it


def _identity(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def trace_activations(
    model: nn.Module,
    info: LayerInfo,
    trainable: Sequence[nn.Parameter] | None,
    adapters: dict[str, tuple[int, int]] | None = None,
    lora_rank: int = 16,
    *,
    batch_size: int,
    seq_len: int,
    unfused_dropout: bool = False,
    autocast: torch.dtype | None = None,
) -> ActivationProfile:
    """The activation profile of one training forward pass of ``model`` (on the meta device).

    Args:
        model: A causal LM on the meta device; left frozen (``requires_grad=False``) afterwards.
        info: Its blocks (see :func:`~lightning_lisa.find_layers`).
        trainable: The parameters that train (``None``: all of them).
        adapters: ``{name: (in_features, out_features)}`` of layers that get rank-``lora_rank`` LoRA
            adapters (the model itself frozen).
        lora_rank: Rank of the adapters.
        batch_size: Sequences per step.
        seq_len: Tokens per sequence.
        unfused_dropout: Count attention with dropout unfused, as PyTorch's CPU kernels run it.
        autocast: Emulate ``torch.autocast`` to this dtype (mixed precision).

    Examples:
        >>> from lightning_lisa import find_layers
        >>> from lightning_lisa.estimate import build_meta_model, load_config
        >>> model = build_meta_model(load_config("tiny")[1])
        >>> profile = trace_activations(model, find_layers(model), None, batch_size=1, seq_len=32)
        >>> len(profile.blocks), profile.saved(checkpointing=True) < profile.saved()
        (6, True)
    """
    ids = torch.zeros((batch_size, seq_len), dtype=torch.long, device="meta")
    dtype = next(model.parameters()).dtype
    model.train()
    model.requires_grad_(trainable is None)
    for p in trainable or ():
        p.requires_grad_(True)
    lora: list[nn.Parameter] = []
    handles = []
    for name, (fan_in, fan_out) in (adapters or {}).items():
        a = nn.Parameter(torch.empty((lora_rank, fan_in), dtype=dtype, device="meta"))
        b = nn.Parameter(torch.empty((fan_out, lora_rank), dtype=dtype, device="meta"))
        lora += [a, b]
        handles.append(model.get_submodule(name).register_forward_hook(_lora_hook(a, b)))
    implementation = getattr(getattr(model, "config", None), "_attn_implementation", None)  # read only
    switch: Callable[[str], None] | None = getattr(model, "set_attn_implementation", None)
    fused = implementation == "eager" and not unfused_dropout and switch is not None
    if fused and switch is not None:
        # models without an SDPA path (e.g. Gemma-2's softcapped attention) run flash-attention on GPUs
        from transformers import AttentionInterface

        AttentionInterface.register(FUSED_ATTENTION, _fused_attention_interface)
        switch(FUSED_ATTENTION)
    head = getattr(model, "get_output_embeddings", lambda: None)()
    try:
        with MetaTraceMode(unfused_dropout, autocast):
            return _SavedTensors(model, exclude=lora).count(
                lambda: model(input_ids=ids, labels=ids),
                info,
                head if isinstance(head, nn.Module) else None,
            )
    finally:
        for handle in handles:
            handle.remove()
        if fused and switch is not None:
            switch(str(implementation))
        model.requires_grad_(False)


def _lora_hook(a: nn.Parameter, b: nn.Parameter) -> Callable[[nn.Module, tuple[Any, ...], torch.Tensor], torch.Tensor]:
    def hook(module: nn.Module, inputs: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        x: torch.Tensor = inputs[0]
        return output + (x @ a.t()) @ b.t()

    return hook


def formula_activations(
    config: Any, blocks: int, trained: int | None, lora_rank: int | None, batch_size: int, seq_len: int, nbytes: int
) -> ActivationProfile:
    """An activation profile from a formula for Llama-like blocks, for models that cannot run on meta.

    Per token and block, in elements: a trained block saves ``7h + 2kv + 4f + heads`` (norm inputs and
    outputs, rotated queries and keys, values, attention output and log-sum-exp, the MLP's gate, up,
    activation and product); a frozen block that the gradient passes through saves
    ``4h + 2kv + 3f + heads`` (the inputs of frozen linear layers are not needed); a LoRA block saves a
    frozen block's tensors, the inputs of its linear layers (``3h + f``) and ``7r``. The head saves its
    input, the logits and their float32 log-probabilities.

    Args:
        config: The model's config (``hidden_size``, ``intermediate_size``, heads, ``vocab_size``).
        blocks: Blocks of the model.
        trained: Blocks that train (the first ones; those above are frozen); ``None``: all.
        lora_rank: Rank of LoRA adapters on every block (``trained`` is then ignored), or ``None``.
        batch_size: Sequences per step.
        seq_len: Tokens per sequence.
        nbytes: Bytes per element of the activations.

    Examples:
        >>> from lightning_lisa.estimate import load_config
        >>> profile = formula_activations(load_config("tiny")[1], 6, 2, None, 1, 32, 4)
        >>> profile.blocks[0] > profile.blocks[5] > 0
        True
    """
    h = int(getattr(config, "hidden_size", 0) or getattr(config, "n_embd", 0))
    heads = int(getattr(config, "num_attention_heads", 0) or getattr(config, "n_head", 1))
    kv = h * int(getattr(config, "num_key_value_heads", heads) or heads) // max(heads, 1)
    f = int(getattr(config, "intermediate_size", 0) or getattr(config, "n_inner", 0) or 4 * h)
    vocab = int(getattr(config, "vocab_size", 0))
    tokens = batch_size * seq_len
    full = 7 * h + 2 * kv + 4 * f + heads
    frozen = 4 * h + 2 * kv + 3 * f + heads
    if lora_rank is not None:
        per_block = [frozen + 3 * h + f + 7 * lora_rank] * blocks
    else:
        n = blocks if trained is None else trained
        per_block = [full] * n + [frozen] * (blocks - n)
    block_bytes = tuple(tokens * e * nbytes for e in per_block)
    head = tokens * ((h + vocab) * nbytes + 4 * vocab)
    return ActivationProfile(
        total=sum(block_bytes) + head,
        blocks=block_bytes,
        block_inputs=(tokens * h * nbytes,) * blocks,
        head=head,
        hidden=tokens * h * nbytes,
    )
