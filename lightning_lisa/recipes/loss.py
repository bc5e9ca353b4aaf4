"""The next-token loss of a causal LM, computed in chunks so the float32 logits never exist in full.

A Hugging Face causal LM computes the logits of the whole batch, ``batch x seq_len x vocab``, casts
them to float32 and takes the cross-entropy: at a 128k vocabulary and 8 x 2048 tokens, that is 8 GiB of
float32 log-probabilities kept for the backward pass, and as much again for their gradient.
:func:`causal_lm_loss` takes the last hidden states instead and computes the head, the logits and the
cross-entropy for ``chunk_size`` tokens at a time. Each chunk is checkpointed
(:func:`torch.utils.checkpoint.checkpoint`, non-reentrant): the backward pass recomputes its logits,
so only one chunk's logits and their gradient exist at once. The loss and the gradients are those of
the whole-batch computation (the sum of the chunks' summed losses over the number of target tokens),
up to float rounding; the head's weight gets its gradient once, summed over the chunks, so a step in
the backward pass sees it once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.nn import functional
from torch.utils.checkpoint import checkpoint

from lightning_lisa.errors import LISAConfigError, check_int, check_positive

#: The label of positions that are not predicted (Hugging Face's and PyTorch's ``ignore_index``).
IGNORE_INDEX = -100
#: Config attributes of models whose logits are more than ``head(hidden)`` and a softcap (Cohere's
#: ``logit_scale``, Granite's ``logits_scaling``): with a value other than 1 the chunked loss would differ.
SCALED_LOGITS = ("logit_scale", "logits_scaling", "output_multiplier_scale")


def check_chunked_loss(model: Any) -> None:
    """Raise unless ``model``'s logits are ``head(decoder(...)[0])`` (and Gemma-2's softcap), as chunks compute them.

    Args:
        model: A Hugging Face causal LM.

    Raises:
        LISAConfigError: If the model has no ``get_decoder``/``get_output_embeddings``, or scales its logits.

    Examples:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> check_chunked_loss(LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=8, intermediate_size=16,
        ...     num_hidden_layers=1, num_attention_heads=2)))
    """
    name = type(model).__name__
    decoder = getattr(model, "get_decoder", None)
    head = getattr(model, "get_output_embeddings", None)
    if not callable(decoder) or not callable(head) or head() is None:
        raise LISAConfigError(
            f"`loss_chunk_size` is not allowed for {name}: the chunked loss needs `get_decoder()` and "
            "`get_output_embeddings()`; leave `loss_chunk_size=None`."
        )
    config = getattr(model, "config", None)
    for attribute in SCALED_LOGITS:
        value = getattr(config, attribute, None)
        if value is not None and value != 1:
            raise LISAConfigError(
                f"`loss_chunk_size` is not allowed for {name}: its config scales the logits "
                f"(`{attribute}={value!r}`), which the chunked loss does not; leave `loss_chunk_size=None`."
            )


def causal_lm_loss(
    hidden: torch.Tensor,
    head: Callable[[torch.Tensor], torch.Tensor],
    labels: torch.Tensor,
    *,
    chunk_size: int | None = None,
    softcap: float | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """Mean next-token cross-entropy of ``head(hidden)`` against ``labels`` shifted by one, as Hugging Face's.

    Position ``t`` predicts ``labels[:, t + 1]``; labels equal to ``ignore_index`` are not predicted. The
    logits are cast to float32 before the cross-entropy (after the softcapping, as Gemma-2 does).

    Args:
        hidden: The last hidden states, ``(batch, seq_len, hidden_size)``.
        head: The output head (e.g. ``model.get_output_embeddings()``).
        labels: Target token ids, ``(batch, seq_len)``.
        chunk_size: Tokens per chunk (over the flattened batch); ``None`` computes all at once.
        softcap: Final logit softcapping, ``tanh(logits / softcap) * softcap`` (Gemma-2's
            ``final_logit_softcapping``), or ``None``.
        ignore_index: Label of positions that are not predicted.

    Returns:
        The scalar loss (NaN if no position is predicted, as PyTorch's mean cross-entropy).

    Raises:
        LISAConfigError: For a ``chunk_size`` or ``softcap`` that is not a positive number.

    Examples:
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> head = torch.nn.Linear(8, 50, bias=False)
        >>> hidden, labels = torch.randn(2, 6, 8), torch.randint(0, 50, (2, 6))
        >>> whole = causal_lm_loss(hidden, head, labels)
        >>> chunked = causal_lm_loss(hidden, head, labels, chunk_size=4)
        >>> torch.allclose(whole, chunked), round(whole.item(), 4) == round(chunked.item(), 4)
        (True, True)
    """
    if chunk_size is not None:
        check_int("chunk_size", chunk_size, 1)
    if softcap is not None:
        check_positive("softcap", softcap)
    states = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    targets = labels[:, 1:].reshape(-1).to(states.device)
    count = (targets != ignore_index).sum()
    if chunk_size is None or chunk_size >= targets.numel():
        total = _summed_loss(states, targets, head, softcap, ignore_index)
    else:
        total = states.new_zeros((), dtype=torch.float32)
        for start in range(0, targets.numel(), chunk_size):
            part = checkpoint(
                _summed_loss,
                states[start : start + chunk_size],
                targets[start : start + chunk_size],
                head,
                softcap,
                ignore_index,
                use_reentrant=False,
            )
            total = total + part
    return total / count


def _summed_loss(
    states: torch.Tensor,
    targets: torch.Tensor,
    head: Callable[[torch.Tensor], torch.Tensor],
    softcap: float | None,
    ignore_index: int,
) -> torch.Tensor:
    logits = head(states)
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return functional.cross_entropy(logits.float(), targets, ignore_index=ignore_index, reduction="sum")
