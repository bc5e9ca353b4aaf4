"""The study's command line: plan the cells from what is on disk, run them in parallel processes, resume.

The state of the study is its folder of results (``--out``, default ``benchmarks/results/quality``):

* ``base.json``: the base model's scores on every task, its English loss, and the control set;
* ``cells/<task>/<arm>/lr<rate>_s<seed>.json``: one file per finished cell (see ``runner.py``).

:func:`plan` derives the cells still to run from those files alone, in order: every arm's grid with seed 0
(validation only; each grid is extended one rate at a time, up to six, while its best rate is at an edge),
then the test scores at the chosen rate (from the seed-0 weights kept for the best rate so far, or by
training that cell again where they are gone), then the other seeds at the chosen rate. ``--resume`` skips
every finished cell, so an interrupted study continues where it stopped; each cell's file is written as
soon as the cell ends.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from arms import ARMS, CORE, VARIANTS, extend
from tasks import TASKS

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "quality"


@dataclass(frozen=True)
class Job:
    """One cell to run: ``kind`` is ``"grid"`` (seed 0, validation only), ``"test"`` or ``"seed"``."""

    task: str
    arm: str
    lr: float
    seed: int
    kind: str

    def path(self, out: Path) -> Path:
        return cell_path(out, self.task, self.arm, self.lr, self.seed)


def cell_path(out: Path, task: str, arm: str, lr: float, seed: int) -> Path:
    return out / "cells" / task / arm / f"lr{lr:g}_s{seed}.json"


def weights_path(scratch: Path, task: str, arm: str, lr: float) -> Path:
    return scratch / task / arm / f"lr{lr:g}.pt"


def read(path: Path) -> dict[str, Any] | None:
    try:
        loaded: dict[str, Any] = json.loads(path.read_text())
        return loaded
    except (OSError, ValueError):
        return None


def better(task_higher: bool, a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether cell ``a`` validates better than ``b`` (the task's metric; ties: the lower validation loss)."""
    if a["val"] != b["val"]:
        return bool(a["val"] > b["val"]) if task_higher else bool(a["val"] < b["val"])
    return bool(a["val_loss"] < b["val_loss"])


def grid_state(out: Path, task: str, arm: str) -> tuple[list[float], dict[float, dict[str, Any]]]:
    """The arm's grid so far (initial rates plus the extensions its results call for) and its finished cells."""
    grid = list(ARMS[arm].grid)
    cells: dict[float, dict[str, Any]] = {}
    while True:
        for lr in grid:
            if lr not in cells and (cell := read(cell_path(out, task, arm, lr, 0))) is not None:
                cells[lr] = cell
        if len(cells) < len(grid):
            return grid, cells
        best = chosen(task, cells)
        nxt = extend(grid, best)
        if nxt is None:
            return grid, cells
        grid.append(nxt)


def chosen(task: str, cells: dict[float, dict[str, Any]]) -> float:
    """The rate whose seed-0 cell validates best."""
    higher = task != "code"
    best = next(iter(cells))
    for lr, cell in cells.items():
        if better(higher, cell, cells[best]):
            best = lr
    return best


def plan(out: Path, tasks: list[str], arms: dict[str, list[str]], seeds: int) -> list[Job]:
    """Every job whose inputs exist and whose result does not, in the order they should run.

    Task by task (a task's results complete before the next task's begin, when workers are free), and in a
    task the seed-0 grids first, then the test scores and the other seeds.
    """
    jobs: list[Job] = []
    for task in tasks:
        grid_jobs: list[Job] = []
        later: list[Job] = []
        for arm in arms[task]:
            grid, cells = grid_state(out, task, arm)
            missing = [lr for lr in grid if lr not in cells]
            if missing:
                grid_jobs.extend(Job(task, arm, lr, 0, "grid") for lr in missing)
                continue
            lr = chosen(task, cells)
            if "test" not in cells[lr]:
                later.append(Job(task, arm, lr, 0, "test"))
            for seed in range(1, seeds):
                if read(cell_path(out, task, arm, lr, seed)) is None:
                    later.append(Job(task, arm, lr, seed, "seed"))
        jobs += grid_jobs + later
    return jobs


def prune(out: Path, scratch: Path, tasks: list[str], arms: dict[str, list[str]]) -> None:
    """Keep the seed-0 weights of each arm's best rate so far; delete the others (and those already tested)."""
    for task in tasks:
        for arm in arms[task]:
            folder = scratch / task / arm
            if not folder.is_dir():
                continue
            _, cells = grid_state(out, task, arm)
            keep = None
            if cells:
                best = chosen(task, cells)
                keep = None if "test" in cells[best] else weights_path(scratch, task, arm, best)
            for path in folder.glob("*.pt"):
                if path != keep:
                    path.unlink(missing_ok=True)


