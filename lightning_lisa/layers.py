"""Discovery of the transformer blocks, input embeddings and output head of a model.

LISA samples among the *blocks* of a model (the ``nn.ModuleList`` or ``nn.Sequential`` of transformer
layers) and keeps the input side (embeddings, learned positions, class tokens) and the output head
trainable. :func:`find_layers` locates these through any wrapper: a ``LightningModule`` attribute, a
DDP/FSDP ``.module``, a PEFT model, a compiled module.

Known Hugging Face architectures are looked up in :data:`BLOCK_LISTS`, a table from
``config.model_type`` to the names of their block lists. Anything else goes through a structural
search (see :func:`find_layers`): every outermost list of blocks is a *stack*, and every stack is
sampled, so both stacks of an encoder-decoder train. In a multimodal model (a module with a
``language_model`` or ``text_model`` child beside other towers) only the language model's blocks are
sampled; the other towers stay frozen and their projectors train all the time.
"""

from __future__ import annotations

import difflib
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from lightning_lisa.errors import LISAConfigError, check_bool

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

#: Names of the language model inside a multimodal model (``LlavaModel.language_model``,
#: ``Idefics3Model.text_model``). A module with such a child and another child holding a block list is
#: multimodal: its other children holding block lists are *towers*, the rest are *projectors*.
LANGUAGE_MODEL_NAMES: tuple[str, ...] = ("language_model", "text_model")

#: A block list that is not sampled although it holds at least this share of the parameters of the
#: largest sampled one makes the choice ambiguous: :func:`find_layers` warns.
SIMILAR_SIZE = 0.5

#: Sampled blocks holding less than this share of the model's parameters: :func:`find_layers` warns.
SMALL_SHARE = 0.2


@dataclass(frozen=True)
class LayerInfo:
    """What :func:`find_layers` found in a model. All names are relative to the module searched.

    Attributes:
        block_paths: Dotted paths of the block lists (``nn.ModuleList`` or ``nn.Sequential``), one per
            stack (two for encoder-decoders).
        block_names: Dotted name of every block, in order; block ``i`` of LISA is ``block_names[i]``.
        blocks: The block modules themselves, in the same order.
        embedding_names: Names of the input-embedding modules (usually one: the token embedding, or
            the patch embedding of a vision model).
        head_names: Names of the output-head modules (may share weights with the embeddings).
        final_norm_names: Names of the norms applied after the last block of each stack
            (e.g. ``model.norm``), if any; a sibling of the block list in the module tree.
        model_type: The Hugging Face ``config.model_type``, or ``None`` for other models.
        from_table: Whether the blocks came from :data:`BLOCK_LISTS` (``False``: structural search
            or an explicit path).
        extra_embedding_names: The rest of the input side, outside the blocks and the frozen towers:
            learned position embeddings, token-type embeddings, embedding norms (BART's
            ``layernorm_embedding``), and parameters held directly by a container module (a ViT's
            ``cls_token`` and ``pos_embed``). Trained with the embeddings by default.
        projector_names: In a multimodal model, the modules (and parameters) beside the language
            model and the towers, such as ``multi_modal_projector`` or ``connector``. Trained all the
            time by default.
        tower_names: In a multimodal model, the towers whose blocks are not sampled (e.g.
            ``model.vision_tower``); they stay frozen unless named in ``layers`` or ``always_active``.
        warnings: Why the automatic choice may not be the one wanted (empty when ``layers`` was given);
            :func:`find_layers` warns with each.
    """

    block_paths: tuple[str, ...]
    block_names: tuple[str, ...]
    blocks: tuple[nn.Module, ...]
    embedding_names: tuple[str, ...]
    head_names: tuple[str, ...]
    final_norm_names: tuple[str, ...]
    model_type: str | None
    from_table: bool
    extra_embedding_names: tuple[str, ...] = ()
    projector_names: tuple[str, ...] = ()
    tower_names: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()

    @property
    def num_blocks(self) -> int:
        """The number of blocks LISA samples from."""
        return len(self.blocks)

    @property
    def path(self) -> str:
        """The block-list path, comma-separated when there are several stacks."""
        return ",".join(self.block_paths)


