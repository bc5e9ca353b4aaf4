"""estimate_memory: nothing allocated, exact training-state counts, orderings that must hold, clear errors."""

from __future__ import annotations

import json

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader
from transformers import GPT2Config, LlamaConfig

from lightning_lisa import LISA, optimizer_state_bytes
from lightning_lisa.errors import LISAConfigError
from lightning_lisa.estimate import (
    SHAPES,
    MemoryEstimate,
    build_meta_model,
    estimate_memory,
    format_estimate,
    load_config,
    lora_targets,
    main,
    saved_activation_bytes,
)

LLAMA = {
    "model_type": "llama",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 96,
    "max_position_embeddings": 64,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
GPT2_TIED = {"model_type": "gpt2", "n_embd": 32, "n_layer": 4, "n_head": 4, "vocab_size": 96, "n_positions": 64}
SEQ = 16


def current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: several threads stall badly on a busy machine; restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def llama7b() -> MemoryEstimate:
    return estimate_memory("llama-2-7b", seq_len=1024, dtype="bf16")


def real_model(config: dict, seed: int = 0) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = dict(config)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(fields.pop("model_type"), **fields))


def counts(model: torch.nn.Module, optimizers: list[torch.optim.Optimizer]) -> tuple[int, int, int, int]:
    params = list(dict.fromkeys(model.parameters()))
    return (
        sum(p.nbytes for p in params),
        sum(p.grad.nbytes for p in params if p.grad is not None),
        optimizer_state_bytes(optimizers),
        sum(p.numel() for p in params if p.requires_grad),
    )


# ------------------------------------------------------------------------------ allocation


def test_meta_model_allocates_nothing():
    before = current_rss()
    model = build_meta_model(load_config("llama-3-8b")[1], torch.bfloat16)
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert sum(p.numel() for p in model.parameters()) == 8_030_261_248
    assert current_rss() - before < 512 * 2**20  # 8B parameters would be 15 GiB in bf16


def test_estimate_of_a_7b_model_allocates_nothing(llama7b: MemoryEstimate):
    before = current_rss()
    estimate = estimate_memory("llama-2-7b", seq_len=2048, dtype="fp32")
    assert current_rss() - before < 512 * 2**20
    assert estimate.num_params == 6_738_415_616
    assert estimate.full.weights == 4 * 6_738_415_616
    assert llama7b.full.weights == 2 * 6_738_415_616


# ------------------------------------------------------------------------------ exact counts


@pytest.mark.parametrize("config", [LLAMA, GPT2_TIED], ids=["llama", "gpt2-tied"])
def test_full_fine_tuning_counts_are_exact(config: dict):
    model = real_model(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, 96, (1, SEQ))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    weights, grads, state, trainable = counts(model, [optimizer])
    est = estimate_memory(config, seq_len=SEQ, dtype="fp32").full
    assert (est.weights, est.grads, est.optimizer_state, est.trainable_params) == (weights, grads, state, trainable)


@pytest.mark.parametrize(("optimizer", "rank"), [("adamw", 8), ("adamw8bit", 128)])
def test_lora_counts_are_exact_and_match_peft(optimizer: str, rank: int):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        real_model(LLAMA), LoraConfig(r=rank, lora_alpha=16, target_modules="all-linear"), autocast_adapter_dtype=False
    )
    params = [p for p in model.parameters() if p.requires_grad]
    if optimizer == "adamw8bit":
        import bitsandbytes as bnb

        opt: torch.optim.Optimizer = bnb.optim.AdamW8bit(params, lr=1e-3)
    else:
        opt = torch.optim.AdamW(params, lr=1e-3)
    ids = torch.randint(0, 96, (1, SEQ))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    weights, grads, state, trainable = counts(model, [opt])
    est = estimate_memory(LLAMA, seq_len=SEQ, dtype="fp32", lora_rank=rank, optimizer=optimizer).lora
    assert (est.weights, est.grads, est.optimizer_state, est.trainable_params) == (weights, grads, state, trainable)


