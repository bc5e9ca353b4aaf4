"""Exact mid-epoch resume of TextDataModule's loader: the loader alone, a Trainer in this process, and the
lightning-lisa command killed with SIGKILL and resumed (same batches, bit-identical training state); the schedule's
length without `trainer.estimated_stepping_batches`."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import yaml

from lightning_lisa.errors import LISAConfigError
from lightning_lisa.recipes.data import TextDataModule
from lightning_lisa.recipes.module import CausalLMModule
from lightning_lisa.testing import tiny_llama
from lightning_lisa.testing.killresume import (
    BATCH_LOG_ENV,
    BatchLog,
    assert_same_training_state,
    digest,
    kill_and_resume,
    read_batch_log,
    run_command,
)
from lightning_lisa.testing.trainer import quiet_trainer

WORDS = ["red", "green", "blue", "cyan", "black", "white", "north", "south", "east", "west", "up", "down", "left"]


def write_records(path: Path, n: int = 60) -> Path:
    lines = []
    for i in range(n):
        prompt = " ".join(WORDS[(i + k) % len(WORDS)] for k in range(1 + i % 4))
        answer = " ".join(WORDS[(3 * i + k) % len(WORDS)] for k in range(1 + (i * 5) % 7))
        lines.append(json.dumps({"messages": [{"role": "user", "content": prompt},
                                              {"role": "assistant", "content": answer}]}))  # fmt: skip
    path.write_text("\n".join(lines) + "\n")
    return path


def chat_tokenizer(directory: Path) -> str:
    """A word-level tokenizer with a chat template, saved to ``directory`` (so a subprocess can load it)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = ["<unk>", "<pad>", "<eos>", "U:", "A:", ";", *WORDS]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>")
    tok.chat_template = (
        "{% for m in messages %}{{ 'U: ' if m.role == 'user' else 'A: ' }}{{ m.content }} ; {% endfor %}"
        "{% if add_generation_prompt %}A: {% endif %}"
    )
    tok.save_pretrained(str(directory))
    return str(directory)


def data(tmp_path: Path, records: int = 60, **kwargs: Any) -> TextDataModule:
    path = tmp_path / f"chat{records}.jsonl"
    if not path.exists():
        write_records(path, records)
    settings: dict[str, Any] = {"path": str(path), "tokenizer": chat_tokenizer(tmp_path / "tok"), "max_length": 24,
                                "batch_size": 2, "cache_dir": str(tmp_path / "cache"), "val_fraction": 0.1}  # fmt: skip
    settings.update(kwargs)
    return TextDataModule(**settings)


@pytest.mark.parametrize("packing", ["none", "isolated"])
@pytest.mark.parametrize("workers", [0, 2])
def test_the_loader_resumes_mid_epoch_with_the_same_batches(tmp_path: Path, packing: str, workers: int):
    dm = data(tmp_path, packing=packing, num_workers=workers)
    dm.setup("fit")
    loader: Any = dm.train_dataloader()
    iterator = iter(loader)
    for _ in range(3):
        next(iterator)
    state = loader.state_dict()
    rest = [digest(batch) for batch in iterator]
    assert len(rest) >= 3
    restored: Any = dm.train_dataloader()
    restored.load_state_dict(state)
    assert [digest(batch) for batch in restored] == rest