def cell_env() -> dict[str, str]:
    """The environment of a cell's process: one CPU thread (the cells run side by side, one per core)."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def command(args: argparse.Namespace, job: Job) -> list[str]:
    cmd = [
        sys.executable, str(Path(__file__).parent), "cell", "--task", job.task, "--arm", job.arm,
        "--lr", repr(job.lr), "--seed", str(job.seed), "--steps", str(args.steps), "--out", str(args.out),
        "--scratch", str(args.scratch), "--device", args.device, "--cache-dir", str(args.cache_dir or ""),
    ]  # fmt: skip
    if args.smoke:
        cmd.append("--smoke")
    if job.kind != "grid":
        cmd.append("--test")
    return cmd


def run_study(args: argparse.Namespace) -> int:
    """Plan and run the cells, ``args.workers`` processes at a time, until none is left (or one fails)."""
    out: Path = args.out
    if (out / "cells").is_dir() and any((out / "cells").rglob("*.json")) and not args.resume:
        raise SystemExit(f"{out} already holds finished cells: pass --resume to skip them, or another --out")
    ensure_base(args)
    arms = {task: list(args.arm_list) if task not in args.variant_tasks else [*args.arm_list, *VARIANTS]
            for task in args.task_list}  # fmt: skip
    env = cell_env()
    nice = ["nice", "-n", str(args.nice)] if args.nice else []
    running: dict[Job, subprocess.Popen[bytes]] = {}
    failed: list[Job] = []
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    while True:
        for job, proc in list(running.items()):
            code = proc.poll()
            if code is None:
                continue
            del running[job]
            print(f"{time.strftime('%H:%M:%S')} done {job} (exit {code})", flush=True)
            if code != 0:
                failed.append(job)
            prune(out, args.scratch, args.task_list, arms)
        if failed:
            for proc in running.values():
                proc.wait()
            raise SystemExit(f"cells failed: {failed}; see {logs}")
        todo = [j for j in plan(out, args.task_list, arms, args.seeds) if j not in running]
        if not todo and not running:
            break
        for job in todo[: max(0, args.workers - len(running))]:
            log = (logs / f"{job.task}_{job.arm}_lr{job.lr:g}_s{job.seed}.log").open("wb")
            print(f"{time.strftime('%H:%M:%S')} start {job}", flush=True)
            running[job] = subprocess.Popen([*nice, *command(args, job)], stdout=log, stderr=subprocess.STDOUT, env=env)
        time.sleep(0.2 if args.smoke else 5)
    print(f"all cells done: {out}")
    return 0


def ensure_base(args: argparse.Namespace) -> dict[str, Any]:
    """``base.json``: the base model's scores (every task's validation and test), English loss, control set."""
    path = args.out / "base.json"
    found = read(path)
    if found is not None and all(t in found["tasks"] for t in args.task_list):
        return found
    import dataclasses

    import common
    import runner
    from tasks import Examples, evaluate

    common.prepare(1)
    base = runner.make_base(args.smoke, args.cache_dir, args.model, args.device, None)
    model = base.fresh().to(args.device)
    scores: dict[str, Any] = {}
    for name in args.task_list:
        task = runner.task_for(base, name)
        val = evaluate(model, task.val, base.pad_id, args.device, task.exact)
        test = evaluate(model, task.test, base.pad_id, args.device, task.exact)
        scores[name] = {"metric": task.metric, "higher_is_better": task.higher_is_better,
                        "val": task.value(val), "test": task.value(test), "test_loss": test.loss}  # fmt: skip
    english = evaluate(model, base.english, base.pad_id, args.device, exact=False).loss
    control = evaluate(model, Examples(base.control, base.tokenizer), base.pad_id, args.device, exact=True)
    payload = {
        "model": "tiny random Llama (smoke)" if args.smoke else Path(args.model).name,
        "sizes": dataclasses.asdict(base.sizes), "english_loss": english, "control_accuracy": control.accuracy,
        "control": [dataclasses.asdict(i) for i in base.control], "tasks": {**(found or {}).get("tasks", {}), **scores},
        "versions": common.versions("torch", "lightning", "transformers", "peft"), "commit": runner.commit(),
    }  # fmt: skip
    common.save_json(path, payload)
    print(f"base model: {json.dumps({k: v for k, v in payload.items() if k not in ('control', 'versions')})}")
    return payload


def run_one(args: argparse.Namespace) -> int:
    """The ``cell`` subcommand: train one cell (or test its kept weights) and write its file."""
    import common
    import runner
    from tasks import Item

    common.prepare(1 if args.device == "cpu" else 0)
    found = read(args.out / "base.json")
    if found is None:
        raise SystemExit(f"{args.out / 'base.json'} is missing: run the study (it writes it first)")
    control = [Item(**i) for i in found["control"]]
    base = runner.make_base(args.smoke, args.cache_dir, args.model, args.device, control)
    task = runner.task_for(base, args.task)
    path = cell_path(args.out, args.task, args.arm, args.lr, args.seed)
    weights = weights_path(args.scratch, args.task, args.arm, args.lr)
    if args.test and args.seed == 0 and (cell := read(path)) is not None:
        if weights.is_file():
            cell.update(runner.test_from_weights(base, task, args.arm, args.seed, weights))
        else:  # the weights are gone (another machine): train the cell again, with its test scores
            again = runner.run_cell(base, task, args.arm, args.lr, args.seed, args.steps, test=True)
            if again["val_correct"] != cell["val_correct"] or again["val_loss"] != cell["val_loss"]:
                print(f"warning: retrained cell validates differently ({again['val_loss']} vs {cell['val_loss']})")
            # the grid's own validation stays (the rate was chosen on it, and must not move once a test is
            # read); the test comes from the retrained run, whose validation is kept beside it
            tested = {k: again[k] for k in again if k not in cell}
            retrained = {k: again[k] for k in ("commit", "val", "val_loss", "val_correct", "curve", "seconds")}
            cell = {**cell, **tested, "retrained_for_test": retrained}
        common.save_json(path, cell, compact=True)
        weights.unlink(missing_ok=True)
        return 0
    keep = weights if args.seed == 0 and not args.test else None
    cell = runner.run_cell(base, task, args.arm, args.lr, args.seed, args.steps, test=args.test, weights=keep)
    common.save_json(path, cell, compact=True)
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from lightning_lisa.recipes.gguf import SMOLLM2
    from lightning_lisa.recipes.tokenizer import default_cache_dir

    parser = argparse.ArgumentParser(description="LISA against full fine-tuning and LoRA on a real model.")
    parser.add_argument("mode", nargs="?", default="run", choices=("run", "cell", "report", "base"),
                        help="run: the study (default); report: summary.json, tables and figures from the results; "
                        "cell: one cell (used by the study's workers); base: only the base model's scores "
                        "(base.json)")  # fmt: skip
    parser.add_argument(
        "--tasks",
        default="reverse,code,facts",
        help=f"comma-separated, from {','.join(TASKS)} (default reverse,code,facts: the order they run in)",
    )
    parser.add_argument("--arms", default=",".join(CORE), help=f"comma-separated, from {','.join(ARMS)}")
    parser.add_argument(
        "--variant-tasks",
        default="reverse",
        help=f"tasks that run the variants {','.join(VARIANTS)} in addition to --arms "
        "(comma-separated; default reverse; '' for none)",
    )
    parser.add_argument("--steps", type=int, help="optimizer steps of every cell (default 100; smoke 20)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds at the chosen rate (default 3)")
    parser.add_argument("--workers", type=int, default=2, help="cells run at once, one CPU thread each (default 2)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--nice", type=int, default=0, help="run the cells at this niceness (default 0)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"results folder (default {DEFAULT_OUT})")
    parser.add_argument("--scratch", type=Path, help="where seed-0 weights wait for their test (default: cache)")
    parser.add_argument("--resume", action="store_true", help="skip the finished cells in --out")
    parser.add_argument("--smoke", action="store_true", help="a tiny random model and tiny data (seconds)")
    parser.add_argument("--model", default=SMOLLM2, help="GGUF file of the base model")
    parser.add_argument("--cache-dir", type=Path, help="tokenizer and converted-model cache")
    parser.add_argument(
        "--figures",
        type=Path,
        nargs="?",
        const=ROOT / "docs" / "images",
        help="report: also draw the figures into this folder (default docs/images)",
    )
    # the cell subcommand's own arguments
    parser.add_argument("--task", help=argparse.SUPPRESS)
    parser.add_argument("--arm", help=argparse.SUPPRESS)
    parser.add_argument("--lr", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--test", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.steps = args.steps or (20 if args.smoke else 100)
    args.cache_dir = args.cache_dir or default_cache_dir()
    args.scratch = args.scratch or Path(args.cache_dir) / "quality-weights"
    args.task_list = [t for t in args.tasks.split(",") if t]
    args.arm_list = [a for a in args.arms.split(",") if a]
    args.variant_tasks = [t for t in args.variant_tasks.split(",") if t]
    for name, values, allowed in (("--tasks", args.task_list, TASKS), ("--arms", args.arm_list, tuple(ARMS)),
                                  ("--variant-tasks", args.variant_tasks, TASKS)):  # fmt: skip
        if (not values and name != "--variant-tasks") or any(v not in allowed for v in values):
            parser.error(f"{name}={','.join(values)!r}: allowed values are {', '.join(allowed)}")
    for name in ("steps", "seeds", "workers"):
        if getattr(args, name) < 1:
            parser.error(f"--{name}={getattr(args, name)}: must be at least 1")
    if args.mode == "cell" and (args.task is None or args.arm is None or args.lr is None or args.seed is None):
        parser.error("cell needs --task, --arm, --lr and --seed")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.mode == "report":
        import report

        return report.report(args.out, args.figures)
    if args.mode == "base":
        ensure_base(args)
        return 0
    return run_one(args) if args.mode == "cell" else run_study(args)
