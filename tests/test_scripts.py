"""The demo, the examples and the benchmarks run end to end at tiny scale, and report what they claim."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from cli_args import run_cli, tiny

from lightning_lisa.testing import subprocess_env

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str, cwd: Path, env: dict[str, str] | None = None) -> str:
    env = env if env is not None else subprocess_env()
    result = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, check=False, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def run_benchmark(script: str, tmp_path: Path, *args: str) -> dict[str, Any]:
    """Run ``benchmarks/<script>`` with ``args`` and ``--json``; return the figures it wrote."""
    results = tmp_path / "results.json"
    run(str(ROOT / "benchmarks" / script), *args, "--json", str(results), cwd=tmp_path)
    figures: dict[str, Any] = json.loads(results.read_text())
    return figures


def test_demo_config_prints_what_lisa_did(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys):
    """The random-weight demo config (tiny_random.yaml) at tiny scale: a tiny model and 12 steps."""
    monkeypatch.chdir(tmp_path)  # the demo writes to ./demo_output
    monkeypatch.setattr(sys, "argv", sys.argv[:1])
    config = ROOT / "examples" / "configs" / "tiny_random.yaml"
    args = ["fit", "--config", str(config), *tiny(tmp_path, tmp_path, steps=12)]
    args.append("--lisa.interval=4")
    out = run_cli(args, capsys, periods=3)
    assert "optimizer state, full fine-tuning (measured)" in out
    ratio = float(out.split("ratio: ")[1].split("x")[0])
    assert 0 < ratio < 1
    assert (tmp_path / "demo_output" / "hf_model" / "config.json").is_file()
    assert "Hugging Face model: demo_output/hf_model" in out
    assert "weight-norm plots: " in out


def test_add_to_existing_module_example(tmp_path: Path):
    env = subprocess_env(LIGHTNING_LISA_CACHE=str(tmp_path), OMP_NUM_THREADS="1")
    out = run(
        str(ROOT / "examples" / "add_to_existing_module.py"),
        "--steps=4", "--layers=3", "--hidden-size=16", "--max-examples=3", "--output", str(tmp_path),
        cwd=tmp_path, env=env,
    )  # fmt: skip
    assert out.count("period ") == 1 and "trained blocks [" in out


def test_optimizer_state_benchmark_smoke(tmp_path: Path):
    figures = run_benchmark("optimizer_state.py", tmp_path, "--shape=tiny", "--steps=15", "--interval=3")
    arms = {a["name"]: a for a in figures["arms"]}
    full, drop, keep = arms["full fine-tuning"], arms["LISA drop"], arms["LISA keep"]
    for state, minimum in zip(drop["optimizer_state"], drop["analytic_minimum"], strict=True):
        assert abs(state / minimum - 1) < 0.01
    assert max(drop["optimizer_state"]) < max(keep["optimizer_state"]) <= max(full["optimizer_state"])
    assert keep["optimizer_state"][-1] > keep["optimizer_state"][0]
    assert max(drop["training_state"]) < 0.7 * max(full["training_state"])


def test_ddp_communication_benchmark_smoke(tmp_path: Path):
    figures = run_benchmark("ddp_communication.py", tmp_path, "--shape=tiny", "--steps=4", "--interval=2")
    total = figures["total"]
    assert all(sent == total for sent in figures["default"]["sent"])
    for sent, active in zip(figures["hook"]["sent"], figures["hook"]["trainable"], strict=True):
        assert sent <= 1.25 * active
        assert sent < 0.6 * total