class _LM(pl.LightningModule):
    def __init__(self, model: torch.nn.Module, optimizer: str) -> None:
        super().__init__()
        self.model = model
        self.optimizer_name = optimizer
        self.peak: tuple[int, int, int, int] = (0, 0, 0, 0)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        return self.model(input_ids=batch, labels=batch).loss

    def on_train_batch_end(self, *args: object) -> None:
        now = counts(self, self.trainer.optimizers)
        self.peak = tuple(max(a, b) for a, b in zip(self.peak, now, strict=True))  # type: ignore[assignment]

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer_name == "adamw8bit":
            import bitsandbytes as bnb

            return bnb.optim.AdamW8bit(self.parameters(), lr=1e-3)
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


@pytest.mark.parametrize(
    ("config", "optimizer", "embeddings"),
    [(LLAMA, "adamw", True), (LLAMA, "adamw", False), (GPT2_TIED, "adamw", True), (LLAMA, "adamw8bit", True)],
    ids=["llama", "llama-frozen-eh", "gpt2-tied", "llama-8bit"],
)
def test_lisa_counts_are_exact(config: dict, optimizer: str, embeddings: bool):
    module = _LM(real_model(config), optimizer)
    lisa = LISA(n_layers=2, interval=2, train_embeddings=embeddings, train_head=embeddings)
    trainer = pl.Trainer(
        max_steps=5,
        callbacks=[lisa],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, DataLoader(list(torch.randint(0, 96, (5, SEQ))), batch_size=1))
    weights, grads, state, trainable = module.peak
    est = estimate_memory(
        config, seq_len=SEQ, dtype="fp32", optimizer=optimizer, train_embeddings=embeddings, train_head=embeddings
    ).lisa
    assert (est.weights, est.grads, est.optimizer_state, est.trainable_params) == (weights, grads, state, trainable)


@pytest.mark.parametrize("config", [LLAMA, GPT2_TIED], ids=["llama", "gpt2"])
def test_traced_activations_match_a_real_step(config: dict):
    model = real_model(config).train()
    ids = torch.randint(0, 96, (2, SEQ))
    measured = saved_activation_bytes(model, lambda: model(input_ids=ids, labels=ids))
    est = estimate_memory(config, batch_size=2, seq_len=SEQ, dtype="fp32", device="cpu")
    assert est.activation_method == "trace"
    assert abs(est.full.activations - measured) <= 0.05 * measured


def test_formula_is_in_the_range_of_the_trace():
    traced = estimate_memory("tiny", seq_len=128, dtype="fp32")
    formula = estimate_memory("tiny", seq_len=128, dtype="fp32", activations="formula")
    assert formula.activation_method == "formula"
    for a, b in zip(traced.arms, formula.arms, strict=True):
        assert 0.7 < b.activations / a.activations < 1.3
        assert a.training_state == b.training_state


def test_lora_targets_exclude_the_head():
    model = build_meta_model(load_config("gpt2-small")[1])
    targets = lora_targets(model)
    assert "lm_head" not in targets
    assert len(targets) == 4 * 12  # c_attn, c_proj, c_fc, mlp.c_proj per block (Conv1D)
    assert targets["transformer.h.0.attn.c_attn"] == (768, 3 * 768)


# ------------------------------------------------------------------------------ orderings


def test_orderings_that_must_hold(llama7b: MemoryEstimate):
    full, lora, lisa = llama7b.full, llama7b.lora, llama7b.lisa
    assert lora.trainable_params < lisa.trainable_params < full.trainable_params
    assert lisa.weights == full.weights < lora.weights
    assert lisa.grads < full.grads and lisa.optimizer_state < full.optimizer_state
    assert lisa.training_state < full.training_state and lora.training_state < full.training_state
    assert lisa.activations <= full.activations and lora.activations <= full.activations
    assert lisa.total < full.total and lora.total < full.total
    assert min(lisa.total, lora.total) < 0.5 * full.total
    for arm in llama7b.arms:
        assert arm.total >= arm.training_state - arm.grads


