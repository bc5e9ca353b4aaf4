"""A finer rate check: each arm's chosen rate against the rates halfway to its grid neighbours.

The study's grids are half-decades. Where an arm's validation changes steeply from one rate to the next, a
rate between them can change a verdict. For each arm given, this check takes the study's chosen rate on the
task and its neighbours in the arm's grid, and runs seed 0 at the geometric midpoints (rounded to one
significant digit: between 1e-3 and 3e-3, 2e-3) into a folder of its own; the study's cells are not
touched. The rate is then chosen again on seed-0 validation, over the grid and the midpoints. If a
midpoint wins, its test is read and the other seeds run there; otherwise the study's results stand. Every
arm compared gets the same midpoints around its own chosen rate::

    python benchmarks/quality/finer.py --task facts --arms lisa2,lora64

writes ``benchmarks/results/quality/finer_grid/`` (cells, logs and ``summary.json``), resuming where it
stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from arms import ARMS
from study import DEFAULT_OUT, better, cell_path, chosen, grid_state, read

from lightning_lisa.recipes.tokenizer import default_cache_dir

HERE = Path(__file__).resolve().parent


def midpoints(grid: list[float], rate: float) -> list[float]:
    """The geometric midpoints between ``rate`` and its neighbours in ``grid``, to one significant digit.

    >>> midpoints([3e-4, 1e-3, 3e-3, 1e-2], 1e-3)
    [0.0005, 0.002]
    >>> midpoints([1e-4, 3e-4, 1e-3, 3e-3, 1e-2], 3e-3)
    [0.002, 0.005]
    """
    ordered = sorted(grid)
    index = ordered.index(rate)
    neighbours = ordered[max(0, index - 1) : index] + ordered[index + 1 : index + 2]
    return sorted(float(f"{(rate * n) ** 0.5:.0e}") for n in neighbours)


def run_cells(args: argparse.Namespace, jobs: list[tuple[str, float, int, bool]]) -> None:
    """Run ``(arm, lr, seed, test)`` cells, ``args.workers`` at a time; stop at the first failure."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    (args.out / "logs").mkdir(parents=True, exist_ok=True)

    def one(job: tuple[str, float, int, bool]) -> int:
        arm, lr, seed, test = job
        cmd = [sys.executable, str(HERE), "cell", "--task", args.task, "--arm", arm, "--lr", repr(lr),
               "--seed", str(seed), "--steps", str(args.steps), "--out", str(args.out),
               "--scratch", str(args.scratch), "--device", args.device, "--cache-dir", str(args.cache_dir),
               *(["--test"] if test else []), *(["--smoke"] if args.smoke else [])]  # fmt: skip
        name = f"{args.task}_{arm}_lr{lr:g}_s{seed}{'_test' if test else ''}.log"
        print(f"start {arm} lr={lr:g} seed={seed}{' test' if test else ''}", flush=True)
        with (args.out / "logs" / name).open("wb") as log:
            code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, check=False).returncode
        print(f"done {arm} lr={lr:g} seed={seed} (exit {code})", flush=True)
        return code

    with ThreadPoolExecutor(args.workers) as pool:
        failed = [job for job, code in zip(jobs, pool.map(one, jobs), strict=True) if code != 0]
    if failed:
        raise SystemExit(f"cells failed: {failed}; see {args.out / 'logs'}")


def check(args: argparse.Namespace) -> dict[str, Any]:
    """Run the check for every arm and return its summary."""
    higher = args.task != "code"
    rates: dict[str, tuple[float, list[float]]] = {}
    for arm in args.arm_list:
        grid, cells = grid_state(args.study, args.task, arm)
        if len(cells) < len(grid):
            raise SystemExit(f"{arm}: the study's grid on {args.task} is not finished")
        rate = chosen(args.task, cells)
        rates[arm] = (rate, midpoints(grid, rate))
    run_cells(args, [(arm, lr, 0, False) for arm, (_, mids) in rates.items() for lr in mids
                     if read(cell_path(args.out, args.task, arm, lr, 0)) is None])  # fmt: skip
    summary: dict[str, Any] = {"task": args.task, "arms": {}}
    later: list[tuple[str, float, int, bool]] = []
    for arm, (rate, mids) in rates.items():
        _, cells = grid_state(args.study, args.task, arm)
        extra = {lr: read(cell_path(args.out, args.task, arm, lr, 0)) for lr in mids}
        pool = {**cells, **{lr: c for lr, c in extra.items() if c is not None}}
        best = rate
        for lr, cell in pool.items():
            if better(higher, cell, pool[best]):
                best = lr
        folder = args.out if best in extra else args.study
        if best in extra:
            first = read(cell_path(args.out, args.task, arm, best, 0))
            later += [(arm, best, 0, True)] if first is not None and "test" not in first else []
            later += [(arm, best, s, True) for s in range(1, args.seeds)
                      if read(cell_path(args.out, args.task, arm, best, s)) is None]  # fmt: skip
        summary["arms"][arm] = {"study_lr": rate, "midpoints": mids, "lr": best, "from": str(folder),
                                "val_by_lr": {f"{k:g}": pool[k]["val"] for k in sorted(pool)}}  # fmt: skip
    run_cells(args, later)
    for arm, entry in summary["arms"].items():
        folder = args.out if entry["lr"] in rates[arm][1] else args.study
        tests = [c["test"] for s in range(args.seeds) if (c := read(cell_path(folder, args.task, arm, entry["lr"], s)))]
        entry["test"] = tests
        entry["test_mean"] = statistics.mean(tests) if tests else None
        entry["test_std"] = statistics.stdev(tests) if len(tests) > 1 else None
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", required=True, help="the study's task")
    parser.add_argument("--arms", required=True, help=f"comma-separated, from {','.join(ARMS)}")
    parser.add_argument("--seeds", type=int, default=3, help="seeds at a midpoint that wins (default 3)")
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps of every cell (the study's)")
    parser.add_argument("--workers", type=int, default=2, help="cells at once, one CPU thread each")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--study", type=Path, default=DEFAULT_OUT, help="the study's results folder")
    parser.add_argument("--out", type=Path, help="this check's folder (default <study>/finer_grid)")
    parser.add_argument("--cache-dir", type=Path, help="tokenizer and converted-model cache")
    parser.add_argument("--smoke", action="store_true", help="the study's tiny random model (seconds)")
    args = parser.parse_args(argv)
    args.arm_list = [a for a in args.arms.split(",") if a]
    if not args.arm_list or any(a not in ARMS for a in args.arm_list):
        parser.error(f"--arms={args.arms!r}: allowed values are {', '.join(ARMS)}")
    args.out = args.out or args.study / "finer_grid"
    args.cache_dir = args.cache_dir or default_cache_dir()
    args.scratch = Path(args.cache_dir) / "quality-weights-finer"  # seed-0 weights until their test is read
    args.out.mkdir(parents=True, exist_ok=True)
    if not (args.out / "base.json").is_file():
        shutil.copy(args.study / "base.json", args.out / "base.json")
    summary = check(args)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    for arm, entry in summary["arms"].items():
        vals = ", ".join(f"{k}: {v:.4g}" for k, v in entry["val_by_lr"].items())
        test = f"{entry['test_mean']:.4g} ± {entry['test_std'] or 0:.2g}" if entry["test"] else "-"
        print(f"{arm}: seed-0 validation {vals}; chosen {entry['lr']:g} (study: {entry['study_lr']:g}); test {test}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
