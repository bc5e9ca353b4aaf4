"""Models as users bring them: tiny random models of families no one on this project wrote.

One test (or more) per failure found by trying LISA on such models: a single stack sampled in an
encoder-decoder, a hybrid model's adapters taken for its blocks, a vision-language model's vision tower
sampled instead of its language model, ``nn.Sequential`` block containers refused, a ViT's patch
embedding, class token and position embedding frozen all run, BART's learned positions frozen, and
nothing reporting what never trains (also under PEFT).
"""

from __future__ import annotations

import importlib
import logging
import math
import warnings
from types import ModuleType
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import transformers as tf
from lightning.pytorch.demos import Transformer
from torch import nn

from lightning_lisa import BLOCK_LISTS, LISA, find_layers
from lightning_lisa.layers import default_always_active, split_units
from lightning_lisa.report import build_report
from lightning_lisa.testing import SEQ2SEQ, CausalLM, quiet_trainer, tiny_llama, token_loader


def optional(name: str) -> ModuleType:
    """Import an optional test dependency, or skip with the reason."""
    try:
        return importlib.import_module(name)
    except ImportError:
        pytest.skip(f"{name} is not installed (an optional test dependency; see docs/guides/models.md)")
    except Exception as err:  # e.g. timm's torchvision built for another torch
        pytest.skip(f"{name} is installed but does not import here: {err!r}")


def quiet_find_layers(module: nn.Module, **kwargs: Any):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return find_layers(module, **kwargs)


class Wrapped(pl.LightningModule):
    """A LightningModule around any model; ``loss(model, batch)`` computes the loss."""

    def __init__(self, model: nn.Module, loss: Any) -> None:
        super().__init__()
        self.model = model
        self.loss = loss

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        return self.loss(self.model, batch)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def fit(module: pl.LightningModule, lisa: LISA, data: Any, steps: int) -> set[str]:
    """Fit for ``steps`` optimizer steps; the names of the parameters that changed."""
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    quiet_trainer([lisa], max_steps=steps).fit(module, data)
    return {n for n, p in module.named_parameters() if not torch.equal(p.detach(), before[n])}


def seq2seq_loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    return model(input_ids=batch, labels=batch).loss


# ----------------------------------------------------------------------------- 1. every stack


def marian() -> nn.Module:
    torch.manual_seed(0)
    return tf.MarianMTModel(tf.MarianConfig(**SEQ2SEQ, decoder_vocab_size=64))


def mbart() -> nn.Module:
    torch.manual_seed(0)
    return tf.MBartForConditionalGeneration(tf.MBartConfig(**SEQ2SEQ))


def pegasus() -> nn.Module:
    torch.manual_seed(0)
    return tf.PegasusForConditionalGeneration(tf.PegasusConfig(**SEQ2SEQ))


def whisper() -> nn.Module:
    torch.manual_seed(0)
    config = {**SEQ2SEQ, "max_position_embeddings": None}
    return tf.WhisperForConditionalGeneration(
        tf.WhisperConfig(**config, num_mel_bins=8, max_source_positions=16, max_target_positions=16)
    )


def lightning_demo() -> nn.Module:
    torch.manual_seed(0)
    return Transformer(vocab_size=64, ninp=16, nhead=2, nhid=32, nlayers=2)


ENCODER_DECODERS = {
    "marian": (marian, ["model.encoder.layers", "model.decoder.layers"]),
    "mbart": (mbart, ["model.encoder.layers", "model.decoder.layers"]),
    "pegasus": (pegasus, ["model.encoder.layers", "model.decoder.layers"]),
    "whisper": (whisper, ["model.encoder.layers", "model.decoder.layers"]),
    "lightning-demo": (lightning_demo, ["transformer.encoder.layers", "transformer.decoder.layers"]),
}


