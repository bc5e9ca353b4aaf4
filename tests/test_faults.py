"""Fault injection: a run killed with SIGKILL at a fixed point and resumed ends as if never interrupted.

Every run is tests/killresume_run.py in a process of its own (a tiny model, LISA with interval 3,
a checkpoint after every optimizer step, 8 steps), driven by the kill-and-resume harness of
:mod:`lightning_lisa.testing.killresume`. The kill points are fixed, so the tests are deterministic;
the soak test (benchmarks/soak.py) draws random ones.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch

from lightning_lisa.testing import (
    assert_same_training_state,
    checkpoint_bytes,
    kill_and_resume,
    load_training_state,
    read_batch_log,
    run_command,
    training_state_differences,
)

HERE = Path(__file__).resolve().parent
SCRIPT = HERE / "killresume_run.py"
STEPS = 8  # interval 3: periods start at steps 0, 3, 6


def command(out: Path, strategy: str = "single", *extra: str) -> list[str]:
    return [sys.executable, str(SCRIPT), str(out), strategy, "--steps", str(STEPS), *extra]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted run on one device: its final checkpoint."""
    out = tmp_path_factory.mktemp("reference")
    run_command(command(out), timeout=300).check()
    return out / "final.ckpt"


@pytest.mark.parametrize(
    ("point", "resumed_from", "redone"),
    [
        ("batch_end@4", 3, 1),  # mid-period (period 1 is steps 3..5), before step 4's checkpoint is written
        ("batch_start@6", 6, 0),  # at a switch: LISA has switched to period 2 and released state, then dies
        ("save_checkpoint@5", 4, 1),  # inside on_save_checkpoint of step 5: nothing of it is written
    ],
)
def test_killed_run_resumes_to_the_uninterrupted_result(
    tmp_path: Path, reference: Path, point: str, resumed_from: int, redone: int
):
    out = tmp_path / "run"
    log = str(out / "batches-{rank}.jsonl")
    result = kill_and_resume(
        command(out), point, command(out, "single", "--resume"), env={"LISA_BATCH_LOG": log}, timeout=300
    )
    assert result.interrupted.returncode == -9
    assert result.extra["killed"][0].endswith(point)
    saved = sorted(p.name for p in (out / "checkpoints").glob("step=*.ckpt"))
    assert saved == [f"step={s}.ckpt" for s in range(1, STEPS + 1)]  # the resumed run wrote the rest
    assert "Restoring states from the checkpoint path" in result.resumed.stdout + result.resumed.stderr
    # the resumed run started at the last complete checkpoint, and the steps add up to one run
    batches = read_batch_log(out / "batches-0.jsonl")
    assert [b["step"] for b in batches] == list(range(STEPS))
    lines = (out / "batches-0.jsonl").read_text().splitlines()
    assert len(lines) == STEPS + redone  # the batches the killed run started after its last checkpoint ran again
    assert_same_training_state(reference, out / "final.ckpt")  # weights, optimizer state, LISA's schedule
    resumed_state = load_training_state(out / "checkpoints" / f"step={resumed_from}.ckpt")
    assert training_state_differences(resumed_state, load_training_state(reference))  # not vacuous
    assert resumed_state.lisa is not None and resumed_state.lisa["period"] == (resumed_from - 1) // 3


def test_interrupted_checkpoint_write_is_never_picked_up(tmp_path: Path, reference: Path):
    """Killed halfway through writing last.ckpt over the previous one: the previous one stays whole."""
    out = tmp_path / "run"
    first = run_command(command(out, "single", "--keep", "last"), env={"LISA_KILL_AT": "write@5"}, timeout=300)
    assert first.returncode == -9, first.describe("was not killed")
    last = out / "checkpoints" / "last.ckpt"
    state = load_training_state(last)
    assert state.global_step == 4  # the checkpoint of step 4, whole; step 5's half-written bytes are elsewhere
    assert state.lisa is not None and state.lisa["period"] == 1  # its last step (index 3) ran in period 1
    leftovers = [p.name for p in (out / "checkpoints").iterdir() if p.name != "last.ckpt"]
    assert not [name for name in leftovers if name.endswith(".ckpt")]  # nothing Lightning would take as one
    run_command(command(out, "single", "--keep", "last", "--resume"), timeout=300).check()
    assert_same_training_state(reference, out / "final.ckpt")


def test_kill_without_the_kill_point_reached_is_reported(tmp_path: Path):
    """The harness refuses a run that never reached its kill point (a step after the end)."""
    with pytest.raises(AssertionError, match="never reached the kill point batch_end@99"):
        kill_and_resume(command(tmp_path / "run"), "batch_end@99", timeout=300)


def test_checkpoint_comparison_sees_one_changed_value(tmp_path: Path, reference: Path):
    checkpoint = torch.load(reference, weights_only=False)
    name = next(iter(checkpoint["optimizer_states"][0]["state"]))
    checkpoint["optimizer_states"][0]["state"][name]["exp_avg_sq"].view(-1)[0] += 1e-12
    torch.save(checkpoint, tmp_path / "changed.ckpt")
    with pytest.raises(AssertionError, match="exp_avg_sq: tensors differ"):
        assert_same_training_state(reference, tmp_path / "changed.ckpt")
    shutil.copy(reference, tmp_path / "same.ckpt")
    assert checkpoint_bytes(tmp_path / "same.ckpt") == checkpoint_bytes(reference)


def _distributed_available() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_gloo_available()


distributed = pytest.mark.skipif(not _distributed_available(), reason="needs torch.distributed with gloo")


