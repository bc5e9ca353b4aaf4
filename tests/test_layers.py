"""find_layers on tiny random models of every architecture the table knows, and through wrappers."""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
import pytest
import torch
import transformers as tf
from lightning.fabric.utilities.exceptions import MisconfigurationException
from torch import nn

from lightning_lisa import BLOCK_LISTS, find_layers
from lightning_lisa.errors import LISAConfigError
from lightning_lisa.layers import module_list_candidates, split_units, unique_parameters
from lightning_lisa.testing import SEQ2SEQ, CausalLM, tiny_llama

SMALL = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2, vocab_size=64)
GQA = dict(SMALL, num_key_value_heads=1)
GPT = dict(n_embd=16, n_layer=3, n_head=2, vocab_size=64, n_positions=32)
T5 = dict(d_model=16, d_ff=32, num_layers=2, num_heads=2, d_kv=8, vocab_size=64)
T5_PATHS = (["encoder.block", "decoder.block"], "shared", "lm_head", True)


def decoder(config: type, model: type, kwargs: dict = GQA, tied: bool = False) -> tuple:
    """A row for a decoder with ``model.layers``, ``model.embed_tokens`` and ``lm_head``."""
    return (config, model, kwargs, ["model.layers"], "model.embed_tokens", "lm_head", tied)