class Stop(pl.Callback):
    """Raise after optimizer step ``step`` (the checkpoint of an earlier step is on disk)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError("stopped")


def test_a_trainer_resumed_mid_epoch_matches_one_never_stopped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    def refuse(self: pl.Trainer) -> int:
        raise AssertionError("configure_optimizers must not read trainer.estimated_stepping_batches")

    monkeypatch.setattr(pl.Trainer, "estimated_stepping_batches", property(refuse))

    def run(root: Path, log: Path, stop: int | None = None, ckpt: str | None = None) -> CausalLMModule:
        module = CausalLMModule.from_model(tiny_llama(num_layers=2, vocab_size=32), learning_rate=1e-2)
        checkpoints = pl.callbacks.ModelCheckpoint(dirpath=root, every_n_train_steps=2, save_top_k=-1)
        callbacks: list[pl.Callback] = [BatchLog(log), checkpoints] + ([Stop(stop)] if stop is not None else [])
        trainer = quiet_trainer(callbacks, max_epochs=2, enable_checkpointing=True, limit_val_batches=0)
        trainer.fit(module, datamodule=data(tmp_path, 24, packing="isolated"), ckpt_path=ckpt)
        return module

    full = run(tmp_path / "full", tmp_path / "full.jsonl")
    dm = data(tmp_path, 24, packing="isolated")
    dm.setup("fit")
    assert full.schedule_steps() == 2 * dm.optimizer_steps_per_epoch() > 6  # the length comes from the data
    with pytest.raises(RuntimeError, match="stopped"):
        run(tmp_path / "cut", tmp_path / "cut.jsonl", stop=5)
    resumed = run(tmp_path / "cut", tmp_path / "resumed.jsonl", ckpt=str(tmp_path / "cut" / "epoch=0-step=4.ckpt"))
    merged = [r["digest"] for r in read_batch_log(tmp_path / "cut.jsonl", tmp_path / "resumed.jsonl")]
    assert merged == [r["digest"] for r in read_batch_log(tmp_path / "full.jsonl")]
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_a_decaying_schedule_needs_a_known_length():
    module = CausalLMModule.from_model(tiny_llama(num_layers=1, vocab_size=32))
    loader = torch.utils.data.DataLoader([{"input_ids": torch.zeros(4, dtype=torch.long)}] * 2, batch_size=1)
    with pytest.raises(LISAConfigError, match=r"`lr_schedule='cosine'` decays over the run.*`trainer.max_steps`"):
        quiet_trainer([], max_epochs=1).fit(module, loader)


@pytest.mark.slow
@pytest.mark.parametrize("devices", [1, 2])
def test_the_command_killed_mid_epoch_resumes_bit_identical(tmp_path: Path, devices: int):
    """One process with 2 loader workers, or DDP on 2 processes (gloo) with the distributed StepSampler."""
    path = write_records(tmp_path / "chat.jsonl")
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu", "devices": devices, "precision": 32, "max_steps": 6, "logger": False,
            "num_sanity_val_steps": 0, "limit_val_batches": 0, "enable_progress_bar": False,
            "enable_model_summary": False,
            "callbacks": [
                {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                 "init_args": {"every_n_train_steps": 2, "save_top_k": -1, "filename": "{step}"}},
                {"class_path": "lightning_lisa.testing.KillSwitch"},
                {"class_path": "lightning_lisa.testing.BatchLog"},
            ],
        },
        "model": {"config": {"model_type": "llama", "vocab_size": 32, "hidden_size": 16, "intermediate_size": 32,
                             "num_hidden_layers": 3, "num_attention_heads": 2}, "learning_rate": 0.01},
        "data": {"path": str(path), "tokenizer": chat_tokenizer(tmp_path / "tok"), "packing": "isolated",
                 "max_length": 24, "batch_size": 2, "num_workers": 2 if devices == 1 else 0,
                 "cache_dir": str(tmp_path / "cache")},
        "lisa": {"n_layers": 1, "interval": 2},
        "summary": {"enabled": False},
    }  # fmt: skip
    if devices > 1:
        config["trainer"]["strategy"] = "ddp_find_unused_parameters_true"  # type: ignore[index]
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))

    def command(root: str, *extra: str) -> list[str]:
        return [sys.executable, "-m", "lightning_lisa", "fit", "--config", "run.yaml",
                f"--trainer.default_root_dir={root}", *extra]  # fmt: skip

    full = run_command(command("full"), {BATCH_LOG_ENV: str(tmp_path / "full-{rank}.jsonl")}, cwd=tmp_path).check()
    assert full.returncode == 0
    first = kill_and_resume(
        command("cut"), "batch_end@3", env={BATCH_LOG_ENV: str(tmp_path / "cut-{rank}.jsonl")}, cwd=tmp_path,
        resume_command=command("cut", "--ckpt_path=cut/checkpoints/step=2.ckpt"),
    )  # fmt: skip
    assert first.interrupted.killed
    seen = []
    for rank in range(devices):
        # both runs appended to one log: split it where the steps restart, and merge what the optimizer stepped on
        lines = (tmp_path / f"cut-{rank}.jsonl").read_text().splitlines()
        steps = [json.loads(line)["step"] for line in lines]
        restart = next(i for i in range(1, len(steps)) if steps[i] <= steps[i - 1])
        (tmp_path / "killed.jsonl").write_text("\n".join(lines[:restart]) + "\n")
        (tmp_path / "resumed.jsonl").write_text("\n".join(lines[restart:]) + "\n")
        batches = [r["digest"] for r in read_batch_log(tmp_path / "killed.jsonl", tmp_path / "resumed.jsonl")]
        expected = [r["digest"] for r in read_batch_log(tmp_path / f"full-{rank}.jsonl")]
        assert batches == expected and len(expected) == 6
        seen.append(expected)
    if devices > 1:
        assert not set(seen[0]) & set(seen[1])  # the ranks train on different rows
    assert_same_training_state(tmp_path / "full/checkpoints/step=6.ckpt", tmp_path / "cut/checkpoints/step=6.ckpt")
