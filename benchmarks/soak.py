"""Soak test of LISA's switches and resumes: thousands of steps, many interruptions, nothing leaks or drifts.

For each ``optimizer_state`` mode (drop, offload, keep) a tiny model (8 blocks of width 32; LISA with
``n_layers=2``, ``interval=3``, driven by :meth:`LISA.attach <lightning_lisa.LISA.attach>` from a plain
PyTorch loop, the engine the Trainer callback and Fabric share) trains ``--steps`` optimizer steps in
segments that end at random points (drawn from ``--seed``):

* in this process: the loop stops at a step, or an exception is raised at a random step; a new model,
  optimizer and LISA then resume from the last checkpoint;
* in a new process: a worker resumes, trains, and ends normally or kills itself with ``SIGKILL`` at a
  random step; the next segment resumes from the last complete checkpoint.

A checkpoint (model, optimizer, LISA) is written every 3 steps (to a temporary file, then renamed).
After the first optimizer step of every period a check asserts that the optimizer state is exactly the
analytic minimum, in parameters and in bytes (``drop``: the parameters trainable now; ``offload`` and
``keep``: every parameter trained since the start, as both keep their entries in ``optimizer.state`` on a
CPU-only run); every third time this process also records its live tensors (``gc``) and RSS. The
Trainer's own kill-and-resume paths are covered by tests/test_faults.py; this run is about the long
haul. Usage: ``nice -n 10 python benchmarks/soak.py [--steps 1701] [--out benchmarks/results/soak]``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import random
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from lightning_lisa import LISA
from lightning_lisa.testing import ResidualLM, run_command
from lightning_lisa.testing.killresume import kill_now

VOCAB, WIDTH, BLOCKS, N_LAYERS, INTERVAL = 64, 32, 8, 2, 3
EVERY = 3  # optimizer steps between checkpoints
MEASURE_EVERY = 3  # checks between two counts of live tensors (a full garbage collection each)
HERE = Path(__file__).resolve()


def make_model() -> ResidualLM:
    """Embedding, 8 residual MLP blocks, head (seeded: every run starts from the same weights)."""
    torch.manual_seed(0)
    return ResidualLM(VOCAB, WIDTH, BLOCKS)


def batch(step: int) -> torch.Tensor:
    """The batch of a step: a function of the step alone, so every resume sees the same data."""
    return torch.randint(0, VOCAB, (4, 17), generator=torch.Generator().manual_seed(step))


def rss_bytes() -> int:
    """The resident set size of this process."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def live_tensors() -> int:
    """Tensors reachable by the garbage collector, after a collection."""
    gc.collect()
    return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


class InterruptError(Exception):
    """Raised inside an in-process segment at a random step."""


class Run:
    """A model, its optimizer and LISA, fresh or resumed from ``folder/last.pt``."""

    def __init__(self, mode: str, folder: Path) -> None:
        self.mode, self.folder = mode, folder
        self.model = make_model()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-3)
        self.lisa = LISA(n_layers=N_LAYERS, interval=INTERVAL, optimizer_state=mode, seed=3)
        self.step = 0
        saved = folder / "last.pt"
        state = torch.load(saved, weights_only=False) if saved.exists() else None
        self.lisa.attach(self.model, self.optimizer)
        if state is not None:  # in the order docs/guides/fabric.md gives for plain loops
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.lisa.load_state_dict(state["lisa"])
            self.step = int(state["step"])
        self.checked = 0
        self.samples: list[tuple[int, int, int]] = []  # (step, live tensors, rss)

    def train(self, stop: int, measure: bool, raise_at: int | None = None, kill_at: int | None = None) -> None:
        """Train to ``stop``, checkpointing every ``EVERY`` steps; raise or die at the given step."""
        while self.step < stop:
            self.model.next_token_loss(batch(self.step)).backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            if (self.step - 1) % INTERVAL == 0:
                self.check(measure)
            if self.step % EVERY == 0:
                self.save()
            if self.step == raise_at:
                raise InterruptError(f"interrupted at step {self.step}")
            if self.step == kill_at:
                kill_now(f"soak at step {self.step}")

    def save(self) -> None:
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "lisa": self.lisa.state_dict(),
            "step": self.step,
        }
        partial = self.folder / "last.pt.partial"
        torch.save(state, partial)
        os.replace(partial, self.folder / "last.pt")

    def check(self, measure: bool) -> None:
        """After the first step of a period: the optimizer state is the analytic minimum."""
        names = dict(self.model.named_parameters())
        with_state = {n for n, p in names.items() if self.optimizer.state.get(p)}
        if self.mode == "drop":
            expected = {n for n, p in names.items() if p.requires_grad}
        else:  # every parameter trained since the start keeps its entry
            ever = {i for s in self.lisa.history for i in s.active_layers}
            expected = {n for n in names if not n.startswith("layers.") or int(n.split(".")[1]) in ever}
        if with_state != expected:
            raise AssertionError(f"{self.mode}: step {self.step}: state for {sorted(with_state ^ expected)[:6]}")
        want = sum(2 * names[n].numel() * 4 + 4 for n in expected)  # AdamW: two float32 moments, a float32 step
        have = sum(t.numel() * t.element_size() for s in self.optimizer.state.values() for t in s.values())
        if have != want:
            raise AssertionError(f"{self.mode}: step {self.step}: {have} state bytes, the minimum is {want}")
        self.checked += 1
        if measure and self.checked % MEASURE_EVERY == 1:
            self.samples.append((self.step, live_tensors(), rss_bytes()))

    def close(self) -> None:
        self.lisa.detach()