@pytest.mark.parametrize("family", sorted(ENCODER_DECODERS))
def test_encoder_decoders_sample_both_stacks(family):
    build, paths = ENCODER_DECODERS[family]
    model = build()
    assert getattr(getattr(model, "config", None), "model_type", None) not in BLOCK_LISTS  # found structurally
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an unambiguous choice: no warning
        info = find_layers(model)
    assert list(info.block_paths) == paths
    assert not info.from_table
    assert info.num_blocks == 4
    assert info.block_names[0] == f"{paths[0]}.0" and info.block_names[-1] == f"{paths[1]}.1"


def test_marian_encoder_trains():
    """The failure: 0 of 48 encoder tensors changed in a Marian run (only the decoder was found)."""
    module = Wrapped(marian(), seq2seq_loss)
    lisa = LISA(n_layers=2, interval=1, sampling="cyclic", seed=0)
    changed = fit(module, lisa, token_loader(n_batches=4), steps=4)
    assert {name for s in lisa.history for name in (lisa.unit_names[i] for i in s.active_layers)} == set(
        lisa.unit_names
    )
    encoder = [n for n, _ in module.named_parameters() if n.startswith("model.model.encoder.layers.")]
    assert encoder and set(encoder) <= changed


def test_lightning_demo_transformer_trains_both_stacks():
    def loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        return nn.functional.nll_loss(model(batch, batch), batch.flatten())  # the demo's own loss

    module = Wrapped(lightning_demo(), loss)
    lisa = LISA(n_layers=2, interval=1, sampling="cyclic")
    changed = fit(module, lisa, token_loader(n_batches=4), steps=4)
    for stack in ("encoder", "decoder"):
        names = [n for n, _ in module.named_parameters() if n.startswith(f"model.transformer.{stack}.layers.")]
        assert names and set(names) <= changed


def zamba2() -> nn.Module:
    torch.manual_seed(0)
    config = tf.Zamba2Config(
        hidden_size=16,
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=64,
        mamba_d_state=4,
        mamba_headdim=4,
        n_mamba_heads=2,
        intermediate_size=32,
        layers_block_type=["mamba", "hybrid", "mamba", "hybrid"],
        num_mem_blocks=1,
        use_shared_attention_adapter=True,
        adapter_rank=2,
        attention_head_dim=8,
    )
    return tf.Zamba2ForCausalLM(config)


def test_zamba2_samples_its_hybrid_layers_not_the_adapters():
    """The failure: a 2-entry adapter list inside a hybrid layer was taken for the blocks."""
    model = zamba2()
    layer_classes = {type(layer).__name__ for layer in model.model.layers}
    assert len(layer_classes) == 2  # Mamba and hybrid layers in one list
    info = find_layers(model)
    assert info.block_paths == ("model.layers",)
    assert info.num_blocks == 4
    assert info.embedding_names == ("model.embed_tokens",) and info.head_names == ("lm_head",)


# ------------------------------------------------------------------------ multimodal models


def llava() -> nn.Module:
    """A LLaVA whose vision tower holds more parameters than its language model."""
    torch.manual_seed(0)
    vision = tf.CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2, image_size=16, patch_size=4
    )
    text = tf.LlamaConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1
    )
    text.vocab_size = 64
    return tf.LlavaForConditionalGeneration(tf.LlavaConfig(vision_config=vision, text_config=text, image_token_id=63))


def test_llava_samples_the_language_model_and_says_what_stays_frozen():
    model = llava()
    vision = sum(p.numel() for p in model.model.vision_tower.parameters())
    language = sum(p.numel() for p in model.model.language_model.layers.parameters())
    assert vision > language  # the tower that used to be sampled
    with pytest.warns(UserWarning, match=r"`model.vision_tower.encoder.layers` .* is not sampled") as record:
        info = find_layers(model)
    assert any("hold only" in str(w.message) for w in record)  # a small share of the model
    assert info.block_paths == ("model.language_model.layers",)
    assert info.tower_names == ("model.vision_tower",)
    assert info.projector_names == ("model.multi_modal_projector",)
    always = default_always_active(info)
    assert always == ["model.language_model.embed_tokens", "lm_head", "model.multi_modal_projector"]
    report = build_report(model, info, split_units(info, "block"), always, 1, 10)
    assert [e.name for e in report.frozen_for_run] == ["model.vision_tower", "model.language_model.norm"]
    assert report.frozen_for_run[0].params == vision
    assert "model.vision_tower" in str(report) and "frozen for the whole run" in str(report)