def find_layers(module: nn.Module, layers: str | Sequence[str] | None = None, warn: bool = True) -> LayerInfo:
    """Find the transformer blocks, input side and output head of ``module``.

    Without ``layers``, the blocks come from :data:`BLOCK_LISTS` for known Hugging Face
    architectures, and otherwise from a structural search:

    * a *block list* is an ``nn.ModuleList`` of at least two children with parameters, all of one
      class or all composite (hybrid stacks such as Zamba2's mix Mamba and attention layers), or an
      ``nn.Sequential`` of at least two children of one class with parameters (timm's ``blocks``);
    * lists inside the blocks of another list (experts, adapters) are not candidates;
    * every remaining list whose blocks are composite modules is a stack, and every stack is sampled
      (both stacks of an encoder-decoder); lists of single layers (e.g. of ``nn.Linear``) are sampled
      only when there is nothing else;
    * in a multimodal model, lists inside a tower other than the language model are not sampled.

    It warns (see :attr:`LayerInfo.warnings`) when a list that is not sampled holds at least
    :data:`SIMILAR_SIZE` of the parameters of the largest sampled one, and when the sampled blocks hold
    less than :data:`SMALL_SHARE` of the model's parameters.

    Args:
        module: A Hugging Face model, a plain torch model, or anything that holds one (a
            ``LightningModule``, a DDP/FSDP wrapper, a PEFT model).
        layers: Dotted path(s) of the block lists relative to ``module``, to bypass detection, e.g.
            ``"model.model.layers"``; an ``nn.ModuleList`` or an ``nn.Sequential``. ``None`` detects
            them.
        warn: Emit :attr:`LayerInfo.warnings` as warnings (on rank 0).

    Returns:
        A :class:`LayerInfo` whose names are relative to ``module``.

    Raises:
        LISAConfigError: If ``layers`` names no ``nn.ModuleList`` or ``nn.Sequential``, or no block
            list can be found.

    Examples:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
        ...                      num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
        >>> info = find_layers(LlamaForCausalLM(config))
        >>> info.path, info.num_blocks, info.embedding_names, info.head_names
        ('model.layers', 3, ('model.embed_tokens',), ('lm_head',))

        A plain torch encoder-decoder: both stacks are sampled.

        >>> from lightning.pytorch.demos import Transformer
        >>> find_layers(Transformer(vocab_size=64, ninp=16, nhead=2, nhid=32, nlayers=2)).block_paths
        ('transformer.encoder.layers', 'transformer.decoder.layers')
    """
    names = {id(m): name for name, m in module.named_modules()}
    hf_model = _find_hf_model(module)
    model_type = _model_type(hf_model)
    multimodal = _find_multimodal(module)
    towers = multimodal.towers if multimodal is not None else []

    from_table = False
    if layers is not None:
        paths = _resolve_explicit_paths(module, layers)
        _check_explicit_blocks(module, paths, hf_model, layers, warn)
    elif model_type in BLOCK_LISTS and (found := _paths_from_table(module, BLOCK_LISTS[model_type])):
        paths, from_table = found, True
    else:
        paths = _structural_search(module, towers)
    towers = [t for t in towers if not any(_inside(path, t) for path in paths)]  # a tower named in `layers` is sampled
    notes = [] if layers is not None else _ambiguities(module, paths, towers)

    block_names: list[str] = []
    blocks: list[nn.Module] = []
    for path in paths:
        for name, block in _block_list(module, path):
            block_names.append(name)
            blocks.append(block)
    in_blocks = {id(m) for block in blocks for m in block.modules()}
    in_towers = {id(m) for t in towers for m in module.get_submodule(t).modules()}

    embeddings, heads = _embeddings_and_head(module, hf_model, in_blocks | in_towers)
    projectors = multimodal.projectors if multimodal is not None else []
    projector_parts = resolve_modules(module, projectors, "projectors")  # modules, or parameters held directly
    in_projectors = {
        id(m)
        for name, p in zip(projectors, projector_parts, strict=True)
        if _is_module(module, name)
        for m in p.modules()
    }
    stop = in_blocks | in_towers | in_projectors | {id(m) for e in embeddings + heads for m in e.modules()}
    stop_params = {id(p) for m in [*embeddings, *heads, *projector_parts] for p in m.parameters()}
    extras = _input_side(module, stop, stop_params)
    excluded = in_blocks | {id(m) for m in embeddings + heads}
    final_norms = [_final_norm(module, path, excluded) for path in paths]
    if warn:
        for note in notes:
            rank_zero_warn(note)
    return LayerInfo(
        block_paths=tuple(paths),
        block_names=tuple(block_names),
        blocks=tuple(blocks),
        embedding_names=tuple(names[id(m)] for m in embeddings if id(m) in names),
        head_names=tuple(names[id(m)] for m in heads if id(m) in names),
        final_norm_names=tuple(dict.fromkeys(name for name in final_norms if name is not None)),
        model_type=model_type,
        from_table=from_table,
        extra_embedding_names=tuple(extras),
        projector_names=tuple(projectors),
        tower_names=tuple(towers),
        warnings=tuple(notes),
    )


