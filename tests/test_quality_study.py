"""The quality study (``benchmarks/quality``) runs end to end at tiny scale and keeps its protocol."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STUDY = ROOT / "benchmarks" / "quality"


def run(*args: str, cwd: Path, ok: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, check=False)
    if ok:
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


def cells(out: Path, task: str, arm: str) -> dict[str, dict]:
    return {p.name: json.loads(p.read_text()) for p in sorted((out / "cells" / task / arm).glob("*.json"))}


def test_study_runs_the_protocol_resumes_and_reports(tmp_path: Path):
    out = tmp_path / "quality"
    common = ["--smoke", "--out", str(out), "--cache-dir", str(tmp_path / "cache")]
    study = [str(STUDY), "--tasks", "reverse", "--arms", "lisa2,fixed2", "--variant-tasks", "", "--seeds", "2"]
    first = run(*study, *common, cwd=tmp_path).stdout
    assert "all cells done" in first

    # --resume skips every finished cell; without it, a folder with results is refused
    again = run(*study, *common, "--resume", cwd=tmp_path).stdout
    assert "start" not in again and "all cells done" in again
    refused = run(*study, *common, cwd=tmp_path, ok=False)
    assert refused.returncode != 0 and "--resume" in refused.stderr

    # the quiet cost script, then the report that joins both
    run(str(STUDY / "cost.py"), *common, "--tasks", "reverse", "--arms", "lisa2,fixed2,full", "--rounds", "1",
        "--steps", "4", "--peak-from", "1", "--peak-to", "3", cwd=tmp_path)  # fmt: skip
    cost = json.loads((out / "cost_smoke.json").read_text())
    rows = cost["tasks"]["reverse"]
    assert set(rows) == {"lisa2", "fixed2", "full"} and "time_regime" in cost and "peak_regime" in cost
    # full fine-tuning with AdamW holds at least the weights, their gradients and two moments at once
    assert rows["full"]["peak_bytes"] >= 4 * rows["full"]["weights_bytes"] > 0
    assert rows["full"]["peak_bytes"] > rows["lisa2"]["peak_bytes"] > rows["lisa2"]["weights_bytes"]
    (out / "cost.json").write_text(json.dumps(cost))
    run(str(STUDY), "report", *common, "--figures", str(tmp_path), cwd=tmp_path)
    summary = json.loads((out / "summary.json").read_text())
    task = summary["tasks"]["reverse"]
    assert task["metric"] == "accuracy" and task["higher_is_better"] is True and "base" in task
    for name in ("lisa2", "fixed2"):
        arm = task["arms"][name]
        for key in ("method", "n_layers", "interval", "rank", "steps", "lr_grid", "val_by_lr", "lr", "seeds",
                    "test", "forgetting", "step_time_s", "peak_bytes"):  # fmt: skip
            assert key in arm, (name, key)
        grid = arm["lr_grid"]
        # at least four rates; extended until the chosen one is strictly inside, or six rates
        assert 4 <= len(grid) <= 6
        assert min(grid) < arm["lr"] < max(grid) or len(grid) == 6
        assert arm["seeds"] == [0, 1] and len(arm["test"]) == len(arm["forgetting"]) == 2
        assert arm["step_time_s"] > 0 and arm["peak_bytes"] > 0
        # the test split is read at the chosen rate only
        for cell in cells(out, "reverse", name).values():
            assert ("test" in cell) == (cell["lr"] == arm["lr"]), (name, cell["lr"])
            assert len(cell["curve"]) == 2 and cell["curve"][-1]["all"]  # 20 steps: a point per period of 10
    # each verdict pairs the arms seed by seed (seed s is the same data order in both)
    (row,) = [v for v in task["verdicts"] if (v["arm"], v["against"]) == ("lisa2", "fixed2")]
    lisa_test, fixed_test = task["arms"]["lisa2"]["test"], task["arms"]["fixed2"]["test"]
    assert row["per_seed"]["seeds"] == [0, 1]
    assert row["per_seed"]["differences"] == [x - y for x, y in zip(lisa_test, fixed_test, strict=True)]
    assert row["per_seed"]["better"] == sum(x > y for x, y in zip(lisa_test, fixed_test, strict=True))
    assert (tmp_path / "quality_vs_memory.png").read_bytes()[:4] == b"\x89PNG"
    assert "lisa2" in (out / "tables.md").read_text() or "LISA" in (out / "tables.md").read_text()

    # every block LISA visited changed, every other block did not; fixed blocks are LISA's first draw
    for cell in cells(out, "reverse", "lisa2").values():
        assert len(cell["periods"]) == 2
        for index, block in cell["blocks"].items():
            visited = any(int(index) in period for period in cell["periods"])
            assert (block["change_norm"] > 0) == visited, (index, block, cell["periods"])
            assert block["periods_active"] == sum(int(index) in period for period in cell["periods"])
    # the finer rate check: seed 0 at the midpoints around each chosen rate, in its own folder
    before = {p: p.read_bytes() for p in (out / "cells").rglob("*.json")}
    finer = out / "finer_grid"
    finer.mkdir()
    earlier = {"tasks": {"reverse": {"fixed2": {"lr": 0.003}}, "facts": {"lisa2": {"lr": 0.002}}}}
    (finer / "summary.json").write_text(json.dumps(earlier))  # what an earlier check of other arms left
    run(str(STUDY / "finer.py"), "--task", "reverse", "--arms", "lisa2", "--study", str(out), "--seeds", "2",
        "--steps", "20", "--smoke", "--cache-dir", str(tmp_path / "cache"), cwd=tmp_path)  # fmt: skip
    assert {p: p.read_bytes() for p in (out / "cells").rglob("*.json")} == before  # the study is not touched
    summary = json.loads((finer / "summary.json").read_text())["tasks"]
    assert summary["facts"] == earlier["tasks"]["facts"] and summary["reverse"]["fixed2"] == {"lr": 0.003}
    checked = summary["reverse"]
    entry, arm = checked["lisa2"], task["arms"]["lisa2"]
    grid = sorted(arm["lr_grid"])
    at = grid.index(arm["lr"])
    assert entry["study_lr"] == arm["lr"] and len(entry["midpoints"]) == len(grid[max(0, at - 1) : at + 2]) - 1
    for mid in entry["midpoints"]:
        assert min(grid) < mid < max(grid) and f"{mid:g}" in entry["val_by_lr"]
        assert cells(finer, "reverse", "lisa2")[f"lr{mid:g}_s0.json"]["val"] == entry["val_by_lr"][f"{mid:g}"]
    best = max(entry["val_by_lr"].values())
    assert entry["val_by_lr"][f"{entry['lr']:g}"] == best
    if entry["lr"] in entry["midpoints"]:  # a midpoint won: its test and the other seed, read there only
        tested = {c["lr"] for c in cells(finer, "reverse", "lisa2").values() if "test" in c}
        assert tested == {entry["lr"]} and len(entry["test"]) == 2 and entry["from"] == "check"
        assert len(entry["forgetting"]) == len(entry["control"]) == 2
    else:
        assert entry["test"] == arm["test"] and entry["from"] == "study"
        assert entry["forgetting"] == pytest.approx(arm["forgetting"]) and entry["control"] == arm["control"]

    # a test whose seed-0 weights are gone retrains the cell, and the validation the rate was chosen on stays
    chosen = task["arms"]["lisa2"]["lr"]
    path = out / "cells" / "reverse" / "lisa2" / f"lr{chosen:g}_s0.json"
    cell = json.loads(path.read_text())
    untested = {k: v for k, v in cell.items() if not k.startswith(("test", "control", "english"))}
    path.write_text(json.dumps({**untested, "val": 12.5}))  # as if another machine had validated differently
    run(str(STUDY), "cell", *common, "--task", "reverse", "--arm", "lisa2", "--lr", repr(chosen), "--seed", "0",
        "--steps", "20", "--test", cwd=tmp_path)  # fmt: skip
    again = json.loads(path.read_text())
    assert again["val"] == 12.5 and again["retrained_for_test"]["val"] == cell["val"]
    assert again["test"] == cell["test"] and again["test_correct"] == cell["test_correct"]

    lisa, fixed = cells(out, "reverse", "lisa2"), cells(out, "reverse", "fixed2")
    for name, cell in fixed.items():
        changed = sorted(int(i) for i, b in cell["blocks"].items() if b["change_norm"] > 0)
        assert len(cell["periods"]) == 1 and changed == cell["periods"][0]
        twin = lisa.get(name)
        if twin is not None:
            assert cell["periods"][0] == twin["periods"][0]


def test_lora_with_embeddings_and_head_trains_the_tied_weight_and_stays_tied(tmp_path: Path):
    # the control arms `lora64-eh*`: LoRA's adapters plus the tied embeddings and head, one tensor, one optimizer
    probe = f"""
