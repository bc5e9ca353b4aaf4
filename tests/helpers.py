"""Tiny models, data and Trainer settings shared by the tests."""

from __future__ import annotations

import os
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader
from transformers import LlamaConfig, LlamaForCausalLM

VOCAB = 64
SEQ = 8


def tiny_llama(num_layers: int = 6, seed: int = 0, tie: bool = False) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=num_layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
    )
    return LlamaForCausalLM(config)


class CausalLM(pl.LightningModule):
    """A LightningModule around a Hugging Face causal LM, with a configurable optimizer."""

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
        self.training_steps += 1
        return self.model(input_ids=batch, labels=batch).loss

    def configure_optimizers(self) -> Any:
        name = self.hparams["optimizer"]
        kwargs = dict(self.hparams["optimizer_kwargs"] or {})
        params = self.parameters()
        if name == "adamw":
            opt = torch.optim.AdamW(params, lr=self.hparams["lr"], **kwargs)
        elif name == "adam":
            opt = torch.optim.Adam(params, lr=self.hparams["lr"], **kwargs)
        elif name == "sgd":
            opt = torch.optim.SGD(params, lr=self.hparams["lr"], momentum=0.9, **kwargs)
        elif name == "adamw8bit":
            import bitsandbytes as bnb

            opt = bnb.optim.AdamW8bit(params, lr=self.hparams["lr"], min_8bit_size=64, **kwargs)
        else:
            raise ValueError(name)
        if self.hparams["scheduler"]:
            sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
        return opt


def token_loader(n_batches: int = 8, batch_size: int = 2, seed: int = 0) -> DataLoader[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    data = torch.randint(0, VOCAB, (n_batches * batch_size, SEQ), generator=g)
    return DataLoader(list(data), batch_size=batch_size, shuffle=False)


def trainer(callbacks: list[pl.Callback], **kwargs: Any) -> pl.Trainer:
    settings: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    settings.update(kwargs)
    return pl.Trainer(callbacks=callbacks, **settings)


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment for a script run in a subprocess, without distributed settings of this process."""
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK")}
    env.update(extra)
    return env
