"""Gradient elements all-reduced per step under DDP, with and without LISA's communication hook.

Two CPU processes (gloo) train the same GPT-2-shaped model with LISA twice in one launch: once with
the default DDP hook, which all-reduces every bucket, and once with the hook LISA installs, which
sends only the gradients of trainable parameters. Elements are counted by the hooks themselves and
printed as ratios to the model size and to the trainable (active) parameters.

Run ``python benchmarks/ddp_communication.py`` (a few minutes on 2 cores) or
``--steps 6 --shape tiny`` for a smoke run.
"""

import argparse
import json
import logging
import statistics
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.utils.data import DataLoader
from transformers import GPT2LMHeadModel

from lightning_lisa import LISA
from lightning_lisa.estimate import SHAPES, load_config
from lightning_lisa.testing import CausalLM, quiet_trainer

#: ``--shape`` choices: GPT-2 shapes of :data:`lightning_lisa.estimate.SHAPES`.
SHAPE_NAMES = {"tiny": "gpt2-tiny", "gpt2-mini": "gpt2-mini"}


@dataclass
class CountingAllReduce:
    """State of the default all-reduce hook, counting the elements it sends."""

    process_group: Any = None
    bucket_elements: int = 0


def counting_allreduce_hook(state: CountingAllReduce, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    state.bucket_elements += bucket.buffer().numel()
    return default_hooks.allreduce_hook(state.process_group, bucket)


@dataclass
class PerStep(pl.Callback):
    """Elements sent, trainable elements and wall time of every optimizer step."""

    lisa: LISA
    counter: CountingAllReduce | None = None
    sent: list[int] = field(default_factory=list)
    trainable: list[int] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    _last: int = 0
    _start: float = 0.0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.counter is not None:
            self.counter.process_group = trainer.strategy.model.process_group  # type: ignore[union-attr]
            trainer.strategy.model.register_comm_hook(self.counter, counting_allreduce_hook)  # type: ignore[union-attr]

    def on_train_batch_start(self, *args: Any) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self.seconds.append(time.perf_counter() - self._start)
        stats = self.lisa.communication
        total = stats.reduced_elements if stats is not None else self.counter.bucket_elements  # type: ignore[union-attr]
        self.sent.append(total - self._last)
        self._last = total
        self.trainable.append(sum(p.numel() for p in pl_module.parameters() if p.requires_grad))


def run_arm(shape: str, steps: int, hook: bool, n_layers: int, interval: int) -> tuple[PerStep, int]:
    lisa = LISA(n_layers=n_layers, interval=interval, ddp_comm_hook=hook)
    per_step = PerStep(lisa, None if hook else CountingAllReduce())
    torch.manual_seed(0)
    module = CausalLM(GPT2LMHeadModel(load_config(SHAPE_NAMES[shape])[1]), lr=1e-4)  # AdamW over all parameters
    vocab = SHAPES[SHAPE_NAMES[shape]]["vocab_size"]
    data = DataLoader(list(torch.randint(0, vocab, (steps * 4, 32), generator=torch.Generator().manual_seed(0))), 2)
    trainer = quiet_trainer([lisa, per_step], devices=2, strategy="ddp_find_unused_parameters_true", max_steps=steps)
    trainer.fit(module, data)
    return per_step, sum(p.numel() for p in module.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPE_NAMES), default="gpt2-mini")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--interval", type=int, default=5)
    parser.add_argument("--n-layers", type=int, default=2)
    parser.add_argument("--json", help="also write the per-step figures to this file (rank 0)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)

    default, total = run_arm(args.shape, args.steps, False, args.n_layers, args.interval)
    hooked, _ = run_arm(args.shape, args.steps, True, args.n_layers, args.interval)
    if dist.get_rank() != 0:
        return
    print(
        f"\nDDP, 2 CPU processes (gloo), shape={args.shape} ({total / 1e6:.2f}M parameters), "
        f"{args.steps} steps, gamma={args.n_layers}, K={args.interval}"
    )
    print(f"{'hook':<22} {'elements/step':>14} {'/ model':>8} {'/ active':>9} {'median step':>12}")
    for name, arm in (("default all-reduce", default), ("LISA frozen-skipping", hooked)):
        sent = statistics.mean(arm.sent)
        active = statistics.mean(arm.trainable)
        print(
            f"{name:<22} {sent:>14,.0f} {sent / total:>8.3f} {sent / active:>9.3f} "
            f"{statistics.median(arm.seconds) * 1e3:>9.1f} ms"
        )
    if args.json:
        with open(args.json, "w") as f:
            arms = {
                name: {"sent": a.sent, "trainable": a.trainable, "seconds": a.seconds}
                for name, a in (("default", default), ("hook", hooked))
            }
            json.dump({"args": vars(args), "total": total, **arms}, f)


if __name__ == "__main__":
    main()