import json, sys
sys.path[:0] = [{str(STUDY)!r}, {str(STUDY.parent)!r}]
from arms import ARMS, CORE, VARIANTS
from runner import LM, build_model, make_base
base = make_base(True, __import__("pathlib").Path({str(tmp_path)!r}), "", "cpu", [])
out = {{"control_is_named_only": not {{"lora64-eh", "lora64-eh10", "lora16-eh10"}} & set(CORE + VARIANTS)}}
for name in ("lora64", "lora64-eh", "lora64-eh10", "lora16-eh10"):
    model, _ = build_model(base, ARMS[name], 0)
    inner = model.get_base_model()
    module = LM.from_model(model, steps=1, learning_rate=1e-3, trainable_only=True,
                           always_active_lr_scale=ARMS[name].eh_lr_scale)
    rate = {{id(p): group["lr"] for group in module.make_optimizer().param_groups for p in group["params"]}}
    adapters = {{rate[id(p)] for n, p in inner.named_parameters() if "lora_" in n}}
    out[name] = {{
        "tied": inner.lm_head.weight is inner.model.embed_tokens.weight,
        "embeddings_lr": rate.get(id(inner.model.embed_tokens.weight)),
        "adapters_lr": sorted(adapters),
        "rank": sorted({{p.shape[0] for n, p in inner.named_parameters() if "lora_A" in n}}),
        "blocks_frozen": all(not p.requires_grad for n, p in inner.named_parameters()
                             if ".layers." in n and "lora_" not in n),
    }}
print(json.dumps(out))
"""
    found = json.loads(run("-c", probe, cwd=tmp_path).stdout.strip().splitlines()[-1])
    assert found["control_is_named_only"]
    common = {"tied": True, "adapters_lr": [1e-3], "blocks_frozen": True}
    assert found["lora64"] == {**common, "embeddings_lr": None, "rank": [64]}
    assert found["lora64-eh"] == {**common, "embeddings_lr": 1e-3, "rank": [64]}
    # `lora*-eh10`: the embeddings and head in a parameter group of their own, at 10x the adapters' rate
    assert found["lora64-eh10"] == {**common, "embeddings_lr": 1e-2, "rank": [64]}
    assert found["lora16-eh10"] == {**common, "embeddings_lr": 1e-2, "rank": [16]}
