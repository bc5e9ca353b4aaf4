"""torch.compile with LISA: per-block compilation compiles a bounded number of times over many switches."""

from __future__ import annotations

import random

import lightning.pytorch as pl
import pytest
import torch
import torch._dynamo as dynamo
from lightning.pytorch.utilities.compile import from_compiled
from torch import nn

from lightning_lisa import LISA, find_layers
from lightning_lisa.compile import compile_blocks, compiled_over_blocks, warn_whole_model_compile


class CountingBackend:
    """A torch.compile backend that runs the captured graph eagerly and counts compilations."""

    def __init__(self) -> None:
        self.compiles = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]):
        self.compiles += 1
        return gm.forward


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(16)
        self.up = nn.Linear(16, 32)
        self.down = nn.Linear(32, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.relu(self.up(self.norm(x))))


class TinyLM(nn.Module):
    def __init__(self, blocks: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(64, 16)
        self.layers = nn.ModuleList(Block() for _ in range(blocks))
        self.head = nn.Linear(16, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for layer in self.layers:
            h = layer(h)
        return self.head(h)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    dynamo.reset()
    yield
    dynamo.reset()


def _switch_and_step(model: TinyLM, forward, switches: int, seed: int = 0) -> list[int]:
    """Freeze all blocks but one (a new one each switch, as LISA does), run forward and backward."""
    rng = random.Random(seed)
    active_sets = []
    for _ in range(switches):
        active = rng.randrange(len(model.layers))
        for i, block in enumerate(model.layers):
            block.requires_grad_(i == active)
        forward(torch.randint(0, 64, (2, 8))).sum().backward()
        active_sets.append(active)
    return active_sets


@pytest.mark.parametrize("embeddings_trainable", [True, False])
def test_per_block_compile_is_bounded_over_20_switches(embeddings_trainable):
    torch.manual_seed(0)
    model = TinyLM()
    keys = sorted(model.state_dict())
    backend = CountingBackend()
    compile_blocks(model, backend=backend)
    model.embed.requires_grad_(embeddings_trainable)
    active = _switch_and_step(model, model, switches=20)
    assert len(set(active)) == 4  # every block was trainable in some period, frozen in others
    # trainable / frozen, and with frozen embeddings also "input requires grad or not": at most 4 variants,
    # shared by all blocks (one block class), however many switches
    assert 1 <= backend.compiles <= (2 if embeddings_trainable else 4)
    assert sorted(model.state_dict()) == keys  # checkpoints keep their keys


def test_whole_model_compile_recompiles_at_each_new_active_set():
    """What the docs warn about: a model compiled as a whole recompiles for every new set of active blocks."""
    torch.manual_seed(0)
    model = TinyLM(blocks=3)
    backend = CountingBackend()
    compiled = torch.compile(model, backend=backend)
    for active in (0, 1, 2):
        for i, block in enumerate(model.layers):
            block.requires_grad_(i == active)
        compiled(torch.randint(0, 64, (2, 8))).sum().backward()
    assert backend.compiles >= 3


def test_compiled_over_blocks_finds_whole_model_compilation():
    model = TinyLM()
    info = find_layers(model)
    assert compiled_over_blocks(model, info) == []
    compile_blocks(model, backend="eager")
    assert compiled_over_blocks(model, info) == []  # one block per compiled module is fine

    holder = nn.Module()
    holder.model = torch.compile(TinyLM(), backend="eager")
    assert compiled_over_blocks(holder, find_layers(holder)) == ["model"]

    in_place = TinyLM()
    in_place.compile(backend="eager")
    assert compiled_over_blocks(in_place, find_layers(in_place)) == [""]
    with pytest.warns(UserWarning, match=r"the TinyLM is compiled as a whole.*compile_blocks"):
        warn_whole_model_compile(in_place, find_layers(in_place))


class CompiledModule(pl.LightningModule):
    def __init__(self, compile_each_block: bool, backend: CountingBackend | None = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = TinyLM()
        if compile_each_block:
            compile_blocks(self.model, backend=backend)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        logits = self.model(batch)
        return nn.functional.cross_entropy(logits.flatten(0, 1), batch.flatten())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def _fit(module: pl.LightningModule, lisa: LISA, steps: int = 20) -> pl.Trainer:
    data = torch.utils.data.DataLoader(list(torch.randint(0, 64, (steps * 2, 8))), batch_size=2)
    trainer = pl.Trainer(
        max_steps=steps,
        callbacks=[lisa],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    trainer.fit(module, data)
    return trainer


def test_lisa_with_compiled_blocks_compiles_a_bounded_number_of_times():
    backend = CountingBackend()
    module = CompiledModule(compile_each_block=True, backend=backend)
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    lisa = LISA(n_layers=1, interval=1, seed=0)
    _fit(module, lisa, steps=20)
    assert len(lisa.history) == 20  # 20 switches
    assert len({s.active_layers for s in lisa.history}) == 4
    assert backend.compiles <= 2
    changed = {n for n, p in module.named_parameters() if not torch.equal(p, before[n])}
    assert {n.split(".")[2] for n in changed if n.startswith("model.layers.")} == {"0", "1", "2", "3"}


def test_lisa_warns_about_a_whole_model_compiled_lightning_module():
    module = CompiledModule(compile_each_block=False)
    compiled = torch.compile(module, backend="eager")
    unwrapped = from_compiled(compiled)  # what the Trainer does with a compiled LightningModule
    assert compiled_over_blocks(unwrapped, find_layers(unwrapped)) == [""]
    with pytest.warns(UserWarning, match=r"compiled as a whole"):
        warn_whole_model_compile(unwrapped, find_layers(unwrapped))


class WholeCompiled(CompiledModule):
    def __init__(self) -> None:
        super().__init__(compile_each_block=False)
        self.model = torch.compile(self.model, backend="eager")


def test_lisa_warns_when_the_model_is_compiled_as_a_whole():
    module = WholeCompiled()
    lisa = LISA(n_layers=1, interval=1)
    with pytest.warns(UserWarning, match=r"LISA: `model` is compiled as a whole"):
        _fit(module, lisa, steps=1)
    assert lisa.layer_info is not None and lisa.layer_info.path == "model._orig_mod.layers"


def _fit_hf(use_cache: bool | None) -> tuple[LISA, int, list[str]]:
    """A tiny Llama with its default config (or ``use_cache`` set), blocks compiled, 12 periods of LISA."""
    import warnings

    from lightning_lisa.compile import compile_watch
    from lightning_lisa.testing import CausalLM, quiet_trainer, tiny_llama, token_loader

    watch = compile_watch()
    start, seen = watch.compiles, len(watch.fallbacks)
    model = tiny_llama(num_layers=6)
    if use_cache is not None:
        model.config.use_cache = use_cache
    compile_blocks(model, backend="eager")
    lisa = LISA(n_layers=2, interval=2, seed=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_trainer([lisa], max_steps=24).fit(CausalLM(model), token_loader(n_batches=24))
    assert len(lisa.history) == 12
    assert len(watch.fallbacks) - seen == (1 if use_cache is not False else 0)
    return lisa, watch.compiles - start, [str(w.message) for w in caught if "LISA" in str(w.message)]


def test_hf_model_with_its_default_cache_setting_is_reported_at_start_and_when_torch_falls_back():
    _, compiles, messages = _fit_hf(use_cache=None)  # transformers' default: use_cache=True
    assert compiles == dynamo.config.recompile_limit  # one compile per block and variant until the limit
    cache = [m for m in messages if "config.use_cache=True" in m]
    assert len(cache) == 1  # once, at start-up
    fallback = [m for m in messages if "gave up" in m]
    assert len(fallback) == 1
    assert f"after {dynamo.config.recompile_limit} compiles" in fallback[0]
    assert "recompile_limit" in fallback[0] and "Last reason for recompiling: " in fallback[0]


def test_hf_model_without_cache_compiles_twice_over_12_periods():
    _, compiles, messages = _fit_hf(use_cache=False)
    assert compiles == 2  # trainable and frozen, shared by the six blocks
    assert not [m for m in messages if "use_cache" in m or "gave up" in m]


@pytest.mark.parametrize("chunked", [False, True])
def test_the_recipe_trains_without_a_key_value_cache(chunked: bool):
    from lightning_lisa.recipes.module import CausalLMModule
    from lightning_lisa.testing import token_loader

    config = {"model_type": "llama", "vocab_size": 64, "hidden_size": 16, "intermediate_size": 32}
    config |= {"num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1}
    module = CausalLMModule(config=config, loss_chunk_size=4 if chunked else None)
    assert module.model.config.use_cache  # the model's own default
    seen: list[object] = []
    target = module.model.get_decoder() if chunked else module.model
    target.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs.get("use_cache")), with_kwargs=True)
    batch = next(iter(token_loader(labels=True)))
    module.training_step(batch, 0)
    assert seen == [False]