def test_llava_user_chooses_the_towers_to_sample():
    model = llava()
    paths = ["model.language_model.layers", "model.vision_tower.encoder.layers"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        info = find_layers(model, layers=paths)
    assert list(info.block_paths) == paths and info.num_blocks == 6
    assert info.tower_names == ()  # a sampled tower is not frozen; its patch and position embeddings train
    assert "model.vision_tower.embeddings" in default_always_active(info)


# model class -> (language-model block list, towers, projectors); default configs, built on the meta device
VLM_LAYOUTS = {
    "Gemma3ForConditionalGeneration": (
        "model.language_model.layers",
        ("model.vision_tower",),
        ("model.multi_modal_projector",),
    ),
    "Qwen2VLForConditionalGeneration": ("model.language_model.layers", ("model.visual",), ()),
    "Idefics3ForConditionalGeneration": ("model.text_model.layers", ("model.vision_model",), ("model.connector",)),
    "MllamaForConditionalGeneration": (
        "model.language_model.layers",
        ("model.vision_model",),
        ("model.multi_modal_projector",),
    ),
    "PaliGemmaForConditionalGeneration": (
        "model.language_model.layers",
        ("model.vision_tower",),
        ("model.multi_modal_projector",),
    ),
    "Blip2ForConditionalGeneration": (
        "language_model.model.decoder.layers",
        ("vision_model", "qformer"),
        ("language_projection", "query_tokens"),
    ),
}


@pytest.mark.parametrize("model_class", sorted(VLM_LAYOUTS))
def test_vision_language_layouts(model_class):
    config_class = getattr(tf, model_class.replace("ForConditionalGeneration", "Config"))
    with torch.device("meta"):
        model = getattr(tf, model_class)(config_class())
    info = quiet_find_layers(model)
    blocks, towers, projectors = VLM_LAYOUTS[model_class]
    assert info.block_paths == (blocks,)
    assert (info.tower_names, info.projector_names) == (towers, projectors)
    always = default_always_active(info)
    assert len(always) == len(set(always))
    assert not any(name.startswith(towers) for name in always)  # the towers stay frozen


# ---------------------------------------------------------------- 2. nn.Sequential block lists


class PatchEmbed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, 16, kernel_size=4, stride=4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class TimmLikeViT(nn.Module):
    """The layout of timm's VisionTransformer: blocks in an nn.Sequential, class token and positions as parameters."""

    def __init__(self, depth: int = 4, classes: int = 5) -> None:
        super().__init__()
        self.patch_embed = PatchEmbed()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, 16))
        self.pos_embed = nn.Parameter(torch.randn(1, 17, 16) * 0.02)
        self.pos_drop = nn.Dropout(0.0)
        self.blocks = nn.Sequential(
            *[nn.TransformerEncoderLayer(16, 2, 32, batch_first=True, norm_first=True) for _ in range(depth)]
        )
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.patch_embed(x)
        h = torch.cat([self.cls_token.expand(h.shape[0], -1, -1), h], dim=1) + self.pos_embed
        h = self.norm(self.blocks(self.pos_drop(h)))
        return self.head(h[:, 0])


def image_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    images, labels = batch
    return nn.functional.cross_entropy(model(images), labels)


def image_loader(n_batches: int = 4, size: int = 16) -> torch.utils.data.DataLoader[Any]:
    g = torch.Generator().manual_seed(0)
    images = torch.randn(n_batches * 2, 3, size, size, generator=g)
    labels = torch.randint(0, 5, (n_batches * 2,), generator=g)
    return torch.utils.data.DataLoader(list(zip(images, labels, strict=True)), batch_size=2)


