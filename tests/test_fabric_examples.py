"""The Fabric examples run end to end: the plain Fabric loop resumes exactly, the litgpt loop trains with LISA."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lightning_lisa.testing import subprocess_env

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run(script: str, cwd: Path, *args: str) -> str:
    command = [sys.executable, str(EXAMPLES / script), *args]
    result = subprocess.run(command, cwd=cwd, env=subprocess_env(), capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result.stdout


def test_fabric_example_saves_resumes_and_matches_an_uninterrupted_run(tmp_path: Path):
    out = run("fabric_finetune.py", tmp_path, "--steps", "8", "--out", str(tmp_path / "ckpt"))
    assert "uninterrupted run: same schedule True, same weights True" in out
    assert (tmp_path / "ckpt" / "lisa-fabric.ckpt").is_file()


def test_litgpt_example_smoke(tmp_path: Path):
    pytest.importorskip("litgpt")
    figures_path = tmp_path / "figures.json"
    run("litgpt_finetune.py", tmp_path, "--smoke", "--json", str(figures_path))
    figures = json.loads(figures_path.read_text())
    assert figures["blocks"] == "transformer.h"
    assert figures["always_active"] == ["transformer.wte", "lm_head"]
    assert len(figures["history"]) == 4  # 8 steps, re-sampled every 2
    assert all(len(h) == 3 for h in figures["history"])  # the step and 2 blocks
    assert figures["after"]["val_loss"] < figures["before"]["val_loss"]
    assert Path(figures["checkpoint"]).is_file()
