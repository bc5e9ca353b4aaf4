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
stopped. ``summary.json`` holds every arm ever checked, by task: a later call with other arms adds to it and
replaces only the arms it names. Each arm's ``from`` says whose cells its test was read from: ``"study"``
(the study's folder: its chosen rate stood) or ``"check"`` (this check's folder: a midpoint won).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from arms import ARMS
from study import DEFAULT_OUT, Job, cell_env, cell_path, chosen, command, grid_state, read

from lightning_lisa.recipes.tokenizer import default_cache_dir


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


def run_cells(args: argparse.Namespace, jobs: list[Job]) -> None:
    """Run the study's cells ``jobs``, ``args.workers`` at a time, into ``args.out``; exit if one failed."""
    env = cell_env()
    (args.out / "logs").mkdir(parents=True, exist_ok=True)

    def one(job: Job) -> int:
        name = f"{job.task}_{job.arm}_lr{job.lr:g}_s{job.seed}{'_test' if job.kind != 'grid' else ''}.log"
        print(f"start {job}", flush=True)
        with (args.out / "logs" / name).open("wb") as log:
            cmd = command(args, job)
            code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, check=False).returncode
        print(f"done {job} (exit {code})", flush=True)
        return code

    with ThreadPoolExecutor(args.workers) as pool:
        failed = [job for job, code in zip(jobs, pool.map(one, jobs), strict=True) if code != 0]
    if failed:
        raise SystemExit(f"cells failed: {failed}; see {args.out / 'logs'}")


def check(args: argparse.Namespace) -> dict[str, Any]:
    """Run the check for every arm of ``args.arm_list`` on ``args.task`` and return its summary, by arm."""
    task = args.task
    study: dict[str, tuple[float, list[float], dict[float, dict[str, Any]]]] = {}
    for arm in args.arm_list:
        grid, cells = grid_state(args.study, task, arm)
        if len(cells) < len(grid):
            raise SystemExit(f"{arm}: the study's grid on {task} is not finished")
        rate = chosen(task, cells)
        study[arm] = (rate, midpoints(grid, rate), cells)
    run_cells(args, [Job(task, arm, lr, 0, "grid") for arm, (_, mids, _) in study.items() for lr in mids
                     if read(cell_path(args.out, task, arm, lr, 0)) is None])  # fmt: skip
    summary: dict[str, Any] = {}
    later: list[Job] = []
    for arm, (rate, mids, cells) in study.items():
        extra = {lr: cell for lr in mids if (cell := read(cell_path(args.out, task, arm, lr, 0))) is not None}
        pool = {**cells, **extra}
        best = chosen(task, pool)
        if best in extra:  # a midpoint won: its test and the other seeds, in this check's folder only
            later += [Job(task, arm, best, 0, "test")] if "test" not in extra[best] else []
            later += [Job(task, arm, best, s, "seed") for s in range(1, args.seeds)
                      if read(cell_path(args.out, task, arm, best, s)) is None]  # fmt: skip
        summary[arm] = {"study_lr": rate, "midpoints": mids, "lr": best, "from": "check" if best in extra else "study",
                        "val_by_lr": {f"{k:g}": pool[k]["val"] for k in sorted(pool)}}  # fmt: skip
    run_cells(args, later)
    english = json.loads((args.out / "base.json").read_text())["english_loss"]
    for arm, entry in summary.items():
        folder = args.out if entry["from"] == "check" else args.study
        cells = [read(cell_path(folder, task, arm, entry["lr"], s)) for s in range(args.seeds)]
        tested = [c for c in cells if c is not None and "test" in c]
        entry["test"] = [c["test"] for c in tested]
        entry["forgetting"] = [c["english_loss"] - english for c in tested]  # the English-loss rise
        entry["control"] = [c["control"] for c in tested]
        for key in ("test", "forgetting", "control"):
            entry[f"{key}_mean"] = statistics.mean(entry[key]) if entry[key] else None
            entry[f"{key}_std"] = statistics.stdev(entry[key]) if len(entry[key]) > 1 else None
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
    checked = check(args)
    path = args.out / "summary.json"
    summary: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
    summary.setdefault("tasks", {}).setdefault(args.task, {}).update(checked)
    path.write_text(json.dumps(summary, indent=1))
    for arm, entry in checked.items():
        vals = ", ".join(f"{k}: {v:.4g}" for k, v in entry["val_by_lr"].items())
        test = f"{entry['test_mean']:.4g} ± {entry['test_std'] or 0:.2g}" if entry["test"] else "-"
        print(f"{arm}: seed-0 validation {vals}; chosen {entry['lr']:g} (study: {entry['study_lr']:g}); test {test}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
