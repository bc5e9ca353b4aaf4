"""The chunked causal-LM loss: the model's own loss and gradients, without the whole batch's logits."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from lightning_lisa.errors import LISAConfigError
from lightning_lisa.estimate import saved_activation_bytes
from lightning_lisa.recipes.loss import IGNORE_INDEX, causal_lm_loss
from lightning_lisa.recipes.module import CausalLMModule

VOCAB = 96
LLAMA = {
    "model_type": "llama",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": VOCAB,
    "max_position_embeddings": 64,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
GEMMA2 = {  # tied embeddings and final logit softcapping
    "model_type": "gemma2",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "vocab_size": VOCAB,
    "max_position_embeddings": 64,
    "final_logit_softcapping": 0.05,  # small, so that it changes the loss of a random model
    "attn_logit_softcapping": 50.0,
    "query_pre_attn_scalar": 8,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
}


def model_of(config: dict) -> torch.nn.Module:
    fields = dict(config)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(fields.pop("model_type"), **fields)).train()


def batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (3, 11), generator=g)
    labels = ids.clone()
    labels[0, :4] = IGNORE_INDEX  # a prompt that is not predicted
    labels[2, -3:] = IGNORE_INDEX  # padding
    return ids, labels


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("config", [LLAMA, GEMMA2], ids=["llama", "gemma2-tied-softcap"])
@pytest.mark.parametrize("chunk_size", [None, 1, 4, 7, 30, 1000])
def test_equals_the_models_own_loss_and_gradients(config: dict, chunk_size: int | None):
    ids, labels = batch()
    reference = model_of(config)
    expected = reference(input_ids=ids, labels=labels).loss
    expected.backward()

    model = model_of(config)
    hidden = model.get_decoder()(input_ids=ids)[0]
    softcap = getattr(model.config, "final_logit_softcapping", None)
    loss = causal_lm_loss(hidden, model.get_output_embeddings(), labels, chunk_size=chunk_size, softcap=softcap)
    loss.backward()

    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
    want, got = grads(reference), grads(model)
    assert set(got) == set(want) and len(got) == len(list(model.parameters()))
    for name, grad in want.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_without_softcap_gemma2_would_differ():
    """The softcap matters: leaving it out gives another loss, so the test above can fail."""
    ids, labels = batch()
    model = model_of(GEMMA2)
    expected = model(input_ids=ids, labels=labels).loss
    hidden = model.get_decoder()(input_ids=ids)[0]
    plain = causal_lm_loss(hidden, model.get_output_embeddings(), labels, chunk_size=4)
    assert abs(plain.item() - expected.item()) > 1e-3


def test_chunks_keep_no_logits_for_backward():
    """Whole-batch loss saves float32 log-probabilities (tokens x vocab); chunks save only the hidden states."""
    head = torch.nn.Linear(16, 4096, bias=False)
    hidden = torch.randn(2, 64, 16, requires_grad=True)
    labels = torch.randint(0, 4096, (2, 64))
    whole = saved_activation_bytes(head, lambda: causal_lm_loss(hidden, head, labels))
    chunked = saved_activation_bytes(head, lambda: causal_lm_loss(hidden, head, labels, chunk_size=16))
    tokens = 2 * 63
    assert whole >= tokens * 4096 * 4  # the float32 log-probabilities
    assert chunked < tokens * 4096  # far less than even one byte per logit
    assert chunked < whole / 100


def test_the_head_gets_its_gradient_once():
    """Chunks add up before the head's gradient is accumulated: a post-accumulate-grad hook runs once."""
    model = model_of(LLAMA)
    head = model.get_output_embeddings()
    calls: list[int] = []
    head.weight.register_post_accumulate_grad_hook(lambda p: calls.append(1))
    ids, labels = batch()
    causal_lm_loss(model.get_decoder()(input_ids=ids)[0], head, labels, chunk_size=3).backward()
    assert calls == [1]


def test_module_trains_with_the_chunked_loss():
    config = {k: v for k, v in LLAMA.items()}
    ids, labels = batch()
    plain = CausalLMModule(config=config)
    chunked = CausalLMModule(config=config, loss_chunk_size=5)
    chunked.model.load_state_dict(plain.model.state_dict())
    data = {"input_ids": ids, "labels": labels}
    expected = plain.training_step(data, 0)
    loss = chunked.training_step(data, 0)
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
    loss.backward()
    assert all(p.grad is not None for p in chunked.parameters())


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"chunk_size": 0}, ["chunk_size=0", ">= 1"]),
        ({"chunk_size": 2.0}, ["chunk_size=2.0", "integer"]),
        ({"softcap": -1.0}, ["softcap=-1.0", "> 0"]),
    ],
)
def test_bad_arguments_are_named(kwargs: dict, words: list[str]):
    head = torch.nn.Linear(4, 8)
    with pytest.raises(LISAConfigError) as info:
        causal_lm_loss(torch.randn(1, 3, 4), head, torch.zeros(1, 3, dtype=torch.long), **kwargs)
    for word in words:
        assert word in str(info.value)


def test_module_refuses_a_bad_chunk_size():
    with pytest.raises(LISAConfigError, match="loss_chunk_size=0"):
        CausalLMModule(config=dict(LLAMA), loss_chunk_size=0)


def test_models_that_scale_their_logits_are_refused():
    """Cohere scales its logits after the head: the chunked loss would differ, so it is refused."""
    cohere = {
        "model_type": "cohere",
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
        "vocab_size": VOCAB,
        "logit_scale": 0.0625,
    }
    ids, labels = batch()
    model = model_of(cohere)
    hidden = model.get_decoder()(input_ids=ids)[0]
    plain = causal_lm_loss(hidden, model.get_output_embeddings(), labels, chunk_size=4)
    assert abs(plain.item() - model(input_ids=ids, labels=labels).loss.item()) > 1e-3  # why it is refused
    with pytest.raises(LISAConfigError, match=r"logit_scale=0.0625"):
        CausalLMModule(config=cohere, loss_chunk_size=4)