def test_more_work_means_more_memory():
    base = estimate_memory("tiny", seq_len=128)
    longer = estimate_memory("tiny", seq_len=256)
    wider = estimate_memory("tiny", seq_len=128, n_layers=4)
    frozen = estimate_memory("tiny", seq_len=128, train_embeddings=False, train_head=False)
    eight_bit = estimate_memory("tiny", seq_len=128, optimizer="adamw8bit")
    fp32 = estimate_memory("tiny", seq_len=128, dtype="fp32")
    assert all(b.activations < a.activations for a, b in zip(longer.arms, base.arms, strict=True))
    assert wider.lisa.trainable_params > base.lisa.trainable_params and wider.lisa.total > base.lisa.total
    assert frozen.lisa.trainable_params < base.lisa.trainable_params
    assert frozen.lisa.activations <= base.lisa.activations
    assert eight_bit.lisa.optimizer_state < base.lisa.optimizer_state
    assert fp32.full.weights == 2 * base.full.weights
    assert (
        base.lora.trainable_params < estimate_memory("tinyllama-1.1b", seq_len=512, lora_rank=128).lora.trainable_params
    )


def test_every_shape_builds_with_its_published_size():
    sizes = {
        "gpt2-small": 124_439_808,
        "tinyllama-1.1b": 1_100_048_384,
        "llama-3.2-1b": 1_235_814_400,
        "llama-2-7b": 6_738_415_616,
        "llama-3-8b": 8_030_261_248,
        "qwen2.5-7b": 7_615_616_512,
        "gemma-2-9b": 9_241_705_984,
    }
    load = load_config
    for name, size in sizes.items():
        assert sum(p.numel() for p in build_meta_model(load(name)[1]).parameters()) == size, name
    assert set(sizes) < set(SHAPES)


# ------------------------------------------------------------------------------ inputs and output


def test_configs_and_paths_are_accepted(tmp_path):
    from_dict = estimate_memory(LLAMA, seq_len=SEQ)
    from_config = estimate_memory(LlamaConfig(**{k: v for k, v in LLAMA.items() if k != "model_type"}), seq_len=SEQ)
    (tmp_path / "config.json").write_text(json.dumps(LLAMA))
    from_file = estimate_memory(str(tmp_path / "config.json"), seq_len=SEQ)
    from_dir = estimate_memory(tmp_path, seq_len=SEQ)
    assert from_dict.full == from_config.full == from_file.full == from_dir.full
    assert estimate_memory(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=96), seq_len=8).num_blocks == 2


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"n_layers": 0}, ["n_layers=0", ">= 1"]),
        ({"n_layers": 7}, ["n_layers=7", "6 blocks", "between 1 and 6"]),
        ({"n_layers": 2.5}, ["n_layers=2.5", "integer"]),
        ({"batch_size": 0}, ["batch_size=0"]),
        ({"seq_len": "1024"}, ["seq_len='1024'"]),
        ({"lora_rank": -1}, ["lora_rank=-1"]),
        ({"dtype": "fp8"}, ["dtype='fp8'", "bf16"]),
        ({"optimizer": "sgd"}, ["optimizer='sgd'", "adamw8bit"]),
        ({"activations": "guess"}, ["activations='guess'", "trace"]),
        ({"train_head": "yes"}, ["train_head='yes'", "True or False"]),
        ({"loss_chunk_size": 0}, ["loss_chunk_size=0", ">= 1"]),
        ({"gradient_checkpointing": 1}, ["gradient_checkpointing=1", "True or False"]),
        ({"step_in_backward": None}, ["step_in_backward=None", "True or False"]),
        ({"compact_always_active": "no"}, ["compact_always_active='no'", "'factored'"]),
        ({"compact_blocks": True}, ["compact_blocks=True", "'8bit'"]),
        ({"fused": "yes"}, ["fused='yes'", "True or False"]),
        ({"compact_blocks": "8bit", "optimizer": "adamw8bit"}, ["compact_blocks='8bit'", "optimizer='adamw'"]),
        ({"fused": True, "optimizer": "adamw8bit"}, ["fused=True", "optimizer='adamw'"]),
        ({"mixed_precision": True, "dtype": "fp32"}, ["mixed_precision=True", "dtype='fp32'", "bf16-mixed"]),
    ],
)
def test_bad_arguments_are_named(kwargs: dict, words: list[str]):
    """Every bad argument raises the package's one exception type, LISAConfigError, naming it."""
    with pytest.raises(LISAConfigError) as info:
        estimate_memory("tiny", **kwargs)
    for word in words:
        assert word in str(info.value)


