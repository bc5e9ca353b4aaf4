"""Step time of LISA in a Lightning Fabric loop against the Trainer, on the same model in the same process.

Both runs train the same Llama-shaped model (random weights) on the same batches with the same AdamW and
the same LISA settings; the Fabric run is the loop of :mod:`lightning_lisa.testing.fabric_loop`. The runs
alternate (Trainer first in even repeats, Fabric first in odd ones), and each step's wall time is taken
between consecutive optimizer steps after a warm-up. The figure is the median step time of each loop,
pooled over the repeats, and their ratio.

Run ``python benchmarks/fabric_speed.py`` (a few minutes on 2 cores) or ``--steps 6 --repeats 1 --shape
tiny`` for a smoke run. Results: ``benchmarks/results/fabric/``.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time
from typing import Any

import lightning.pytorch as pl
import torch
from common import prepare, print_header, save_json, versions
from lightning.fabric import Fabric

from lightning_lisa import LISA
from lightning_lisa.testing import CausalLM, quiet_trainer, tiny_llama, token_loader
from lightning_lisa.testing.fabric_loop import fabric_fit

SHAPES: dict[str, dict[str, int]] = {
    "tiny": {"hidden_size": 16, "intermediate_size": 32, "num_layers": 4},
    "small": {"hidden_size": 256, "intermediate_size": 688, "num_layers": 12},
}
VOCAB, SEQ, BATCH = 2048, 128, 4


class StepClock(pl.Callback):
    """Wall time at the end of every optimizer step of a Trainer run."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._step = 0

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, idx: int) -> None:
        if trainer.global_step != self._step:
            self._step = trainer.global_step
            self.times.append(time.perf_counter())


def module_for(shape: str) -> CausalLM:
    dims = SHAPES[shape]
    model = tiny_llama(
        dims["num_layers"],
        hidden_size=dims["hidden_size"],
        intermediate_size=dims["intermediate_size"],
        vocab_size=VOCAB,
        max_position_embeddings=SEQ,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return CausalLM(model=model, lr=1e-4)


def trainer_times(shape: str, steps: int, accumulate: int, options: dict[str, Any]) -> list[float]:
    clock = StepClock()
    loader = token_loader(n_batches=steps * accumulate, batch_size=BATCH, vocab=VOCAB, seq_len=SEQ)
    trainer = quiet_trainer([LISA(**options), clock], max_steps=steps, accumulate_grad_batches=accumulate)
    trainer.fit(module_for(shape), loader)
    return [b - a for a, b in itertools.pairwise(clock.times)]


def fabric_times(shape: str, steps: int, accumulate: int, options: dict[str, Any]) -> list[float]:
    times: list[float] = []
    fabric = Fabric(accelerator="cpu", devices=1, callbacks=[LISA(**options)])
    module = module_for(shape)
    model, optimizer = fabric.setup(module, module.configure_optimizers())
    loader = token_loader(n_batches=steps * accumulate, batch_size=BATCH, vocab=VOCAB, seq_len=SEQ)
    fabric_fit(
        fabric, model, optimizer, loader, steps, accumulate, after_step=lambda _: times.append(time.perf_counter())
    )
    return [b - a for a, b in itertools.pairwise(times)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="small")
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=5, help="first step times left out of each run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--accumulate", type=int, default=2, help="micro-batches per optimizer step")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--json", default=None, help="write the figures here")
    args = parser.parse_args()
    prepare(args.threads)
    print_header("CPU", versions("torch", "lightning", "transformers"))
    options = {"n_layers": 2, "interval": 10, "seed": 0}
    pooled: dict[str, list[float]] = {"trainer": [], "fabric": []}
    for repeat in range(args.repeats):
        order = ["trainer", "fabric"] if repeat % 2 == 0 else ["fabric", "trainer"]
        for loop in order:
            run = trainer_times if loop == "trainer" else fabric_times
            torch.manual_seed(0)
            pooled[loop] += run(args.shape, args.steps, args.accumulate, options)[args.warmup :]
    medians = {loop: statistics.median(t) * 1e3 for loop, t in pooled.items()}
    dims = SHAPES[args.shape]
    print(
        f"model: Llama shape {args.shape} ({dims['num_layers']} blocks, width {dims['hidden_size']}, vocab {VOCAB}), "
        f"batch {BATCH} x {SEQ}, {args.accumulate} micro-batches per step, LISA n_layers=2 interval=10, "
        f"{args.threads} thread(s)"
    )
    print(f"{'loop':8} {'median step (ms)':>17} {'steps timed':>12}")
    for loop, median in medians.items():
        print(f"{loop:8} {median:17.1f} {len(pooled[loop]):12d}")
    ratio = medians["fabric"] / medians["trainer"]
    print(f"Fabric / Trainer: {ratio:.3f}")
    if args.json:
        save_json(args.json, {"args": vars(args), "median_ms": medians, "ratio": ratio, "step_seconds": pooled})


if __name__ == "__main__":
    main()
