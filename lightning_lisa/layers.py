"""Discovery of the transformer blocks, input embeddings and output head of a model.

LISA samples among the *blocks* of a model (the ``nn.ModuleList`` of identical decoder or encoder
layers) and keeps the input embeddings and output head trainable. :func:`find_layers` locates these
through any wrapper: a ``LightningModule`` attribute, a DDP/FSDP ``.module``, a PEFT model.

Known Hugging Face architectures are looked up in :data:`BLOCK_LISTS`, a table from
``config.model_type`` to the names of their block lists; anything else falls back to a structural
search for the largest ``nn.ModuleList`` of identical blocks.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from torch import nn

from lightning_lisa.errors import LISAConfigError

#: Names of the block lists of known Hugging Face architectures, by ``config.model_type``.
#: A name matches a ``nn.ModuleList`` whose dotted path equals it or ends with ``"." + name``, so the
#: same entry serves ``LlamaModel`` (``layers``), ``LlamaForCausalLM`` (``model.layers``) and a PEFT
#: wrapper (``base_model.model.model.layers``). Encoder-decoders list both stacks, in order.
BLOCK_LISTS: dict[str, tuple[str, ...]] = {
    "llama": ("layers",),
    "mistral": ("layers",),
    "mixtral": ("layers",),
    "qwen2": ("layers",),
    "qwen2_moe": ("layers",),
    "qwen3": ("layers",),
    "qwen3_moe": ("layers",),
    "gemma": ("layers",),
    "gemma2": ("layers",),
    "gemma3_text": ("layers",),
    "phi": ("layers",),
    "phi3": ("layers",),
    "olmo": ("layers",),
    "olmo2": ("layers",),
    "starcoder2": ("layers",),
    "gpt2": ("h",),
    "gptj": ("h",),
    "gpt_bigcode": ("h",),
    "falcon": ("h",),
    "bloom": ("h",),
    "gpt_neox": ("layers",),
    "opt": ("decoder.layers",),
    "t5": ("encoder.block", "decoder.block"),
    "mt5": ("encoder.block", "decoder.block"),
    "umt5": ("encoder.block", "decoder.block"),
    "bart": ("encoder.layers", "decoder.layers"),
    "bert": ("encoder.layer",),
    "roberta": ("encoder.layer",),
    "xlm-roberta": ("encoder.layer",),
    "distilbert": ("transformer.layer",),
}

#: Attribute names of task heads on Hugging Face models that have no output embeddings
#: (e.g. ``BertForSequenceClassification.classifier``, ``LlamaForSequenceClassification.score``).
HEAD_ATTRIBUTES: tuple[str, ...] = ("lm_head", "score", "classifier", "qa_outputs")


@dataclass(frozen=True)
class LayerInfo:
    """What :func:`find_layers` found in a model. All names are relative to the module searched.

    Attributes:
        block_paths: Dotted paths of the block ``nn.ModuleList`` objects (two for encoder-decoders).
        block_names: Dotted name of every block, in order; block ``i`` of LISA is ``block_names[i]``.
        blocks: The block modules themselves, in the same order.
        embedding_names: Names of the input-embedding modules (usually one).
        head_names: Names of the output-head modules (may share weights with the embeddings).
        final_norm_names: Names of the norms applied after the last block of each stack
            (e.g. ``model.norm``), if any; a sibling of the block list in the module tree.
        model_type: The Hugging Face ``config.model_type``, or ``None`` for other models.
        from_table: Whether the blocks came from :data:`BLOCK_LISTS` (``False``: structural search
            or an explicit path).
    """

    block_paths: tuple[str, ...]
    block_names: tuple[str, ...]
    blocks: tuple[nn.Module, ...]
    embedding_names: tuple[str, ...]
    head_names: tuple[str, ...]
    final_norm_names: tuple[str, ...]
    model_type: str | None
    from_table: bool

    @property
    def num_blocks(self) -> int:
        """The number of blocks LISA samples from."""
        return len(self.blocks)

    @property
    def path(self) -> str:
        """The block-list path, comma-separated when there are several stacks."""
        return ",".join(self.block_paths)


def find_layers(module: nn.Module, layers: str | Sequence[str] | None = None) -> LayerInfo:
    """Find the transformer blocks, input embeddings and output head of ``module``.

    Args:
        module: A Hugging Face model, a plain torch model, or anything that holds one (a
            ``LightningModule``, a DDP/FSDP wrapper, a PEFT model).
        layers: Dotted path(s) of the block ``nn.ModuleList`` relative to ``module``, to bypass
            detection, e.g. ``"model.model.layers"``. ``None`` detects them.

    Returns:
        A :class:`LayerInfo` whose names are relative to ``module``.

    Raises:
        LISAConfigError: If ``layers`` names no ``nn.ModuleList``, or no block list
            can be found.

    Examples:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
        ...                      num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
        >>> info = find_layers(LlamaForCausalLM(config))
        >>> info.path, info.num_blocks, info.embedding_names, info.head_names
        ('model.layers', 3, ('model.embed_tokens',), ('lm_head',))
    """
    names = {id(m): name for name, m in module.named_modules()}
    hf_model = _find_hf_model(module)
    model_type = _model_type(hf_model)

    from_table = False
    if layers is not None:
        paths = _resolve_explicit_paths(module, layers)
    elif model_type in BLOCK_LISTS and (found := _paths_from_table(module, BLOCK_LISTS[model_type])):
        paths, from_table = found, True
    else:
        paths = _structural_search(module)

    block_names: list[str] = []
    blocks: list[nn.Module] = []
    for path in paths:
        for index, block in enumerate(_module_list(module, path)):
            block_names.append(f"{path}.{index}")
            blocks.append(block)
    in_blocks = {id(m) for block in blocks for m in block.modules()}

    embeddings, heads = _embeddings_and_head(module, hf_model, in_blocks)
    excluded = in_blocks | {id(m) for m in embeddings + heads}
    final_norms = [_final_norm(module, path, excluded) for path in paths]
    return LayerInfo(
        block_paths=tuple(paths),
        block_names=tuple(block_names),
        blocks=tuple(blocks),
        embedding_names=tuple(names[id(m)] for m in embeddings if id(m) in names),
        head_names=tuple(names[id(m)] for m in heads if id(m) in names),
        final_norm_names=tuple(dict.fromkeys(name for name in final_norms if name is not None)),
        model_type=model_type,
        from_table=from_table,
    )


@dataclass(frozen=True)
class Unit:
    """What LISA samples: a whole block, or (``granularity="module"``) one large sub-module of a block.

    Attributes:
        name: Dotted name, e.g. ``"model.layers.3"`` or ``"model.layers.3.mlp"``.
        block: Index of the block it belongs to.
        modules: The modules whose parameters train when the unit is sampled. For sub-modules this
            includes the block's small leftovers (e.g. its norms), which train with any of its units.
    """

    name: str
    block: int
    modules: tuple[nn.Module, ...]


#: A sub-module holding at least this share of its block's parameters is a unit of its own.
MODULE_SHARE = 0.05


def split_units(info: LayerInfo, granularity: str) -> list[Unit]:
    """The units LISA samples from: each block (``"block"``) or its large sub-modules (``"module"``).

    A block is split into its direct children holding at least :data:`MODULE_SHARE` of its parameters
    (attention and MLP in a transformer block), descending through a single dominant child (such as
    T5's ``layer`` list); the small remaining parameters go with every unit of the block.

    Examples:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        ...                      num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
        >>> [u.name for u in split_units(find_layers(LlamaForCausalLM(config)), "module")]
        ['model.layers.0.self_attn', 'model.layers.0.mlp', 'model.layers.1.self_attn', 'model.layers.1.mlp']
    """
    if granularity == "block":
        pairs = zip(info.block_names, info.blocks, strict=True)
        return [Unit(name, i, (block,)) for i, (name, block) in enumerate(pairs)]
    units: list[Unit] = []
    for index, (name, block) in enumerate(zip(info.block_names, info.blocks, strict=True)):
        parts = _large_children(name, block)
        if len(parts) < 2:
            units.append(Unit(name, index, (block,)))
            continue
        in_parts = {id(p) for _, part in parts for p in part.parameters()}
        leftovers = [p for p in block.parameters() if id(p) not in in_parts]
        extra: tuple[nn.Module, ...] = (nn.ParameterList(leftovers),) if leftovers else ()
        units.extend(Unit(part_name, index, (part, *extra)) for part_name, part in parts)
    return units


def _large_children(name: str, module: nn.Module) -> list[tuple[str, nn.Module]]:
    total = _numel(module)
    large = [(f"{name}.{n}", c) for n, c in module.named_children() if _numel(c) >= MODULE_SHARE * total > 0]
    if len(large) == 1 and any(True for _ in large[0][1].children()):
        return _large_children(*large[0])
    return large


def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def unique_parameters(modules: Iterable[nn.Module]) -> list[nn.Parameter]:
    """All parameters of ``modules``, each once (tied weights are counted once), in order."""
    seen: set[int] = set()
    params: list[nn.Parameter] = []
    for m in modules:
        for p in m.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                params.append(p)
    return params


def module_list_candidates(module: nn.Module) -> list[str]:
    """Dotted paths of every ``nn.ModuleList`` with at least two children of one class."""
    return [name for name, m in module.named_modules() if name and _is_block_list(m)]


def resolve_modules(module: nn.Module, names: Iterable[str], argument: str) -> list[nn.Module]:
    """Look up modules (or single parameters) of ``module`` by dotted name.

    Args:
        module: The root module the names are relative to.
        names: Dotted module names, e.g. ``"model.model.embed_tokens"``, or parameter names.
        argument: The user-facing argument the names came from, for the error message.

    Returns:
        One module per name; a parameter name yields a ``nn.ParameterList`` holding it.

    Raises:
        LISAConfigError: If a name matches neither a module nor a parameter.
    """
    resolved: list[nn.Module] = []
    for name in names:
        try:
            resolved.append(module.get_submodule(name))
            continue
        except AttributeError:
            pass
        try:
            resolved.append(nn.ParameterList([module.get_parameter(name)]))
        except AttributeError:
            known = [n for n, _ in module.named_modules() if n] + [n for n, _ in module.named_parameters()]
            close = difflib.get_close_matches(name, known, n=5, cutoff=0.5)
            hint = f" Close matches: {close}." if close else ""
            raise LISAConfigError(
                f"`{argument}` names {name!r}, which is neither a module nor a parameter of "
                f"{type(module).__name__}. Names are dotted paths relative to the LightningModule.{hint}"
            ) from None
    return resolved


def _walk(module: nn.Module) -> Iterator[nn.Module]:
    """Pre-order walk over ``module`` and its children, each module once."""
    for _, m in module.named_modules():
        yield m


def _find_hf_model(module: nn.Module) -> nn.Module | None:
    """The outermost module that looks like a Hugging Face ``PreTrainedModel``."""
    for m in _walk(module):
        config = getattr(m, "config", None)
        if getattr(config, "model_type", None) is not None and callable(getattr(m, "get_input_embeddings", None)):
            return m
    return None


def _model_type(hf_model: nn.Module | None) -> str | None:
    if hf_model is None:
        return None
    model_type = getattr(hf_model.config, "model_type", None)
    return str(model_type) if model_type else None


def _is_block_list(m: nn.Module) -> bool:
    return isinstance(m, nn.ModuleList) and len(m) >= 2 and len({type(child) for child in m}) == 1


def _module_list(module: nn.Module, path: str) -> nn.ModuleList:
    found = module.get_submodule(path)
    assert isinstance(found, nn.ModuleList)
    return found


def _resolve_explicit_paths(module: nn.Module, layers: str | Sequence[str]) -> list[str]:
    paths = [layers] if isinstance(layers, str) else list(layers)
    if not paths:
        raise LISAConfigError("`layers` is an empty list; give at least one dotted path or None.")
    for path in paths:
        try:
            found = module.get_submodule(path)
        except AttributeError:
            found = None
        if not isinstance(found, nn.ModuleList):
            what = "does not exist" if found is None else f"is a {type(found).__name__}, not an nn.ModuleList"
            raise LISAConfigError(
                f"`layers={layers!r}`: {path!r} {what} in {type(module).__name__}. "
                f"Block lists found: {module_list_candidates(module) or 'none'}."
            )
    return paths


def _paths_from_table(module: nn.Module, suffixes: tuple[str, ...]) -> list[str] | None:
    """The block-list paths for a table entry, or ``None`` when the model does not match it."""
    lists = [name for name, m in module.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    paths: list[str] = []
    for suffix in suffixes:
        matches = [name for name in lists if name == suffix or name.endswith("." + suffix)]
        if len(matches) != 1:
            return None
        paths.append(matches[0])
    return paths


def _structural_search(module: nn.Module) -> list[str]:
    """The path of the ``nn.ModuleList`` of identical blocks holding the most parameters."""
    candidates = module_list_candidates(module)
    if not candidates:
        raise LISAConfigError(
            f"LISA found no block list in {type(module).__name__}: it needs an nn.ModuleList of at least two "
            "identical blocks (e.g. `model.model.layers`). Pass `layers=` with the dotted path of yours."
        )

    def size(path: str) -> int:
        return sum(p.numel() for p in unique_parameters([module.get_submodule(path)]))

    return [max(candidates, key=size)]


def _embeddings_and_head(
    module: nn.Module, hf_model: nn.Module | None, in_blocks: set[int]
) -> tuple[list[nn.Module], list[nn.Module]]:
    """Input embeddings and output head: from the HF accessors if any, else structurally."""
    embeddings: list[nn.Module] = []
    heads: list[nn.Module] = []
    if hf_model is not None:
        embedding = _call_accessor(hf_model, "get_input_embeddings")
        if embedding is not None:
            embeddings.append(embedding)
        head = _call_accessor(hf_model, "get_output_embeddings")
        if head is None:
            head = next((h for a in HEAD_ATTRIBUTES if isinstance(h := getattr(hf_model, a, None), nn.Module)), None)
        if head is not None:
            heads.append(head)
        return embeddings, heads
    outside = [m for m in _walk(module) if id(m) not in in_blocks]
    embeddings = [m for m in outside if isinstance(m, nn.Embedding)]
    linears: list[nn.Module] = [m for m in outside if isinstance(m, nn.Linear)]
    return embeddings, linears[-1:]


def _final_norm(module: nn.Module, path: str, excluded: set[int]) -> str | None:
    """The norm applied after the block list ``path``: a sibling of the list, outside ``excluded``.

    The first norm (a module with parameters whose class name contains "norm" and whose name does not
    mention embeddings, unlike BART's ``layernorm_embedding``) registered after the list; failing
    that, the last one registered before it (OPT registers its final norm before its layers).
    """
    parent_path, _, attr = path.rpartition(".")
    siblings = list(module.get_submodule(parent_path).named_children())
    position = [name for name, _ in siblings].index(attr)

    def is_norm(name: str, m: nn.Module) -> bool:
        named_norm = "norm" in type(m).__name__.lower() and "emb" not in name.lower()
        return named_norm and id(m) not in excluded and any(True for _ in m.parameters())

    after = [name for name, m in siblings[position + 1 :] if is_norm(name, m)]
    before = [name for name, m in siblings[:position] if is_norm(name, m)]
    chosen = after[0] if after else (before[-1] if before else None)
    if chosen is None:
        return None
    return f"{parent_path}.{chosen}" if parent_path else chosen


def _call_accessor(model: nn.Module, name: str) -> nn.Module | None:
    try:
        found = getattr(model, name)()
    except (NotImplementedError, AttributeError):
        return None
    return found if isinstance(found, nn.Module) else None
