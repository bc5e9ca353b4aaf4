"""The start-up report: what LISA samples, what it always trains and what stays frozen for the whole run.

Every parameter of the model falls in exactly one of four parts:

* *sampled*: in the blocks (or block modules) LISA samples from; trained while its unit is active;
* *always trained*: in the always-active set (by default the input side, the head and a multimodal
  model's projectors);
* *frozen for the whole run*: trainable before fit, but in no unit and not always active (a final
  norm, a vision tower, a pooler): LISA freezes it at the start and never trains it;
* *frozen before fit*: ``requires_grad=False`` when LISA looked (frozen by the user, by PEFT, or by
  the model itself); LISA leaves it frozen.

:class:`LISA <lightning_lisa.LISA>` logs the report once when fit starts and keeps it as
``LISA.report``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from lightning_lisa.layers import LayerInfo, Unit, resolve_modules, unique_parameters

SAMPLED = "sampled"
ALWAYS = "always trained"
FROZEN = "frozen for the whole run"
USER_FROZEN = "frozen before fit"

#: At most this many entries of a part are listed by :func:`format_report`; the rest are summed up.
MAX_ENTRIES = 8


@dataclass(frozen=True)
class Entry:
    """One line of a part of the report: a module (or parameter) name and its parameter count.

    Attributes:
        name: Dotted name relative to the module the report was made for.
        params: Parameters (elements) counted in this part; tied weights are counted once, under the
            first name that holds them.
        note: What else to know, e.g. ``"frozen before fit"`` for an always-active module that the
            user froze.
    """

    name: str
    params: int
    note: str = ""


@dataclass(frozen=True)
class LISAReport:
    """What trains in a LISA run. Parameter counts are elements, each tensor counted once.

    Attributes:
        total_params: All parameters of the model.
        n_layers: Units trained at once.
        interval: Optimizer steps between re-samplings.
        num_units: Units sampled from (those with parameters to sample).
        unit_kind: ``"blocks"`` or ``"block modules"``.
        per_period: About how many sampled parameters train during one period (``n_layers`` units of
            average size).
        sampled: One entry per block list, with its parameters that LISA may train.
        always_trained: One entry per always-active name, with its parameters that train throughout.
        frozen_for_run: The modules LISA keeps frozen for the whole run, coarsest first.
        frozen_before_fit: The modules that were already frozen (by the user, PEFT or the model).
    """

    total_params: int
    n_layers: int
    interval: int
    num_units: int
    unit_kind: str
    per_period: int
    sampled: tuple[Entry, ...]
    always_trained: tuple[Entry, ...]
    frozen_for_run: tuple[Entry, ...]
    frozen_before_fit: tuple[Entry, ...]

    @property
    def sampled_params(self) -> int:
        """Parameters in the sampled units."""
        return sum(e.params for e in self.sampled)

    @property
    def always_trained_params(self) -> int:
        """Parameters trained throughout."""
        return sum(e.params for e in self.always_trained)

    @property
    def frozen_for_run_params(self) -> int:
        """Parameters LISA never trains although they were trainable before fit."""
        return sum(e.params for e in self.frozen_for_run)

    @property
    def frozen_before_fit_params(self) -> int:
        """Parameters that were frozen before fit."""
        return sum(e.params for e in self.frozen_before_fit)

    def share(self, params: int) -> float:
        """``params`` as a share of the model's parameters."""
        return params / self.total_params if self.total_params else 0.0

    def __str__(self) -> str:
        return format_report(self)


