"""Kill a training run at a fixed point, resume it, and compare with a run that was never interrupted.

The pieces, for tests of any training script or command (a Python script, ``lightning-lisa fit``):

* In the training process: :class:`KillSwitch`, a callback that sends ``SIGKILL`` to its own process at
  the point named by the environment variable :data:`KILL_ENV` (nothing happens when it is unset), and
  :class:`BatchLog`, a callback that appends a hash of every training batch to the file named by
  :data:`BATCH_LOG_ENV`. Add both to the Trainer's callbacks (on the command line:
  ``--trainer.callbacks+=lightning_lisa.testing.KillSwitch``).
* In the test: :func:`run_command` runs a command in a new process group with a timeout and ends
  every process of the group afterwards (the other ranks of a distributed job included), so that
  nothing can hang; :func:`kill_and_resume` runs a command with a kill point, checks that it was
  killed there, and runs the resuming command.
* To compare: :func:`load_training_state` reads what a Lightning checkpoint file holds for training
  (weights, optimizer state, schedulers, step, LISA's schedule), :func:`assert_same_training_state`
  compares two of them bit for bit, and :func:`read_batch_log` merges the batch logs of an interrupted
  and a resumed run into the batches the optimizer actually stepped on.

A kill point is ``"<hook>@<step>"`` or ``"<hook>@<step>:<rank>"`` (only that rank dies), where ``step``
is ``trainer.global_step`` (optimizer steps taken so far) at the moment of the hook:

============================ ====================================================================
hook                         where the process dies
============================ ====================================================================
``batch_start``              at the start of the first micro-batch of optimizer step ``step + 1``,
                             after the callbacks before the KillSwitch ran (LISA's switch included)
``batch_end``                after optimizer step ``step``, before the checkpoint callbacks save it
``save_checkpoint``          inside ``on_save_checkpoint`` of the checkpoint of step ``step``: the
                             checkpoint's contents are gathered, nothing is written yet
``write``                    while the checkpoint of step ``step`` is written: a single file after
                             half of its bytes, a distributed checkpoint (a folder) after this rank's
                             shard files and before the metadata that completes it
============================ ====================================================================

Examples:
    >>> KillPoint.parse("batch_end@5:1")
    KillPoint(hook='batch_end', step=5, rank=1)
    >>> KillPoint("save_checkpoint", 3).env()
    {'LISA_KILL_AT': 'save_checkpoint@3'}
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

#: The environment variable that names the kill point of :class:`KillSwitch`.
KILL_ENV = "LISA_KILL_AT"

#: The environment variable that names the file :class:`BatchLog` appends to.
BATCH_LOG_ENV = "LISA_BATCH_LOG"

#: The environment variable that names a file :class:`KillSwitch` writes (its kill point) just before it kills.
KILL_MARKER_ENV = "LISA_KILL_MARKER"

#: The hooks a :class:`KillPoint` may name.
KILL_HOOKS = ("batch_start", "batch_end", "save_checkpoint", "write")


@dataclass(frozen=True)
class KillPoint:
    """Where :class:`KillSwitch` kills its process.

    Attributes:
        hook: One of :data:`KILL_HOOKS`.
        step: ``trainer.global_step`` at the moment of the hook.
        rank: Only the process of this global rank dies; ``None``: every rank (each at the same point).
    """

    hook: str
    step: int
    rank: int | None = None

    def __post_init__(self) -> None:
        if self.hook not in KILL_HOOKS:
            raise ValueError(f"`hook={self.hook!r}` is not one of {list(KILL_HOOKS)}.")
        if self.step < 0:
            raise ValueError(f"`step={self.step}` is not allowed; it must be >= 0.")

    @classmethod
    def parse(cls, text: str) -> KillPoint:
        """Read ``"<hook>@<step>"`` or ``"<hook>@<step>:<rank>"``."""
        hook, sep, rest = text.partition("@")
        step, _, rank = rest.partition(":")
        if not sep or not step.isdigit() or (rank and not rank.isdigit()):
            raise ValueError(f"{KILL_ENV}={text!r} is not '<hook>@<step>' or '<hook>@<step>:<rank>'.")
        return cls(hook, int(step), int(rank) if rank else None)

    def __str__(self) -> str:
        return f"{self.hook}@{self.step}" + ("" if self.rank is None else f":{self.rank}")

    def env(self) -> dict[str, str]:
        """The environment variable that sets this kill point in a child process."""
        return {KILL_ENV: str(self)}


def kill_now(why: str = "") -> None:
    """Flush the standard streams and send ``SIGKILL`` to this process: no handler, no cleanup runs.

    Args:
        why: Written (with the process id) to the file named by :data:`KILL_MARKER_ENV`, if set, first.
    """
    marker = os.environ.get(KILL_MARKER_ENV)
    if marker:
        with open(marker, "a", encoding="utf-8") as f:
            f.write(f"{os.getpid()} {why}\n")
            f.flush()
            os.fsync(f.fileno())
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


class KillSwitch(pl.Callback):
    """Kill this process with ``SIGKILL`` at a :class:`KillPoint`; without one it does nothing.

    Put it after LISA in the callbacks (Lightning runs callbacks in order, and the checkpoint callbacks
    last), so that a ``batch_start`` kill happens after LISA's switch of that step.

    Args:
        at: The kill point, as a :class:`KillPoint` or its text; ``None`` reads :data:`KILL_ENV`.
    """

    def __init__(self, at: KillPoint | str | None = None) -> None:
        text = os.environ.get(KILL_ENV) if at is None else at
        self.point = text if isinstance(text, KillPoint) else KillPoint.parse(text) if text else None
        self._patched = False

    def _due(self, trainer: pl.Trainer, hook: str) -> bool:
        point = self.point
        if point is None or point.hook != hook or trainer.global_step != point.step:
            return False
        return point.rank is None or point.rank == trainer.global_rank

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """For a ``write`` kill point, make the checkpoint writers of this process stop halfway."""
        if self.point is not None and self.point.hook == "write" and not self._patched:
            self._patched = True
            _kill_inside_writes(lambda: self._due(trainer, "write"), str(self.point))

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """Die at a ``batch_start`` kill point (the first micro-batch of the step)."""
        if batch_idx % trainer.accumulate_grad_batches == 0 and self._due(trainer, "batch_start"):
            kill_now(str(self.point))

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Die at a ``batch_end`` kill point, after the optimizer step."""
        stepped = (batch_idx + 1) % trainer.accumulate_grad_batches == 0
        if stepped and self._due(trainer, "batch_end"):
            kill_now(str(self.point))

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Die at a ``save_checkpoint`` kill point, before anything of the checkpoint is written."""
        if self._due(trainer, "save_checkpoint"):
            kill_now(str(self.point))


def _kill_inside_writes(due: Callable[[], bool], why: str) -> None:
    """Make the writes of checkpoints in this process die halfway while ``due()`` holds.

    Single files: Lightning writes them through ``fsspec``; the patched write writes half of the bytes,
    flushes them to disk and dies. Distributed checkpoints: ``torch.distributed.checkpoint``'s
    ``FileSystemWriter`` writes the shards, then its ``finish`` writes the metadata that makes the folder
    a checkpoint; the patched ``finish`` dies first. Test machinery: it changes these classes in this
    process only.
    """
    import importlib

    opener: Any = importlib.import_module("fsspec.implementations.local").LocalFileOpener  # fsspec is untyped
    write = opener.write

    def half_write(self: Any, data: Any, *args: Any, **kwargs: Any) -> Any:
        if not due():
            return write(self, data, *args, **kwargs)
        view = memoryview(data).cast("B")
        write(self, view[: len(view) // 2])
        self.flush()
        os.fsync(self.fileno())
        kill_now(f"{why} (half of a file written)")
        return None  # pragma: no cover - unreachable

    opener.write = half_write
    if torch.distributed.is_available():
        from torch.distributed.checkpoint.filesystem import FileSystemWriter

        finish = FileSystemWriter.finish

        def dying_finish(self: Any, *args: Any, **kwargs: Any) -> Any:
            if due():
                kill_now(f"{why} (shards written, no metadata)")
            return finish(self, *args, **kwargs)

        FileSystemWriter.finish = dying_finish  # type: ignore[method-assign]


def digest(obj: Any) -> str:
    """A SHA-256 hex digest of the tensors (values, dtypes, shapes) and plain values in ``obj``.

    Examples:
        >>> digest({"input_ids": torch.arange(4)}) == digest({"input_ids": torch.arange(4)})
        True
        >>> digest(torch.arange(4)) == digest(torch.arange(4).float())
        False
    """
    h = hashlib.sha256()

    def visit(x: Any) -> None:
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous()
            h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")  # 0-dim too
        elif isinstance(x, Mapping):
            h.update(b"{")
            for key in sorted(x, key=str):
                h.update(repr(key).encode())
                visit(x[key])
            h.update(b"}")
        elif isinstance(x, list | tuple):
            h.update(b"[")
            for item in x:
                visit(item)
            h.update(b"]")
        else:
            h.update(repr(x).encode())

    visit(obj)
    return h.hexdigest()


class BatchLog(pl.Callback):
    """Append ``{"step", "epoch", "batch_idx", "rank", "digest"}`` of every training micro-batch to a JSONL file.

    Each line is flushed and synced before the batch runs, so a killed run's log holds every batch it
    started. Merge the logs of an interrupted and a resumed run with :func:`read_batch_log`.

    Args:
        path: The file; ``None`` reads :data:`BATCH_LOG_ENV` (and nothing is logged when that is unset).
            Under several processes ``{rank}`` in the name is replaced by the global rank.
    """

    def __init__(self, path: str | Path | None = None) -> None:
        text = os.environ.get(BATCH_LOG_ENV) if path is None else str(path)
        self.path = text or None

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """Log the batch."""
        if self.path is None:
            return
        path = Path(self.path.replace("{rank}", str(trainer.global_rank)))
        record = {
            "step": trainer.global_step,
            "epoch": trainer.current_epoch,
            "batch_idx": batch_idx,
            "rank": trainer.global_rank,
            "digest": digest(batch),
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())


def read_batch_log(*paths: str | Path) -> list[dict[str, Any]]:
    r"""The batches the optimizer stepped on, from the logs of a run and of its resumptions, in order.

    The logs may be separate files or one file appended to by every run. A run that resumes starts a
    new segment (its first ``(step, epoch, batch_idx)`` is not after the previous line's), which replaces
    the entries of the earlier ones from its first step on: the batches a killed run started after its
    last checkpoint were never part of the result.

    Examples:
        >>> import tempfile
        >>> log = Path(tempfile.mkdtemp()) / "batches.jsonl"
        >>> rows = [(0, 0), (1, 1), (2, 2), (1, 1), (2, 2), (3, 3)]  # killed after step 2, resumed from step 1
        >>> _ = log.write_text("".join(json.dumps({"step": s, "epoch": 0, "batch_idx": b}) + "\n" for s, b in rows))
        >>> [r["step"] for r in read_batch_log(log)]
        [0, 1, 2, 3]
    """
    merged: list[dict[str, Any]] = []
    previous: tuple[int, int, int] | None = None
    for path in paths:
        for line in Path(path).read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            record = json.loads(line)
            key = (int(record["step"]), int(record.get("epoch", 0)), int(record.get("batch_idx", 0)))
            if previous is not None and key <= previous:  # a resumed run: drop what it redoes
                merged = [r for r in merged if r["step"] < key[0]]
            merged.append(record)
            previous = key
    return merged


@dataclass
class Run:
    """What :func:`run_command` saw.

    Attributes:
        command: The command.
        returncode: Its exit status; negative for a signal (``-9``: ``SIGKILL``).
        stdout: What it printed.
        stderr: What it printed on the error stream.
        timed_out: Whether it was stopped at the timeout.
        leftovers: Processes of its group still running after it ended (they were killed).
    """

    command: list[str]
    returncode: int
    stdout: str
    stderr: str
    timed_out: bool = False
    leftovers: int = 0

    @property
    def killed(self) -> bool:
        """Whether the process died of ``SIGKILL`` (a kill point, not the timeout)."""
        return self.returncode == -signal.SIGKILL and not self.timed_out

    def check(self) -> Run:
        """Raise ``AssertionError`` with the end of its error stream unless it exited with 0."""
        if self.returncode != 0 or self.timed_out:
            raise AssertionError(self.describe("failed"))
        return self

    def describe(self, what: str) -> str:
        """A message with the command, the status and the end of both streams."""
        status = "timed out" if self.timed_out else f"exit status {self.returncode}"
        return (
            f"{' '.join(self.command)} {what} ({status}).\n--- stdout (end) ---\n{self.stdout[-2000:]}"
            f"\n--- stderr (end) ---\n{self.stderr[-4000:]}"
        )


def run_command(
    command: Sequence[str],
    env: Mapping[str, str] | None = None,
    cwd: str | Path | None = None,
    timeout: float = 600,
) -> Run:
    """Run ``command`` in a new process group; afterwards kill whatever of the group still runs.

    The group holds the processes the command starts (e.g. the other ranks Lightning launches), so a
    rank left waiting for a killed peer is ended too: a test can never hang longer than ``timeout``.

    Args:
        command: The program and its arguments (``[sys.executable, "script.py", ...]``).
        env: Variables added to this process's environment, without its distributed settings.
        cwd: The working folder.
        timeout: Seconds before the whole group is killed (``Run.timed_out``).
    """
    from lightning_lisa.testing.processes import subprocess_env

    full_env = subprocess_env(**dict(env or {}))
    process = subprocess.Popen(
        list(command),
        cwd=cwd,
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    timed_out = False
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        _kill_group(process.pid)
        stdout, stderr = process.communicate()
    leftovers = _kill_group(process.pid)
    return Run(list(command), process.returncode, stdout, stderr, timed_out, leftovers)


def _kill_group(pgid: int) -> int:
    """Send ``SIGKILL`` to the process group ``pgid``; 1 when something of it still ran, else 0."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        return 0
    except PermissionError:  # pragma: no cover - a reused group id of another user
        return 0
    return 1


@dataclass
class KillResume:
    """The interrupted run and the resumed run of :func:`kill_and_resume`."""

    interrupted: Run
    resumed: Run
    point: KillPoint
    extra: dict[str, Any] = field(default_factory=dict)


def kill_and_resume(
    command: Sequence[str],
    at: KillPoint | str,
    resume_command: Sequence[str] | None = None,
    env: Mapping[str, str] | None = None,
    cwd: str | Path | None = None,
    timeout: float = 600,
) -> KillResume:
    """Run ``command`` with the kill point ``at``, check that it died of it, then run ``resume_command``.

    Args:
        command: The training command; it must contain a :class:`KillSwitch` among its callbacks.
        at: The kill point (:class:`KillPoint` or its text), passed in :data:`KILL_ENV`.
        resume_command: The command that resumes (e.g. with ``ckpt_path="last"``); ``None``: ``command``.
        env: Variables for both runs (e.g. :data:`BATCH_LOG_ENV`, which may differ per run: use
            :func:`run_command` directly for that).
        cwd: The working folder of both.
        timeout: Seconds each run may take before its process group is killed.

    Raises:
        AssertionError: When the kill point was never reached (the :class:`KillSwitch` left no marker), the
            first run ended with status 0 or at the timeout, or the resumed run failed.
    """
    point = KillPoint.parse(at) if isinstance(at, str) else at
    with tempfile.TemporaryDirectory() as folder:
        marker = Path(folder) / "killed"
        first = run_command(command, {**dict(env or {}), **point.env(), KILL_MARKER_ENV: str(marker)}, cwd, timeout)
        reached = marker.read_text(encoding="utf-8") if marker.exists() else ""
    if not reached:
        raise AssertionError(first.describe(f"never reached the kill point {point}"))
    if first.returncode == 0 or first.timed_out:
        raise AssertionError(first.describe(f"did not end as it should after the kill at {point}"))
    second = run_command(resume_command if resume_command is not None else command, env, cwd, timeout)
    second.check()
    return KillResume(first, second, point, {"killed": reached.splitlines()})


@dataclass
class TrainingState:
    """What a Lightning checkpoint holds for training, loaded on the CPU.

    Attributes:
        path: The file.
        global_step: Optimizer steps taken.
        weights: The ``state_dict``.
        optimizers: ``optimizer_states`` (per optimizer: ``state`` and ``param_groups``).
        schedulers: ``lr_schedulers``.
        lisa: LISA's schedule (``callbacks["LISA"]``), or ``None``.
    """

    path: Path
    global_step: int
    weights: dict[str, torch.Tensor]
    optimizers: list[dict[str, Any]]
    schedulers: list[dict[str, Any]]
    lisa: dict[str, Any] | None


def load_training_state(path: str | Path) -> TrainingState:
    """Read the training state of the Lightning checkpoint file ``path`` (weights, optimizer, schedule)."""
    path = Path(path)
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    return TrainingState(
        path=path,
        global_step=int(checkpoint["global_step"]),
        weights=dict(checkpoint["state_dict"]),
        optimizers=list(checkpoint.get("optimizer_states", [])),
        schedulers=list(checkpoint.get("lr_schedulers", [])),
        lisa=checkpoint.get("callbacks", {}).get("LISA"),
    )


def training_state_differences(a: TrainingState, b: TrainingState) -> list[str]:
    """Where ``a`` and ``b`` differ: steps, weights, optimizer state and groups, schedulers, LISA's schedule.

    Tensors must be equal bit for bit (dtype, shape and values).
    """
    found: list[str] = []
    if a.global_step != b.global_step:
        found.append(f"global_step: {a.global_step} != {b.global_step}")
    _compare(a.weights, b.weights, "state_dict", found)
    _compare(a.optimizers, b.optimizers, "optimizer_states", found)
    _compare(a.schedulers, b.schedulers, "lr_schedulers", found)
    _compare(a.lisa, b.lisa, "LISA", found)
    return found


def assert_same_training_state(a: TrainingState | str | Path, b: TrainingState | str | Path) -> None:
    """Raise ``AssertionError`` listing the differences unless ``a`` and ``b`` hold the same training state."""
    first = a if isinstance(a, TrainingState) else load_training_state(a)
    second = b if isinstance(b, TrainingState) else load_training_state(b)
    found = training_state_differences(first, second)
    if found:
        shown = "\n  ".join(found[:20]) + (f"\n  ... and {len(found) - 20} more" if len(found) > 20 else "")
        raise AssertionError(f"{first.path} and {second.path} differ:\n  {shown}")


def _compare(a: Any, b: Any, where: str, found: list[str]) -> None:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        same = (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and torch.equal(a, b)
        )
        if not same:
            found.append(f"{where}: tensors differ" + _max_diff(a, b))
    elif isinstance(a, Mapping) and isinstance(b, Mapping):
        if set(a) != set(b):
            found.append(f"{where}: keys {sorted(map(str, set(a) ^ set(b)))[:8]} in one only")
        for key in a:
            if key in b:
                _compare(a[key], b[key], f"{where}.{key}", found)
    elif isinstance(a, list | tuple) and isinstance(b, list | tuple):
        if len(a) != len(b):
            found.append(f"{where}: {len(a)} != {len(b)} entries")
        for i, (x, y) in enumerate(zip(a, b, strict=False)):
            _compare(x, y, f"{where}[{i}]", found)
    elif a != b:
        found.append(f"{where}: {a!r} != {b!r}"[:300])


def _max_diff(a: Any, b: Any) -> str:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape:
        return f" (max abs difference {(a.double() - b.double()).abs().max().item():.3g})"
    return ""


def checkpoint_bytes(path: str | Path) -> bytes:
    """The bytes of a checkpoint file, or of every file of a checkpoint folder (by name): to prove it unchanged."""
    path = Path(path)
    if path.is_file():
        return path.read_bytes()
    buffer = io.BytesIO()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        buffer.write(str(file.relative_to(path)).encode() + b"\0" + file.read_bytes())
    return buffer.getvalue()
