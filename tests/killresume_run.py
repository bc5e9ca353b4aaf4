"""Run by tests/test_faults.py: train a tiny model with LISA, checkpointing every step, and save the end state.

Usage: ``python killresume_run.py OUT STRATEGY [--resume] [--mode MODE] [--steps N] [--keep all|last]``
with STRATEGY ``single``, ``ddp`` (2 processes) or ``fsdp2`` (2 processes). ``--resume`` resumes from
``ckpt_path="last"``. Checkpoints go to ``OUT/checkpoints`` after every optimizer step (``--keep all``:
``step=N.ckpt`` and ``last.ckpt``; ``--keep last``: only ``last.ckpt``, written over each time); at the
end rank 0 writes ``OUT/final.ckpt``, a full checkpoint. A :class:`~lightning_lisa.testing.KillSwitch`
kills the run where ``LISA_KILL_AT`` says. The batch of each step is a function of the step and the
rank alone, so that a resumed run sees the same data whatever the loader does.
"""

from __future__ import annotations

import argparse
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from lightning_lisa import LISA
from lightning_lisa.testing import BatchLog, KillSwitch, ResidualLM, end_process_group

VOCAB, WIDTH, BLOCKS = 32, 16, 4


class StepLM(pl.LightningModule):
    """Next-token loss on a batch drawn from ``(global_step, rank)``; ``fsdp2`` shards one unit per block."""

    def __init__(self, fsdp2: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = ResidualLM(VOCAB, WIDTH, BLOCKS)
        self.fsdp2 = fsdp2

    def configure_model(self) -> None:
        if self.fsdp2:
            from lightning_lisa.strategies.fsdp2 import fully_shard_blocks

            fully_shard_blocks(self.net, mesh=self.device_mesh["data_parallel"])

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(1000 * self.trainer.global_step + self.global_rank)
        ids = torch.randint(0, VOCAB, (2, 9), generator=g)
        return self.net.next_token_loss(ids)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def strategy_of(name: str) -> Any:
    if name == "single":
        return "auto"
    if name == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        return DDPStrategy(find_unused_parameters=True, timeout=timedelta(seconds=20))
    from lightning_lisa import LISAModelParallelStrategy

    return LISAModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1, timeout=timedelta(seconds=20))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("strategy", choices=["single", "ddp", "fsdp2"])
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--mode", default="drop")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--interval", type=int, default=3)
    parser.add_argument("--keep", choices=["all", "last"], default="all")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    keep_all = args.keep == "all"
    checkpoint = ModelCheckpoint(
        dirpath=args.out / "checkpoints",
        filename="{step}",
        every_n_train_steps=1,
        save_top_k=-1 if keep_all else 0,
        save_last=True,
    )
    lisa = LISA(n_layers=2, interval=args.interval, optimizer_state=args.mode, seed=5)
    distributed = args.strategy != "single"
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2 if distributed else 1,
        strategy=strategy_of(args.strategy),
        max_steps=args.steps,
        callbacks=[lisa, KillSwitch(), BatchLog(), checkpoint],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    loader = DataLoader(list(range(4 * args.steps)), batch_size=1)  # placeholders: the step draws the batch
    module = StepLM(fsdp2=args.strategy == "fsdp2")
    trainer.fit(module, loader, ckpt_path="last" if args.resume else None)
    if args.strategy == "fsdp2":
        trainer.strategy._save_distributed_checkpoint = False  # type: ignore[attr-defined]  # a full checkpoint
    trainer.save_checkpoint(args.out / "final.ckpt")
    end_process_group()  # not left to interpreter finalization, where gloo may abort the process


if __name__ == "__main__":
    main()