def default_always_active(info: LayerInfo) -> list[str]:
    """The names LISA trains all the time when ``always_active=None``.

    The input side (:attr:`LayerInfo.embedding_names` and :attr:`LayerInfo.extra_embedding_names`), the
    head (:attr:`LayerInfo.head_names`) and a multimodal model's projectors
    (:attr:`LayerInfo.projector_names`); a name is listed once. Start from this list to write your own
    ``always_active``.

    Examples:
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> model = GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=64, n_positions=32))
        >>> default_always_active(find_layers(model))
        ['transformer.wte', 'transformer.wpe', 'lm_head']
    """
    names = [*info.embedding_names, *info.extra_embedding_names, *info.head_names, *info.projector_names]
    return list(dict.fromkeys(names))


def flagged_always_active(
    module: nn.Module, info: LayerInfo, embeddings: bool = True, head: bool = True, final_norm: bool = False
) -> list[str]:
    """:func:`default_always_active`, with parts left out or added by LISA's deprecated ``train_*`` flags.

    Args:
        module: The module ``info`` was found in.
        info: What :func:`find_layers` found.
        embeddings: Keep the input side (``train_embeddings``).
        head: Keep the head (``train_head``).
        final_norm: Add the final normalization layers (``train_final_norm``).

    Raises:
        LISAConfigError: When ``embeddings`` and ``head`` differ but the two share (tie) their weights,
            or when ``final_norm`` is set and the model has no final normalization layer.

    Examples:
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> model = GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=64, n_positions=32))
        >>> flagged_always_active(model, find_layers(model), final_norm=True)
        ['transformer.wte', 'transformer.wpe', 'lm_head', 'transformer.ln_f']
    """
    if embeddings != head and _tied(module, info):
        raise LISAConfigError(
            f"`train_embeddings={embeddings}` and `train_head={head}` differ, but the input embeddings "
            f"{list(info.embedding_names)} and the head {list(info.head_names)} share (tie) their weights in this "
            "model; set both alike."
        )
    if final_norm and not info.final_norm_names:
        raise LISAConfigError(
            f"`train_final_norm=True`, but no final normalization layer was found after `{info.path}`; name it "
            "in `always_active` instead."
        )
    names = [*info.embedding_names, *info.extra_embedding_names] if embeddings else []
    names += [*info.head_names] if head else []
    names += [*info.projector_names, *(info.final_norm_names if final_norm else ())]
    return list(dict.fromkeys(names))


def deprecated_flags(
    always_active: Sequence[str] | None, embeddings: bool | None, head: bool | None, final_norm: bool | None
) -> tuple[bool, bool, bool]:
    """Check LISA's deprecated ``train_*`` flags and warn when one is given.

    Returns:
        The arguments of :func:`flagged_always_active`: ``(True, True, False)`` when no flag was given.

    Raises:
        LISAConfigError: For a flag that is not a bool, or flags given together with ``always_active``.
    """
    given = {"train_embeddings": embeddings, "train_head": head, "train_final_norm": final_norm}
    named = [f"{k}={v}" for k, v in given.items() if v is not None]
    for name, value in given.items():
        if value is not None:
            check_bool(name, value)
    if named and always_active is not None:
        raise LISAConfigError(
            f"`always_active={list(always_active)!r}` and `{', '.join(named)}` both choose what always trains; "
            "give the list of names only."
        )
    if named:
        warnings.warn(
            f"LISA's `{', '.join(named)}` is deprecated and will be removed in 0.3: name what always trains in "
            "`always_active` (`lightning_lisa.find_layers(model)` lists the detected `embedding_names`, "
            "`head_names` and `final_norm_names`).",
            DeprecationWarning,
            stacklevel=3,
        )
    return (embeddings is not False, head is not False, final_norm is True)


