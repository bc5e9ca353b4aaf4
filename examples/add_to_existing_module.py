"""Add LISA to a LightningModule you already have, in three lines.

``MyLanguageModel`` below stands for your own module: any LightningModule around a Hugging Face
causal LM (or another model with a list of blocks) whose ``configure_optimizers`` builds the
optimizer over all parameters. Nothing in it changes. The three lines are marked ``# LISA``.

    python examples/add_to_existing_module.py            # about a minute on a laptop CPU
    python examples/add_to_existing_module.py --steps 4 --hidden-size 16 --max-examples 4
"""

from __future__ import annotations

import argparse
from typing import Any

import lightning.pytorch as pl
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lightning_lisa import LISA  # LISA (1/3)
from lightning_lisa.recipes.data import TextDataModule


class MyLanguageModel(pl.LightningModule):
    """An ordinary LightningModule: a causal LM, its loss, AdamW over all parameters."""

    def __init__(self, model: torch.nn.Module, lr: float = 3e-3) -> None:
        super().__init__()
        self.model = model
        self.lr = lr

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss: torch.Tensor = self.model(**batch).loss
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--layers", type=int, default=6, help="transformer blocks of the model")
    parser.add_argument("--hidden-size", type=int, default=128)
    parser.add_argument("--max-examples", type=int, default=None, help="use only the first N documents")
    parser.add_argument("--output", default="lightning_logs")
    args = parser.parse_args()

    data = TextDataModule(vocab_size=2048, max_length=64, batch_size=8, max_examples=args.max_examples)
    config = LlamaConfig(
        vocab_size=2048,
        hidden_size=args.hidden_size,
        intermediate_size=2 * args.hidden_size,
        num_hidden_layers=args.layers,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    module = MyLanguageModel(LlamaForCausalLM(config))

    lisa = LISA(n_layers=2, interval=10)  # LISA (2/3): 2 blocks at a time, re-sampled every 10 steps
    trainer = pl.Trainer(  # LISA (3/3): pass it to the Trainer, as any callback
        max_steps=args.steps, callbacks=[lisa], accelerator="cpu", default_root_dir=args.output, logger=False
    )
    trainer.fit(module, datamodule=data)

    for switch in lisa.history:
        print(f"period {switch.period} (from step {switch.step}): trained blocks {list(switch.active_layers)}")


if __name__ == "__main__":
    main()
