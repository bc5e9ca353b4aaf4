"""LISA under DDP: 2 CPU processes over gloo train the same blocks and end with the same weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from recorder import block_of

HERE = Path(__file__).resolve().parent
ALWAYS = {"model.model.embed_tokens.weight", "model.lm_head.weight"}


@pytest.mark.parametrize("strategy", ["ddp", "ddp_find_unused_parameters_true"])
def test_ddp_ranks_agree_and_train_only_sampled_blocks(tmp_path: Path, strategy: str):
    env = {**os.environ, "PYTHONPATH": str(HERE)}
    result = subprocess.run(
        [sys.executable, str(HERE / "ddp_run.py"), str(tmp_path), strategy],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    zero, one = ranks
    # plain "ddp" gets find_unused_parameters=True from LISA; without it the 2nd batch would fail
    assert zero["find_unused_parameters"] is True
    assert zero["history"] == one["history"]
    assert len(zero["history"]) == 3
    for gathered in zero["gathered"]:
        assert gathered[0] == gathered[1]
    assert zero["weights"] == one["weights"]
    for rank in ranks:
        for step in rank["steps"]:
            expected = {n for n in rank["weights"] if block_of(n) in step["active"] or n in ALWAYS}
            assert set(step["changed"]) == expected
            assert set(step["with_state"]) == expected
    trained = {i for h in zero["history"] for i in h}
    frozen_blocks = {n for n in zero["weights"] if block_of(n) is not None and block_of(n) not in trained}
    assert frozen_blocks <= set(zero["unchanged"])