def _tied(module: nn.Module, info: LayerInfo) -> bool:
    """Whether the input embeddings and the head share a weight."""
    embeddings = unique_parameters(resolve_modules(module, info.embedding_names, "always_active"))
    head = unique_parameters(resolve_modules(module, info.head_names, "always_active"))
    return bool({id(p) for p in embeddings} & {id(p) for p in head})


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


def find_units(
    module: nn.Module, layers: str | Sequence[str] | None, granularity: str, n_layers: int
) -> tuple[LayerInfo, list[Unit]]:
    """Find the blocks (:func:`find_layers`) and split them into units; check that ``n_layers`` fit.

    Raises:
        LISAConfigError: When ``n_layers`` is larger than the number of units.

    Examples:
        >>> model = nn.Sequential(nn.Embedding(8, 4), nn.ModuleList([nn.Linear(4, 4) for _ in range(3)]))
        >>> info, units = find_units(model, "1", "block", n_layers=2)
        >>> [u.name for u in units]
        ['1.0', '1.1', '1.2']
    """
    info = find_layers(module, layers)
    units = split_units(info, granularity)
    if n_layers > len(units):
        what = "blocks" if granularity == "block" else "block modules"
        raise LISAConfigError(
            f"`n_layers={n_layers}` is larger than the {len(units)} {what} of `{info.path}`; "
            f"allowed: 1 to {len(units)}."
        )
    return info, units


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
    """Dotted paths of the outermost block lists of ``module``, in model order.

    A block list is an ``nn.ModuleList`` of at least two children with parameters, all of one class or all
    composite, or an ``nn.Sequential`` of at least two children of one class with parameters. Lists inside
    the children of another block list (MoE experts, adapters) are left out.

    Examples:
        >>> from torch import nn
        >>> model = nn.Module()
        >>> model.blocks = nn.Sequential(*[nn.TransformerEncoderLayer(8, 2, 16) for _ in range(3)])
        >>> module_list_candidates(model)
        ['blocks']
    """
    found: list[str] = []
    inside: set[int] = set()
    for name, m in module.named_modules():
        if not name or id(m) in inside:
            continue
        if _is_block_list(m):
            found.append(name)
            inside.update(id(x) for x in m.modules())
    return found


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


def _has_params(m: nn.Module) -> bool:
    return any(True for _ in m.parameters())


def _is_composite(m: nn.Module) -> bool:
    return any(True for _ in m.children())


def _is_block_list(m: nn.Module) -> bool:
    children = list(m.children())
    if len(children) < 2 or not all(_has_params(c) for c in children):
        return False
    one_class = len({type(c) for c in children}) == 1
    if isinstance(m, nn.ModuleList):
        return one_class or all(_is_composite(c) for c in children)
    return isinstance(m, nn.Sequential) and one_class


def _block_list(module: nn.Module, path: str) -> list[tuple[str, nn.Module]]:
    """The blocks of the list at ``path`` with their dotted names (the container's own child names)."""
    return [(f"{path}.{name}", block) for name, block in module.get_submodule(path).named_children()]


def _inside(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix + ".")


def _is_module(module: nn.Module, name: str) -> bool:
    try:
        module.get_submodule(name)
    except AttributeError:
        return False
    return True


def _size(module: nn.Module, paths: Iterable[str]) -> int:
    return sum(p.numel() for p in unique_parameters(module.get_submodule(path) for path in paths))


def _resolve_explicit_paths(module: nn.Module, layers: str | Sequence[str]) -> list[str]:
    paths = [layers] if isinstance(layers, str) else list(layers)
    if not paths:
        raise LISAConfigError("`layers` is an empty list; give at least one dotted path or None.")
    for path in paths:
        try:
            found = module.get_submodule(path)
        except AttributeError:
            found = None
        if not isinstance(found, nn.ModuleList | nn.Sequential) or len(found) == 0:
            if found is None:
                what = "does not exist"
            elif isinstance(found, nn.ModuleList | nn.Sequential):
                what = f"is an empty {type(found).__name__}"
            else:
                what = f"is a {type(found).__name__}, not an nn.ModuleList or nn.Sequential"
            raise LISAConfigError(
                f"`layers={layers!r}`: {path!r} {what} in {type(module).__name__}. "
                f"Block lists found: {module_list_candidates(module) or 'none'}."
            )
    return paths