def test_sequential_blocks_are_found_named_and_keep_their_keys():
    model = TimmLikeViT()
    keys = sorted(model.state_dict())
    info = find_layers(model)
    assert info.block_paths == ("blocks",)
    assert info.block_names == ("blocks.0", "blocks.1", "blocks.2", "blocks.3")
    assert find_layers(model, layers="blocks").block_paths == ("blocks",)  # was refused as "not an nn.ModuleList"
    assert info.embedding_names == ("patch_embed",)
    assert info.extra_embedding_names == ("cls_token", "pos_embed")
    assert info.head_names == ("head",) and info.final_norm_names == ("norm",)
    assert isinstance(model.blocks, nn.Sequential) and sorted(model.state_dict()) == keys  # nothing re-wrapped


def test_vit_patch_embedding_class_token_and_positions_train():
    """The failure: outside Hugging Face only nn.Embedding was always active, so these stayed frozen all run."""
    module = Wrapped(TimmLikeViT(), image_loss)
    lisa = LISA(n_layers=1, interval=2)
    changed = fit(module, lisa, image_loader(), steps=4)
    assert {"model.patch_embed.proj.weight", "model.cls_token", "model.pos_embed", "model.head.weight"} <= changed
    assert [e.name for e in lisa.report.frozen_for_run] == ["model.norm"]
    assert "model.norm.weight" not in changed


def test_timm_vit():
    timm = optional("timm")
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=5, img_size=32, depth=3)
    keys = sorted(model.state_dict())
    info = find_layers(model)
    assert isinstance(model.blocks, nn.Sequential)
    assert info.block_paths == ("blocks",) and info.num_blocks == 3
    assert default_always_active(info) == ["patch_embed", "cls_token", "pos_embed", "head"]
    module = Wrapped(model, image_loss)
    changed = fit(module, LISA(n_layers=1, interval=2), image_loader(size=32), steps=2)
    assert {"model.cls_token", "model.pos_embed", "model.patch_embed.proj.weight"} <= changed
    assert sorted(model.state_dict()) == keys


# ------------------------------------------------------------- 3. always-active defaults


def test_bart_learned_positions_and_embedding_norm_train():
    torch.manual_seed(0)
    model = tf.BartForConditionalGeneration(tf.BartConfig(**SEQ2SEQ))
    info = find_layers(model)
    assert info.extra_embedding_names == (
        "model.encoder.embed_positions",
        "model.encoder.layernorm_embedding",
        "model.decoder.embed_positions",
        "model.decoder.layernorm_embedding",
    )
    module = Wrapped(model, seq2seq_loss)
    lisa = LISA(n_layers=1, interval=2)
    changed = fit(module, lisa, token_loader(n_batches=2), steps=2)
    for stack in ("encoder", "decoder"):
        assert f"model.model.{stack}.embed_positions.weight" in changed
        assert f"model.model.{stack}.layernorm_embedding.weight" in changed


#: A tiny encoder (BERT, ViT): 2 blocks of width 16.
ENCODER = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2)

# name -> (model, extra input-side names)
INPUT_SIDE = {
    "gpt2": (
        lambda: tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=64, n_positions=32)),
        ("transformer.wpe",),
    ),
    "bert": (
        lambda: tf.BertForMaskedLM(tf.BertConfig(**ENCODER, vocab_size=64, max_position_embeddings=32)),
        ("bert.embeddings.position_embeddings", "bert.embeddings.token_type_embeddings", "bert.embeddings.LayerNorm"),
    ),
    "hf-vit": (
        lambda: tf.ViTForImageClassification(tf.ViTConfig(**ENCODER, image_size=16, patch_size=4, num_labels=3)),
        ("vit.embeddings.cls_token", "vit.embeddings.position_embeddings"),
    ),
    "llama": (lambda: tiny_llama(2), ()),
    "mamba": (
        lambda: tf.MambaForCausalLM(tf.MambaConfig(hidden_size=16, num_hidden_layers=2, vocab_size=64, state_size=4)),
        (),
    ),
}


