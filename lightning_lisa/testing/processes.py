"""Run a script in a fresh process (e.g. one that starts distributed ranks), free of this process's settings."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

#: Variables of a distributed run that a child process must not inherit.
DISTRIBUTED_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK")


def subprocess_env(**extra: str) -> dict[str, str]:
    """This process's environment without distributed settings, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in DISTRIBUTED_VARIABLES}
    env.update(extra)
    return env


def free_port() -> int:
    """A TCP port on the loopback interface that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_script(
    script: str | Path, out: Path, *args: str, timeout: float = 600, mkdir: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run ``python script out *args`` in the folder ``out`` and return what it printed.

    Args:
        script: The script's path.
        out: Its working folder (created unless ``mkdir=False``), also passed as its first argument.
        *args: Its other arguments.
        timeout: Seconds before it is stopped.
        mkdir: Create ``out`` first.
    """
    if mkdir:
        out.mkdir(parents=True, exist_ok=True)
    return subprocess.run(
        [sys.executable, str(script), str(out), *args],
        cwd=out,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def end_process_group(timeout: float = 120) -> None:
    """Wait for every rank, then destroy the default process group and its subgroups: call it last in a script.

    Lightning destroys the process group at exit only for NCCL. A gloo group left alive is torn down
    during interpreter finalization, where gloo's worker threads may still hold finished work objects
    with tensors; destroying them then can abort the process (SIGABRT, "terminate called without an
    active exception"), depending on timing, so more often on a loaded machine. Nothing happens when no
    group was initialized.

    Args:
        timeout: Seconds the ranks wait for each other (gloo's monitored barrier names a rank that never
            came) before the group is destroyed anyway.
    """
    import datetime

    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    try:
        if dist.get_backend() == "gloo":
            dist.monitored_barrier(timeout=datetime.timedelta(seconds=timeout))
        else:
            dist.barrier()
    finally:
        dist.destroy_process_group()
