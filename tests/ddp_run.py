"""Run by tests/test_ddp.py: LISA under DDP with 2 CPU processes (gloo); each rank writes what it saw."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
from helpers import CausalLM, token_loader
from recorder import Recorder

from lightning_lisa import LISA


class AgreeingRanks(pl.Callback):
    """All-gathers the active blocks at every step: every rank must train the same ones."""

    def __init__(self, lisa: LISA) -> None:
        self.lisa = lisa
        self.gathered: list[list[list[int]]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        active = torch.tensor(self.lisa.active_layers)
        self.gathered.append(trainer.strategy.all_gather(active).tolist())


def main(out: Path, strategy: str) -> None:
    warnings.filterwarnings("ignore")
    lisa = LISA(n_layers=2, interval=3, seed=9)
    recorder = Recorder(lisa)
    agree = AgreeingRanks(lisa)
    module = CausalLM()
    start = {n: p.detach().clone() for n, p in module.named_parameters()}
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=strategy,
        max_steps=9,
        callbacks=[lisa, recorder, agree],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, token_loader(n_batches=40))
    rank = trainer.global_rank
    result = {
        "find_unused_parameters": trainer.strategy._ddp_kwargs.get("find_unused_parameters"),
        "history": [list(s.active_layers) for s in lisa.history],
        "gathered": agree.gathered,
        "steps": [
            {"active": list(r.active_layers), "changed": sorted(r.changed), "with_state": sorted(r.with_state)}
            for r in recorder.steps
        ],
        "weights": {n: p.detach().double().sum().item() for n, p in module.named_parameters()},
        "unchanged": sorted(n for n, p in module.named_parameters() if torch.equal(p.detach(), start[n])),
    }
    (out / f"rank{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
