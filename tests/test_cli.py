"""The lightning-lisa command end to end: configs, the --lisa group, errors, subcommands, the shipped examples."""

from __future__ import annotations

import json
import runpy
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml
from cli_args import tiny, torch_threads

from lightning_lisa import LISA
from lightning_lisa.recipes.cli import LisaCLI, cli_main

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "examples" / "configs"


@pytest.fixture(autouse=True)
def _no_pytest_argv(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(sys, "argv", sys.argv[:1])  # the CLI gets its arguments from `args` only
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # else Lightning's DDP sets one thread per core
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tokenizers")


def write_yaml(path: Path, content: dict[str, object]) -> Path:
    path.write_text(yaml.safe_dump(content), encoding="utf-8")
    return path


def lisas(cli: LisaCLI) -> list[LISA]:
    return [c for c in cli.trainer.callbacks if isinstance(c, LISA)]  # type: ignore[attr-defined]


def parse_error(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        LisaCLI(args=args)
    assert exit_info.value.code != 0
    return capsys.readouterr().err


def test_fit_then_validate_test_and_predict_from_the_checkpoint(
    tmp_path: Path, cache: Path, capsys: pytest.CaptureFixture[str]
):
    config = write_yaml(
        tmp_path / "run.yaml",
        {"lisa": {"n_layers": 1, "interval": 2, "seed": 3}, "summary": {"validate_before": True}},
    )
    fit = LisaCLI(args=["fit", "--config", str(config), *tiny(tmp_path, cache, steps=4)])
    out = capsys.readouterr().out
    (lisa,) = lisas(fit)
    assert [s.step for s in lisa.history] == [0, 2]
    assert "validation loss:" in out and out.count("  period ") == 2
    assert "optimizer state, full fine-tuning (estimated)" in out
    assert fit.report is not None and fit.report.val_loss_after is not None
    assert fit.report.val_loss_before is not None and fit.report.val_loss_after < fit.report.val_loss_before
    ckpt = Path(fit.report.paths["checkpoint"])
    assert ckpt.is_file() and f"checkpoint: {ckpt}" in out

    common = ["--config", str(config), *tiny(tmp_path, cache), "--ckpt_path", str(ckpt)]
    validate = LisaCLI(args=["validate", *common])
    assert float(validate.trainer.callback_metrics["val_loss"]) == pytest.approx(fit.report.val_loss_after, rel=1e-5)
    test = LisaCLI(args=["test", *common])
    assert float(test.trainer.callback_metrics["test_loss"]) == pytest.approx(fit.report.val_loss_after, rel=1e-5)
    LisaCLI(args=["predict", *common])


def test_print_config_round_trips(tmp_path: Path, cache: Path, capsys: pytest.CaptureFixture[str]):
    args = ["--config", str(CONFIGS / "tiny_random.yaml"), *tiny(tmp_path, cache, steps=1), "--lisa.interval=3"]
    with pytest.raises(SystemExit):
        LisaCLI(args=["fit", *args, "--print_config"])
    printed = capsys.readouterr().out
    dumped = yaml.safe_load(printed)
    assert dumped["lisa"]["init_args"]["interval"] == 3 and dumped["model"]["config"]["hidden_size"] == 16
    again = tmp_path / "printed.yaml"
    again.write_text(printed)
    with pytest.raises(SystemExit):
        LisaCLI(args=["fit", "--config", str(again), "--print_config"])
    assert capsys.readouterr().out == printed
    cli = LisaCLI(args=["fit", "--config", str(again), "--summary.enabled=false", "--trainer.callbacks=[]"])
    assert cli.trainer.global_step == 1
    assert [(x.n_layers, x.interval) for x in lisas(cli)] == [(2, 3)]


@pytest.mark.parametrize(
    ("args", "yaml_text", "expected"),
    [
        (["--lisa.optimizer_state=free"], None, ["optimizer_state", "free", "drop", "offload", "keep"]),
        (["--lisa.n_layers=0"], None, ["error: `n_layers=0` is not allowed", "integer >= 1"]),  # LISA refuses it
        ([], "lisa:\n  interval: -1\n", ["error: `interval=-1` is not allowed"]),
        ([], "lisa:\n  n_layers: two\n", ["n_layers", "two"]),
        ([], "lisa:\n  no_such_option: 1\n", ["no_such_option"]),
        (["--model.optimizer=sgd"], None, ["model.optimizer", "sgd", "adamw8bit"]),
        (["--data.max_length=long"], None, ["data.max_length", "long"]),
        (
            [],
            "trainer:\n  callbacks:\n    - class_path: lightning_lisa.LISA\n"
            "      init_args:\n        sampling: magic\n",
            ["sampling", "magic"],
        ),
    ],
)
def test_invalid_values_are_refused_naming_the_key(
    tmp_path: Path, cache: Path, capsys: pytest.CaptureFixture[str], args: list[str], yaml_text: str | None,
    expected: list[str],
):  # fmt: skip
    extra = []
    if yaml_text is not None:
        (tmp_path / "bad.yaml").write_text(yaml_text)
        extra = ["--config", str(tmp_path / "bad.yaml")]
    err = parse_error(["fit", *tiny(tmp_path, cache), *extra, *args], capsys)
    for word in expected:
        assert word in err, (word, err[-2000:])


def test_lisa_configured_twice_is_refused(tmp_path: Path, cache: Path, capsys: pytest.CaptureFixture[str]):
    callbacks = {"trainer": {"callbacks": [{"class_path": "lightning_lisa.LISA", "init_args": {"n_layers": 1}}]}}
    config = write_yaml(tmp_path / "twice.yaml", callbacks)
    err = parse_error(["fit", "--config", str(config), *tiny(tmp_path, cache), "--lisa.n_layers=1"], capsys)
    assert "LISA is configured more than once" in err and "trainer.callbacks" in err and "--lisa" in err
    callbacks["trainer"]["callbacks"] *= 2  # type: ignore[index]
    config = write_yaml(tmp_path / "twice.yaml", callbacks)
    err = parse_error(["fit", "--config", str(config), *tiny(tmp_path, cache)], capsys)
    assert "LISA is configured more than once" in err


def test_lisa_as_a_trainer_callback_or_not_at_all(tmp_path: Path, cache: Path, capsys: pytest.CaptureFixture[str]):
    callbacks = {"trainer": {"callbacks": [{"class_path": "lightning_lisa.LISA", "init_args": {"n_layers": 3}}]}}
    config = write_yaml(tmp_path / "cb.yaml", callbacks)
    cli = LisaCLI(args=["fit", "--config", str(config), *tiny(tmp_path, cache, steps=1)])
    assert [x.n_layers for x in lisas(cli)] == [3]
    capsys.readouterr()
    full = LisaCLI(args=["fit", *tiny(tmp_path, cache, steps=1), "--summary.measure_full_finetuning=true"])
    out = capsys.readouterr().out
    assert lisas(full) == []
    assert "no LISA: full fine-tuning" in out and "ratio: 1.00x" in out


def test_compact_moments_everywhere_from_the_command_line(tmp_path: Path, cache: Path):
    args = ["--model.compact_always_active=factored", "--model.compact_blocks=factored"]
    cli = LisaCLI(args=["fit", *tiny(tmp_path, cache, steps=1), *args])
    optimizer = cli.trainer.optimizers[0]
    assert type(optimizer).__name__ == "CompactAdamW"
    assert {group["compact"] for group in optimizer.param_groups} == {"factored"}


def test_always_active_lr_scale_from_the_command_line(tmp_path: Path, cache: Path):
    cli = LisaCLI(args=["fit", *tiny(tmp_path, cache, steps=1), "--model.always_active_lr_scale=0.25"])
    groups = cli.trainer.optimizers[0].param_groups
    head = cli.model.model.lm_head.weight
    (own,) = [g for g in groups if any(p is head for p in g["params"])]
    assert {g["initial_lr"] for g in groups} == {cli.model.hparams["learning_rate"], own["initial_lr"]}
    assert own["initial_lr"] == 0.25 * cli.model.hparams["learning_rate"]


def test_seven_b_example_at_tiny_scale(tmp_path: Path, cache: Path):
    records = [{"instruction": f"Repeat {i}.", "input": "", "output": f"{i} " * (i % 5 + 1)} for i in range(40)]
    data = tmp_path / "alpaca.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in records))
    cli = LisaCLI(
        args=[
            "fit", "--config", str(CONFIGS / "llama-7b-single-gpu.yaml"), *tiny(tmp_path, cache, steps=2),
            "--model.model_name_or_path=null", "--data.tokenizer=null", f"--data.path={data}",
            "--data.max_examples=null", "--data.max_length=192", "--data.num_workers=0",
            f"--model.save_hf_dir={tmp_path / 'hf'}",
        ]
    )  # fmt: skip
    hp = cli.model.hparams
    assert hp["optimizer"] == "adamw8bit" and hp["gradient_checkpointing"] and cli.datamodule.packing == "none"
    assert type(cli.trainer.optimizers[0]).__name__ == "AdamW8bit"
    assert cli.trainer.accumulate_grad_batches == 8 and cli.trainer.global_step == 2
    assert (tmp_path / "hf" / "config.json").is_file()


def test_ddp_example_at_tiny_scale(tmp_path: Path, cache: Path):
    cli = LisaCLI(
        args=[
            "fit", "--config", str(CONFIGS / "ddp.yaml"), *tiny(tmp_path, cache, steps=2),
            "--model.model_name_or_path=null", "--data.tokenizer=null", "--data.path=null",
            "--data.num_workers=0", f"--model.save_hf_dir={tmp_path / 'hf'}",
        ]
    )  # fmt: skip
    strategy = cli.trainer.strategy
    assert type(strategy).__name__ == "DDPStrategy" and strategy._ddp_kwargs["find_unused_parameters"]
    assert cli.trainer.global_step == 2 and len(lisas(cli)) == 1


def test_console_script_and_module_entry_points(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    script = shutil.which("lightning-lisa", path=str(Path(sys.executable).parent))
    assert script is not None, "`pip install -e .` installs the lightning-lisa command"
    args = ["fit", "--config", str(CONFIGS / "demo.yaml"), "--print_config"]
    result = subprocess.run([script, *args], capture_output=True, text=True, check=False, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    printed = yaml.safe_load(result.stdout)
    assert printed["lisa"]["init_args"]["n_layers"] == 4  # the demo's setting, read from its config
    assert printed["controls"] == {"What is the capital of France?": "Paris", "What is the opposite of hot?": "cold"}
    monkeypatch.setattr(sys, "argv", ["python -m lightning_lisa", *args])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module("lightning_lisa", run_name="__main__")
    assert exit_info.value.code == 0


def test_cli_main_runs_in_process(tmp_path: Path, cache: Path, capsys: pytest.CaptureFixture[str]):
    cli_main(["fit", *tiny(tmp_path, cache, steps=1), "--lisa.n_layers=1"])
    assert "LISA: n_layers=1 of 4 blocks" in capsys.readouterr().out
    assert torch.load(next(tmp_path.rglob("*.ckpt")), weights_only=False)["callbacks"]["LISA"]["n_layers"] == 1


def test_estimate_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["estimate", "tiny", "--seq-len", "64", "--dtype", "fp32", "--unit", "MiB"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("tiny: ")
    assert all(arm in out for arm in ("full fine-tuning", "LoRA r=16", "LISA"))
