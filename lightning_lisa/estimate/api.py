"""Memory of full fine-tuning, LoRA and LISA for a model, estimated without allocating it.

:func:`estimate_memory` builds the model on PyTorch's ``meta`` device (shapes only, no storage), finds
its blocks, embeddings and head with :func:`~lightning_lisa.find_layers`, and adds up, per arm:

* **weights**: every parameter (tied weights once), in ``dtype``;
* **grads**: the trainable parameters, in ``dtype``;
* **optimizer state**: AdamW's two moments per trainable parameter (in ``dtype``, as
  ``torch.optim.AdamW`` keeps them in the parameter's dtype) plus its 4-byte ``step`` tensor per
  parameter tensor; or bitsandbytes ``AdamW8bit``: one byte per moment and element, plus a float32
  absolute maximum per 256-element block, for tensors of at least 4096 elements, and 32-bit moments
  for smaller tensors;
* **activations**: the tensors autograd saves for the backward pass, counted by running the forward
  pass on the meta device with :func:`torch.autograd.graph.saved_tensors_hooks` (parameters
  excluded, shared storages once);
* **workspace**: the largest transient buffers: the gradient of the float32 logits during the loss's
  backward pass, and the temporary that ``torch.optim.AdamW``'s multi-tensor step allocates
  (one copy of the trainable parameters; none for ``AdamW8bit``).

The arms are full fine-tuning (everything trains), LoRA (rank ``lora_rank`` adapters on every
linear layer but the output head, as PEFT's ``target_modules="all-linear"``; base weights frozen;
adapters in ``dtype``) and LISA with ``optimizer_state="drop"`` (the input embeddings, the head and
``n_layers`` blocks train; the state of frozen blocks is freed).

**The peak.** Lightning's automatic optimization runs the forward pass while the previous step's
gradients still exist, zeroes them, runs the backward pass, then the optimizer step. So the peak is
``weights + optimizer_state + max(grads + activations, activations + logits workspace, grads + step
workspace)``, which is :attr:`ArmEstimate.total`.

**Assumptions of the activation estimate** (the uncertain part; the training-state figures are
exact counts):

* Attention runs in a fused kernel (``scaled_dot_product_attention`` with the flash or
  memory-efficient backend, as on CUDA and in PyTorch's CPU flash kernel): it saves queries, keys,
  values, the output and a float32 log-sum-exp per query and head, never the ``seq_len x seq_len``
  attention matrix. Models with eager attention save that matrix and need more. With
  ``device="cpu"``, attention with dropout is counted unfused (matrix and mask), as the CPU runs it.
* No gradient checkpointing; dropout as in the model's config (its masks are counted).
* For LISA, the sampled blocks are the first ones: with frozen embeddings that is the worst case,
  as the gradient then flows through every block above them.
* Allocator fragmentation, the CUDA context (several hundred MiB), communication buffers and the
  framework's own tensors are not counted. Calibrated on CPU against ``benchmarks/memory_speed.py``,
  which counts the saved tensors of a real step the same way.

If a model cannot run its forward pass on the meta device, activations fall back to a formula for
Llama-like blocks (:attr:`MemoryEstimate.activation_method` says which was used).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import sys
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from torch import nn

from lightning_lisa.layers import LayerInfo, find_layers, unique_parameters

Dtype = Literal["fp32", "bf16", "fp16"]
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
OptimizerName = Literal["adamw", "adamw8bit"]
OPTIMIZERS: tuple[str, ...] = get_args(OptimizerName)

#: Model shapes with the published dimensions of well-known models (weights are never needed).
SHAPES: dict[str, dict[str, Any]] = {
    "tiny": {
        "model_type": "llama",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 6,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 512,
        "max_position_embeddings": 256,
        "bos_token_id": 1,
        "eos_token_id": 2,
    },
    "gpt2-small": {
        "model_type": "gpt2",
        "n_embd": 768,
        "n_layer": 12,
        "n_head": 12,
        "vocab_size": 50257,
        "n_positions": 1024,
    },
    "tinyllama-1.1b": {
        "model_type": "llama",
        "hidden_size": 2048,
        "intermediate_size": 5632,
        "num_hidden_layers": 22,
        "num_attention_heads": 32,
        "num_key_value_heads": 4,
        "vocab_size": 32000,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
    },
    "llama-3.2-1b": {
        "model_type": "llama",
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "vocab_size": 128256,
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": True,
        "bos_token_id": 128000,
        "eos_token_id": 128001,
    },
    "llama-2-7b": {
        "model_type": "llama",
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "vocab_size": 32000,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
    },
    "llama-3-8b": {
        "model_type": "llama",
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "bos_token_id": 128000,
        "eos_token_id": 128001,
    },
}

#: bitsandbytes 8-bit optimizers keep 32-bit state for tensors smaller than this (``min_8bit_size``).
MIN_8BIT_SIZE = 4096
#: Elements per float32 absolute maximum of bitsandbytes' blockwise 8-bit state.
BLOCKWISE_8BIT = 256


@dataclass(frozen=True)
class ArmEstimate:
    """Estimated memory of one way of fine-tuning, in bytes.

    Attributes:
        name: ``"full fine-tuning"``, ``"LoRA r=<rank>"`` or ``"LISA"``.
        trainable_params: Parameters that train (tied weights once).
        weights: All parameters (for LoRA, the base model and the adapters).
        grads: Gradients of the trainable parameters.
        optimizer_state: The optimizer's state tensors.
        activations: Tensors saved for the backward pass (see the module's assumptions).
        logits_workspace: Transient float32 gradient of the logits during the loss's backward pass.
        step_workspace: Transient buffers of the optimizer step.
    """

    name: str
    trainable_params: int
    weights: int
    grads: int
    optimizer_state: int
    activations: int
    logits_workspace: int
    step_workspace: int

    @property
    def training_state(self) -> int:
        """Weights + gradients + optimizer state: what is counted exactly."""
        return self.weights + self.grads + self.optimizer_state

    @property
    def total(self) -> int:
        """The estimated peak: weights, optimizer state and the largest of the three phases of a step."""
        phases = (
            self.grads + self.activations,  # end of the forward pass (the previous gradients still exist)
            self.activations + self.logits_workspace,  # start of the backward pass
            self.grads + self.step_workspace,  # optimizer step
        )
        return self.weights + self.optimizer_state + max(phases)


@dataclass(frozen=True)
class MemoryEstimate:
    """The estimated memory of full fine-tuning, LoRA and LISA for one model and one setting.

    Attributes:
        model: What was estimated (a shape name, a path, or the config's ``model_type``).
        num_params: Parameters of the model (tied weights once).
        num_blocks: Transformer blocks found by :func:`~lightning_lisa.find_layers`.
        n_layers: Blocks LISA trains at once.
        batch_size: Sequences per step.
        seq_len: Tokens per sequence.
        dtype: Dtype of weights, gradients, optimizer state and activations.
        optimizer: ``"adamw"`` or ``"adamw8bit"``.
        lora_rank: Rank of the LoRA adapters.
        activation_method: ``"trace"`` (saved tensors of a meta-device forward pass) or ``"formula"``.
        full: Full fine-tuning.
        lora: LoRA on all linear layers but the head.
        lisa: LISA, ``optimizer_state="drop"``.
    """

    model: str
    num_params: int
    num_blocks: int
    n_layers: int
    batch_size: int
    seq_len: int
    dtype: str
    optimizer: str
    lora_rank: int
    activation_method: str
    full: ArmEstimate
    lora: ArmEstimate
    lisa: ArmEstimate

    @property
    def arms(self) -> tuple[ArmEstimate, ArmEstimate, ArmEstimate]:
        """Full fine-tuning, LoRA and LISA, in that order."""
        return (self.full, self.lora, self.lisa)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly dict, with each arm's ``training_state`` and ``total``."""
        result = asdict(self)
        for arm in self.arms:
            key = {"full fine-tuning": "full", "LISA": "lisa"}.get(arm.name, "lora")
            result[key].update(training_state=arm.training_state, total=arm.total)
        return result


def estimate_memory(
    model: str | os.PathLike[str] | Mapping[str, Any] | Any,
    *,
    n_layers: int = 2,
    batch_size: int = 1,
    seq_len: int = 1024,
    dtype: Dtype = "bf16",
    optimizer: OptimizerName = "adamw",
    lora_rank: int = 16,
    train_embeddings: bool = True,
    train_head: bool = True,
    train_final_norm: bool = False,
    device: Literal["cuda", "cpu"] = "cuda",
    activations: Literal["trace", "formula"] = "trace",
) -> MemoryEstimate:
    """Estimate the memory of full fine-tuning, LoRA and LISA, building the model on the meta device.

    Nothing is allocated: the model only exists as shapes, and no weights are downloaded.

    Args:
        model: A shape name from :data:`SHAPES` (e.g. ``"llama-2-7b"``), a local directory or
            ``config.json`` of a Hugging Face model, a Hub name (read with ``AutoConfig``, which needs
            network access), a ``transformers.PretrainedConfig``, or a dict with a ``model_type``.
        n_layers: Blocks LISA trains at once (the paper's gamma).
        batch_size: Sequences per step.
        seq_len: Tokens per sequence.
        dtype: ``"bf16"``, ``"fp16"`` or ``"fp32"``: weights, gradients, optimizer state and
            activations all in this dtype (Lightning's ``precision="bf16-true"`` for ``"bf16"``).
        optimizer: ``"adamw"`` (``torch.optim.AdamW``) or ``"adamw8bit"`` (bitsandbytes).
        lora_rank: Rank of the LoRA adapters.
        train_embeddings: LISA keeps the input embeddings trainable (its default).
        train_head: LISA keeps the output head trainable (its default).
        train_final_norm: LISA also keeps the final norm trainable.
        device: Where training runs. Attention is assumed fused on ``"cuda"``; on ``"cpu"``, attention
            with dropout (e.g. GPT-2 in training mode) is unfused, as PyTorch's CPU kernels run it.
        activations: ``"trace"`` counts the saved tensors of a meta-device forward pass (falling back
            to the formula if the model cannot run on meta); ``"formula"`` uses a Llama-like formula.

    Returns:
        The per-arm breakdown.

    Raises:
        ValueError: For an argument out of range, an unknown dtype, optimizer or shape name.
        TypeError: For an argument of the wrong type.

    Examples:
        >>> est = estimate_memory("tiny", seq_len=64, dtype="fp32")
        >>> est.num_params, est.num_blocks, est.lisa.trainable_params
        (287552, 6, 139520)
        >>> est.full.weights == 4 * est.num_params and est.lisa.optimizer_state < est.full.optimizer_state
        True
    """
    _check_int("n_layers", n_layers, 1)
    _check_int("batch_size", batch_size, 1)
    _check_int("seq_len", seq_len, 1)
    _check_int("lora_rank", lora_rank, 1)
    _check_choice("dtype", dtype, list(DTYPES))
    _check_choice("optimizer", optimizer, list(OPTIMIZERS))
    _check_choice("activations", activations, ["trace", "formula"])
    _check_choice("device", device, ["cuda", "cpu"])
    for flag, value in (
        ("train_embeddings", train_embeddings),
        ("train_head", train_head),
        ("train_final_norm", train_final_norm),
    ):
        if not isinstance(value, bool):
            raise TypeError(f"`{flag}={value!r}` is not allowed; it must be True or False.")

    label, config = load_config(model)
    torch_dtype = DTYPES[dtype]
    meta = build_meta_model(config, torch_dtype)
    info = find_layers(meta)
    if n_layers > info.num_blocks:
        raise ValueError(
            f"`n_layers={n_layers}` is not allowed for {label}: it has {info.num_blocks} blocks, so `n_layers` "
            f"must be between 1 and {info.num_blocks}."
        )
    always, block_params = _lisa_parameters(meta, info, n_layers, train_embeddings, train_head, train_final_norm)
    lisa_params = always + block_params
    all_params = unique_parameters([meta])
    lora_shapes = lora_targets(meta, info)
    lora_tensors = [lora_rank * fan for shape in lora_shapes.values() for fan in shape]  # A: r x in, B: out x r

    vocab = _vocab_size(meta, config)
    logits_workspace = 4 * batch_size * seq_len * vocab
    nbytes = torch.tensor([], dtype=torch_dtype).element_size()

    method = activations
    acts: dict[str, int] = {}
    if method == "trace":
        try:
            with _quiet():
                acts = _traced_activations(
                    meta, info, always, n_layers, lora_shapes, lora_rank, batch_size, seq_len, device == "cpu"
                )
        except Exception:  # any model that cannot run on meta falls back to the formula
            method = "formula"
    if method == "formula":
        acts = _formula_activations(config, info.num_blocks, n_layers, lora_rank, batch_size, seq_len, nbytes)

    def arm(name: str, trainable: list[int], extra_weights: int, activation_bytes: int) -> ArmEstimate:
        trainable_bytes = sum(trainable) * nbytes
        return ArmEstimate(
            name=name,
            trainable_params=sum(trainable),
            weights=sum(p.numel() for p in all_params) * nbytes + extra_weights,
            grads=trainable_bytes,
            optimizer_state=_optimizer_state_bytes(trainable, nbytes, optimizer),
            activations=activation_bytes,
            logits_workspace=logits_workspace,
            step_workspace=trainable_bytes if optimizer == "adamw" else 0,
        )

    return MemoryEstimate(
        model=label,
        num_params=sum(p.numel() for p in all_params),
        num_blocks=info.num_blocks,
        n_layers=n_layers,
        batch_size=batch_size,
        seq_len=seq_len,
        dtype=dtype,
        optimizer=optimizer,
        lora_rank=lora_rank,
        activation_method=method,
        full=arm("full fine-tuning", [p.numel() for p in all_params], 0, acts["full"]),
        lora=arm(f"LoRA r={lora_rank}", lora_tensors, sum(lora_tensors) * nbytes, acts["lora"]),
        lisa=arm("LISA", [p.numel() for p in lisa_params], 0, acts["lisa"]),
    )


# ------------------------------------------------------------------------------ the model


def load_config(model: str | os.PathLike[str] | Mapping[str, Any] | Any) -> tuple[str, Any]:
    """A label and a ``transformers.PretrainedConfig`` for ``model`` (see :func:`estimate_memory`).

    Raises:
        ValueError: For an unknown shape name, a missing path, or a dict without ``model_type``.
        TypeError: For anything else.

    Examples:
        >>> label, config = load_config("llama-2-7b")
        >>> label, config.model_type, config.hidden_size
        ('llama-2-7b', 'llama', 4096)
    """
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(model, PretrainedConfig):
        return str(model.model_type), model
    if isinstance(model, Mapping):
        fields = dict(model)
        model_type = fields.pop("model_type", None)
        if not isinstance(model_type, str):
            raise ValueError(
                f"`model` is a dict with keys {sorted(fields)}; it must name its architecture with a `model_type` "
                "string, e.g. {'model_type': 'llama', 'hidden_size': 4096, ...}."
            )
        try:
            config = AutoConfig.for_model(model_type, **fields)
        except (ValueError, KeyError) as err:
            raise ValueError(f"`model={{'model_type': {model_type!r}, ...}}`: unknown architecture ({err}).") from err
        return model_type, config
    if isinstance(model, str | os.PathLike):
        name = os.fspath(model)
        if name in SHAPES:
            return name, load_config(SHAPES[name])[1]
        path = Path(name).expanduser()
        if path.is_file():
            with path.open(encoding="utf-8") as f:
                return name, load_config(json.load(f))[1]
        if path.is_dir():
            return name, AutoConfig.from_pretrained(str(path))
        if name.startswith((".", "/", "~")) or name.count("/") != 1:
            raise ValueError(
                f"`model={name!r}` is not a known shape {sorted(SHAPES)}, nor an existing directory or config.json, "
                "nor a Hub name of the form 'organization/name'."
            )
        try:
            return name, AutoConfig.from_pretrained(name)
        except (OSError, ValueError) as err:
            raise ValueError(
                f"`model={name!r}`: its config could not be read from the Hub ({err}). Give a known shape "
                f"{sorted(SHAPES)}, a local directory or config.json, or a dict."
            ) from err
    raise TypeError(
        f"`model={model!r}` is not allowed; give a shape name, a path, a Hub name, a PretrainedConfig or a dict."
    )


def build_meta_model(config: Any, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The causal LM of ``config`` on the meta device: parameters with shapes and no storage.

    Examples:
        >>> model = build_meta_model(load_config("llama-2-7b")[1])
        >>> next(model.parameters()).device.type, sum(p.numel() for p in model.parameters())
        ('meta', 6738415616)
    """
    from transformers import AutoModel, AutoModelForCausalLM

    causal_lm: Any = AutoModelForCausalLM  # untyped in transformers
    bare: Any = AutoModel
    with _quiet(), torch.device("meta"):
        try:
            built: nn.Module = causal_lm.from_config(config, dtype=dtype)
        except ValueError:  # not a causal LM (e.g. an encoder): the bare model
            built = bare.from_config(config, dtype=dtype)
    return built


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the warnings and informational logs of transformers while building and tracing on meta."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(verbosity)


def lora_targets(model: nn.Module, info: LayerInfo | None = None) -> dict[str, tuple[int, int]]:
    """``{name: (in_features, out_features)}`` of the layers LoRA adapts with ``target_modules="all-linear"``.

    Every ``nn.Linear`` (and Hugging Face ``Conv1D``, as in GPT-2) except the output head.

    Examples:
        >>> model = build_meta_model(load_config("tiny")[1])
        >>> targets = lora_targets(model)
        >>> len(targets), targets["model.layers.0.mlp.down_proj"]
        (42, (128, 64))
    """
    info = info if info is not None else find_layers(model)
    heads = {id(model.get_submodule(name)) for name in info.head_names}
    targets: dict[str, tuple[int, int]] = {}
    for name, module in model.named_modules():
        if id(module) in heads:
            continue
        if isinstance(module, nn.Linear):
            targets[name] = (module.in_features, module.out_features)
        elif type(module).__name__ == "Conv1D" and isinstance(getattr(module, "weight", None), torch.Tensor):
            fan_in, fan_out = module.weight.shape
            targets[name] = (int(fan_in), int(fan_out))
    return targets


def _lisa_parameters(
    model: nn.Module, info: LayerInfo, n_layers: int, embeddings: bool, head: bool, final_norm: bool
) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """What LISA trains at its largest: the always-active parameters, and those of the ``n_layers`` largest blocks."""
    embedding_params = unique_parameters(model.get_submodule(n) for n in info.embedding_names)
    head_params = unique_parameters(model.get_submodule(n) for n in info.head_names)
    if {id(p) for p in embedding_params} & {id(p) for p in head_params} and embeddings != head:
        raise ValueError(
            f"`train_embeddings={embeddings}` and `train_head={head}` differ, but this model ties its input "
            "embeddings and head; set both alike."
        )
    modules: list[nn.Module] = []
    if embeddings:
        modules += [model.get_submodule(n) for n in info.embedding_names]
    if head:
        modules += [model.get_submodule(n) for n in info.head_names]
    if final_norm:
        if not info.final_norm_names:
            raise ValueError("`train_final_norm=True`, but this model has no final norm after its blocks.")
        modules += [model.get_submodule(n) for n in info.final_norm_names]
    always = unique_parameters(modules)
    sizes = [sum(p.numel() for p in block.parameters()) for block in info.blocks]
    largest = sorted(range(len(sizes)), key=lambda i: -sizes[i])[:n_layers]
    seen = {id(p) for p in always}
    blocks = [p for p in unique_parameters(info.blocks[i] for i in sorted(largest)) if id(p) not in seen]
    return always, blocks


def _vocab_size(model: nn.Module, config: Any) -> int:
    head = getattr(model, "get_output_embeddings", lambda: None)()
    if isinstance(head, nn.Linear):
        return int(head.out_features)
    return int(getattr(config, "vocab_size", 0) or 0)


def _optimizer_state_bytes(numels: Sequence[int], nbytes: int, optimizer: str) -> int:
    """State bytes of ``optimizer`` for parameter tensors of ``numels`` elements in a ``nbytes`` dtype."""
    if optimizer == "adamw":  # exp_avg, exp_avg_sq in the parameter's dtype; a float32 step tensor
        return sum(2 * n * nbytes + 4 for n in numels)
    total = 0
    blockwise = False
    for n in numels:
        if n >= MIN_8BIT_SIZE:  # uint8 moments and a float32 absmax per block, for each moment
            total += 2 * n + 2 * 4 * math.ceil(n / BLOCKWISE_8BIT)
            blockwise = True
        else:
            total += 2 * 4 * n
    return total + (2 * 256 * 4 if blockwise else 0)  # the two quantization maps, shared by all tensors


# ---------------------------------------------------------------------------- activations


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


@contextlib.contextmanager
def _fused_attention(unfused_dropout: bool = False) -> Iterator[None]:
    """Replace ``scaled_dot_product_attention`` by :class:`_FusedAttention` while tracing on meta.

    With ``unfused_dropout``, attention with dropout keeps the unfused implementation (which saves the
    attention matrix and the dropout mask), as PyTorch's CPU kernels do.
    """
    original = torch.nn.functional.scaled_dot_product_attention

    def stand_in(
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        dropout_p: float = 0.0,
        *args: Any,
        **kwargs: Any,
    ) -> Any:
        if unfused_dropout and dropout_p > 0:  # PyTorch's CPU kernels fall back to the unfused path
            return original(query, key, value, attn_mask, dropout_p, *args, **kwargs)
        extra = (attn_mask,) if isinstance(attn_mask, torch.Tensor) else ()
        apply: Callable[..., Any] = _FusedAttention.apply
        return apply(query, key, value, *extra)

    torch.nn.functional.scaled_dot_product_attention = stand_in
    try:
        yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = original


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
    excluded = {_storage_key(t) for t in [*model.parameters(), *model.buffers(), *exclude]}
    sizes: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        key = _storage_key(tensor)
        if key not in excluded:
            sizes[key] = max(sizes.get(key, 0), tensor.untyped_storage().nbytes())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, _identity):
        run()
    return sum(sizes.values())


def _storage_key(tensor: torch.Tensor) -> int:
    return int(tensor.untyped_storage()._cdata)


def _identity(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def _traced_activations(
    model: nn.Module,
    info: LayerInfo,
    always: list[nn.Parameter],
    n_layers: int,
    lora_shapes: dict[str, tuple[int, int]],
    lora_rank: int,
    batch_size: int,
    seq_len: int,
    unfused_dropout: bool,
) -> dict[str, int]:
    """Saved-tensor bytes of one forward pass per arm, on the meta device (``model`` is left frozen)."""
    dtype = next(model.parameters()).dtype
    ids = torch.zeros((batch_size, seq_len), dtype=torch.long, device="meta")

    def run() -> Any:
        return model(input_ids=ids, labels=ids)

    model.train()
    result: dict[str, int] = {}
    with _fused_attention(unfused_dropout):
        model.requires_grad_(True)
        result["full"] = saved_activation_bytes(model, run)

        # LISA: the always-active parameters and the first blocks (the worst case with frozen embeddings)
        model.requires_grad_(False)
        for p in always:
            p.requires_grad_(True)
        for block in info.blocks[:n_layers]:
            block.requires_grad_(True)
        result["lisa"] = saved_activation_bytes(model, run)

        # LoRA: base frozen, a rank-r path x -> x A^T -> (x A^T) B^T added to every targeted layer
        model.requires_grad_(False)
        adapters: list[nn.Parameter] = []
        handles = []
        for name, (fan_in, fan_out) in lora_shapes.items():
            a = nn.Parameter(torch.empty((lora_rank, fan_in), dtype=dtype, device="meta"))
            b = nn.Parameter(torch.empty((fan_out, lora_rank), dtype=dtype, device="meta"))
            adapters += [a, b]
            handles.append(model.get_submodule(name).register_forward_hook(_lora_hook(a, b)))
        try:
            result["lora"] = saved_activation_bytes(model, run, exclude=adapters)
        finally:
            for handle in handles:
                handle.remove()
    return result


def _lora_hook(a: nn.Parameter, b: nn.Parameter) -> Callable[[nn.Module, tuple[Any, ...], torch.Tensor], torch.Tensor]:
    def hook(module: nn.Module, inputs: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        x: torch.Tensor = inputs[0]
        return output + (x @ a.t()) @ b.t()

    return hook


def _formula_activations(
    config: Any, blocks: int, n_layers: int, lora_rank: int, batch_size: int, seq_len: int, nbytes: int
) -> dict[str, int]:
    """Saved-tensor bytes from a formula for Llama-like blocks.

    Per token and block, in elements: a trained block saves ``7h + 2kv + 4f + heads`` (norm inputs and
    outputs, rotated queries and keys, values, attention output and log-sum-exp, the MLP's gate, up,
    activation and product); a frozen block that the gradient passes through saves
    ``4h + 2kv + 3f + heads`` (the inputs of frozen linear layers are not needed); a LoRA block saves a
    frozen block's tensors, the inputs of its linear layers (``3h + f``) and ``7r``. The head saves its
    input, the logits and their float32 log-probabilities.
    """
    h = int(getattr(config, "hidden_size", 0) or getattr(config, "n_embd", 0))
    heads = int(getattr(config, "num_attention_heads", 0) or getattr(config, "n_head", 1))
    kv = h * int(getattr(config, "num_key_value_heads", heads) or heads) // max(heads, 1)
    f = int(getattr(config, "intermediate_size", 0) or getattr(config, "n_inner", 0) or 4 * h)
    vocab = int(getattr(config, "vocab_size", 0))
    tokens = batch_size * seq_len
    trained = 7 * h + 2 * kv + 4 * f + heads
    frozen = 4 * h + 2 * kv + 3 * f + heads
    lora = frozen + 3 * h + f + 7 * lora_rank
    head = (h + vocab) * nbytes + 4 * vocab
    return {
        "full": tokens * (blocks * trained * nbytes + head),
        "lisa": tokens * ((n_layers * trained + (blocks - n_layers) * frozen) * nbytes + head),
        "lora": tokens * (blocks * lora * nbytes + head),
    }


# ------------------------------------------------------------------------------ reporting


def format_estimate(estimate: MemoryEstimate, unit: Literal["GiB", "MiB", "auto"] = "auto") -> str:
    """A table of the estimate: one row per arm, one column per part, and each total against full fine-tuning.

    Examples:
        >>> print(format_estimate(estimate_memory("tiny", seq_len=64, dtype="fp32"), unit="MiB"))  # doctest: +ELLIPSIS
        tiny: 287,552 parameters, 6 blocks; batch 1 x 64 tokens, fp32, adamw; LISA trains 2 blocks, LoRA rank 16
        arm ...
        full fine-tuning ...
        LoRA r=16 ...
        LISA ...
    """
    _check_choice("unit", unit, ["GiB", "MiB", "auto"])
    if unit == "auto":
        unit = "GiB" if estimate.full.total >= 2**30 else "MiB"
    scale = float(2**30 if unit == "GiB" else 2**20)
    header = (
        f"{estimate.model}: {estimate.num_params:,} parameters, {estimate.num_blocks} blocks; batch "
        f"{estimate.batch_size} x {estimate.seq_len} tokens, {estimate.dtype}, {estimate.optimizer}; LISA trains "
        f"{estimate.n_layers} blocks, LoRA rank {estimate.lora_rank}"
    )
    columns = ["trainable", "weights", "grads", "opt. state", "activations", "total", "x full"]
    lines = [header, f"{'arm':<18}" + "".join(f"{c:>13}" for c in columns) + f"   ({unit})"]
    for arm in estimate.arms:
        cells = [
            f"{arm.trainable_params:,}",
            *(f"{v / scale:.2f}" for v in (arm.weights, arm.grads, arm.optimizer_state, arm.activations, arm.total)),
            f"{arm.total / estimate.full.total:.2f}",
        ]
        lines.append(f"{arm.name:<18}" + "".join(f"{c:>13}" for c in cells))
    lines.append(f"activations: {estimate.activation_method} (fused attention, no gradient checkpointing)")
    lines.append(
        "total = weights + opt. state + max(grads + activations, activations + logits grad, grads + step buffers)"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Print the estimate of a model (a shape name, a local directory or config.json, a Hub name).

    Examples:
        >>> main(["tiny", "--seq-len", "64", "--dtype", "fp32", "--unit", "MiB"])  # doctest: +ELLIPSIS
        tiny: 287,552 parameters, ...
        0
    """
    parser = argparse.ArgumentParser(
        prog="lightning-lisa estimate",
        description="Estimate the memory of full fine-tuning, LoRA and LISA without loading the model.",
    )
    parser.add_argument("model", help=f"a shape ({', '.join(SHAPES)}), a local directory or config.json, a Hub name")
    parser.add_argument("--n-layers", type=int, default=2, help="blocks LISA trains at once (default 2)")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    parser.add_argument("--optimizer", choices=list(OPTIMIZERS), default="adamw")
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--freeze-embeddings", action="store_true", help="LISA with train_embeddings=False")
    parser.add_argument("--freeze-head", action="store_true", help="LISA with train_head=False")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="where training runs")
    parser.add_argument("--unit", choices=["GiB", "MiB", "auto"], default="auto")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    args = parser.parse_args(argv)
    try:
        estimate = estimate_memory(
            args.model,
            n_layers=args.n_layers,
            batch_size=args.batch_size,
            seq_len=args.seq_len,
            dtype=args.dtype,
            optimizer=args.optimizer,
            lora_rank=args.lora_rank,
            train_embeddings=not args.freeze_embeddings,
            train_head=not args.freeze_head,
            device=args.device,
        )
    except (ValueError, TypeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(estimate.to_dict(), indent=2) if args.json else format_estimate(estimate, unit=args.unit))
    return 0


def _check_int(name: str, value: object, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"`{name}={value!r}` is not allowed; it must be an integer >= {minimum}.")
    if value < minimum:
        raise ValueError(f"`{name}={value!r}` is not allowed; it must be an integer >= {minimum}.")


def _check_choice(name: str, value: object, allowed: list[str]) -> None:
    if value not in allowed:
        raise ValueError(f"`{name}={value!r}` is not one of {allowed}.")