@pytest.mark.slow
@distributed
def test_ddp_rank_killed_and_job_restarted_equals_uninterrupted_run(tmp_path: Path):
    """Rank 1 of 2 dies after step 4; rank 0 fails at its next collective (20 s group timeout at most); restart."""
    reference = tmp_path / "reference"
    run_command(command(reference, "ddp"), timeout=300).check()
    out = tmp_path / "run"
    result = kill_and_resume(command(out, "ddp"), "batch_end@4:1", command(out, "ddp", "--resume"), timeout=300)
    assert result.interrupted.returncode != 0 and not result.interrupted.timed_out
    assert len(result.extra["killed"]) == 1  # rank 1 alone was killed
    assert_same_training_state(reference / "final.ckpt", out / "final.ckpt")


@pytest.mark.slow
@distributed
def test_fsdp2_interrupted_checkpoint_folder_is_never_picked_up(tmp_path: Path):
    """Rank 0 dies after the shards of step 4's last.ckpt are written, before its metadata: last.ckpt stays step 3."""
    reference = tmp_path / "reference"
    run_command(command(reference, "fsdp2", "--keep", "last"), timeout=300).check()
    out = tmp_path / "run"
    killed = run_command(command(out, "fsdp2", "--keep", "last"), env={"LISA_KILL_AT": "write@4:0"}, timeout=300)
    assert killed.returncode == -9 and not killed.timed_out, killed.describe("was not killed")
    folder = out / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == [".last.ckpt.incomplete", "last.ckpt"]
    assert not (folder / ".last.ckpt.incomplete" / ".metadata").exists()  # the interrupted write, set apart
    meta = torch.load(folder / "last.ckpt" / "meta.pt", weights_only=False)
    assert meta["global_step"] == 3 and meta["callbacks"]["LISA"]["period"] == 0  # steps 0..2 ran in period 0
    assert {p.name for p in (folder / "last.ckpt").iterdir()} >= {".metadata", "meta.pt"}
    run_command(command(out, "fsdp2", "--keep", "last", "--resume"), timeout=300).check()
    assert not (folder / ".last.ckpt.incomplete").exists()  # removed by the next save
    assert_same_training_state(reference / "final.ckpt", out / "final.ckpt")


def _trained_checkpoints(folder: Path) -> Path:
    """A short in-process run with LISA that leaves step=1..3 checkpoints in ``folder``; the last one's path."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_lisa import LISA
    from lightning_lisa.testing import CausalLM, quiet_trainer, token_loader

    saving = ModelCheckpoint(dirpath=folder, filename="{step}", every_n_train_steps=1, save_top_k=-1)
    trainer = quiet_trainer([LISA(n_layers=1, interval=2), saving], max_steps=3, enable_checkpointing=True)
    trainer.fit(CausalLM(num_layers=3), token_loader(n_batches=3))
    return folder / "step=3.ckpt"


@pytest.mark.parametrize("damage", ["truncated", "flipped byte"])
def test_damaged_checkpoint_is_named_and_nothing_is_overwritten(tmp_path: Path, damage: str):
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_lisa import LISA
    from lightning_lisa.errors import LISAConfigError
    from lightning_lisa.testing import CausalLM, quiet_trainer, token_loader

    folder = tmp_path / "checkpoints"
    path = _trained_checkpoints(folder)
    data = bytearray(path.read_bytes())
    if damage == "truncated":
        data = data[: len(data) // 2]
    else:  # inside a tensor's record: torch itself loads this without an error
        data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    before = {p.name: checkpoint_bytes(p) for p in folder.iterdir()}
    saving = ModelCheckpoint(dirpath=folder, filename="{step}", every_n_train_steps=1, save_top_k=-1)
    trainer = quiet_trainer([LISA(n_layers=1, interval=2), saving], max_steps=6, enable_checkpointing=True)
    expected = "truncated" if damage == "truncated" else "fails its CRC-32 checksum"
    with pytest.raises(LISAConfigError, match=rf"`ckpt_path='{path}'` cannot be resumed from: .*{expected}") as error:
        trainer.fit(CausalLM(num_layers=3), token_loader(n_batches=6), ckpt_path=str(path))
    assert "step=2.ckpt" in str(error.value)  # the message lists the others
    assert trainer.global_step == 0
    assert {p.name: checkpoint_bytes(p) for p in folder.iterdir()} == before  # nothing written or overwritten


def test_lisa_corrects_the_trainable_count_of_lightnings_model_summary(caplog, capsys):
    import logging

    from lightning_lisa import LISA
    from lightning_lisa.testing import CausalLM, quiet_trainer, token_loader

    module = CausalLM(num_layers=6)
    lisa = LISA(n_layers=2, interval=2)
    with caplog.at_level(logging.INFO):
        quiet_trainer([lisa], max_steps=1, enable_model_summary=True).fit(module, token_loader(n_batches=1))
    assert "Trainable params: 16.1 K" in capsys.readouterr().out  # every block, before LISA's first switch
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("LISA: "))
    trains = lisa.history[0].trainable_params
    assert trains < sum(p.numel() for p in module.parameters()) / 2
    assert line.startswith(f"LISA: {trains / 1000:.1f} K trainable params at a time (2 of 6 blocks")
    assert "Lightning's summary above counts 16.1 K" in line
    # LISA froze nothing before the optimizer existed: every block is in it
    assert len(module.trainer.optimizers[0].param_groups[0]["params"]) == len(list(module.parameters()))
