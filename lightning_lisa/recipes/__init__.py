"""The command-line application: ``lightning-lisa fit``, a causal-LM module and a text data module.

Needs the ``cli`` extra (``pip install "lightning-lisa[cli]"``): ``jsonargparse``, ``transformers``,
``tokenizers``, ``datasets`` and ``torchdata``. The callback itself needs none of them.
"""

from __future__ import annotations

import importlib.util

#: What the recipes import, by the name ``pip`` installs it under.
REQUIREMENTS: dict[str, str] = {
    "jsonargparse": "jsonargparse[signatures]",
    "transformers": "transformers",
    "datasets": "datasets",
    "torchdata": "torchdata",
}


def cli_main() -> None:
    """Run the ``lightning-lisa`` command, or say which extra to install when its dependencies are missing."""
    missing = [pip for module, pip in REQUIREMENTS.items() if not _importable(module)]
    if missing:
        raise SystemExit(
            f"lightning-lisa: the command line needs {', '.join(missing)}, which are not installed. "
            'Install them with: pip install "lightning-lisa[cli]"'
        )
    from lightning_lisa.recipes.cli import cli_main as run

    run()


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:
        return False
