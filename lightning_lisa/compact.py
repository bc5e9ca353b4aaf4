"""A compact AdamW optimizer state: 8-bit or factored moments for the always-active set, optionally the blocks.

LISA trains the input embeddings and the head all the time. At vocabularies of 128k-256k they are
most of what LISA trains, and their two float32 AdamW moments (8 bytes per parameter) are a large
share of its peak memory. :class:`CompactAdamW` is ``torch.optim.AdamW`` with one addition: a
parameter group with ``compact="8bit"`` or ``compact="factored"`` keeps compact moments, while every
other group is updated by torch's own AdamW code, unchanged (plain, ``foreach`` or ``fused``). By
default (:func:`compact_adamw`) the sampled blocks keep the exact optimizer and only the always-active
set is approximated; ``compact_blocks`` makes the blocks' moments compact too (see below).

Compact moments (per parameter of a compact group):

* ``"8bit"``: both moments in 8 bits, quantized in blocks of ``block_size`` elements, each block
  scaled by its largest magnitude (one float32 per block). The first moment ``m`` is stored as
  ``round(127 * cbrt(m / absmax))`` (signed), the second as ``round(255 * sqrt(sqrt(v) / absmax))``
  of ``sqrt(v)``: both maps are finer near zero, where most moments are. About 2.03 bytes per
  parameter instead of 8.
* ``"factored"``: the first moment in 8 bits as above, the second moment of a matrix factored into
  a row and a column average (Adafactor's estimate ``v[i, j] = r[i] * c[j] / mean(r)``); one-dimensional
  parameters keep an 8-bit second moment. About 1.02 bytes per parameter.

Both are lossy: they change the training trajectory, so they are never the default. The blocks may
keep compact moments too (``compact_adamw(..., compact_blocks="factored")``, opt-in): the state is then
about one byte per trained parameter with ``"factored"`` in both places. The update is
otherwise AdamW's (decoupled weight decay, bias correction, ``maximize``); ``amsgrad`` is refused in
compact groups. Work is done in chunks of about four million elements, so the float32 copies of the
moments that a step needs exist for one chunk at a time, not for a whole embedding matrix.

LISA frees or offloads the state of frozen parameters of any group as for any optimizer, and the
optimizer steps each parameter on its own (``per_parameter_step = True``), so it also works with
``LISA(step_in_backward=True)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal, cast, get_args

import torch
from torch import Tensor, nn

from lightning_lisa.errors import LISAConfigError, check_choice, check_int
from lightning_lisa.layers import default_always_active, find_layers, resolve_modules, unique_parameters

CompactMode = Literal["8bit", "factored"]
COMPACT_MODES: tuple[str, ...] = get_args(CompactMode)

#: Elements updated at once (a multiple of every block size up to 2**14).
CHUNK = 2**22
#: Adafactor's small constant added to squared gradients in the factored second moment.
FACTORED_EPS = 1e-30
#: The state keys that hold codes, block scales or factors (never cast to the parameter's dtype).
COMPACT_KEYS = (
    "exp_avg_codes",
    "exp_avg_absmax",
    "exp_avg_sq_codes",
    "exp_avg_sq_absmax",
    "exp_avg_sq_row",
    "exp_avg_sq_col",
)


class CompactAdamW(torch.optim.AdamW):
    """``torch.optim.AdamW`` whose groups with ``compact`` set keep 8-bit or factored moments.

    Args:
        params: Parameters or parameter groups, as for ``torch.optim.AdamW``. A group may set
            ``compact`` (``"8bit"``, ``"factored"`` or ``None``) and ``block_size``.
        lr: Learning rate.
        betas: AdamW's ``(beta1, beta2)``.
        eps: AdamW's ``eps``.
        weight_decay: Decoupled weight decay.
        compact: The default of the groups' ``compact``: ``None`` (exact AdamW) unless a group says otherwise.
        block_size: Elements per quantization block (a power of two from 16 to 16384).
        **kwargs: Other ``torch.optim.AdamW`` arguments (``foreach``, ``fused``, ``maximize``, ``amsgrad``),
            which apply as usual to the exact groups.

    Examples:
        >>> import torch
        >>> embed, block = torch.nn.Embedding(1000, 64), torch.nn.Linear(64, 64)
        >>> opt = CompactAdamW([{"params": embed.parameters(), "compact": "8bit"}, {"params": block.parameters()}])
        >>> (block(embed(torch.tensor([1, 2]))) ** 2).sum().backward(); opt.step()
        >>> sorted(opt.state[embed.weight])
        ['exp_avg_absmax', 'exp_avg_codes', 'exp_avg_sq_absmax', 'exp_avg_sq_codes', 'step']
        >>> sorted(opt.state[block.weight])  # exact AdamW
        ['exp_avg', 'exp_avg_sq', 'step']
    """

    #: Stepping one parameter alone gives the same update (see :mod:`lightning_lisa.step_in_backward`).
    per_parameter_step = True

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        compact: CompactMode | None = None,
        block_size: int = 256,
        **kwargs: Any,
    ) -> None:
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, **kwargs)
        self.defaults["compact"] = compact
        self.defaults["block_size"] = block_size
        for group in self.param_groups:
            group.setdefault("compact", compact)
            group.setdefault("block_size", block_size)
            _check_group(group)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group as ``torch.optim.AdamW`` does, then check its ``compact`` and ``block_size``."""
        super().add_param_group(param_group)
        if "compact" in self.defaults:  # not while torch's __init__ adds the first groups
            _check_group(self.param_groups[-1])

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One optimizer step: torch's AdamW for the exact groups, compact moments for the others."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        groups = self.param_groups
        exact = [g for g in groups if g["compact"] is None]
        if exact:
            self.param_groups = exact
            try:
                _adam_step()(self)
            finally:
                self.param_groups = groups
        # With fused=True, torch.amp.GradScaler leaves the unscaling to the optimizer (as for torch's fused
        # AdamW): it sets ``grad_scale`` (None if already unscaled) and ``found_inf`` for this call.
        found_inf: Tensor | None = getattr(self, "found_inf", None)
        if found_inf is not None and bool(found_inf.item()):
            return loss  # an overflow: the whole step is skipped, as the fused exact groups skip theirs
        grad_scale: Tensor | None = getattr(self, "grad_scale", None)
        for group in groups:
            if group["compact"] is not None:
                for p in group["params"]:
                    if p.grad is not None:
                        self._compact_update(p, group, grad_scale)
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load as torch does, but keep the codes, block scales and factors in their own dtypes.

        ``torch.optim.Optimizer.load_state_dict`` casts every floating-point state tensor to the
        parameter's dtype, which would turn 8-bit codes into floats and round float32 scales to bf16.
        """
        super().load_state_dict(state_dict)
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        by_id = dict(zip(saved_ids, params, strict=True))
        for pid, saved in state_dict["state"].items():
            p = by_id[pid]
            for key in COMPACT_KEYS:
                if key in saved:
                    self.state[p][key] = saved[key].to(device=p.device, copy=True)

    # ------------------------------------------------------------------------------ compact step

    def _compact_update(self, p: Tensor, group: dict[str, Any], grad_scale: Tensor | None = None) -> None:
        if p.grad is None or p.grad.is_sparse:
            raise RuntimeError("CompactAdamW does not support sparse gradients.")
        block: int = group["block_size"]
        beta1, beta2 = (float(b) for b in group["betas"])
        lr, eps, decay = float(group["lr"]), float(group["eps"]), float(group["weight_decay"])
        factored = group["compact"] == "factored" and p.dim() >= 2
        state = self.state[p]
        if not state:
            _init_state(state, p, block, factored)
        state["step"] += 1
        t = float(state["step"])
        bias1, bias2 = 1 - beta1**t, 1 - beta2**t
        if decay != 0:
            p.mul_(1 - lr * decay)
        flat_p = p.view(-1)
        flat_g = p.grad.reshape(-1)
        if group["maximize"]:
            flat_g = -flat_g
        inv_scale = None if grad_scale is None else grad_scale.to(device=p.device, dtype=torch.float32).reciprocal()
        if factored:
            cols = p[0].numel()
            rows_per_chunk = _rows_per_chunk(cols, block)
            row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
            col_sum = torch.zeros_like(col)
            for start in range(0, p.shape[0], rows_per_chunk):
                # a copy: the gradient itself is never written
                g2 = flat_g[start * cols : (start + rows_per_chunk) * cols].view(-1, cols).to(torch.float32, copy=True)
                if inv_scale is not None:
                    g2.mul_(inv_scale)
                g2.square_().add_(FACTORED_EPS)
                row[start : start + rows_per_chunk].mul_(beta2).add_(g2.mean(1), alpha=1 - beta2)
                col_sum.add_(g2.sum(0))
                del g2  # before the next chunk's copy, and not into the update below
            col.mul_(beta2).add_(col_sum / p.shape[0], alpha=1 - beta2)
            row_mean = row.mean()
            chunk = rows_per_chunk * cols
        else:
            chunk = CHUNK
        m_codes, m_absmax = state["exp_avg_codes"], state["exp_avg_absmax"]
        for start in range(0, flat_p.numel(), chunk):
            stop = min(start + chunk, flat_p.numel())
            g = flat_g[start:stop].to(torch.float32, copy=inv_scale is not None)
            if inv_scale is not None:
                g.mul_(inv_scale)
            b0, b1 = start // block, math.ceil(stop / block)
            n = stop - start
            # m and v (8-bit) keep the padding of their last block (zeros), so requantizing them copies nothing
            m = _dequantize_signed(m_codes[b0 * block : b1 * block], m_absmax[b0:b1], block)
            m[:n].mul_(beta1).add_(g, alpha=1 - beta1)
            if factored:
                v = torch.outer(row[start // cols : stop // cols], col).div_(row_mean).view(-1)
            else:
                s_codes, s_absmax = state["exp_avg_sq_codes"], state["exp_avg_sq_absmax"]
                v = _dequantize_root(s_codes[b0 * block : b1 * block], s_absmax[b0:b1], block)
                v[:n].square_().mul_(beta2).addcmul_(g, g, value=1 - beta2)
                v[n:].zero_()
                codes, absmax = _quantize_root(v.sqrt(), block)
                s_codes[b0 * block : b1 * block], s_absmax[b0:b1] = codes, absmax
            # in place from here: few float32 copies of the chunk exist at once
            update = v[:n].div_(bias2).sqrt_().add_(eps)
            torch.div(m[:n], update, out=update).mul_(-lr / bias1)
            flat_p[start:stop].add_(update.to(p.dtype))
            del update, v
            codes, absmax = _quantize_signed(m, block)
            m_codes[b0 * block : b1 * block], m_absmax[b0:b1] = codes, absmax
            del g, m, codes, absmax  # nothing of this chunk lives into the next one


def compact_adamw(
    module: nn.Module,
    always_active: Sequence[str] | None = None,
    compact: CompactMode | None = "8bit",
    lr: float = 1e-3,
    *,
    compact_blocks: CompactMode | None = None,
    **kwargs: Any,
) -> CompactAdamW:
    """AdamW over every parameter of ``module``: compact moments for the always-active set (and optionally the rest).

    Call it in ``configure_optimizers`` with the ``LightningModule`` (``compact_adamw(self, lr=...)``):
    like LISA, it takes every parameter, trainable or not, so parameter ids stay stable. By default
    the rest (the sampled blocks and any other parameter) keeps exact AdamW moments. With
    ``compact_blocks``, the rest keeps compact moments too: with ``"factored"`` in both places the whole
    state is about one byte per trained parameter. Lossy everywhere then: the blocks no longer follow
    AdamW exactly. ``compact=None`` with ``compact_blocks`` set keeps exact moments for the always-active
    set and compact ones for the rest; ``always_active=[]`` (as for ``LISA(always_active=[])``) is
    allowed when ``compact_blocks`` is set. At least one of the two groups must be compact.

    Args:
        module: The ``LightningModule`` (or any model).
        always_active: Names of modules relative to ``module`` whose moments are ``compact``; ``None``: the
            set LISA trains all the time by default (input embeddings, head, ...; see
            :func:`~lightning_lisa.layers.default_always_active`). Use the same names as ``LISA(always_active=...)``.
        compact: ``"8bit"`` or ``"factored"`` (see :class:`CompactAdamW`): the always-active set's moments;
            ``None``: exact AdamW moments for it (then ``compact_blocks`` must be set).
        lr: Learning rate of both groups.
        compact_blocks: The moments of every other parameter: ``None`` (exact AdamW, the default),
            ``"8bit"`` or ``"factored"``.
        **kwargs: Other :class:`CompactAdamW` / ``torch.optim.AdamW`` arguments (``weight_decay``,
            ``betas``, ``fused``, ``block_size``, ...).

    Returns:
        A :class:`CompactAdamW` with the group of the rest first and the always-active group second
        (each only if it holds parameters).

    Raises:
        LISAConfigError: If ``compact`` or ``compact_blocks`` is not a mode, if neither is set, or if
            ``always_active`` holds no parameters while only ``compact`` is set.

    Examples:
        >>> import torch
        >>> model = torch.nn.ModuleDict({"embed": torch.nn.Embedding(1000, 32), "head": torch.nn.Linear(32, 1000),
        ...     "blocks": torch.nn.ModuleList([torch.nn.Linear(32, 32) for _ in range(4)])})
        >>> opt = compact_adamw(model, always_active=["embed", "head"], lr=1e-3, weight_decay=0.0)
        >>> [(g["compact"], sum(p.numel() for p in g["params"])) for g in opt.param_groups]
        [(None, 4224), ('8bit', 65000)]
        >>> opt = compact_adamw(model, always_active=["embed", "head"], compact="factored", compact_blocks="factored")
        >>> [g["compact"] for g in opt.param_groups]
        ['factored', 'factored']
        >>> opt = compact_adamw(model, always_active=[], compact_blocks="factored")  # every parameter compact
        >>> [g["compact"] for g in opt.param_groups]
        ['factored']
    """
    check_choice("compact", compact, [None, *COMPACT_MODES])
    check_choice("compact_blocks", compact_blocks, [None, *COMPACT_MODES])
    if compact is None and compact_blocks is None:
        raise LISAConfigError(
            "`compact=None` and `compact_blocks=None`: nothing would be compact; set one of them to "
            f"{' or '.join(map(repr, COMPACT_MODES))}, or use torch.optim.AdamW."
        )
    names = always_active if always_active is not None else default_always_active(find_layers(module))
    always = unique_parameters(resolve_modules(module, list(names), "always_active"))
    if not always and compact_blocks is None:
        raise LISAConfigError(
            f"`always_active={list(names)!r}` holds no parameters and `compact_blocks=None`; nothing would be "
            "compact. Name modules that hold parameters, or set `compact_blocks`."
        )
    chosen = {id(p) for p in always}
    rest = [p for p in unique_parameters([module]) if id(p) not in chosen]
    pairs = ((rest, compact_blocks), (always, compact))
    groups = [{"params": params, "compact": mode} for params, mode in pairs if params]
    return CompactAdamW(groups, lr=lr, **kwargs)


def compact_state_nbytes(shape: Sequence[int], compact: CompactMode, block_size: int = 256) -> int:
    """Bytes of :class:`CompactAdamW`'s state for one parameter of ``shape`` in a group with ``compact`` set.

    The first moment's int8 codes (padded to whole blocks) and a float32 scale per block; the second
    moment's uint8 codes and scales, or, ``"factored"`` for two or more dimensions, a float32 row and
    column average; and the 4-byte ``step`` tensor.

    Args:
        shape: The parameter's shape.
        compact: ``"8bit"`` or ``"factored"``.
        block_size: The group's ``block_size`` (elements per quantization block).

    Returns:
        The bytes of the parameter's state tensors, as allocated after its first step.

    Examples:
        >>> compact_state_nbytes((1000, 64), "8bit")  # about 2.03 bytes per element
        130004
        >>> compact_state_nbytes((1000, 64), "factored")  # about 1.02
        69260
    """
    check_choice("compact", compact, COMPACT_MODES)
    numel = math.prod(shape)
    blocks = math.ceil(numel / block_size)
    codes = blocks * block_size + 4 * blocks
    if compact == "factored" and len(shape) >= 2:
        return 4 + codes + 4 * shape[0] + 4 * (numel // shape[0])
    return 4 + 2 * codes


def compact_step_nbytes(shape: Sequence[int], compact: CompactMode, grad_nbytes: int, block_size: int = 256) -> int:
    """The transient bytes of :class:`CompactAdamW`'s update of one parameter (float32 copies of a chunk).

    The update works on one chunk at a time (about :data:`CHUNK` elements; for a factored matrix, whole
    rows) and frees everything of a chunk before the next one, so the peak is set by the first, largest
    chunk. Counted with :class:`~lightning_lisa.estimate.measure.TensorPeak` on CPU, per element of that
    chunk (padded to whole blocks): 17 bytes (8-bit) or 9 (factored) with float32 gradients, 21 or 14
    with bf16/fp16 ones (the gradient's float32 copy and what it adds to the peak); plus two float32
    block scales per block (8 bytes per ``block_size`` elements; not at the peak of a factored update with
    bf16/fp16 gradients) and, factored, the float32 column sums of the second moment (4 bytes a column).

    Args:
        shape: The parameter's shape.
        compact: ``"8bit"`` or ``"factored"``.
        grad_nbytes: Bytes per element of the gradient (2 for bf16/fp16, 4 for float32).
        block_size: The group's ``block_size``.

    Returns:
        The bytes allocated during the update above what exists before it (parameter, gradient, state).

    Examples:
        >>> round(compact_step_nbytes((128256, 4096), "factored", 2) / 2**20, 1)  # Llama-3-8B's head: not 2 GiB
        56.0
        >>> round(compact_step_nbytes((128256, 4096), "8bit", 2) / 2**20, 1)
        84.1
    """
    check_choice("compact", compact, COMPACT_MODES)
    check_int("grad_nbytes", grad_nbytes, minimum=1)
    numel = math.prod(shape)
    factored = compact == "factored" and len(shape) >= 2
    cols = numel // shape[0] if factored else 0
    chunk = min(numel, _rows_per_chunk(cols, block_size) * cols if factored else CHUNK)
    chunk = math.ceil(chunk / block_size) * block_size
    scales = 8 * chunk // block_size
    if factored:
        if grad_nbytes == 4:
            return 9 * chunk + scales + 4 * cols + 4
        return 14 * chunk + 4 * cols + 4
    return (17 if grad_nbytes == 4 else 21) * chunk + scales


# ------------------------------------------------------------------------------------ internals


def _check_group(group: dict[str, Any]) -> None:
    check_choice("compact", group["compact"], [None, *COMPACT_MODES])
    block = group["block_size"]
    check_int("block_size", block, minimum=16)
    if block > 2**14 or block & (block - 1):
        raise LISAConfigError(f"`block_size={block!r}` is not allowed; it must be a power of two from 16 to 16384.")
    if group["compact"] is not None and group["amsgrad"]:
        raise LISAConfigError(f"`amsgrad=True` is not supported in a group with `compact={group['compact']!r}`.")


def _adam_step() -> Callable[[torch.optim.Optimizer], Any]:
    """The Adam/AdamW step body of torch, without the step hooks (the outer ``step`` call runs them once)."""
    step: Any = torch.optim.Adam.step
    if getattr(step, "hooked", False) and hasattr(step, "__wrapped__"):
        step = step.__wrapped__
    return cast(Callable[[torch.optim.Optimizer], Any], step)


def _init_state(state: dict[str, Any], p: Tensor, block: int, factored: bool) -> None:
    blocks = math.ceil(p.numel() / block)
    state["step"] = torch.tensor(0.0, dtype=torch.float32)
    state["exp_avg_codes"] = torch.zeros(blocks * block, dtype=torch.int8, device=p.device)
    state["exp_avg_absmax"] = torch.zeros(blocks, dtype=torch.float32, device=p.device)
    if factored:
        state["exp_avg_sq_row"] = torch.zeros(p.shape[0], dtype=torch.float32, device=p.device)
        state["exp_avg_sq_col"] = torch.zeros(p[0].numel(), dtype=torch.float32, device=p.device)
    else:
        state["exp_avg_sq_codes"] = torch.zeros(blocks * block, dtype=torch.uint8, device=p.device)
        state["exp_avg_sq_absmax"] = torch.zeros(blocks, dtype=torch.float32, device=p.device)


def _rows_per_chunk(cols: int, block: int) -> int:
    """Rows per chunk: about :data:`CHUNK` elements, and a whole number of quantization blocks."""
    step = block // math.gcd(cols, block)
    return max(step, CHUNK // cols // step * step)


def _blocks(x: Tensor, block: int) -> Tensor:
    pad = (-x.numel()) % block
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    return x.view(-1, block)


def _quantize_signed(x: Tensor, block: int) -> tuple[Tensor, Tensor]:
    """Codes ``round(127 * cbrt(x / absmax))`` (int8) and the absmax of each block."""
    xb = _blocks(x, block)
    absmax = xb.abs().amax(1)
    scale = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    codes = xb.abs().div_(scale[:, None]).pow_(1 / 3).mul_(127).round_().copysign_(xb)
    return codes.to(torch.int8).view(-1), absmax


def _dequantize_signed(codes: Tensor, absmax: Tensor, block: int) -> Tensor:
    return codes.view(-1, block).float().div_(127).pow_(3).mul_(absmax[:, None]).view(-1)


def _quantize_root(s: Tensor, block: int) -> tuple[Tensor, Tensor]:
    """Codes ``round(255 * sqrt(s / absmax))`` (uint8) of non-negative ``s`` and the absmax of each block."""
    sb = _blocks(s, block)
    absmax = sb.amax(1)
    scale = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    codes = sb.div(scale[:, None]).sqrt_().mul_(255).round_()
    return codes.to(torch.uint8).view(-1), absmax


def _dequantize_root(codes: Tensor, absmax: Tensor, block: int) -> Tensor:
    # code 0 stands for "below half the first level": half of it, so that no tiny second moment becomes 0
    q = codes.view(-1, block).float().clamp_(min=0.5).div_(255)
    return q.square_().mul_(absmax[:, None]).view(-1)
