"""Memory of full fine-tuning, LoRA and LISA for a model, estimated without allocating it.

:func:`estimate_memory` builds the model on PyTorch's ``meta`` device (shapes only, no storage), finds
its blocks, embeddings and head with :func:`~lightning_lisa.find_layers`, and adds up, per arm:

* **weights**: every parameter (tied weights once), in ``dtype`` (in float32 with ``mixed_precision``);
* **grads**: the gradients resident at once: every trainable parameter's, in the weights' dtype; with
  ``step_in_backward`` (LISA), only the largest single one (a tied embedding and head's gradient, which
  waits through the backward pass beside the others, is counted in the backward-pass peak);
* **optimizer state**: the bytes of :func:`optimizer_state_nbytes`: AdamW's two moments per trainable
  parameter in the parameter's dtype, as ``torch.optim.AdamW`` keeps them, plus its 4-byte ``step``
  tensor per parameter tensor; or bitsandbytes ``AdamW8bit``: one byte per moment and element, plus a
  float32 absolute maximum per 256-element block, for tensors of at least 4096 elements, and 32-bit
  moments for smaller tensors. With ``compact_always_active`` (LISA), the always-active parameters
  keep :class:`~lightning_lisa.compact.CompactAdamW`'s 8-bit or factored state
  (:func:`~lightning_lisa.compact.compact_state_nbytes`), and with ``compact_blocks`` the blocks too;
  otherwise they keep ``optimizer``'s;
* **activations**: the tensors autograd saves for the backward pass, counted by running the forward
  pass on the meta device (:mod:`lightning_lisa.estimate.activations`); with
  ``gradient_checkpointing``, each block keeps only its input and the largest block is rebuilt in the
  backward pass (the *recompute* workspace);
* **workspace**: the largest transient buffers: the gradient of the float32 logits during the loss's
  backward pass (only a chunk of it with ``loss_chunk_size``), and the temporary that
  ``torch.optim.AdamW``'s multi-tensor step allocates (one copy of the parameters it steps at once;
  none for ``AdamW8bit`` and with ``fused``), or a compact step's float32 temporaries of one chunk
  (:func:`~lightning_lisa.compact.compact_step_nbytes`).

The arms are full fine-tuning (everything trains), LoRA (rank ``lora_rank`` adapters on every
linear layer but the output head, as PEFT's ``target_modules="all-linear"``; base weights frozen;
adapters in the weights' dtype) and LISA with ``optimizer_state="drop"`` (the input embeddings, the
head and ``n_layers`` blocks train; the state of frozen blocks is freed; ``"offload"`` holds the same on
the device). Gradient checkpointing, the chunked loss and the precision apply to every arm; the step
in backward and the compact state to LISA only, fused AdamW to every arm.

**The peak.** Lightning's automatic optimization runs the forward pass while the previous step's
gradients still exist, zeroes them, runs the backward pass, then the optimizer step. So the peak is
``weights + optimizer_state + max(grads + activations, activations + logits workspace, activations +
recompute + grads, grads + step workspace)``, which is :attr:`ArmEstimate.total`. With the step in
backward, each gradient is used and freed as soon as it is final: no gradient outlives the backward
pass, and at most the largest one and its step's temporary are resident with the activations.

**Assumptions of the activation estimate** (the uncertain part; the training-state figures are
exact counts):

* Attention runs in a fused kernel (``scaled_dot_product_attention`` with the flash or
  memory-efficient backend, as on CUDA and in PyTorch's CPU flash kernel; flash-attention for models
  without an SDPA path, such as Gemma-2): it saves queries, keys, values, the output and a float32
  log-sum-exp per query and head, never the ``seq_len x seq_len`` attention matrix. Models with eager
  attention save that matrix and need more. With ``device="cpu"``, attention with dropout, and
  models without an SDPA path, are counted unfused, as the CPU runs them.
* Dropout as in the model's config (its masks are counted). ``bf16-mixed`` is ``torch.autocast``:
  matrix products on lower-precision copies of their inputs, softmax and the loss in float32.
* For LISA, the sampled blocks are the first ones: with frozen embeddings that is the worst case,
  as the gradient then flows through every block above them.
* Allocator fragmentation, the CUDA context (several hundred MiB), communication buffers and the
  framework's own tensors are not counted. Calibrated on CPU against tensors counted during real
  steps (:class:`~lightning_lisa.estimate.measure.TensorPeak`) and on an H100 against
  ``benchmarks/memory_speed.py``.

If a model cannot run its forward pass on the meta device, activations fall back to a formula for
Llama-like blocks (:attr:`MemoryEstimate.activation_method` says which was used).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal, get_args

import torch
from torch import nn

from lightning_lisa.compact import COMPACT_MODES, CompactMode, compact_state_nbytes, compact_step_nbytes
from lightning_lisa.errors import LISAConfigError, check_bool, check_choice, check_int
from lightning_lisa.estimate.activations import ActivationProfile, formula_activations, trace_activations
from lightning_lisa.estimate.shapes import build_meta_model, load_config, lora_targets, quiet
from lightning_lisa.layers import LayerInfo, find_layers, resolve_modules, unique_parameters

Dtype = Literal["fp32", "bf16", "fp16"]
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
OptimizerName = Literal["adamw", "adamw8bit"]
OPTIMIZERS: tuple[str, ...] = get_args(OptimizerName)

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
        grads: Gradients resident at once (with ``step_in_backward``, the largest single gradient).
        optimizer_state: The optimizer's state tensors.
        activations: Tensors saved for the backward pass and kept through the forward pass.
        logits_workspace: Transient float32 gradients of the logits (or of one chunk of them, and the
            chunk's rebuilt tensors) in the loss's backward pass.
        step_workspace: Transient buffers of the optimizer step: with torch's default (``foreach``) AdamW,
            a copy of what it steps, counted as one parameter group (torch steps each group on its
            own, so with several groups the copy is the largest group's and this is an upper bound);
            with ``fused`` none; for compact groups, one parameter's chunk temporaries.
        recompute_workspace: With gradient checkpointing, the saved tensors of the largest block, rebuilt
            during the backward pass.
        step_in_backward: Each gradient is used by the optimizer and freed as soon as it is final.
        forward_workspace: Transient logits at the end of the forward pass (the model's output and its
            float32 copy for the loss), or one chunk's.
        backward_step_peak: With ``step_in_backward``, the activations, gradients and step temporaries
            resident at the worst update inside the backward pass: the head's (the loss's tensors freed),
            a block's (a tied head's gradient waiting for the embeddings' part), or the embeddings' (at
            the end, the activations freed).
    """

    name: str
    trainable_params: int
    weights: int
    grads: int
    optimizer_state: int
    activations: int
    logits_workspace: int
    step_workspace: int
    recompute_workspace: int = 0
    step_in_backward: bool = False
    backward_step_peak: int = 0
    forward_workspace: int = 0

    @property
    def training_state(self) -> int:
        """Weights + gradients + optimizer state: what is counted exactly."""
        return self.weights + self.grads + self.optimizer_state

    @property
    def total(self) -> int:
        """The estimated peak: weights, optimizer state and the largest of the phases of a step."""
        acts = self.activations
        if self.step_in_backward:  # no gradient outlives the backward pass
            phases: tuple[int, ...] = (
                acts + self.forward_workspace,
                acts + self.logits_workspace,
                self.backward_step_peak,
            )
        else:
            phases = (
                self.grads + acts + self.forward_workspace,  # end of the forward pass (the previous gradients exist)
                acts + self.logits_workspace,  # start of the backward pass
                acts + self.recompute_workspace + self.grads,  # a checkpointed block rebuilt, gradients accumulating
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
        dtype: Dtype of the computation and activations (and of everything else unless ``mixed_precision``).
        optimizer: ``"adamw"`` or ``"adamw8bit"``.
        lora_rank: Rank of the LoRA adapters.
        activation_method: ``"trace"`` (saved tensors of a meta-device forward pass) or ``"formula"``.
        full: Full fine-tuning.
        lora: LoRA on all linear layers but the head.
        lisa: LISA, ``optimizer_state="drop"``.
        mixed_precision: Weights, gradients and optimizer state in float32, computation in ``dtype``.
        gradient_checkpointing: Hugging Face gradient checkpointing of every block.
        loss_chunk_size: Tokens per chunk of the loss (``None``: the whole batch at once).
        step_in_backward: LISA steps each parameter in the backward pass.
        compact_always_active: LISA's compact moments for its always-active parameters: ``"8bit"``,
            ``"factored"`` or ``None`` (exact).
        compact_blocks: LISA's compact moments for its blocks: ``"8bit"``, ``"factored"`` or ``None`` (exact).
        fused: ``torch.optim.AdamW(fused=True)``, whose step makes no temporary copy.
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
    mixed_precision: bool = False
    gradient_checkpointing: bool = False
    loss_chunk_size: int | None = None
    step_in_backward: bool = False
    compact_always_active: CompactMode | None = None
    compact_blocks: CompactMode | None = None
    fused: bool = False

    @property
    def arms(self) -> tuple[ArmEstimate, ArmEstimate, ArmEstimate]:
        """Full fine-tuning, LoRA and LISA, in that order."""
        return (self.full, self.lora, self.lisa)

    @property
    def precision(self) -> str:
        """Lightning's name of the precision, e.g. ``"bf16-true"`` or ``"bf16-mixed"``.

        Examples:
            >>> estimate_memory("tiny", seq_len=16, mixed_precision=True).precision
            'bf16-mixed'
        """
        name = {"fp32": "32", "bf16": "bf16", "fp16": "16"}[self.dtype]
        return f"{name}-mixed" if self.mixed_precision else f"{name}-true"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly dict, with each arm's ``training_state`` and ``total``."""
        result = asdict(self)
        for arm in self.arms:
            key = {"full fine-tuning": "full", "LISA": "lisa"}.get(arm.name, "lora")
            result[key].update(training_state=arm.training_state, total=arm.total)
        result["precision"] = self.precision
        return result


def optimizer_state_nbytes(sizes: Iterable[tuple[int, int]], optimizer: str = "adamw") -> int:
    """State bytes of ``optimizer`` for parameter tensors given as ``(numel, element_size)`` pairs.

    ``"adamw"`` (``torch.optim.AdamW``): two moments in the parameter's dtype and a 4-byte ``step`` tensor
    per parameter tensor. ``"adamw8bit"`` (bitsandbytes): one byte per moment and element plus a float32
    absolute maximum per 256 elements, for tensors of at least 4096 elements; float32 moments for smaller
    ones; and the two 256-entry float32 quantization maps.

    Examples:
        >>> optimizer_state_nbytes([(100 * 100, 4)])  # a Linear(100, 100) weight in float32
        80004
        >>> optimizer_state_nbytes([(100 * 100, 4)], "adamw8bit")
        22368
    """
    check_choice("optimizer", optimizer, list(OPTIMIZERS))
    if optimizer == "adamw":  # exp_avg, exp_avg_sq in the parameter's dtype; a float32 step tensor
        return sum(2 * n * nbytes + 4 for n, nbytes in sizes)
    total = 0
    blockwise = False
    for n, _ in sizes:
        if n >= MIN_8BIT_SIZE:  # uint8 moments and a float32 absmax per block, for each moment
            total += 2 * n + 2 * 4 * math.ceil(n / BLOCKWISE_8BIT)
            blockwise = True
        else:
            total += 2 * 4 * n
    return total + (2 * 256 * 4 if blockwise else 0)  # the two quantization maps, shared by all tensors


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
    mixed_precision: bool = False,
    gradient_checkpointing: bool = False,
    loss_chunk_size: int | None = None,
    step_in_backward: bool = False,
    compact_always_active: bool | CompactMode | None = False,
    compact_blocks: CompactMode | None = None,
    fused: bool = False,
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
            activations all in this dtype (Lightning's ``precision="bf16-true"`` for ``"bf16"``), or, with
            ``mixed_precision``, the dtype of the computation and activations only.
        optimizer: ``"adamw"`` (``torch.optim.AdamW``) or ``"adamw8bit"`` (bitsandbytes).
        lora_rank: Rank of the LoRA adapters.
        train_embeddings: LISA keeps the input embeddings trainable (its default).
        train_head: LISA keeps the output head trainable (its default).
        train_final_norm: LISA also keeps the final normalization layer trainable.
        device: Where training runs. Attention is assumed fused on ``"cuda"``; on ``"cpu"``, attention
            with dropout (e.g. GPT-2 in training mode) and attention without an SDPA path are unfused,
            as PyTorch's CPU kernels run them.
        activations: ``"trace"`` counts the saved tensors of a meta-device forward pass (falling back
            to the formula if the model cannot run on meta); ``"formula"`` uses a Llama-like formula.
        mixed_precision: Lightning's ``precision="bf16-mixed"`` (with ``dtype="bf16"``): weights,
            gradients and optimizer state in float32, the forward and backward passes under
            ``torch.autocast`` to ``dtype``. Every arm.
        gradient_checkpointing: Hugging Face gradient checkpointing
            (``model.gradient_checkpointing_enable()``) of every block, for every arm.
        loss_chunk_size: Compute the logits and the loss in chunks of this many tokens, each rebuilt in
            the backward pass (as ``CausalLMModule(loss_chunk_size=...)``), for every arm; ``None``: the
            model's own loss over the whole batch.
        step_in_backward: LISA updates each parameter in a post-accumulate-grad hook and frees its
            gradient at once (``LISA(step_in_backward=True)``): gradients are resident one at a time,
            except a tied embedding and head's, which waits from the head's part to the embedding's.
        compact_always_active: LISA keeps the compact moments of
            :class:`~lightning_lisa.compact.CompactAdamW` for its always-active parameters (the embeddings
            and the head): ``"8bit"`` (``True`` means it), ``"factored"``, or ``False`` / ``None`` (exact).
            Needs ``optimizer="adamw"``.
        compact_blocks: The same for LISA's blocks (``compact_adamw(..., compact_blocks=...)``): ``"8bit"``,
            ``"factored"`` or ``None`` (``optimizer``'s exact state).
        fused: ``torch.optim.AdamW(fused=True)`` in every arm: its step updates in place, with no
            temporary copy of the parameters it steps. Needs ``optimizer="adamw"``.

    Returns:
        The per-arm breakdown.

    Raises:
        LISAConfigError: For an argument of the wrong type or out of range, an unknown dtype, optimizer
            or shape name.

    Examples:
        >>> est = estimate_memory("tiny", seq_len=64, dtype="fp32")
        >>> est.num_params, est.num_blocks, est.lisa.trainable_params
        (287552, 6, 139520)
        >>> est.full.weights == 4 * est.num_params and est.lisa.optimizer_state < est.full.optimizer_state
        True
        >>> lean = estimate_memory(
        ...     "tiny", seq_len=64, step_in_backward=True, compact_always_active="factored", compact_blocks="factored"
        ... )
        >>> lean.lisa.total < estimate_memory("tiny", seq_len=64).lisa.total
        True
    """
    arguments = dict(locals())  # exactly the arguments, echoed into the result
    check_int("n_layers", n_layers, 1)
    check_int("batch_size", batch_size, 1)
    check_int("seq_len", seq_len, 1)
    check_int("lora_rank", lora_rank, 1)
    if loss_chunk_size is not None:
        check_int("loss_chunk_size", loss_chunk_size, 1)
    check_choice("dtype", dtype, list(DTYPES))
    check_choice("optimizer", optimizer, list(OPTIMIZERS))
    check_choice("activations", activations, ["trace", "formula"])
    check_choice("device", device, ["cuda", "cpu"])
    for flag, value in (
        ("train_embeddings", train_embeddings),
        ("train_head", train_head),
        ("train_final_norm", train_final_norm),
        ("mixed_precision", mixed_precision),
        ("gradient_checkpointing", gradient_checkpointing),
        ("step_in_backward", step_in_backward),
        ("fused", fused),
    ):
        check_bool(flag, value)
    if not isinstance(compact_always_active, bool) and compact_always_active not in [None, *COMPACT_MODES]:
        raise LISAConfigError(
            f"`compact_always_active={compact_always_active!r}` is not one of {[True, False, None, *COMPACT_MODES]}."
        )
    always_mode: CompactMode | None = "8bit" if compact_always_active is True else compact_always_active or None
    check_choice("compact_blocks", compact_blocks, [None, *COMPACT_MODES])
    options: tuple[tuple[str, object], ...] = (
        ("compact_always_active", always_mode),
        ("compact_blocks", compact_blocks),
        ("fused", fused),
    )
    for name, option in options:
        if option and optimizer != "adamw":
            raise LISAConfigError(
                f"`{name}={option!r}` needs `optimizer='adamw'` (it models torch's AdamW or CompactAdamW), "
                f"got `optimizer={optimizer!r}`."
            )
    if mixed_precision and dtype == "fp32":
        raise LISAConfigError(
            "`mixed_precision=True` with `dtype='fp32'` is not allowed; mixed precision computes in a lower "
            "precision: give `dtype='bf16'` (Lightning's 'bf16-mixed') or `dtype='fp16'`."
        )

    label, config = load_config(model)
    compute_dtype = DTYPES[dtype]
    weight_dtype = torch.float32 if mixed_precision else compute_dtype
    meta = build_meta_model(config, weight_dtype)
    info = find_layers(meta)
    if n_layers > info.num_blocks:
        raise LISAConfigError(
            f"`n_layers={n_layers}` is not allowed for {label}: it has {info.num_blocks} blocks, so `n_layers` "
            f"must be between 1 and {info.num_blocks}."
        )
    always, block_params = _lisa_parameters(meta, info, n_layers, train_embeddings, train_head, train_final_norm)
    all_params = unique_parameters([meta])
    lora_shapes = lora_targets(meta, info)
    lora_tensors = [lora_rank * fan for shape in lora_shapes.values() for fan in shape]  # A: r x in, B: out x r
    nbytes = torch.tensor([], dtype=weight_dtype).element_size()
    compute_nbytes = torch.tensor([], dtype=compute_dtype).element_size()
    tokens = batch_size * seq_len

    method = activations
    profiles: dict[str, ActivationProfile] = {}
    if method == "trace":
        try:
            with quiet():
                profiles = _trace_arms(
                    meta, info, always, n_layers, lora_shapes, lora_rank, batch_size, seq_len, device == "cpu",
                    compute_dtype if mixed_precision else None,
                )  # fmt: skip
        except Exception:  # any model that cannot run on meta falls back to the formula
            method = "formula"
    if method == "formula":
        profiles = {
            "full": formula_activations(config, info.num_blocks, None, None, batch_size, seq_len, compute_nbytes),
            "lisa": formula_activations(config, info.num_blocks, n_layers, None, batch_size, seq_len, compute_nbytes),
            "lora": formula_activations(config, info.num_blocks, 0, lora_rank, batch_size, seq_len, compute_nbytes),
        }

    vocab = _vocab_size(meta, config)
    chunked = loss_chunk_size is not None and loss_chunk_size < tokens  # one chunk is the plain loss
    # the backward pass of the loss holds two float32 gradients of the logits (of the loss, of the
    # log-softmax) beside the saved log-probabilities; a chunked loss, one chunk's and its saved tensors
    logits_workspace = 8 * tokens * vocab
    upcast = 4 if compute_nbytes != 4 else 0  # the loss's float32 copy of the logits (none if float32)
    forward_workspace = (compute_nbytes + upcast) * tokens * vocab  # the model's logits and that copy
    if chunked:
        assert loss_chunk_size is not None
        per_token = profiles["full"].head / tokens + 8 * vocab
        logits_workspace = int(min(loss_chunk_size, tokens) * per_token)
        forward_workspace = (compute_nbytes + upcast + 4) * min(loss_chunk_size, tokens) * vocab

    multi_tensor = optimizer == "adamw" and not fused  # torch's foreach step: a temporary copy of what it steps
    embedding_ids = {id(p) for p in unique_parameters(meta.get_submodule(n) for n in info.embedding_names)}
    head_ids = {id(p) for p in unique_parameters(meta.get_submodule(n) for n in info.head_names)}

    def backward_step_peak(after_loss: int, recompute: int) -> int:
        """LISA's worst update in the backward pass (see :attr:`ArmEstimate.backward_step_peak`)."""

        def update(p: nn.Parameter, always_active: bool) -> int:  # the gradient, and the step's temporaries
            mode = always_mode if always_active else compact_blocks
            if mode is not None:
                return p.numel() * nbytes + compact_step_nbytes(tuple(p.shape), mode, nbytes)
            return p.numel() * nbytes * (2 if multi_tensor else 1)

        held = sum(p.numel() for p in always if id(p) in head_ids and id(p) in embedding_ids) * nbytes  # tied
        peaks = [after_loss + update(p, True) for p in always if id(p) in head_ids - embedding_ids]
        inner = [update(p, False) for p in block_params]
        inner += [update(p, True) for p in always if id(p) not in head_ids | embedding_ids]
        if inner:
            peaks.append(after_loss + recompute + held + max(inner))
        peaks += [update(p, True) for p in always if id(p) in embedding_ids]  # last: activations freed
        return max(peaks, default=after_loss)

    def arm(
        name: str,
        key: str,
        trainable: list[int],
        extra_weights: int,
        state: int,
        stepped_by_adamw: list[int],
        in_backward: bool = False,
        trains_head: bool = False,
        compact_workspace: int = 0,
    ) -> ArmEstimate:
        profile = profiles[key]
        # a chunked loss sums the head's gradient over the chunks while the next chunk's workspace exists
        head_gradient = sum(p.numel() for p in unique_parameters(meta.get_submodule(n) for n in info.head_names))
        head_gradient *= nbytes
        saved = profile.saved(gradient_checkpointing, chunked)
        recompute = profile.recompute(gradient_checkpointing)
        grads, step_workspace = sum(trainable) * nbytes, sum(stepped_by_adamw) * nbytes
        peak = 0
        if in_backward:  # one parameter at a time: its gradient, and its step's temporary
            grads, step_workspace = max(trainable, default=0) * nbytes, max(stepped_by_adamw, default=0) * nbytes
            peak = backward_step_peak(saved - (0 if chunked else profile.head), recompute)
        step_workspace = max(step_workspace, compact_workspace)  # compact parameters are updated one at a time
        return ArmEstimate(
            name=name,
            trainable_params=sum(trainable),
            weights=sum(p.numel() for p in all_params) * nbytes + extra_weights,
            grads=grads,
            optimizer_state=state,
            activations=saved,
            logits_workspace=logits_workspace + (head_gradient if chunked and trains_head else 0),
            forward_workspace=forward_workspace,
            step_workspace=step_workspace,
            recompute_workspace=recompute,
            step_in_backward=in_backward,
            backward_step_peak=peak,
        )

    def state(numels: list[int], name: str) -> int:
        return optimizer_state_nbytes(((n, nbytes) for n in numels), name)

    full = [p.numel() for p in all_params]
    always_numels = [p.numel() for p in always]
    block_numels = [p.numel() for p in block_params]
    modes = [(p, always_mode) for p in always] + [(p, compact_blocks) for p in block_params]
    lisa_exact = [p.numel() for p, mode in modes if mode is None]
    compact_shapes = [(tuple(p.shape), mode) for p, mode in modes if mode is not None]
    lisa_state = state(lisa_exact, optimizer) + sum(compact_state_nbytes(sh, m) for sh, m in compact_shapes)
    lisa_stepped = lisa_exact if multi_tensor else []
    lisa_compact_workspace = max((compact_step_nbytes(sh, m, nbytes) for sh, m in compact_shapes), default=0)
    echoed = {f.name: arguments[f.name] for f in fields(MemoryEstimate) if f.name in arguments}
    return MemoryEstimate(
        **{**echoed, "model": label, "compact_always_active": always_mode},
        num_params=sum(full),
        num_blocks=info.num_blocks,
        activation_method=method,
        full=arm(
            "full fine-tuning", "full", full, 0, state(full, optimizer), full if multi_tensor else [], trains_head=True
        ),
        lora=arm(
            f"LoRA r={lora_rank}",
            "lora",
            lora_tensors,
            sum(lora_tensors) * nbytes,
            state(lora_tensors, optimizer),
            lora_tensors if multi_tensor else [],
        ),
        lisa=arm(
            "LISA",
            "lisa",
            always_numels + block_numels,
            0,
            lisa_state,
            lisa_stepped,
            step_in_backward,
            trains_head=bool({id(p) for p in always} & head_ids),
            compact_workspace=lisa_compact_workspace,
        ),
    )


def _trace_arms(
    model: nn.Module,
    info: LayerInfo,
    always: list[nn.Parameter],
    n_layers: int,
    lora_shapes: dict[str, tuple[int, int]],
    lora_rank: int,
    batch_size: int,
    seq_len: int,
    unfused_dropout: bool,
    autocast: torch.dtype | None,
) -> dict[str, ActivationProfile]:
    """Activation profiles of full fine-tuning, LISA (its first blocks: the worst case) and LoRA."""
    common: dict[str, Any] = dict(
        batch_size=batch_size, seq_len=seq_len, unfused_dropout=unfused_dropout, autocast=autocast
    )
    lisa = [*always, *unique_parameters(info.blocks[:n_layers])]
    return {
        "full": trace_activations(model, info, None, **common),
        "lisa": trace_activations(model, info, lisa, **common),
        "lora": trace_activations(model, info, [], lora_shapes, lora_rank, **common),
    }


def _lisa_parameters(
    model: nn.Module, info: LayerInfo, n_layers: int, embeddings: bool, head: bool, final_norm: bool
) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """What LISA trains at its largest: the always-active parameters, and those of the ``n_layers`` largest blocks."""
    embedding_params = unique_parameters(model.get_submodule(n) for n in info.embedding_names)
    head_params = unique_parameters(model.get_submodule(n) for n in info.head_names)
    if {id(p) for p in embedding_params} & {id(p) for p in head_params} and embeddings != head:
        raise LISAConfigError(
            f"`train_embeddings={embeddings}` and `train_head={head}` differ, but this model ties its input "
            "embeddings and head; set both alike."
        )
    modules: list[nn.Module] = []
    if embeddings:  # with learned positions, class tokens and embedding norms (LISA's default input side)
        modules += resolve_modules(model, [*info.embedding_names, *info.extra_embedding_names], "always_active")
    if head:
        modules += [model.get_submodule(n) for n in info.head_names]
    modules += resolve_modules(model, info.projector_names, "always_active")
    if final_norm:
        if not info.final_norm_names:
            raise LISAConfigError(
                "`train_final_norm=True` is not allowed: this model has no final normalization layer after its blocks."
            )
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


# ------------------------------------------------------------------------------ reporting


def format_estimate(estimate: MemoryEstimate, unit: Literal["GiB", "MiB", "auto"] = "auto") -> str:
    """A table of the estimate: one row per arm, one column per part, and each total against full fine-tuning.

    Examples:
        >>> print(format_estimate(estimate_memory("tiny", seq_len=64, dtype="fp32"), unit="MiB"))  # doctest: +ELLIPSIS
        tiny: 287,552 parameters, 6 blocks; batch 1 x 64 tokens, 32-true, adamw; LISA trains 2 blocks, LoRA rank 16
        arm ...
        full fine-tuning ...
        LoRA r=16 ...
        LISA ...
    """
    check_choice("unit", unit, ["GiB", "MiB", "auto"])
    if unit == "auto":
        unit = "GiB" if estimate.full.total >= 2**30 else "MiB"
    scale = float(2**30 if unit == "GiB" else 2**20)
    header = (
        f"{estimate.model}: {estimate.num_params:,} parameters, {estimate.num_blocks} blocks; batch "
        f"{estimate.batch_size} x {estimate.seq_len} tokens, {estimate.precision}, {estimate.optimizer}"
        f"{' (fused)' if estimate.fused else ''}; LISA trains "
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
    checkpointing = "gradient checkpointing" if estimate.gradient_checkpointing else "no gradient checkpointing"
    loss = f"loss in chunks of {estimate.loss_chunk_size} tokens" if estimate.loss_chunk_size else "loss unchunked"
    lines.append(f"activations: {estimate.activation_method} (fused attention, {checkpointing}, {loss})")
    lisa_options = [
        name
        for name, on in (
            ("step in backward", estimate.step_in_backward),
            (f"{estimate.compact_always_active} always-active state", estimate.compact_always_active),
            (f"{estimate.compact_blocks} blocks' state", estimate.compact_blocks),
        )
        if on
    ]
    if lisa_options:
        lines.append(f"LISA with {' and '.join(lisa_options)}")
    lines.append(
        "total = weights + opt. state + the largest phase of a step: end of the forward pass (grads, activations, "
        "logits), loss backward, a block rebuilt, an optimizer step (see ArmEstimate.total)"
    )
    return "\n".join(lines)
