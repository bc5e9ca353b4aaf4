"""The cost beside the quality: each arm's peak memory and step time, measured quietly.

Run apart from the study (whose parallel processes compete for the cores) with nothing else running::

    python benchmarks/quality/cost.py            # writes benchmarks/results/quality/cost.json

Every arm of the study trains on every task's own batches, in one process, one CPU thread, interleaved:
``--rounds`` rounds, each of which runs every arm for ``--steps`` steps on a fresh copy of the model, so
that a drift of the machine's speed spreads over all arms. The step time is the median over the rounds'
steps after each round's first two (warm-up). The peak is the largest number of bytes of tensor storages
alive at once (weights, gradients, optimizer state, activations and temporaries:
:class:`~lightning_lisa.estimate.measure.TensorPeak`) in steps 9 to 12 of a separate run, which pass a
re-sampling of the LISA arms (K = 10); tracing slows every operation, so no step time is taken from it.
The peak is an exact count, so ``--measure peak`` may run on a busy machine; ``--measure time`` may not.
The LoRA rank matched to LISA gamma = 2 is checked against these peaks.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

import common  # noqa: E402
import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from arms import ARMS  # noqa: E402
from runner import Base, fit, make_base, task_for  # noqa: E402
from study import read  # noqa: E402
from tasks import TASKS, Item, Task  # noqa: E402

from lightning_lisa.estimate.measure import TensorPeak  # noqa: E402


class StepClock(pl.Callback):
    """The wall time of every training step (batch start to batch end)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._start = 0.0

    def on_train_batch_start(self, *args: Any) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, *args: Any) -> None:
        self.times.append(time.perf_counter() - self._start)


class Peak(pl.Callback):
    """:class:`TensorPeak` from step ``start`` to the end of the fit.

    The weights, gradients and optimizer state that exist when it starts are tracked, so steps before
    ``start`` run at full speed and the peak still counts everything alive.
    """

    def __init__(self, start: int) -> None:
        self.mode = TensorPeak()
        self.start = start
        self.active = False
        self.weights_bytes = 0  # the model's parameters and buffers, counted once each

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if self.active or trainer.global_step < self.start:
            return
        self.mode.__enter__()
        self.active = True
        # the tensors that own the storages: `state_dict()` hands out detached copies, which die at once
        owners = [*pl_module.parameters(), *pl_module.buffers()]
        self.mode.track(owners)
        self.weights_bytes = sum(
            {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in owners}.values()
        )
        self.mode.track(p.grad for p in pl_module.parameters() if p.grad is not None)
        for optimizer in trainer.optimizers:
            self.mode.track(t for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.active:
            self.mode.__exit__(None, None, None)


def measure(base: Base, task: Task, arm: str, steps: int, extra: list[pl.Callback]) -> None:
    """Train ``arm`` on ``task`` for ``steps`` steps with the callbacks ``extra``."""
    lr = ARMS[arm].grid[1]
    fit(base, ARMS[arm], task, lr, 0, steps, extra=extra)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument(
        "--measure",
        default="time,peak",
        help="time (needs a quiet machine), peak (exact tensor counts, any load), or both",
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=6, help="steps of each arm in each round (default 6)")
    parser.add_argument("--peak-from", type=int, default=8, help="first traced step (default 8)")
    parser.add_argument("--peak-to", type=int, default=12, help="steps of the run the peak is taken in (default 12)")
    parser.add_argument("--out", type=Path, default=HERE.parents[1] / "benchmarks" / "results" / "quality")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--cache-dir", type=Path)
    args = parser.parse_args(argv)
    args.measure = [m for m in args.measure.split(",") if m]
    if not args.measure or any(m not in ("time", "peak") for m in args.measure):
        parser.error(f"--measure={','.join(args.measure)!r}: allowed are time, peak or time,peak")
    from lightning_lisa.recipes.gguf import SMOLLM2
    from lightning_lisa.recipes.tokenizer import default_cache_dir

    common.prepare(1)
    machine = f"CPU only, no GPU: {os.cpu_count()} cores ({platform.machine()}); torch threads 1"
    common.print_header(machine, common.versions("torch", "lightning", "transformers", "peft"))
    found = read(args.out / "base.json")
    control = [Item(**i) for i in found["control"]] if found else []
    base = make_base(args.smoke, args.cache_dir or default_cache_dir(), SMOLLM2, "cpu", control)
    arms = [a for a in args.arms.split(",") if a]
    path = args.out / ("cost_smoke.json" if args.smoke else "cost.json")
    result: dict[str, Any] = read(path) or {"tasks": {}}
    result["machine"] = machine
    for name in [t for t in args.tasks.split(",") if t]:
        task = task_for(base, name)
        rows: dict[str, Any] = result["tasks"].setdefault(name, {})
        if "time" in args.measure:
            times: dict[str, list[float]] = {arm: [] for arm in arms}
            for _ in range(args.rounds):
                for arm in arms:
                    clock = StepClock()
                    measure(base, task, arm, args.steps, [clock])
                    times[arm] += clock.times[2:]
            for arm in arms:
                rows.setdefault(arm, {}).update(step_time_s=statistics.median(times[arm]), step_times=times[arm])
                print(f"{name:8} {arm:14} step {rows[arm]['step_time_s']:.3f} s", flush=True)
            result["time_regime"] = (
                f"CPU, 1 thread, float32, each task's training batches; {args.rounds} rounds x {args.steps} steps "
                "per arm, interleaved, one process, nothing else running; median after 2 warm-up steps a round"
            )
        if "peak" in args.measure:
            for arm in arms:
                peak = Peak(args.peak_from)
                measure(base, task, arm, args.peak_to, [peak])
                rows.setdefault(arm, {})["peak_bytes"] = peak.mode.peak
                rows[arm]["weights_bytes"] = peak.weights_bytes
                print(f"{name:8} {arm:14} peak {peak.mode.peak / 2**20:8.1f} MiB", flush=True)
            result["peak_regime"] = (
                f"float32, each task's training batches; tensor bytes alive at once in steps {args.peak_from + 1} "
                f"to {args.peak_to} (a re-sampling at step 10), counted by TensorPeak (exact whatever the load)"
            )
        common.save_json(path, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