def _check_explicit_blocks(
    module: nn.Module, paths: Sequence[str], hf_model: nn.Module | None, layers: str | Sequence[str], warn: bool
) -> None:
    """Refuse a block list named in ``layers`` that holds the input embeddings or the head; warn about odd entries.

    Odd entries are those that are not blocks like the others: single layers among composite blocks, or
    entries without parameters. LISA samples every entry of a block list as a block: an embedding or a
    head in it would be frozen in most periods and trained as a "block" in others, not always.
    """
    special: dict[int, str] = {}
    if hf_model is not None:
        for accessor, part in (("get_input_embeddings", "the input embeddings"), ("get_output_embeddings", "the head")):
            found = _call_accessor(hf_model, accessor)
            if found is not None:
                special.setdefault(id(found), part)
        head = next((h for a in HEAD_ATTRIBUTES if isinstance(h := getattr(hf_model, a, None), nn.Module)), None)
        if head is not None:
            special.setdefault(id(head), "the head")
    for path in paths:
        entries = _block_list(module, path)
        embedded: list[str] = []
        for name, entry in entries:
            what: str | None = special.get(id(entry))
            if what is None and isinstance(entry, nn.Embedding):
                what = "an embedding"
            if what is None and any(id(m) in special for m in entry.modules()):
                what = "a module holding " + next(special[id(m)] for m in entry.modules() if id(m) in special)
            if what is not None:
                embedded.append(f"`{name}` ({type(entry).__name__}: {what})")
        if embedded:
            raise LISAConfigError(
                f"`layers={layers!r}`: {path!r} holds {', '.join(embedded)}, not only blocks. LISA samples every entry "
                "of a block list as a block, so it would freeze these in most periods. Put the blocks in a list of "
                "their own (e.g. an nn.ModuleList) and pass its path; the embeddings and the head train all the "
                "time by default (or name them in `always_active`)."
            )
        if not warn:
            continue
        composite = [name for name, entry in entries if _is_composite(entry)]
        odd = [name for name, entry in entries if not _has_params(entry) or (composite and not _is_composite(entry))]
        if odd:
            rank_zero_warn(
                f"LISA: the block list {path!r} given in `layers` holds entries that are not blocks like the others: "
                f"{odd[:8]} (single layers among composite blocks, or without parameters). LISA samples each entry as "
                "a block; pass the path of a list that holds the blocks alone."
            )


def _paths_from_table(module: nn.Module, suffixes: tuple[str, ...]) -> list[str] | None:
    """The block-list paths for a table entry, or ``None`` when the model does not match it."""
    lists = [name for name, m in module.named_modules() if isinstance(m, nn.ModuleList | nn.Sequential) and len(m) > 0]
    paths: list[str] = []
    for suffix in suffixes:
        matches = [name for name in lists if name == suffix or name.endswith("." + suffix)]
        if len(matches) != 1:
            return None
        paths.append(matches[0])
    return paths


@dataclass(frozen=True)
class _Multimodal:
    language_model: str
    towers: list[str]
    projectors: list[str]


def _find_multimodal(module: nn.Module) -> _Multimodal | None:
    """The outermost module with a language-model child beside another child holding a block list."""
    for name, m in module.named_modules():
        children = dict(m.named_children())
        lm = next((n for n in LANGUAGE_MODEL_NAMES if n in children), None)
        if lm is None:
            continue
        prefix = f"{name}." if name else ""
        towers: list[str] = []
        projectors: list[str] = []
        for child_name, child in children.items():
            if child_name == lm or not _has_params(child):
                continue
            holds_blocks = any(_is_block_list(x) for x in child.modules())
            (towers if holds_blocks else projectors).append(prefix + child_name)
        if towers:
            projectors += [prefix + n for n, _ in m.named_parameters(recurse=False)]
            return _Multimodal(prefix + lm, towers, projectors)
    return None