def build_report(
    module: nn.Module,
    info: LayerInfo,
    units: Sequence[Unit],
    always_active: Sequence[str],
    n_layers: int,
    interval: int,
) -> LISAReport:
    """Sort every parameter of ``module`` into the four parts of the report.

    Args:
        module: The model, e.g. the ``LightningModule``; names are relative to it.
        info: What :func:`~lightning_lisa.find_layers` found in ``module``.
        units: What LISA samples (see :func:`~lightning_lisa.split_units`).
        always_active: Names of the modules (or parameters) trained all the time.
        n_layers: Units trained at once.
        interval: Optimizer steps between re-samplings.

    Returns:
        The report; parameters with ``requires_grad=False`` now are *frozen before fit*.

    Examples:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> from lightning_lisa import find_layers, split_units
        >>> model = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=4,
        ...                                      num_attention_heads=2, num_key_value_heads=1, vocab_size=64))
        >>> info = find_layers(model)
        >>> report = build_report(model, info, split_units(info, "block"), ["model.embed_tokens", "lm_head"], 2, 20)
        >>> [e.name for e in report.frozen_for_run]
        ['model.norm']
        >>> print(report)  # doctest: +NORMALIZE_WHITESPACE
        LISA trains 2 of 4 blocks at a time, re-sampled every 20 steps; the model has 11,408 parameters:
          sampled                    9,344  81.9%  about 4,672 per period
            model.layers (4 blocks)  9,344
          always trained             2,048  18.0%
            model.embed_tokens       1,024
            lm_head                  1,024
          frozen for the whole run      16   0.1%
            model.norm                  16
          frozen before fit              0   0.0%
    """
    block_ids = {id(b) for b in info.blocks}
    unit_kind = (
        "blocks" if all(len(u.modules) == 1 and id(u.modules[0]) in block_ids for u in units) else "block modules"
    )
    always_modules = resolve_modules(module, always_active, "always_active")
    always_ids = {id(p) for p in unique_parameters(always_modules)}
    unit_ids = {id(p) for u in units for p in unique_parameters(u.modules)}
    part: dict[int, str] = {}
    for p in unique_parameters([module]):
        if not p.requires_grad:
            part[id(p)] = USER_FROZEN
        elif id(p) in always_ids:
            part[id(p)] = ALWAYS
        elif id(p) in unit_ids:
            part[id(p)] = SAMPLED
        else:
            part[id(p)] = FROZEN

    sampled: list[Entry] = []
    counted: set[int] = set()
    for path in info.block_paths:
        params = [p for p in module.get_submodule(path).parameters() if part[id(p)] == SAMPLED and id(p) not in counted]
        counted.update(id(p) for p in params)
        blocks = [module.get_submodule(name) for name in info.block_names if name.rpartition(".")[0] == path]
        # a block always active as a whole (or frozen before fit) is not sampled
        count = sum(1 for b in blocks if any(part[id(p)] == SAMPLED for p in b.parameters()))
        of = f"{count} of {len(blocks)}" if count < len(blocks) else f"{count}"
        sampled.append(Entry(f"{path} ({of} {'block' if len(blocks) == 1 else 'blocks'})", _numel(params)))

    always: list[Entry] = []
    counted = set()
    for name, m in zip(always_active, always_modules, strict=True):
        params = [p for p in m.parameters() if id(p) not in counted]
        counted.update(id(p) for p in params)
        trained = [p for p in params if part[id(p)] == ALWAYS]
        note = ""
        if not params:
            note = "tied to an entry above"
        elif not trained:
            note = "frozen before fit: not trained"
        elif len(trained) < len(params):
            note = "partly frozen before fit"
        always.append(Entry(name, _numel(trained), note))

    unit_sizes = [_numel([p for p in unique_parameters(u.modules) if part[id(p)] == SAMPLED]) for u in units]
    unit_sizes = [size for size in unit_sizes if size]  # the sampling pool
    per_period = round(sum(unit_sizes) / len(unit_sizes) * n_layers) if unit_sizes else 0
    return LISAReport(
        total_params=_numel(unique_parameters([module])),
        n_layers=n_layers,
        interval=interval,
        num_units=len(unit_sizes),
        unit_kind=unit_kind,
        per_period=per_period,
        sampled=tuple(sampled),
        always_trained=tuple(always),
        frozen_for_run=tuple(_group(module, part, FROZEN, info.block_paths)),
        frozen_before_fit=tuple(_group(module, part, USER_FROZEN, info.block_paths)),
    )


