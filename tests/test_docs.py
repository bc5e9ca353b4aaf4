"""Every ```python block of the docs and the README runs, so the docs cannot drift from the code."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [*sorted((ROOT / "docs").rglob("*.md")), ROOT / "README.md"]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)

# The README's usage example stands for a user's project: give it a tiny module and data to train.
README_PRELUDE = textwrap.dedent(
    """
    from lightning_lisa.testing import CausalLM, token_loader
    module, train_dataloader = CausalLM(), token_loader(n_batches=4)
    """
)


def python_blocks(page: Path) -> list[str]:
    return BLOCK.findall(page.read_text())


@pytest.mark.parametrize("page", [p for p in PAGES if python_blocks(p)], ids=lambda p: str(p.relative_to(ROOT)))
def test_code_blocks_run(page: Path, tmp_path: Path):
    # the blocks of a page run in order, in one process, as a reader would paste them
    code = "\n\n".join(python_blocks(page))
    if page.name == "README.md":
        code = README_PRELUDE + code.replace("max_steps=100", "max_steps=4, accelerator='cpu', logger=False")
    script = tmp_path / "page.py"
    script.write_text("import warnings\nwarnings.filterwarnings('ignore')\n" + code)
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]


def test_docs_build_strict(tmp_path: Path):
    mkdocs = Path(sys.executable).with_name("mkdocs")  # installed with the "dev" and "docs" extras
    result = subprocess.run(
        [str(mkdocs), "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