# model_type -> (config class, model class, config kwargs, block paths, embedding names, head names, tied)
ARCHITECTURES = {
    "llama": decoder(tf.LlamaConfig, tf.LlamaForCausalLM),
    "mistral": decoder(tf.MistralConfig, tf.MistralForCausalLM),
    "mixtral": decoder(tf.MixtralConfig, tf.MixtralForCausalLM, dict(GQA, num_local_experts=2)),
    "qwen2": decoder(tf.Qwen2Config, tf.Qwen2ForCausalLM),
    "qwen3": decoder(tf.Qwen3Config, tf.Qwen3ForCausalLM, dict(GQA, head_dim=8)),
    "gemma": decoder(tf.GemmaConfig, tf.GemmaForCausalLM, dict(GQA, head_dim=8), tied=True),
    "gemma2": decoder(tf.Gemma2Config, tf.Gemma2ForCausalLM, dict(GQA, head_dim=8), tied=True),
    "phi": decoder(tf.PhiConfig, tf.PhiForCausalLM, SMALL),
    "phi3": decoder(tf.Phi3Config, tf.Phi3ForCausalLM, dict(GQA, pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    "gpt2": (
        tf.GPT2Config, tf.GPT2LMHeadModel, dict(GPT, bos_token_id=0, eos_token_id=0),
        ["transformer.h"], "transformer.wte", "lm_head", True,
    ),
    "gpt_neox": (
        tf.GPTNeoXConfig, tf.GPTNeoXForCausalLM, SMALL, ["gpt_neox.layers"], "gpt_neox.embed_in", "lm_head", False
    ),
    "gptj": (
        tf.GPTJConfig, tf.GPTJForCausalLM, dict(GPT, rotary_dim=4, bos_token_id=0, eos_token_id=0),
        ["transformer.h"], "transformer.wte", "lm_head", False,
    ),
    "opt": (
        tf.OPTConfig, tf.OPTForCausalLM, dict(SMALL, ffn_dim=32, word_embed_proj_dim=16),
        ["model.decoder.layers"], "model.decoder.embed_tokens", "lm_head", True,
    ),
    "falcon": (
        tf.FalconConfig, tf.FalconForCausalLM, SMALL,
        ["transformer.h"], "transformer.word_embeddings", "lm_head", True,
    ),
    "bloom": (
        tf.BloomConfig, tf.BloomForCausalLM, dict(hidden_size=16, n_layer=3, n_head=2, vocab_size=64),
        ["transformer.h"], "transformer.word_embeddings", "lm_head", True,
    ),
    "t5": (tf.T5Config, tf.T5ForConditionalGeneration, dict(T5, num_layers=3, num_decoder_layers=2), *T5_PATHS),
    "bert": (
        tf.BertConfig, tf.BertForMaskedLM, SMALL,
        ["bert.encoder.layer"], "bert.embeddings.word_embeddings", "cls.predictions.decoder", True,
    ),
    "roberta": (
        tf.RobertaConfig, tf.RobertaForMaskedLM, SMALL,
        ["roberta.encoder.layer"], "roberta.embeddings.word_embeddings", "lm_head.decoder", True,
    ),
    "qwen2_moe": decoder(
        tf.Qwen2MoeConfig, tf.Qwen2MoeForCausalLM,
        dict(GQA, num_experts=2, moe_intermediate_size=16, shared_expert_intermediate_size=16),
    ),
    "qwen3_moe": decoder(
        tf.Qwen3MoeConfig, tf.Qwen3MoeForCausalLM, dict(GQA, num_experts=2, moe_intermediate_size=16, head_dim=8)
    ),
    "gemma3_text": decoder(tf.Gemma3TextConfig, tf.Gemma3ForCausalLM, dict(GQA, head_dim=8), tied=True),
    "olmo": decoder(tf.OlmoConfig, tf.OlmoForCausalLM),
    "olmo2": decoder(tf.Olmo2Config, tf.Olmo2ForCausalLM),
    "starcoder2": decoder(tf.Starcoder2Config, tf.Starcoder2ForCausalLM, tied=True),
    "gpt_bigcode": (
        tf.GPTBigCodeConfig, tf.GPTBigCodeForCausalLM, GPT, ["transformer.h"], "transformer.wte", "lm_head", True
    ),
    "mt5": (tf.MT5Config, tf.MT5ForConditionalGeneration, T5, *T5_PATHS),
    "umt5": (tf.UMT5Config, tf.UMT5ForConditionalGeneration, T5, *T5_PATHS),
    "bart": (
        tf.BartConfig, tf.BartForConditionalGeneration, SEQ2SEQ,
        ["model.encoder.layers", "model.decoder.layers"], "model.shared", "lm_head", True,
    ),
    "xlm-roberta": (
        tf.XLMRobertaConfig, tf.XLMRobertaForMaskedLM, SMALL,
        ["roberta.encoder.layer"], "roberta.embeddings.word_embeddings", "lm_head.decoder", True,
    ),
    "distilbert": (
        tf.DistilBertConfig, tf.DistilBertForMaskedLM,
        dict(dim=16, hidden_dim=32, n_layers=3, n_heads=2, vocab_size=64),
        ["distilbert.transformer.layer"], "distilbert.embeddings.word_embeddings", "vocab_projector", True,
    ),
}  # fmt: skip


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_known_architectures(model_type):
    config_cls, model_cls, kwargs, paths, embedding, head, tied = ARCHITECTURES[model_type]
    model = model_cls(config_cls(**kwargs))
    info = find_layers(model)
    assert info.model_type == model_type
    assert info.from_table
    assert list(info.block_paths) == paths
    expected_blocks = sum(len(model.get_submodule(p)) for p in paths)
    assert info.num_blocks == expected_blocks
    assert info.block_names[0] == f"{paths[0]}.0"
    assert all(model.get_submodule(n) is b for n, b in zip(info.block_names, info.blocks, strict=True))
    assert info.embedding_names == (embedding,)
    assert info.head_names == (head,)
    # tied weights are counted once
    always = [model.get_submodule(n) for n in info.embedding_names + info.head_names]
    embedding_weight = model.get_submodule(embedding).weight
    head_weight = model.get_submodule(head).weight
    assert (embedding_weight is head_weight) == tied
    head_params = model.get_submodule(head).parameters()
    expected = embedding_weight.numel() + sum(p.numel() for p in head_params if p is not embedding_weight)
    assert sum(p.numel() for p in unique_parameters(always)) == expected


def test_every_table_entry_is_tested():
    assert set(BLOCK_LISTS) == set(ARCHITECTURES)


def test_names_are_relative_to_the_wrapper():
    module = CausalLM()  # LightningModule -> .model (LlamaForCausalLM)
    info = find_layers(module)
    assert info.path == "model.model.layers"
    assert info.num_blocks == 6
    assert info.embedding_names == ("model.model.embed_tokens",)
    assert info.head_names == ("model.lm_head",)

    class DDPLike(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.module = inner

    assert find_layers(DDPLike(module)).path == "module.model.model.layers"


def test_peft_wrapped_model():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_llama(4), peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    info = find_layers(model)
    assert info.path == "base_model.model.model.layers"
    assert info.num_blocks == 4
    assert info.embedding_names == ("base_model.model.model.embed_tokens",)
    assert info.head_names == ("base_model.model.lm_head",)


def test_base_model_without_head_and_classifier_head():
    base = tf.LlamaModel(tf.LlamaConfig(**GQA))
    info = find_layers(base)
    assert (info.path, info.embedding_names, info.head_names) == ("layers", ("embed_tokens",), ())

    classifier = tf.LlamaForSequenceClassification(tf.LlamaConfig(**GQA, num_labels=3, pad_token_id=0))
    assert find_layers(classifier).head_names == ("score",)


class PlainLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Embedding(50, 8)
        self.pos = nn.Embedding(16, 8)
        self.small = nn.ModuleList([nn.Linear(2, 2) for _ in range(3)])  # identical, but smaller
        self.stack = nn.ModuleList([nn.TransformerEncoderLayer(8, 2, 16, batch_first=True) for _ in range(4)])
        self.norm = nn.LayerNorm(8)
        self.out = nn.Linear(8, 50)


def test_plain_torch_model_structural_fallback():
    info = find_layers(PlainLM())
    assert info.model_type is None
    assert not info.from_table
    assert info.path == "stack"
    assert info.num_blocks == 4
    assert info.embedding_names == ("tok", "pos")
    assert info.head_names == ("out",)


def test_unknown_hf_architecture_falls_back_to_structure():
    model = tiny_llama(3)
    model.config.model_type = "my_new_llama"
    info = find_layers(model)
    assert (info.path, info.from_table, info.model_type) == ("model.layers", False, "my_new_llama")


def test_explicit_layers_path():
    model = PlainLM()
    assert find_layers(model, layers="small").path == "small"
    assert find_layers(model, layers=["small", "stack"]).num_blocks == 7


def test_explicit_path_errors_list_the_candidates():
    with pytest.raises(MisconfigurationException, match=r"'stak' does not exist.*\['small', 'stack'\]"):
        find_layers(PlainLM(), layers="stak")
    with pytest.raises(MisconfigurationException, match=r"'norm' is a LayerNorm, not an nn.ModuleList or nn.Seq"):
        find_layers(PlainLM(), layers="norm")


def test_no_block_list_is_an_error():
    with pytest.raises(MisconfigurationException, match=r"found no block list in Sequential.*Pass `layers=`"):
        find_layers(nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2)))


def test_find_layers_does_not_modify_the_model():
    model = tiny_llama(3)
    before = {n: (p.requires_grad, p.detach().clone()) for n, p in model.named_parameters()}
    find_layers(model)
    for n, p in model.named_parameters():
        assert p.requires_grad == before[n][0]
        assert torch.equal(p, before[n][1])


FINAL_NORMS = {
    "llama": ("model.norm",),
    "gpt2": ("transformer.ln_f",),
    "opt": ("model.decoder.final_layer_norm",),
    "bloom": ("transformer.ln_f",),
    "gpt_neox": ("gpt_neox.final_layer_norm",),
    "t5": ("encoder.final_layer_norm", "decoder.final_layer_norm"),
    "bert": (),
    "bart": (),  # layernorm_embedding is applied before the layers
    "olmo": (),  # a parameter-free norm: nothing to train
    "qwen3_moe": ("model.norm",),
}


@pytest.mark.parametrize("model_type", sorted(FINAL_NORMS))
def test_final_norms(model_type):
    config_cls, model_cls, kwargs, *_ = ARCHITECTURES[model_type]
    assert find_layers(model_cls(config_cls(**kwargs))).final_norm_names == FINAL_NORMS[model_type]


def test_module_units_of_gpt2_and_t5():
    config_cls, model_cls, kwargs, *_ = ARCHITECTURES["gpt2"]
    gpt2 = find_layers(model_cls(config_cls(**kwargs)))
    assert [u.name for u in split_units(gpt2, "module")][:2] == ["transformer.h.0.attn", "transformer.h.0.mlp"]
    config_cls, model_cls, kwargs, *_ = ARCHITECTURES["t5"]
    t5 = find_layers(model_cls(config_cls(**kwargs)))
    names = [u.name for u in split_units(t5, "module")]
    assert names[:2] == ["encoder.block.0.layer.0", "encoder.block.0.layer.1"]  # self-attention, feed-forward
    assert names[-3:] == ["decoder.block.1.layer.0", "decoder.block.1.layer.1", "decoder.block.1.layer.2"]
    assert [u.block for u in split_units(t5, "block")] == list(range(5))
    # every parameter of every block belongs to some unit
    for info in (gpt2, t5):
        units = split_units(info, "module")
        covered = {id(p) for u in units for p in unique_parameters(u.modules)}
        assert covered == {id(p) for b in info.blocks for p in b.parameters()}


def test_hybrid_lists_of_mixed_composite_blocks_are_block_lists():
    class Mamba(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mix = nn.Linear(8, 8)
            self.adapters = nn.ModuleList(nn.Linear(8, 8) for _ in range(2))  # inside a block: not a candidate

    class Attention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2)

    model = nn.Module()
    model.layers = nn.ModuleList([Mamba(), Attention(), Mamba(), Attention()])
    assert module_list_candidates(model) == ["layers"]
    assert find_layers(model).block_names == ("layers.0", "layers.1", "layers.2", "layers.3")
    # a list mixing single layers of different classes is not a block list
    model.layers = nn.ModuleList([nn.Linear(8, 8), nn.Conv1d(8, 8, 1)])
    with pytest.raises(MisconfigurationException, match="found no block list"):
        find_layers(model)


def test_sequential_block_lists():
    from collections import OrderedDict

    model = nn.Module()
    model.stages = nn.Sequential(
        OrderedDict((f"stage{i}", nn.TransformerEncoderLayer(8, 2, 16, batch_first=True)) for i in range(3))
    )
    model.mlp = nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 8))  # mixed, with a layer without parameters
    info = find_layers(model)
    assert info.block_paths == ("stages",)
    assert info.block_names == ("stages.stage0", "stages.stage1", "stages.stage2")  # the container's own names
    assert find_layers(model, layers="mlp").num_blocks == 3  # any Sequential when named explicitly
    model.empty = nn.Sequential()
    with pytest.raises(MisconfigurationException, match=r"'empty' is an empty Sequential"):
        find_layers(model, layers="empty")


