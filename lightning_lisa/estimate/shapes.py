"""Model shapes: published dimensions of well-known models, their configs, and the models built on the meta device.

A *shape* is a ``transformers`` config with a model's published dimensions; the estimate never needs
weights. :func:`build_meta_model` builds the causal LM on PyTorch's ``meta`` device (shapes, no storage).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_lisa.errors import LISAConfigError
from lightning_lisa.layers import LayerInfo, find_layers

#: Model shapes with the published dimensions of well-known models (weights are never needed).
SHAPES: dict[str, dict[str, Any]] = {
    "tiny": {
        "model_type": "llama",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 6,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 512,
        "max_position_embeddings": 256,
        "bos_token_id": 1,
        "eos_token_id": 2,
    },
    "gpt2-small": {
        "model_type": "gpt2",
        "n_embd": 768,
        "n_layer": 12,
        "n_head": 12,
        "vocab_size": 50257,
        "n_positions": 1024,
    },
    "gpt2-tiny": {  # benchmarks' smoke runs
        "model_type": "gpt2",
        "n_embd": 64,
        "n_layer": 6,
        "n_head": 4,
        "vocab_size": 512,
        "n_positions": 64,
        "bos_token_id": 0,
        "eos_token_id": 0,
    },
    "gpt2-mini": {  # the DDP communication benchmark
        "model_type": "gpt2",
        "n_embd": 256,
        "n_layer": 12,
        "n_head": 4,
        "vocab_size": 8192,
        "n_positions": 128,
        "bos_token_id": 0,
        "eos_token_id": 0,
    },
    "llama-small": {  # Llama-3-like proportions (large vocabulary), for checks on CPU
        "model_type": "llama",
        "hidden_size": 256,
        "intermediate_size": 896,
        "num_hidden_layers": 8,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "vocab_size": 16000,
        "max_position_embeddings": 1024,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
    },
    "gemma2-small": {  # Gemma-2-like: tied, softcapped, for checks on CPU
        "model_type": "gemma2",
        "hidden_size": 256,
        "intermediate_size": 1024,
        "num_hidden_layers": 6,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 64,
        "vocab_size": 16000,
        "max_position_embeddings": 1024,
        "tie_word_embeddings": True,
        "final_logit_softcapping": 30.0,
        "attn_logit_softcapping": None,
        "query_pre_attn_scalar": 64,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
    },
    "tinyllama-1.1b": {
        "model_type": "llama",
        "hidden_size": 2048,
        "intermediate_size": 5632,
        "num_hidden_layers": 22,
        "num_attention_heads": 32,
        "num_key_value_heads": 4,
        "vocab_size": 32000,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
    },
    "llama-3.2-1b": {
        "model_type": "llama",
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "vocab_size": 128256,
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": True,
        "bos_token_id": 128000,
        "eos_token_id": 128001,
    },
    "llama-2-7b": {
        "model_type": "llama",
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "vocab_size": 32000,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
    },
    "llama-3-8b": {
        "model_type": "llama",
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "bos_token_id": 128000,
        "eos_token_id": 128001,
    },
    "qwen2.5-7b": {
        "model_type": "qwen2",
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_hidden_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "vocab_size": 152064,
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": False,
        "bos_token_id": 151643,
        "eos_token_id": 151643,
    },
    "gemma-2-9b": {
        "model_type": "gemma2",
        "hidden_size": 3584,
        "intermediate_size": 14336,
        "num_hidden_layers": 42,
        "num_attention_heads": 16,
        "num_key_value_heads": 8,
        "head_dim": 256,
        "vocab_size": 256000,
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True,
        "final_logit_softcapping": 30.0,
        "attn_logit_softcapping": 50.0,
        "query_pre_attn_scalar": 256,
        "sliding_window": 4096,
        "hidden_activation": "gelu_pytorch_tanh",
        "bos_token_id": 2,
        "eos_token_id": 1,
        "pad_token_id": 0,
    },
}


def load_config(model: str | os.PathLike[str] | Mapping[str, Any] | Any) -> tuple[str, Any]:
    """A label and a ``transformers.PretrainedConfig`` for ``model`` (see :func:`estimate_memory`).

    Raises:
        LISAConfigError: For an unknown shape name, a missing path, a dict without ``model_type``, or
            anything else than a name, a path, a config or a dict.

    Examples:
        >>> label, config = load_config("llama-2-7b")
        >>> label, config.model_type, config.hidden_size
        ('llama-2-7b', 'llama', 4096)
    """
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(model, PretrainedConfig):
        return str(model.model_type), model
    if isinstance(model, Mapping):
        fields = dict(model)
        model_type = fields.pop("model_type", None)
        if not isinstance(model_type, str):
            raise LISAConfigError(
                f"`model` is a dict with keys {sorted(fields)}; it must name its architecture with a `model_type` "
                "string, e.g. {'model_type': 'llama', 'hidden_size': 4096, ...}."
            )
        try:
            config = AutoConfig.for_model(model_type, **fields)
        except (ValueError, KeyError) as err:
            raise LISAConfigError(
                f"`model={{'model_type': {model_type!r}, ...}}`: unknown architecture ({err})."
            ) from err
        return model_type, config
    if isinstance(model, str | os.PathLike):
        name = os.fspath(model)
        if name in SHAPES:
            return name, load_config(SHAPES[name])[1]
        path = Path(name).expanduser()
        if path.is_file():
            with path.open(encoding="utf-8") as f:
                return name, load_config(json.load(f))[1]
        if path.is_dir():
            return name, AutoConfig.from_pretrained(str(path))
        if name.startswith((".", "/", "~")) or name.count("/") != 1:
            raise LISAConfigError(
                f"`model={name!r}` is not a known shape {sorted(SHAPES)}, nor an existing directory or config.json, "
                "nor a Hub name of the form 'organization/name'."
            )
        try:
            return name, AutoConfig.from_pretrained(name)
        except (OSError, ValueError) as err:
            raise LISAConfigError(
                f"`model={name!r}`: its config could not be read from the Hub ({err}). Give a known shape "
                f"{sorted(SHAPES)}, a local directory or config.json, or a dict."
            ) from err
    raise LISAConfigError(
        f"`model={model!r}` is not allowed; give a shape name, a path, a Hub name, a PretrainedConfig or a dict."
    )


def build_meta_model(config: Any, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The causal LM of ``config`` on the meta device: parameters with shapes and no storage.

    Examples:
        >>> model = build_meta_model(load_config("llama-2-7b")[1])
        >>> next(model.parameters()).device.type, sum(p.numel() for p in model.parameters())
        ('meta', 6738415616)
    """
    from transformers import AutoModel, AutoModelForCausalLM

    causal_lm: Any = AutoModelForCausalLM  # untyped in transformers
    bare: Any = AutoModel
    with quiet(), torch.device("meta"):
        try:
            built: nn.Module = causal_lm.from_config(config, dtype=dtype)
        except ValueError:  # not a causal LM (e.g. an encoder): the bare model
            built = bare.from_config(config, dtype=dtype)
    return built


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence the warnings and informational logs of transformers while building and tracing on meta."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(verbosity)


def lora_targets(model: nn.Module, info: LayerInfo | None = None) -> dict[str, tuple[int, int]]:
    """``{name: (in_features, out_features)}`` of the layers LoRA adapts with ``target_modules="all-linear"``.

    Every ``nn.Linear`` (and Hugging Face ``Conv1D``, as in GPT-2) except the output head.

    Examples:
        >>> model = build_meta_model(load_config("tiny")[1])
        >>> targets = lora_targets(model)
        >>> len(targets), targets["model.layers.0.mlp.down_proj"]
        (42, (128, 64))
    """
    info = info if info is not None else find_layers(model)
    heads = {id(model.get_submodule(name)) for name in info.head_names}
    targets: dict[str, tuple[int, int]] = {}
    for name, module in model.named_modules():
        if id(module) in heads:
            continue
        if isinstance(module, nn.Linear):
            targets[name] = (module.in_features, module.out_features)
        elif type(module).__name__ == "Conv1D" and isinstance(getattr(module, "weight", None), torch.Tensor):
            fan_in, fan_out = module.weight.shape
            targets[name] = (int(fan_in), int(fan_out))
    return targets
