"""LISA under FSDP2: ModelParallelStrategy with one ``fully_shard`` unit per block, 2 CPU processes over gloo.

Each scenario runs tests/fsdp2_run.py in a subprocess (Lightning launches the second rank); each rank
writes what it saw.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from lightning_lisa.testing import block_of, run_script


def _fsdp2_available() -> bool:
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        return False
    try:
        from lightning.pytorch.strategies import ModelParallelStrategy  # noqa: F401
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard  # noqa: F401
    except ImportError:
        return False
    return True


pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not _fsdp2_available(), reason="needs torch.distributed with gloo and FSDP2 (fully_shard)"),
]

HERE = Path(__file__).resolve().parent
ALWAYS = {"model.model.embed_tokens.weight", "model.lm_head.weight"}


def run(out: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_script(HERE / "fsdp2_run.py", out, *args)


def ranks(out: Path, name: str) -> list[dict]:
    return [json.loads((out / f"{name}-rank{r}.json").read_text()) for r in range(2)]


def train(tmp_path_factory, precision: str, sampling: str) -> list[dict]:
    out = tmp_path_factory.mktemp("fsdp2") / precision
    result = run(out, "train", precision, sampling, "lazy")
    assert result.returncode == 0, result.stderr[-3000:]
    return ranks(out, "train")


@pytest.fixture(scope="module")
def fp32(tmp_path_factory) -> list[dict]:
    return train(tmp_path_factory, "fp32", "uniform")


@pytest.fixture(scope="module")
def bf16(tmp_path_factory) -> list[dict]:
    return train(tmp_path_factory, "bf16", "weight_norm")


def expected_trainable(weights: dict, active: list[int]) -> set[str]:
    return {n for n in weights if block_of(n) in active or n in ALWAYS}


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_ranks_agree_and_only_sampled_blocks_train(precision: str, request):
    zero, one = request.getfixturevalue(precision)
    assert zero["param_type"] == "DTensor"
    assert zero["local_shape"] == [8, 16]  # q_proj (16 x 16) sharded over 2 ranks
    assert zero["global_shape"] == [16, 16]
    assert zero["history"] == one["history"]
    assert len(zero["history"]) == 3
    assert zero["weights"] == one["weights"]  # the gathered weights, bit for bit
    assert zero["all_trainable_after_fit"]
    for rank in (zero, one):
        assert len(rank["steps"]) == 9
        for step in rank["steps"]:
            expected = expected_trainable(rank["weights"], step["active"])
            assert set(step["trainable"]) == expected
            assert set(step["changed"]) == expected  # on this rank's shards
            assert set(step["with_state"]) == expected  # the state of frozen blocks was freed
    trained = {i for h in zero["history"] for i in h}
    never = {n for n in zero["weights"] if block_of(n) is not None and block_of(n) not in trained}
    assert never
    assert set(zero["unchanged"]) == never | {"model.model.norm.weight"}  # bit-identical after 9 steps


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_only_trainable_gradients_are_reduce_scattered(precision: str, request):
    zero, _ = request.getfixturevalue(precision)
    assert zero["reduce_dtypes"] == ["torch.float32"]  # reduce_dtype=float32 also under bf16
    for step in zero["steps"]:
        assert step["rs_calls"] == len(step["active"]) + 1  # one unit per sampled block + the root
        assert step["rs_elements"] == step["trainable_numel"]  # nothing of the frozen blocks


def test_optimizer_state_bytes_count_the_local_shard(fp32):
    for rank in fp32:
        for step in rank["steps"]:
            assert step["dtensor_state"] == 2 * len(step["with_state"])  # exp_avg, exp_avg_sq; step is a plain tensor
            # each rank holds half of the moments, plus one 4-byte step counter per parameter
            local = step["trainable_numel"] // 2 * 2 * 4 + 4 * len(step["with_state"])
            assert step["state_local_bytes"] == local
            assert step["state_bytes"] == local  # lightning_lisa's count
            assert step["state_global_bytes"] > local  # what DTensor.numel() would give
        # right after a switch: the state of the always-active params and of the blocks that stay active
        history = rank["history"]
        for before, after, switch_bytes in zip(history[:-1], history[1:], rank["switch_bytes"][1:], strict=True):
            kept = len(set(before) & set(after))
            assert switch_bytes == (2048 + 2336 * kept) // 2 * 2 * 4 + 4 * (2 + 9 * kept)


def test_mixed_precision_needs_lazy_init_before_the_first_freeze(tmp_path):
    result = run(tmp_path / "nolazy", "train", "bf16", "uniform", "nolazy")
    assert result.returncode != 0, "FSDP2 no longer needs the forced lazy initialization; LISA may drop it"
    zero = json.loads((tmp_path / "nolazy" / "train-rank0.json").read_text())
    assert "attempting to assign a gradient with dtype 'c10::BFloat16'" in zero["error"]
    assert len(zero["steps"]) == 3  # it fails at the first step with a block that was frozen at the first forward


@pytest.mark.parametrize(
    ("mode", "checkpointing"),
    [("drop", False), ("keep", True)],  # activation checkpointing: names in checkpoints lack the wrapper's
)
def test_resume_matches_uninterrupted_run(tmp_path, mode: str, checkpointing: bool):
    out = tmp_path / "resume"
    result = run(out, "resume", mode, "ac" if checkpointing else "no-ac")
    assert result.returncode == 0, result.stderr[-3000:]
    zero, one = ranks(out, f"resume-{mode}")
    kinds = ["sharded"] if checkpointing else ["sharded", "full"]
    for rank in (zero, one):
        reference = rank["reference"]
        assert reference["global_step"] == 12
        assert not rank["first"]["identical"]  # the comparison is not vacuous
        assert len(rank["first_state_names"]) < 57  # state for some blocks only
        assert sorted(rank["resumed"]) == sorted(kinds)
        for kind in kinds:
            assert rank["saved"][kind] == rank["first_state_names"], kind
            resumed = rank["resumed"][kind]
            assert resumed["history"] == reference["history"], kind
            assert resumed["state_names"] == reference["state_names"], kind
            assert resumed["identical"], (kind, resumed["max_abs_diff"])
    # Lightning's own loading refuses optimizer state for only some parameters, for both kinds of checkpoint
    sharded = (out / "plain-sharded-rank0.txt").read_text()
    assert "Missing key in checkpoint state_dict: optimizer_0.state." in sharded
    if not checkpointing:
        full = (out / "plain-full-rank0.txt").read_text()
        assert "Missing optimizer state for parameter" in full
