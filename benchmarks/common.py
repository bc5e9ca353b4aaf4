"""What the benchmark scripts share: quiet logs, the header of their output, versions, and saving results."""

from __future__ import annotations

import importlib.metadata as md
import json
import logging
import os
import platform
import sys
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

#: Loggers silenced by :func:`quiet_logs` (besides those named by the caller).
LOGGERS = ("lightning.pytorch", "lightning.fabric", "lightning_lisa", "transformers", "peft")


def versions(*packages: str) -> dict[str, str]:
    """Python's version, each package's installed version, and lightning-lisa's (installed or from this tree)."""
    found = {"python": platform.python_version()}
    for package in packages:
        try:
            found[package] = md.version(package)
        except md.PackageNotFoundError:
            found[package] = "not installed"
    import lightning_lisa

    try:
        found["lightning-lisa"] = md.version("lightning-lisa")
    except md.PackageNotFoundError:
        found["lightning-lisa"] = f"{lightning_lisa.__version__} (source tree)"
    return found


def quiet_logs(*loggers: str, ignore: tuple[str, ...] = ()) -> None:
    """Silence Lightning's data-loader hints, torch's pytree deprecation, and the libraries' info logs.

    Args:
        loggers: More loggers to set to ``ERROR``, besides :data:`LOGGERS`.
        ignore: More warning messages (regular expressions) to ignore.
    """
    hints = (".*does not have many workers.*", ".*but have no `val_dataloader`.*", ".*LeafSpec.*is deprecated.*")
    for message in (*hints, *ignore):
        warnings.filterwarnings("ignore", message)
    for name in (*LOGGERS, *loggers):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        return
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def prepare(threads: int, *loggers: str, ignore: tuple[str, ...] = ()) -> None:
    """What a script does before it measures: set torch's CPU threads (``0`` keeps torch's default), quiet the logs.

    Args:
        threads: ``torch.set_num_threads`` when above 0.
        loggers: More loggers to quiet (see :func:`quiet_logs`).
        ignore: More warning messages to ignore.
    """
    import torch

    if threads > 0:
        torch.set_num_threads(threads)
    quiet_logs(*loggers, ignore=ignore)


def print_header(machine: str, found_versions: dict[str, str]) -> datetime:
    """Print the command line, the date, the machine and the versions; return the start time (UTC)."""
    started = datetime.now(timezone.utc)
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    print(f"date: {started.isoformat(timespec='seconds')}")
    print(f"machine: {machine}")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in found_versions.items()))
    return started


def save_json(path: str | Path, payload: dict[str, Any], compact: bool = False) -> None:
    """Write ``payload`` to ``path`` through a temporary file: a run cut short never leaves half a file.

    The folder is made if needed; ``compact`` writes no indentation (files with long per-item lists).
    """
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(f"{path}.tmp")
    tmp.write_text(json.dumps(payload, separators=(",", ":")) if compact else json.dumps(payload, indent=1))
    os.replace(tmp, path)


def load_runs(paths: list[str], settings: tuple[str, ...], option: str) -> list[dict[str, Any]]:
    """The saved results of ``paths``, to merge; exit with a message if they differ in one of ``settings``.

    Args:
        paths: JSON files written by the same script.
        settings: Keys of their ``"args"`` that must agree.
        option: The command-line option that merges them, for the message.
    """
    runs = [json.loads(Path(p).read_text()) for p in paths]
    for path, run in zip(paths[1:], runs[1:], strict=True):
        differ = [k for k in settings if run["args"].get(k) != runs[0]["args"].get(k)]
        if differ:
            raise SystemExit(f"{option}: {path} differs from {paths[0]} in {differ}; only runs alike can be merged")
    return runs