# the input side beyond the token embedding, trained with it by default (see docs/guides/models.md)
EXTRA_EMBEDDINGS = {
    "bart": (
        "model.encoder.embed_positions",
        "model.encoder.layernorm_embedding",
        "model.decoder.embed_positions",
        "model.decoder.layernorm_embedding",
    ),
    "bert": (
        "bert.embeddings.position_embeddings",
        "bert.embeddings.token_type_embeddings",
        "bert.embeddings.LayerNorm",
    ),
    "bloom": ("transformer.word_embeddings_layernorm",),
    "distilbert": ("distilbert.embeddings.position_embeddings", "distilbert.embeddings.LayerNorm"),
    "gpt2": ("transformer.wpe",),
    "gpt_bigcode": ("transformer.wpe",),
    "opt": ("model.decoder.embed_positions",),
    "roberta": (
        "roberta.embeddings.token_type_embeddings",
        "roberta.embeddings.LayerNorm",
        "roberta.embeddings.position_embeddings",
    ),
}


EXTRA_EMBEDDINGS["xlm-roberta"] = EXTRA_EMBEDDINGS["roberta"]


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_extra_embeddings_of_known_architectures(model_type):
    config_cls, model_cls, kwargs, *_ = ARCHITECTURES[model_type]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        info = find_layers(model_cls(config_cls(**kwargs)))
    assert info.extra_embedding_names == EXTRA_EMBEDDINGS.get(model_type, ())
    assert info.projector_names == () and info.tower_names == ()


