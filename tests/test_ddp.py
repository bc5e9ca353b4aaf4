"""LISA under DDP: 2 CPU processes over gloo train the same blocks and end with the same weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lightning_lisa.testing import block_of, run_script

HERE = Path(__file__).resolve().parent
ALWAYS = {"model.model.embed_tokens.weight", "model.lm_head.weight"}


def launch(out: Path, *args: str) -> None:
    """Run ddp_run.py with ``args`` in ``out``; it starts the second process itself."""
    result = run_script(HERE / "ddp_run.py", out, *args)
    assert result.returncode == 0, result.stderr[-3000:]


def run_ddp(out: Path, strategy: str, hook: bool) -> list[dict]:
    launch(out, strategy, "hook" if hook else "no-hook")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.fixture(scope="module")
def with_hook(tmp_path_factory) -> list[dict]:
    return run_ddp(tmp_path_factory.mktemp("ddp") / "hook", "ddp_find_unused_parameters_true", hook=True)


@pytest.fixture(scope="module")
def without_hook(tmp_path_factory) -> list[dict]:
    return run_ddp(tmp_path_factory.mktemp("ddp") / "plain", "ddp_find_unused_parameters_true", hook=False)


@pytest.mark.parametrize("run", ["with_hook", "without_hook"])
def test_ddp_ranks_agree_and_train_only_sampled_blocks(run: str, request):
    ranks = request.getfixturevalue(run)
    zero, one = ranks
    # LISA refuses DDP without find_unused_parameters=True (test_errors); without it the 2nd batch would fail
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


def test_hook_all_reduces_only_trainable_gradients(with_hook, without_hook):
    zero = with_hook[0]
    assert zero["hook_installed"]
    assert not without_hook[0]["hook_installed"]
    assert len(zero["reduced"]) == 9
    for reduced, buckets, trainable in zip(zero["reduced"], zero["buckets"], zero["trainable"], strict=True):
        assert reduced == trainable  # exactly the trainable parameters' elements
        assert buckets == zero["total"]  # what the default hook would have sent
    # and training is unchanged by it: same weights as plain DDP
    for name, value in zero["weights"].items():
        assert value == pytest.approx(without_hook[0]["weights"][name], rel=1e-6, abs=1e-9), name


@pytest.mark.parametrize("mode", ["drop", "offload"])
def test_resume_under_ddp_matches_uninterrupted_run(tmp_path: Path, mode: str):
    """Stop after 2 of 4 epochs (step 6, mid-period 4..7), save, resume: the same weights and schedule."""
    out = tmp_path / "resume"
    launch(out, "resume", mode)
    zero, one = (json.loads((out / f"resume-{mode}-rank{r}.json").read_text()) for r in range(2))
    for run in ("reference", "first", "resumed"):  # the two ranks agree in every run
        for key in ("history", "global_step", "digest", "state_names"):
            assert zero[run][key] == one[run][key], (run, key)
        for gathered in zero[run]["gathered"]:
            assert gathered[0] == gathered[1], run
    for rank in (zero, one):
        reference, first, resumed = rank["reference"], rank["first"], rank["resumed"]
        assert reference["global_step"] == resumed["global_step"] == 12
        assert first["global_step"] == 6
        # periods start at steps 0, 4, 8 and block 2 trains in periods 0 and 2: "offload" must carry its state
        assert [h[0] for h in reference["history"]] == [0, 4, 8]
        assert 2 in reference["history"][0][1:] and 2 in reference["history"][2][1:]
        assert 2 not in reference["history"][1][1:]
        assert first["history"] == reference["history"][:2]
        assert resumed["history"] == reference["history"]
        assert resumed["gathered"] == reference["gathered"][6:]  # the blocks of every resumed step
        assert resumed["state_names"] == reference["state_names"]
        assert resumed["identical"], {n: d for n, d in resumed["max_abs_diff"].items() if d}
        assert resumed["digest"] == reference["digest"]
        assert not first["identical"]  # the comparison is not vacuous
