"""The memory/speed benchmarks run end to end at tiny scale and write what they claim."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str, cwd: Path) -> str:
    result = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_memory_speed_smoke(tmp_path: Path):
    results = tmp_path / "memory_speed.json"
    out = run(
        str(ROOT / "benchmarks" / "memory_speed.py"),
        "--shape=tiny", "--steps=4", "--warmup=2", "--interval=2", "--threads=1", "--json", str(results),
        cwd=tmp_path,
    )  # fmt: skip
    assert "goals:" in out
    payload = json.loads(results.read_text())
    arms = {a["key"]: a for a in payload["arms"]}
    assert set(arms) == {
        "full", "lora16", "lora128", "lisa-drop", "lisa-offload", "lisa-keep", "lisa-8bit", "lisa-frozen-eh",
        "lisa-sib", "lisa-compact", "lisa-factored", "lisa-sib-compact",
    }  # fmt: skip
    assert all(a["status"] == "ok" for a in arms.values())
    full, drop, keep = arms["full"], arms["lisa-drop"], arms["lisa-keep"]
    state = "optimizer_state_bytes"
    assert drop[state] < keep[state] <= full[state]
    assert arms["lisa-8bit"][state] < drop[state]
    assert arms["lora16"]["trainable_params"] < drop["trainable_params"] < full["trainable_params"]
    assert arms["lisa-frozen-eh"]["trainable_params"] < drop["trainable_params"]
    assert drop["training_state_bytes"] < full["training_state_bytes"]
    # the memory options: one gradient at a time, compact moments for the embeddings and head, both
    train = "training_state_bytes"
    assert arms["lisa-sib"][train] < drop[train] and arms["lisa-sib"][state] == drop[state]
    assert arms["lisa-factored"][state] < arms["lisa-compact"][state] < drop[state]
    assert arms["lisa-sib-compact"][train] < min(arms["lisa-sib"][train], arms["lisa-compact"][train])
    for arm in arms.values():
        assert arm["median_step_seconds"] > 0 and arm["tokens_per_second"] > 0
        assert len(arm["step_seconds"]) == 6
        if arm["estimate"] is not None:  # the estimate's exact part is exact, its activations close
            if "compact" in arm["key"]:  # the estimate counts bitsandbytes' 8-bit layout, within 1% of ours
                assert abs(arm["estimate"]["training_state"] / arm["training_state_bytes"] - 1) < 0.01
            else:
                assert arm["estimate"]["training_state"] == arm["training_state_bytes"], arm["key"]
            assert abs(arm["estimate"]["activations"] / arm["activation_bytes"] - 1) < 0.1, arm["key"]
        if arm["key"].startswith("lisa"):
            assert len(arm["switch_seconds"]) == 2  # periods 1 and 2 of steps 0..5 with K=2
            assert math.isfinite(arm["switch_overhead_pct"]) and arm["switch_overhead_pct"] >= 0
    assert payload["goals"]["lisa_drop_training_state_vs_full"] < 1


def test_memory_speed_refuses_a_model_too_big_for_the_cpu(tmp_path: Path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "memory_speed.py"), "--shape=llama-3-8b", "--steps=1"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2
    assert "refused: --shape=llama-3-8b on CPU needs about" in result.stderr
    assert "--device=cuda" in result.stderr


def test_figures_are_drawn_from_the_committed_gpu_results(tmp_path: Path):
    gpu = ROOT / "benchmarks" / "results" / "gpu_h100"
    memory_png = tmp_path / "memory.png"
    run(
        str(ROOT / "benchmarks" / "plot_results.py"),
        "--memory", str(gpu / "tinyllama-1.1b.json"), str(gpu / "llama-2-7b_all_arms.json"),
        "--memory-out", str(memory_png),
        cwd=tmp_path,
    )  # fmt: skip
    assert memory_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_memory_speed_report_merges_saved_runs(tmp_path: Path):
    gpu = ROOT / "benchmarks" / "results" / "gpu_h100"
    merged = tmp_path / "merged.json"
    out = run(
        str(ROOT / "benchmarks" / "memory_speed.py"),
        "--report", str(gpu / "llama-2-7b.json"), str(gpu / "llama-2-7b_frozen-eh.json"), "--json", str(merged),
        cwd=tmp_path,
    )  # fmt: skip
    payload = json.loads(merged.read_text())
    keys = [a["key"] for a in payload["arms"]]
    assert keys == ["full", "lora16", "lisa-drop", "lisa-offload", "lisa-8bit", "lisa-frozen-eh"]
    drop, lora = (next(a for a in payload["arms"] if a["key"] == k) for k in ("lisa-drop", "lora16"))
    assert payload["goals"]["lisa_drop_peak_vs_lora16"] == drop["arm_peak_bytes"] / lora["arm_peak_bytes"]
    assert "LISA frozen E+H" in out and "lisa_drop_peak_vs_lora16" in out
    # runs with other settings are not merged
    other = json.loads((gpu / "tinyllama-1.1b.json").read_text())
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "memory_speed.py"), "--report", str(gpu / "llama-2-7b.json"),
         str(gpu / "tinyllama-1.1b.json")],
        cwd=tmp_path, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode != 0 and "differs from" in result.stderr and other["args"]["shape"] == "tinyllama-1.1b"


def test_fsdp_check_runs_its_checks_under_fsdp2_on_cpu(tmp_path: Path):
    # benchmarks/gpu/fsdp1_check.py needs CUDA for FSDP1; its checks run here under FSDP2, so they cannot rot.
    # One of each kind (training, the Trainer's resume, Fabric's resume), sharded where it has the choice: the
    # others run the same functions with another flag, and tests/test_fsdp2.py covers them under FSDP2.
    script = ROOT / "benchmarks" / "gpu" / "fsdp1_check.py"
    kinds = "train_fp32,resume_sharded,fabric_resume_sharded"
    out = run(str(script), "--out", str(tmp_path), "--strategy", "fsdp2", "--accelerator", "cpu", "--checks", kinds,
              cwd=tmp_path)  # fmt: skip
    report = json.loads((tmp_path / "fsdp1_check_fsdp2.json").read_text())
    assert list(report["checks"]) == kinds.split(",")
    assert all(check["passed"] for check in report["checks"].values()), out
    train = report["checks"]["train_fp32"]
    assert train["steps"] == 12 and len(train["switches"]) == 4  # K=3: periods at steps 0, 3, 6, 9
    assert report["checks"]["resume_sharded"]["bit_identical"]
    assert report["checks"]["fabric_resume_sharded"]["bit_identical"]  # lisa.save + lisa.load under Fabric
    wrong = subprocess.run([sys.executable, str(script), "--out", str(tmp_path), "--strategy", "fsdp2",
                            "--accelerator", "cpu", "--checks", "train_fp32,train_fp64"],
                           cwd=tmp_path, capture_output=True, text=True, check=False)  # fmt: skip
    assert wrong.returncode == 2 and "--checks='train_fp32,train_fp64'" in wrong.stderr and "train_bf16" in wrong.stderr