class SequentialLM(nn.Module):
    """Embedding, blocks and head in one nn.Sequential: the blocks are not a list of their own."""

    def __init__(self) -> None:
        super().__init__()
        blocks = [nn.TransformerEncoderLayer(8, 2, 16, batch_first=True) for _ in range(3)]
        self.net = nn.Sequential(nn.Embedding(16, 8), *blocks, nn.Linear(8, 16))


def test_layers_naming_a_list_with_the_embedding_is_refused():
    with pytest.raises(LISAConfigError, match=r"`layers='net'`: 'net' holds `net.0` \(Embedding: an embedding\)"):
        find_layers(SequentialLM(), layers="net")
    # LISA refuses it before anything trains
    from lightning_lisa import LISA
    from lightning_lisa.testing import quiet_trainer

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = SequentialLM()

        def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
            return self.model.net(batch.long()).sum()

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW(self.parameters())

    with pytest.raises(LISAConfigError, match="not only blocks"):
        quiet_trainer([LISA(n_layers=1, layers="model.net")], max_steps=1).fit(Module(), [torch.zeros(1)])


def test_layers_naming_a_list_with_a_hugging_face_head_is_refused():
    model = tiny_llama(3)
    holder = nn.Module()
    holder.stack = nn.ModuleList([*model.model.layers, model.lm_head])
    holder.model = model
    with pytest.raises(LISAConfigError, match=r"'stack' holds `stack.3` \(Linear: the head\)"):
        find_layers(holder, layers="stack")


def test_layers_naming_a_list_with_odd_entries_warns():
    model = nn.Module()
    model.stack = nn.ModuleList([nn.TransformerEncoderLayer(8, 2, 16, batch_first=True) for _ in range(3)])
    model.stack.append(nn.LayerNorm(8))
    with pytest.warns(UserWarning, match=r"not blocks like the others: \['stack.3'\]"):
        find_layers(model, layers="stack")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a list of blocks alone: no warning
        plain = nn.Module()
        plain.stack = nn.ModuleList([nn.TransformerEncoderLayer(8, 2, 16, batch_first=True) for _ in range(3)])
        find_layers(plain, layers="stack")