def worker(args: argparse.Namespace) -> None:
    """One segment in a new process: resume, train to ``--stop`` (or die at ``--kill-at``), report the checks."""
    run = Run(args.mode, Path(args.folder))
    run.train(args.stop, measure=False, kill_at=args.kill_at or None)
    print(json.dumps({"checked": run.checked, "step": run.step}))


def saved_step(folder: Path) -> int:
    saved = folder / "last.pt"
    return int(torch.load(saved, weights_only=False)["step"]) if saved.exists() else 0


def soak(mode: str, steps: int, rng: random.Random, work: Path, log: list[str]) -> dict[str, Any]:
    folder = work / mode
    folder.mkdir(parents=True)
    kinds = {"in_process_stop": 0, "in_process_exception": 0, "new_process": 0, "new_process_killed": 0}
    checked, samples, segments, step = 0, [], 0, 0
    all_trained_at: int | None = None
    while step < steps:
        stop = min(steps, step + rng.randint(30, 100))
        kind = "in_process_stop" if segments == 0 else rng.choice(list(kinds))
        segments += 1
        if kind.startswith("in_process"):
            run = Run(mode, folder)
            raise_at = rng.randint(step + 1, stop) if kind == "in_process_exception" else None
            with contextlib.suppress(InterruptError):
                run.train(stop, measure=True, raise_at=raise_at)
            checked += run.checked
            samples += run.samples
            if all_trained_at is None and len({i for s in run.lisa.history for i in s.active_layers}) == BLOCKS:
                all_trained_at = run.step
            run.close()
            del run
        else:
            command = [sys.executable, str(HERE), "--worker", "--mode", mode, "--folder", str(folder)]
            command += ["--stop", str(stop)]
            if kind == "new_process_killed":
                command += ["--kill-at", str(rng.randint(step + 1, stop))]
            result = run_command(command, timeout=1200)
            if kind == "new_process_killed":
                if result.returncode != -9:
                    raise AssertionError(result.describe("was not killed"))
            else:
                result.check()
                checked += json.loads(result.stdout.strip().splitlines()[-1])["checked"]
        kinds[kind] += 1
        step = saved_step(folder)
        log.append(f"{mode}: segment {segments} ({kind}) ended with the checkpoint of step {step}")
    state = torch.load(folder / "last.pt", weights_only=False)
    measured = [s for s in samples if all_trained_at is not None and s[0] >= all_trained_at] or samples
    return {
        "mode": mode,
        "steps": int(state["step"]),
        "switches": len(state["lisa"]["history"]),
        "segments": segments,
        "resumes": segments - 1,
        "segment_kinds": kinds,
        "checks_after_switch": checked,
        "measured_from_step": measured[0][0],
        "live_tensors": {
            "first": measured[0][1],
            "last": measured[-1][1],
            "min": min(s[1] for s in measured),
            "max": max(s[1] for s in measured),
        },
        "rss_mib": {
            "first": round(measured[0][2] / 2**20, 2),
            "last": round(measured[-1][2] / 2**20, 2),
            "max": round(max(s[2] for s in measured) / 2**20, 2),
        },
        "samples": len(measured),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--steps", type=int, default=1701, help="optimizer steps per mode")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--modes", nargs="+", default=["drop", "offload", "keep"])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/soak"))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="drop", help=argparse.SUPPRESS)
    parser.add_argument("--folder", default="", help=argparse.SUPPRESS)
    parser.add_argument("--stop", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--kill-at", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)  # a tiny model: one thread, no waiting on the others on a loaded machine
    import logging

    logging.getLogger("lightning_lisa").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    if args.worker:
        worker(args)
        return
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="lisa-soak-"))
    started = time.time()
    log: list[str] = []
    results = []
    try:
        for mode in args.modes:
            results.append(soak(mode, args.steps, rng, work, log))
            print(json.dumps(results[-1]), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    summary = {
        "steps": sum(r["steps"] for r in results),
        "switches": sum(r["switches"] for r in results),
        "resumes": sum(r["resumes"] for r in results),
        "checks_after_switch": sum(r["checks_after_switch"] for r in results),
        "wall_seconds": round(time.time() - started, 1),
        "torch": torch.__version__,
        "seed": args.seed,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "soak.json").write_text(json.dumps({"summary": summary, "modes": results}, indent=2) + "\n")
    (args.out / "segments.log").write_text("\n".join(log) + "\n")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
