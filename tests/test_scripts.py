"""The demo and the benchmarks run end to end at tiny scale, and report what they claim."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str, cwd: Path) -> str:
    result = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_demo_prints_what_lisa_did(tmp_path: Path):
    out = run(
        str(ROOT / "examples" / "demo.py"),
        "--steps=12", "--layers=4", "--interval=4", "--output", str(tmp_path),
        cwd=tmp_path,
    )  # fmt: skip
    assert "validation loss:" in out
    assert out.count("  period ") == 3
    assert "optimizer state, full fine-tuning (measured)" in out
    ratio = float(out.split("ratio: ")[1].split("x")[0])
    assert 0 < ratio < 1


def test_optimizer_state_benchmark_smoke(tmp_path: Path):
    results = tmp_path / "bytes.json"
    run(
        str(ROOT / "benchmarks" / "optimizer_state.py"),
        "--shape=tiny", "--steps=15", "--interval=3", "--json", str(results),
        cwd=tmp_path,
    )  # fmt: skip
    arms = {a["name"]: a for a in json.loads(results.read_text())["arms"]}
    full, drop, keep = arms["full fine-tuning"], arms["LISA drop"], arms["LISA keep"]
    for state, minimum in zip(drop["optimizer_state"], drop["analytic_minimum"], strict=True):
        assert abs(state / minimum - 1) < 0.01
    assert max(drop["optimizer_state"]) < max(keep["optimizer_state"]) <= max(full["optimizer_state"])
    assert keep["optimizer_state"][-1] > keep["optimizer_state"][0]
    assert max(drop["training_state"]) < 0.7 * max(full["training_state"])


def test_ddp_communication_benchmark_smoke(tmp_path: Path):
    results = tmp_path / "ddp.json"
    run(
        str(ROOT / "benchmarks" / "ddp_communication.py"),
        "--shape=tiny", "--steps=4", "--interval=2", "--json", str(results),
        cwd=tmp_path,
    )  # fmt: skip
    figures = json.loads(results.read_text())
    total = figures["total"]
    assert all(sent == total for sent in figures["default"]["sent"])
    for sent, active in zip(figures["hook"]["sent"], figures["hook"]["trainable"], strict=True):
        assert sent <= 1.25 * active
        assert sent < 0.6 * total
