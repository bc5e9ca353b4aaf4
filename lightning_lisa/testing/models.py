"""Tiny Hugging Face causal LMs with random weights, a LightningModule around them, and token batches."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset

if TYPE_CHECKING:
    from transformers import LlamaForCausalLM

#: Vocabulary and sequence length of :func:`tiny_llama` and :func:`token_loader`.
VOCAB = 64
SEQ = 8

#: Settings of a tiny encoder-decoder (BART and its kin: mBART, Marian, Pegasus): 2 + 2 blocks of width 16.
SEQ2SEQ: dict[str, Any] = {
    "d_model": 16,
    "encoder_ffn_dim": 32,
    "decoder_ffn_dim": 32,
    "encoder_layers": 2,
    "decoder_layers": 2,
    "encoder_attention_heads": 2,
    "decoder_attention_heads": 2,
    "vocab_size": VOCAB,
    "max_position_embeddings": 32,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "decoder_start_token_id": 1,
}


class ResidualBlock(torch.nn.Module):
    """A residual MLP block: ``x + down(relu(up(norm(x))))``."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = torch.nn.LayerNorm(width)
        self.up = torch.nn.Linear(width, 2 * width)
        self.down = torch.nn.Linear(2 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The block's output."""
        out: torch.Tensor = x + self.down(torch.relu(self.up(self.norm(x))))
        return out


class ResidualLM(torch.nn.Module):
    """A token model without Hugging Face: ``embed``, :class:`ResidualBlock` s in ``layers``, ``head``.

    Args:
        vocab: Vocabulary size.
        width: Hidden size.
        blocks: Blocks in ``layers``.

    Examples:
        >>> model = ResidualLM(vocab=32, width=16, blocks=4)
        >>> model(torch.zeros(2, 5, dtype=torch.long)).shape
        torch.Size([2, 5, 32])
        >>> model.next_token_loss(torch.zeros(2, 5, dtype=torch.long)).shape
        torch.Size([])
    """

    def __init__(self, vocab: int, width: int, blocks: int) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, width)
        self.layers = torch.nn.ModuleList(ResidualBlock(width) for _ in range(blocks))
        self.head = torch.nn.Linear(width, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """The logits of every position."""
        x = self.embed(ids)
        for block in self.layers:
            x = block(x)
        out: torch.Tensor = self.head(x)
        return out

    def next_token_loss(self, ids: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of each position's logits against the next token."""
        logits = self(ids[:, :-1])
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def tiny_llama(num_layers: int = 6, seed: int = 0, tie: bool = False, **config: Any) -> LlamaForCausalLM:
    """A Llama of hidden size 16 with ``num_layers`` blocks and random weights seeded by ``seed``.

    Args:
        num_layers: Blocks in ``model.layers``.
        seed: Seed of the initialization.
        tie: Tie the input embeddings and the head.
        **config: Other ``LlamaConfig`` settings.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    settings: dict[str, Any] = {
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": num_layers,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "vocab_size": VOCAB,
        "max_position_embeddings": 64,
        "tie_word_embeddings": tie,
    }
    settings.update(config)
    return LlamaForCausalLM(LlamaConfig(**settings))


class CausalLM(pl.LightningModule):
    """A LightningModule around a Hugging Face causal LM, with a choice of optimizer.

    Args:
        model: The model; by default :func:`tiny_llama` with ``num_layers`` blocks.
        optimizer: ``"adamw"``, ``"adam"``, ``"sgd"`` (momentum 0.9) or ``"adamw8bit"`` (bitsandbytes).
        lr: The learning rate.
        scheduler: Halve the learning rate every 3 steps.
        num_layers: Blocks of the default model.
        optimizer_kwargs: More arguments of the optimizer.
    """

    def __init__(
        self,
        model: torch.nn.Module | None = None,
        optimizer: str = "adamw",
        lr: float = 1e-2,
        scheduler: bool = False,
        num_layers: int = 6,
        optimizer_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["model"])
        self.model = model if model is not None else tiny_llama(num_layers)
        self.training_steps = 0

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        """The causal-LM loss of a batch of token ids."""
        self.training_steps += 1
        loss: torch.Tensor = self.model(input_ids=batch, labels=batch).loss
        return loss

    def configure_optimizers(self) -> Any:
        """The chosen optimizer over all parameters (as LISA needs), with the optional step schedule."""
        name = self.hparams["optimizer"]
        kwargs = dict(self.hparams["optimizer_kwargs"] or {})
        params = self.parameters()
        opt: torch.optim.Optimizer
        if name == "adamw":
            opt = torch.optim.AdamW(params, lr=self.hparams["lr"], **kwargs)
        elif name == "adam":
            opt = torch.optim.Adam(params, lr=self.hparams["lr"], **kwargs)
        elif name == "sgd":
            opt = torch.optim.SGD(params, lr=self.hparams["lr"], momentum=0.9, **kwargs)
        elif name == "adamw8bit":
            import importlib

            adamw8bit: Any = importlib.import_module("bitsandbytes.optim").AdamW8bit  # an untyped third-party class
            opt = adamw8bit(params, lr=self.hparams["lr"], min_8bit_size=64, **kwargs)
        else:
            raise ValueError(f"`optimizer={name!r}` is not one of ['adamw', 'adam', 'sgd', 'adamw8bit'].")
        if self.hparams["scheduler"]:
            sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
        return opt


def token_loader(
    n_batches: int = 8,
    batch_size: int = 2,
    seed: int = 0,
    vocab: int = VOCAB,
    seq_len: int = SEQ,
    labels: bool = False,
) -> DataLoader[Any]:
    """``n_batches`` batches of random token ids, the same for the same ``seed``.

    Args:
        n_batches: Batches in one epoch.
        batch_size: Sequences per batch.
        seed: Seed of the tokens.
        vocab: Token ids are drawn from ``range(vocab)``.
        seq_len: Tokens per sequence.
        labels: Batches are ``{"input_ids": ids, "labels": ids}`` dicts (what
            :class:`~lightning_lisa.recipes.module.CausalLMModule` trains on) instead of ``ids``.

    Examples:
        >>> next(iter(token_loader(batch_size=3))).shape
        torch.Size([3, 8])
        >>> sorted(next(iter(token_loader(vocab=100, seq_len=4, labels=True))).items())[0][1].shape
        torch.Size([2, 4])
    """
    g = torch.Generator().manual_seed(seed)
    data = torch.randint(0, vocab, (n_batches * batch_size, seq_len), generator=g)
    rows: list[Any] = [{"input_ids": row, "labels": row} for row in data] if labels else list(data)
    # a list of rows serves as a map-style dataset
    return DataLoader(cast("Dataset[Any]", rows), batch_size=batch_size, shuffle=False)
