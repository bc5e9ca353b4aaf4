"""Optimizer-state and training-state bytes of LISA (drop, keep, offload, compact) against full fine-tuning.

Every arm trains the same GPT-2-shaped model (random weights, random tokens) with AdamW as a
:class:`~lightning_lisa.recipes.module.CausalLMModule` (constant learning rate) in this process, and
the bytes are counted from tensors after every optimizer step:

* optimizer state: every tensor in ``optimizer.state``;
* training state: parameters + gradients + optimizer state;
* analytic minimum for LISA: AdamW's two moments for exactly the parameters trainable at that step.

Besides ``drop`` and ``keep``: ``offload`` (with the prefetch of the next period's state: how many
state tensors came back from a prefetched copy, how many were copied at the switch), and the compact
always-active state (``CausalLMModule(compact_always_active=...)``, ``"8bit"`` and ``"factored"``: the
blocks keep exact AdamW, the embeddings and head compact moments).

Run ``python benchmarks/optimizer_state.py`` (GPT-2 small, 200 steps, K=5; about 10 minutes on 2
CPU cores) or ``--shape tiny --steps 20`` for a smoke run.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import common
import lightning.pytorch as pl
import torch

from lightning_lisa import LISA, optimizer_state_bytes
from lightning_lisa.estimate import SHAPES
from lightning_lisa.recipes.module import CausalLMModule
from lightning_lisa.testing import quiet_trainer, token_loader

#: ``--shape`` choices: GPT-2 shapes of :data:`lightning_lisa.estimate.SHAPES`.
SHAPE_NAMES = {"tiny": "gpt2-tiny", "gpt2-small": "gpt2-small"}


@dataclass
class Bytes(pl.Callback):
    """Counts bytes after every optimizer step."""

    optimizer_state: list[int] = field(default_factory=list)
    training_state: list[int] = field(default_factory=list)
    analytic_minimum: list[int] = field(default_factory=list)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        params = list(dict.fromkeys(pl_module.parameters()))  # tied weights once
        state = optimizer_state_bytes(trainer.optimizers)
        grads = sum(p.grad.nbytes for p in params if p.grad is not None)
        self.optimizer_state.append(state)
        self.training_state.append(sum(p.nbytes for p in params) + grads + state)
        self.analytic_minimum.append(sum(2 * p.nbytes for p in params if p.requires_grad))


@dataclass
class Arm:
    """The per-step figures of one arm."""

    name: str
    optimizer_state: list[int]
    training_state: list[int]
    analytic_minimum: list[int]
    seconds: float


def run_arm(name: str, shape: str, steps: int, lisa: LISA | None, seq_len: int, compact: str | None = None) -> Arm:
    torch.manual_seed(0)
    config = dict(SHAPES[SHAPE_NAMES[shape]])
    module = CausalLMModule(
        config=config, learning_rate=1e-4, weight_decay=0.01, lr_schedule="constant", compact_always_active=compact
    )
    data = token_loader(steps, batch_size=1, vocab=config["vocab_size"], seq_len=seq_len, labels=True)
    counter = Bytes()
    callbacks: list[pl.Callback] = [counter] if lisa is None else [lisa, counter]
    trainer = quiet_trainer(callbacks, max_steps=steps, enable_progress_bar=True)
    start = time.perf_counter()
    trainer.fit(module, data)
    seconds = time.perf_counter() - start
    return Arm(name, counter.optimizer_state, counter.training_state, counter.analytic_minimum, seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPE_NAMES), default="gpt2-small")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--interval", type=int, default=5, help="K, steps between re-samplings")
    parser.add_argument("--n-layers", type=int, default=2, help="gamma, blocks trained at once")
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--json", help="also write the per-step figures to this file")
    args = parser.parse_args()
    common.quiet_logs()

    def lisa(mode: str) -> LISA:
        return LISA(n_layers=args.n_layers, interval=args.interval, optimizer_state=mode)  # type: ignore[arg-type]

    offload = lisa("offload")
    arms = [
        run_arm("full fine-tuning", args.shape, args.steps, None, args.seq_len),
        run_arm("LISA drop", args.shape, args.steps, lisa("drop"), args.seq_len),
        run_arm("LISA keep", args.shape, args.steps, lisa("keep"), args.seq_len),
        run_arm("LISA offload", args.shape, args.steps, offload, args.seq_len),
        run_arm("LISA compact 8bit", args.shape, args.steps, lisa("drop"), args.seq_len, compact="8bit"),
        run_arm("LISA compact fact.", args.shape, args.steps, lisa("drop"), args.seq_len, compact="factored"),
    ]
    full = arms[0]
    full_state, full_training = max(full.optimizer_state), max(full.training_state)

    print(f"\nshape={args.shape} steps={args.steps} K={args.interval} gamma={args.n_layers} (CPU, fp32, AdamW)")
    print(
        f"{'arm':<18} {'opt. state (peak)':>18} {'ratio':>7} {'opt. state (end)':>17} {'ratio':>7} "
        f"{'train. state (peak)':>20} {'ratio':>7} {'time':>7}"
    )
    for arm in arms:
        peak, end, train = max(arm.optimizer_state), arm.optimizer_state[-1], max(arm.training_state)
        print(
            f"{arm.name:<18} {peak / 2**20:>14.1f} MiB {peak / full_state:>7.3f} {end / 2**20:>13.1f} MiB "
            f"{end / full_state:>7.3f} {train / 2**20:>16.1f} MiB {train / full_training:>7.3f} {arm.seconds:>6.0f}s"
        )

    drop, keep = arms[1], arms[2]
    deviation = max(abs(s / m - 1) for s, m in zip(drop.optimizer_state, drop.analytic_minimum, strict=True))
    print(f"\nLISA drop vs analytic minimum (state of the trainable parameters only), worst step: {deviation:.4%}")
    boundaries = list(range(args.interval - 1, args.steps, args.interval))
    growth = [keep.optimizer_state[i] / full_state for i in boundaries]
    print("LISA keep, optimizer state / full fine-tuning at the end of each period:")
    print("  " + " ".join(f"{g:.2f}" for g in growth))
    hits, misses = offload._state.prefetch_hits, offload._state.prefetch_misses
    print(f"LISA offload: {hits} state tensors came back from prefetched copies, {misses} were copied at the switch")
    if args.json:
        common.save_json(args.json, {"args": vars(args), "arms": [asdict(a) for a in arms]})


if __name__ == "__main__":
    main()