def _structural_search(module: nn.Module, towers: Sequence[str]) -> list[str]:
    """Every outermost list of composite blocks outside the towers; else the largest list of single layers."""
    candidates = module_list_candidates(module)
    if not candidates:
        raise LISAConfigError(
            f"LISA found no block list in {type(module).__name__}: it needs an nn.ModuleList or nn.Sequential of "
            "at least two blocks with parameters, all of one class (e.g. `model.model.layers`; a ModuleList may "
            "also hold blocks of several classes that each contain layers). Pass `layers=` with the dotted path "
            "of yours."
        )
    outside = [c for c in candidates if not any(_inside(c, t) for t in towers)] or candidates
    composite = [c for c in outside if all(_is_composite(b) for _, b in _block_list(module, c))]
    if composite:
        return composite
    return [max(outside, key=lambda path: _size(module, [path]))]


def _ambiguities(module: nn.Module, paths: Sequence[str], towers: Sequence[str]) -> list[str]:
    """Warnings about an automatic choice of block lists that may not be the one wanted."""
    total = _size(module, [""])
    if total == 0:
        return []
    largest = max(_size(module, [p]) for p in paths)
    notes: list[str] = []
    for candidate in module_list_candidates(module):
        if any(_inside(candidate, p) or _inside(p, candidate) for p in paths):
            continue
        size = _size(module, [candidate])
        if size < SIMILAR_SIZE * largest:
            continue
        tower = next((t for t in towers if _inside(candidate, t)), None)
        if tower is not None:
            why = f"it is in `{tower}`, a tower beside the language model, which stays frozen in a multimodal model"
        elif not all(_is_composite(b) for _, b in _block_list(module, candidate)):
            why = "its entries are single layers, not blocks"
        else:
            why = "it is not in this model type's entry of lightning_lisa.BLOCK_LISTS"
        count = len(_block_list(module, candidate))
        notes.append(
            f"LISA samples the blocks of {list(paths)}, but `{candidate}` ({count} entries, {size / total:.0%} of the "
            f"model's parameters) is not sampled: {why}. To sample it too, pass `layers={[*paths, candidate]}`; "
            f"to keep this choice without this warning, pass `layers={list(paths)}`."
        )
    chosen = _size(module, paths)
    if chosen < SMALL_SHARE * total:
        notes.append(
            f"LISA samples the blocks of {list(paths)}, which hold only {chosen / total:.0%} of the model's "
            "parameters. Check in LISA's start-up report what stays frozen for the whole run, and pass `layers=` "
            "(the block lists to sample) or `always_active=` if this is not the choice you want."
        )
    return notes


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
    outside = [(name, m) for name, m in module.named_modules() if id(m) not in in_blocks]
    embeddings = [m for _, m in outside if isinstance(m, nn.Embedding)]
    if not embeddings:  # a vision model: its patch embedding (timm's `patch_embed`)
        embedded = [m for name, m in outside if "embed" in name.rpartition(".")[2].lower() and _has_params(m)]
        embeddings = embedded[:1]
    linears: list[nn.Module] = [m for _, m in outside if isinstance(m, nn.Linear)]
    return embeddings, linears[-1:]


def _is_input_side(name: str, m: nn.Module) -> bool:
    return isinstance(m, nn.Embedding) or "embed" in name.lower()


def _input_side(module: nn.Module, stop: set[int], stop_params: set[int]) -> list[str]:
    """Names of the input side outside ``stop``, outermost first.

    Embeddings, modules named ``*embed*`` and parameters held directly by container modules (class
    tokens, learned positions).
    """
    found: list[str] = []

    def visit(prefix: str, m: nn.Module, take_all: bool) -> None:
        for child_name, child in m.named_children():
            if id(child) in stop or all(id(p) in stop_params for p in child.parameters()):
                continue  # also skips modules without parameters
            holds_stop = any(id(x) in stop for x in child.modules())
            if take_all or _is_input_side(child_name, child):
                if holds_stop:
                    visit(f"{prefix}{child_name}.", child, True)
                else:
                    found.append(prefix + child_name)
            else:
                visit(f"{prefix}{child_name}.", child, False)
        if take_all or _is_composite(m):
            found.extend(prefix + n for n, p in m.named_parameters(recurse=False) if id(p) not in stop_params)

    visit("", module, False)
    return found


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