def format_report(report: LISAReport, max_entries: int = MAX_ENTRIES) -> str:
    """The report as text: one line per part with its parameters and share, its entries below.

    Args:
        report: From :func:`build_report`.
        max_entries: List at most this many entries of a part (the largest); the rest are summed up.

    Examples:
        >>> report = LISAReport(100, 1, 5, 2, "blocks", 40, (Entry("layers (2 blocks)", 80),),
        ...                     (Entry("embed", 20),), (), ())
        >>> print(format_report(report))  # doctest: +NORMALIZE_WHITESPACE
        LISA trains 1 of 2 blocks at a time, re-sampled every 5 steps; the model has 100 parameters:
          sampled                 80  80.0%  about 40 per period
            layers (2 blocks)     80
          always trained          20  20.0%
            embed                 20
          frozen for the whole run  0   0.0%
          frozen before fit        0   0.0%
    """
    parts = [
        (SAMPLED, report.sampled_params, list(report.sampled), f"about {report.per_period:,} per period"),
        (ALWAYS, report.always_trained_params, list(report.always_trained), ""),
        (FROZEN, report.frozen_for_run_params, _largest(report.frozen_for_run, max_entries), ""),
        (USER_FROZEN, report.frozen_before_fit_params, _largest(report.frozen_before_fit, max_entries), ""),
    ]
    rows: list[tuple[str, str, str]] = []  # label, count, rest
    for title, params, entries, extra in parts:
        rows.append((f"  {title}", f"{params:,}", f"{report.share(params):6.1%}" + (f"  {extra}" if extra else "")))
        rows.extend((f"    {e.name}", f"{e.params:,}", f"  ({e.note})" if e.note else "") for e in entries)
    width = max(len(label) for label, _, _ in rows)
    digits = max(len(count) for _, count, _ in rows)
    every = "step" if report.interval == 1 else f"{report.interval} steps"
    lines = [
        f"LISA trains {report.n_layers} of {report.num_units} {report.unit_kind} at a time, re-sampled every "
        f"{every}; the model has {report.total_params:,} parameters:"
    ]
    lines += [f"{label:<{width}}  {count:>{digits}} {rest}".rstrip() for label, count, rest in rows]
    return "\n".join(lines)


def _largest(entries: Sequence[Entry], limit: int) -> list[Entry]:
    if len(entries) <= limit:
        return list(entries)
    ranked = sorted(entries, key=lambda e: -e.params)
    rest = ranked[limit - 1 :]
    return [*ranked[: limit - 1], Entry(f"... {len(rest)} more", sum(e.params for e in rest))]


def _group(module: nn.Module, part: dict[int, str], wanted: str, block_paths: Sequence[str]) -> list[Entry]:
    """The coarsest modules (or parameters) all of whose not-yet-counted parameters are in part ``wanted``.

    Inside a block list that also holds parameters of other parts (the base weights of a PEFT model),
    the parameters in ``wanted`` make one entry for the whole list.
    """
    entries: list[Entry] = []
    seen: set[int] = set()

    def visit(prefix: str, m: nn.Module) -> None:
        params = [p for p in m.parameters() if id(p) not in seen]
        parts = {part[id(p)] for p in params}
        if wanted not in parts:
            return
        if parts == {wanted} and prefix:
            entries.append(Entry(prefix[:-1], _numel(params)))
            seen.update(id(p) for p in params)
            return
        if prefix[:-1] in block_paths:
            inside = [p for p in params if part[id(p)] == wanted]
            blocks = [b for b in m.children() if any(part[id(p)] == wanted for p in b.parameters())]
            entries.append(Entry(f"{prefix[:-1]} (parts of {len(blocks)} blocks)", _numel(inside)))
            seen.update(id(p) for p in inside)
            return
        for name, p in m.named_parameters(recurse=False):
            if id(p) not in seen and part[id(p)] == wanted:
                entries.append(Entry(prefix + name, p.numel()))
                seen.add(id(p))
        for name, child in m.named_children():
            visit(f"{prefix}{name}.", child)

    visit("", module)
    return entries


def _numel(params: Sequence[nn.Parameter]) -> int:
    return sum(p.numel() for p in params)


def summary_correction(total_trainable: int, trainable_now: int, report: LISAReport | None) -> str:
    """The line LISA prints after Lightning's model summary, which counts parameters before LISA freezes any.

    Lightning's ``ModelSummary`` runs when fit starts, before LISA's first switch (which waits for the
    optimizer, so that every block is in it), and counts every block as trainable.

    Args:
        total_trainable: What the summary counted as trainable.
        trainable_now: What trains in LISA's first period.
        report: LISA's start-up report, for the number of units.

    Examples:
        >>> summary_correction(134_515_008, 35_000_000, None)  # doctest: +NORMALIZE_WHITESPACE
        "LISA: 35.0 M trainable params at a time (the sampled blocks and the always-active set); Lightning's
        summary above counts 134 M, every parameter that was trainable before LISA's first switch"
    """
    from lightning.pytorch.utilities.model_summary.model_summary import get_human_readable_count

    sampled = "the sampled blocks" if report is None else f"{report.n_layers} of {report.num_units} {report.unit_kind}"
    return (
        f"LISA: {get_human_readable_count(trainable_now)} trainable params at a time ({sampled} and the always-active "
        f"set); Lightning's summary above counts {get_human_readable_count(total_trainable)}, every parameter that "
        "was trainable before LISA's first switch"
    )
