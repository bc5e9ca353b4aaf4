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