@pytest.mark.parametrize(
    ("model", "words"),
    [
        ("llama-9000", ["model='llama-9000'", "tiny", "llama-2-7b"]),
        ("./no/such/dir", ["model='./no/such/dir'", "directory"]),
        (42, ["model=42", "shape name"]),
        ({"hidden_size": 8}, ["model_type", "hidden_size"]),
        ({"model_type": "no-such-arch"}, ["no-such-arch"]),
    ],
)
def test_bad_models_are_named(model: object, words: list[str]):
    with pytest.raises(LISAConfigError) as info:
        estimate_memory(model)
    for word in words:
        assert word in str(info.value)


def test_tied_weights_need_alike_flags():
    with pytest.raises(LISAConfigError, match=r"train_embeddings=False.*train_head=True.*tie"):
        estimate_memory("gpt2-small", train_embeddings=False)


def test_table_and_main(capsys):
    text = format_estimate(estimate_memory("tiny", seq_len=64), unit="MiB")
    lines = text.splitlines()
    assert lines[0].startswith("tiny: 287,552 parameters, 6 blocks")
    assert [line.split()[0] for line in lines[2:5]] == ["full", "LoRA", "LISA"]
    assert main(["llama-2-7b", "--seq-len", "512"]) == 0
    out = capsys.readouterr().out
    assert "(GiB)" in out and "LISA" in out
    assert main(["tiny", "--json"]) == 0
    assert '"lisa"' in capsys.readouterr().out
    assert main(["tiny", "--n-layers", "9"]) == 2
    assert "n_layers=9" in capsys.readouterr().err


# ------------------------------------------------------------------------------ the options