@pytest.mark.parametrize("family", sorted(INPUT_SIDE))
def test_input_side_defaults(family):
    build, extras = INPUT_SIDE[family]
    info = quiet_find_layers(build())
    assert info.extra_embedding_names == extras


def test_litgpt():
    optional("litgpt")
    from litgpt.config import Config
    from litgpt.model import GPT

    model = GPT(Config(n_layer=3, n_head=2, n_embd=16, block_size=32, vocab_size=64, padded_vocab_size=64))
    info = find_layers(model)
    assert (info.path, info.num_blocks) == ("transformer.h", 3)
    assert default_always_active(info) == ["transformer.wte", "lm_head"]
    assert info.final_norm_names == ("transformer.ln_f",)


# --------------------------------------------------------------------- 4. the start-up report


def test_report_is_logged_once_and_kept(caplog):
    module = CausalLM(num_layers=4)
    lisa = LISA(n_layers=2, interval=2)
    with caplog.at_level(logging.INFO):
        quiet_trainer([lisa], max_steps=4).fit(module, token_loader())
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("LISA trains")]
    assert len(lines) == 1
    assert lines[0] == str(lisa.report)
    report = lisa.report
    assert report is not None
    assert [e.name for e in report.sampled] == ["model.model.layers (4 blocks)"]
    assert [e.name for e in report.always_trained] == ["model.model.embed_tokens", "model.lm_head"]
    assert [e.name for e in report.frozen_for_run] == ["model.model.norm"]
    parts = report.sampled_params + report.always_trained_params + report.frozen_for_run_params
    assert parts + report.frozen_before_fit_params == report.total_params == sum(p.numel() for p in module.parameters())


def test_report_is_true_under_peft():
    """The failure: the start-up line said "always trained: embed_tokens, lm_head" though PEFT froze them."""
    peft = optional("peft")
    model = peft.get_peft_model(tiny_llama(4), peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    module = CausalLM(model=model)
    lisa = LISA(n_layers=2, interval=2)
    changed = fit(module, lisa, token_loader(), steps=4)
    report = lisa.report
    assert report is not None
    assert report.always_trained_params == 0
    assert all("frozen before fit" in e.note for e in report.always_trained)
    lora = sum(p.numel() for n, p in module.named_parameters() if "lora_" in n)
    assert report.sampled_params == lora
    assert report.frozen_before_fit_params == report.total_params - lora
    assert report.frozen_for_run_params == 0
    assert "model.base_model.model.model.layers (parts of 4 blocks)" in [e.name for e in report.frozen_before_fit]
    assert all("lora_" in n for n in changed)
    assert "frozen before fit" in str(report)


# ----------------------------------------------------------------------- ambiguous choices


class TwoLists(nn.Module):
    def __init__(self, first: int, second: int) -> None:
        super().__init__()
        self.a = nn.ModuleList(nn.Linear(first, first) for _ in range(3))
        self.b = nn.ModuleList(nn.Linear(second, second) for _ in range(3))
        self.head = nn.Linear(second, 2)


def test_warns_when_lists_of_similar_size_compete():
    with pytest.warns(UserWarning, match=r"`a` \(3 entries, .*\) is not sampled: its entries are single layers"):
        info = find_layers(TwoLists(15, 16))
    assert info.block_paths == ("b",)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert find_layers(TwoLists(4, 16)).block_paths == ("b",)  # clearly the larger one: no warning
        assert find_layers(TwoLists(15, 16), layers="b").warnings == ()  # the user chose


def test_warns_when_the_blocks_hold_a_small_share():
    model = nn.Module()
    model.embed = nn.Embedding(4000, 16)
    model.layers = nn.ModuleList(nn.TransformerEncoderLayer(16, 2, 32) for _ in range(2))
    with pytest.warns(UserWarning, match=r"hold only \d+% of the model's parameters"):
        info = find_layers(model)
    share = sum(p.numel() for p in model.layers.parameters()) / sum(p.numel() for p in model.parameters())
    assert share < 0.2 and math.isclose(share, 0.063, abs_tol=0.01)
    assert len(info.warnings) == 1
