"""A short LISA fine-tune of a tiny Llama-architecture model on CPU, and what LISA did.

Run with ``make demo`` (or ``python examples/demo.py``). It trains on the English text that ships with
Python (``pydoc_data.topics``), byte-level, so nothing is downloaded, and prints the loss, the blocks
trained in each period, and the optimizer-state bytes against full fine-tuning of the same model.
"""

from __future__ import annotations

import argparse
import copy
import logging
import warnings
from pydoc_data.topics import topics
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset
from transformers import LlamaConfig, LlamaForCausalLM

from lightning_lisa import LISA, optimizer_state_bytes


class ByteLM(pl.LightningModule):
    """A causal LM over bytes, wrapping a Hugging Face model."""

    def __init__(self, model: LlamaForCausalLM, lr: float = 3e-3) -> None:
        super().__init__()
        self.model = model
        self.lr = lr

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.model(input_ids=batch[0], labels=batch[0]).loss
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: list[torch.Tensor], batch_idx: int) -> None:
        self.log("val_loss", self.model(input_ids=batch[0], labels=batch[0]).loss, prog_bar=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        # Over ALL parameters: LISA decides what trains, and frees the state of what does not.
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


class StateBytes(pl.Callback):
    """Records the optimizer-state bytes after every optimizer step."""

    def __init__(self) -> None:
        self.bytes: list[int] = []

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self.bytes.append(optimizer_state_bytes(trainer.optimizers))


def corpus(seq_len: int) -> tuple[TensorDataset, TensorDataset]:
    data = torch.frombuffer(bytearray("\n".join(topics.values()).encode()), dtype=torch.uint8).long()
    chunks = data[: len(data) // seq_len * seq_len].view(-1, seq_len)
    n_val = max(8, len(chunks) // 50)
    return TensorDataset(chunks[n_val:]), TensorDataset(chunks[:n_val])


def tiny_llama(layers: int) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    return LlamaForCausalLM(config)


def full_fine_tuning_state_bytes(module: ByteLM, batch: torch.Tensor) -> int:
    """Measure the AdamW state of full fine-tuning: one real step on a copy of the model."""
    model = copy.deepcopy(module.model).requires_grad_(True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=module.lr)
    model(input_ids=batch, labels=batch).loss.backward()
    optimizer.step()
    return optimizer_state_bytes([optimizer])


def mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--layers", type=int, default=8, help="transformer blocks of the model")
    parser.add_argument("--n-layers", type=int, default=2, help="blocks LISA trains at once (gamma)")
    parser.add_argument("--interval", type=int, default=15, help="steps between re-samplings (K)")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--output", default="demo_output")
    args = parser.parse_args()

    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*LeafSpec.*is deprecated.*")
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    pl.seed_everything(0, verbose=False)
    train, val = corpus(args.seq_len)
    train_loader = DataLoader(train, batch_size=args.batch_size, shuffle=True)
    val_loader = DataLoader(val, batch_size=args.batch_size)
    module = ByteLM(tiny_llama(args.layers))

    lisa = LISA(n_layers=args.n_layers, interval=args.interval)
    state = StateBytes()
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=args.steps,
        val_check_interval=args.steps,
        callbacks=[lisa, state],
        logger=pl.loggers.CSVLogger(args.output, name="demo"),
        enable_checkpointing=False,
        enable_model_summary=False,
        log_every_n_steps=5,
    )
    before = trainer.validate(module, val_loader, verbose=False)[0]["val_loss"]
    trainer.fit(module, train_loader, val_loader)
    after = trainer.callback_metrics["val_loss"].item()

    full = full_fine_tuning_state_bytes(module, next(iter(train_loader))[0])
    total_params = sum(p.numel() for p in module.parameters())
    print("\n=== lightning-lisa demo ===")
    print(f"model: Llama architecture, {args.layers} blocks, {total_params / 1e6:.2f}M parameters, byte-level")
    print(f"LISA: n_layers={args.n_layers}, interval={args.interval}, {args.steps} optimizer steps")
    print(f"validation loss: {before:.3f} before -> {after:.3f} after")
    print("blocks trained per period:")
    for switch in lisa.history:
        print(
            f"  period {switch.period:2d} (from step {switch.step:3d}): blocks {list(switch.active_layers)}, "
            f"{switch.trainable_params / 1e6:.2f}M trainable"
        )
    peak = max(state.bytes)
    print(f"optimizer state, LISA (peak over all steps): {mib(peak)}")
    print(f"optimizer state, full fine-tuning (measured): {mib(full)}")
    print(f"ratio: {peak / full:.2f}x full fine-tuning")
    print(f"metrics logged to: {trainer.logger.log_dir if trainer.logger else '-'}")


if __name__ == "__main__":
    main()