def test_every_option_against_tensors_counted_in_real_steps(tmp_path):
    """benchmarks/estimate_check.py --tiny: every setting and arm within 10% of the measured peak."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "check.json"
    result = subprocess.run(
        [sys.executable, str(root / "benchmarks" / "estimate_check.py"), "--tiny", "--out", str(out)],
        cwd=root / "benchmarks",
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) >= 20
    for row in rows:
        assert abs(row["error"]) <= 0.10, row


def test_step_in_backward_keeps_one_gradient():
    base = estimate_memory("llama-3-8b", seq_len=1024)
    fused = estimate_memory("llama-3-8b", seq_len=1024, step_in_backward=True)
    head = 128256 * 4096 * 2  # the largest single gradient, bf16
    assert fused.lisa.grads == head < base.lisa.grads
    assert fused.lisa.total < base.lisa.total
    assert (fused.full, fused.lora) == (base.full, base.lora)  # a LISA option only
    assert fused.lisa.training_state == base.lisa.training_state - base.lisa.grads + head


def test_compact_state_is_compact_adamws_for_embeddings_and_head_and_optionally_the_blocks():
    from lightning_lisa.compact import compact_state_nbytes
    from lightning_lisa.estimate import optimizer_state_nbytes

    base = estimate_memory("tiny", seq_len=64, dtype="fp32")
    compact = estimate_memory("tiny", seq_len=64, dtype="fp32", compact_always_active=True)
    assert compact.compact_always_active == "8bit" and compact.compact_blocks is None
    vocab, hidden = 512, 64
    always = [(vocab, hidden), (vocab, hidden)]  # embeddings and head (untied)
    blocks = base.lisa.trainable_params - vocab * hidden * 2
    saved = optimizer_state_nbytes([(vocab * hidden, 4)] * 2) - 2 * compact_state_nbytes(always[0], "8bit")
    assert blocks > 0 and base.lisa.optimizer_state - compact.lisa.optimizer_state == saved
    # the blocks' exact state is kept; with compact_blocks it is CompactAdamW's too
    everywhere = estimate_memory(
        "tiny", seq_len=64, dtype="fp32", compact_always_active="factored", compact_blocks="factored"
    )
    # about one byte per parameter (small norms are padded to a 256-element block)
    assert everywhere.lisa.optimizer_state < 1.2 * everywhere.lisa.trainable_params < compact.lisa.optimizer_state
    assert (everywhere.full, everywhere.lora) == (base.full, base.lora)  # LISA options only
    with pytest.raises(LISAConfigError, match=r"compact_always_active='8bit'.*optimizer='adamw'"):
        estimate_memory("tiny", seq_len=64, optimizer="adamw8bit", compact_always_active=True)


def test_fused_adamw_makes_no_step_copy_and_lowers_the_step_in_backward_peak():
    base = estimate_memory("llama-3-8b", seq_len=1024, step_in_backward=True)
    fused = estimate_memory("llama-3-8b", seq_len=1024, step_in_backward=True, fused=True)
    assert base.full.step_workspace == base.full.grads and fused.full.step_workspace == 0
    assert fused.lisa.training_state == base.lisa.training_state
    head = 128256 * 4096 * 2  # the head's gradient and, without fused, AdamW's copy of it
    assert base.lisa.backward_step_peak - fused.lisa.backward_step_peak == head
    assert fused.lisa.total < base.lisa.total


@pytest.mark.parametrize(("kwargs", "copies"), [({"foreach": True}, 1), ({"fused": True}, 0)])
def test_the_modelled_step_copies_are_those_counted_in_a_real_step(kwargs, copies):
    from lightning_lisa.estimate.measure import TensorPeak

    p = torch.nn.Parameter(torch.randn(512, 256, dtype=torch.bfloat16))
    p.grad = torch.randn_like(p)
    optimizer = torch.optim.AdamW([p], **kwargs)
    optimizer.step()
    existing = [p, p.grad, *optimizer.state[p].values()]
    with TensorPeak() as peak:
        peak.track(existing)
        before = peak.current
        del existing
        optimizer.step()
    assert peak.peak - before == copies * p.numel() * p.element_size()


def test_checkpointing_and_chunked_loss_shrink_activations_of_every_arm():
    base = estimate_memory("llama-3-8b", batch_size=8, seq_len=2048)
    checkpointed = estimate_memory("llama-3-8b", batch_size=8, seq_len=2048, gradient_checkpointing=True)
    chunked = estimate_memory("llama-3-8b", batch_size=8, seq_len=2048, loss_chunk_size=2048)
    tokens, vocab = 8 * 2048, 128256
    for a, b, c in zip(base.arms, checkpointed.arms, chunked.arms, strict=True):
        assert b.activations < a.activations / 4 and b.recompute_workspace > 0 and b.total < a.total
        hidden = tokens * 4096 * 2  # the head's input, which the chunks keep to rebuild their logits
        assert c.activations <= a.activations - 4 * tokens * vocab + hidden  # no float32 log-probabilities kept
        assert c.logits_workspace < a.logits_workspace / 3 and c.total < a.total
        assert a.training_state == b.training_state == c.training_state


def test_mixed_precision_keeps_float32_state_and_bf16_activations():
    true = estimate_memory("tiny", seq_len=64)
    mixed = estimate_memory("tiny", seq_len=64, mixed_precision=True)
    fp32 = estimate_memory("tiny", seq_len=64, dtype="fp32")
    assert mixed.precision == "bf16-mixed" and true.precision == "bf16-true"
    for m, f, t in zip(mixed.arms, fp32.arms, true.arms, strict=True):
        assert (m.weights, m.grads, m.optimizer_state) == (f.weights, f.grads, f.optimizer_state)
        assert t.activations < m.activations  # bf16 copies of float32 inputs, and a float32 residual stream


def test_gemma2_counts_fused_attention_on_cuda_and_eager_on_cpu():
    cuda = estimate_memory("gemma-2-9b", seq_len=2048, activations="trace")
    cpu = estimate_memory("gemma-2-9b", seq_len=2048, device="cpu")
    assert cuda.activation_method == cpu.activation_method == "trace"
    matrix = 2048 * 2048 * 16 * 2  # one block's bf16 attention matrix
    assert cpu.lora.activations - cuda.lora.activations > 42 * matrix
    assert build_meta_model(load_config("gemma-2-9b")[1]).config._attn_implementation == "eager"  # restored


def test_new_flags_on_the_command_line(capsys):
    args = ["tiny", "--seq-len", "64", "--unit", "MiB", "--json"]
    assert main([*args, "--mixed", "--gradient-checkpointing", "--loss-chunk-size", "16"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["precision"] == "bf16-mixed" and payload["gradient_checkpointing"] is True
    assert payload["loss_chunk_size"] == 16
    assert main([*args, "--step-in-backward", "--compact-always-active"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["step_in_backward"] and payload["compact_always_active"] == "8bit"
    assert main([*args, "--compact-always-active", "factored", "--compact-blocks", "factored", "--fused"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert (payload["compact_always_active"], payload["compact_blocks"], payload["fused"]) == ("factored",) * 2 + (
        True,
    )
    assert payload["lisa"]["total"] < estimate_memory("tiny", seq_len=64).lisa.total
    assert main(["tiny", "--mixed", "--dtype", "fp32"]) == 2
    assert "mixed_precision=True" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("flags", "mode"),
    [
        (["--compact-always-active", "tiny"], "8bit"),  # the old form: the flag, then the model
        (["--compact-always", "tiny"], "8bit"),  # an abbreviation
        (["tiny", "--compact-always-active", "--json"], "8bit"),
        (["--compact-always-active", "factored", "tiny"], "factored"),
        (["tiny", "--compact-always-active=factored"], "factored"),
        (["tiny"], None),
    ],
)
def test_compact_always_active_takes_a_mode_only_when_one_follows(capsys, flags, mode):
    assert main([*flags, "--seq-len", "64", "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["model"] == "tiny" and payload["compact_always_active"] == mode


def test_memory_map_script_writes_its_tables(tmp_path):
    """benchmarks/memory_map.py at the tiny shape: two tables (own and chunked loss), one ratio per variant."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [
            sys.executable,
            str(root / "benchmarks" / "memory_map.py"),
            "--shapes",
            "tiny",
            "--out",
            str(tmp_path / "map"),
        ],
        cwd=root / "benchmarks",
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads((tmp_path / "map.json").read_text())["rows"]
    assert len(rows) == 2 * 2 * 2  # batches x checkpointing x loss
    for row in rows:
        assert set(row["ratio"]) == {
            "default",
            "step in backward",
            "+ fused AdamW",
            "compact",
            "both",
            "factored everywhere",
            "+ step in backward",
        }
        assert row["lisa_gib"]["+ step in backward"] <= row["lisa_gib"]["both"] <= row["lisa_gib"]["default"]
    text = (tmp_path / "map.md").read_text()
    assert text.count("| tiny |") == 8 and "(estimated)" in text
