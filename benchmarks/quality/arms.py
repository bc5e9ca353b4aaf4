"""The study's arms: what each one trains, and its learning-rate grid.

Core arms, run on every task: ``full`` (every parameter), ``lora16``, ``lora{R}`` (the LoRA rank an estimate
matched to LISA gamma = 2's peak on this model, :data:`MATCHED_RANK`), ``lisa2`` and ``lisa4`` (the callback
with gamma = 2 and 4, K = 10), ``fixed2`` and ``fixed4`` (LISA's first draw at the same gamma, never
re-sampled: ``interval`` = the run's length) and ``eh`` (the embeddings and the head only).

Variants of ``lisa2``, run on one task first: ``lisa6`` (gamma = 6, a fifth of the depth), ``lisa2-blocks``
(``always_active=[]``: blocks only; autograd stops at the lowest sampled block), ``lisa2-eh025`` (the
embeddings and the head at 0.25 x the blocks' learning rate: ``CausalLMModule(always_active_lr_scale=0.25)``)
and ``lisa2-offload`` (``optimizer_state="offload"``: a block that returns keeps its Adam moments instead of
restarting them from zero).

One more variant is a control of memory, not of LISA: ``lora104`` (rank 104), whose measured peak on
``reverse`` is 0.98 x LISA gamma = 2's (1113 against 1134 MiB), where the tied embeddings' Adam state makes
LISA heavier than ``lora64`` (see :data:`MATCHED_RANK`).

And controls of what trains, run only where ``--arms`` names them: ``lora64-eh``, LoRA r = 64 that also
trains the (tied) embeddings and head at the adapters' rate, as LISA does, and ``lora64-eh10``, the same with
the embeddings and head at 10 x the adapters' rate (a parameter group of their own; on ``facts`` the
embeddings and head alone chose 1e-2 and LoRA r = 64 1e-3). They separate "trains the embeddings and head"
from "trains whole blocks, re-sampled" where the embeddings and head alone do well (``facts``). A third,
``lora16-eh10``, is the same at rank 16: the smallest LoRA that trains the embeddings and head, to measure
whether one fits in LISA gamma = 2's peak.

Every grid starts with four log-spaced rates (half-decades) and is extended by the study, one rate at a time
and to at most six, until the chosen rate lies strictly inside it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

#: LoRA's rank meant to match LISA gamma = 2's peak on SmolLM2-135M: the estimate at the study's batch chose
#: it before the runs. Measured by ``cost.py``, it needs 4% less than LISA gamma = 2 on code and 18% less on
#: reverse; kept, so that every finished cell stays comparable, with ``lora104`` as reverse's measured match.
MATCHED_RANK = 64
#: Half-decade grids: full fine-tuning of a pretrained model takes lower rates than the arms that train
#: fewer parameters; LoRA's adapters start at zero and take the highest.
GRID_FULL = (1e-5, 3e-5, 1e-4, 3e-4)
GRID_LISA = (1e-4, 3e-4, 1e-3, 3e-3)
GRID_LORA = (3e-4, 1e-3, 3e-3, 1e-2)
#: The adapters' rates of LoRA with the embeddings and head at 10x: LoRA's grid a half-decade lower, so the
#: embeddings and head span 1e-3 to 3e-2, the rates where they learn on their own.
GRID_LORA_EH10 = (1e-4, 3e-4, 1e-3, 3e-3)
#: Rates a grid is extended with, below its lowest and above its highest (a half decade apart).
LADDER = (1e-6, 3e-6, 1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
MAX_GRID = 6


@dataclass(frozen=True)
class Arm:
    """One way of fine-tuning.

    Attributes:
        name: Short name (the results' key).
        method: ``"full"``, ``"lora"``, ``"lisa"``, ``"fixed"`` or ``"eh"``.
        title: What the tables print.
        grid: The initial learning rates.
        n_layers: LISA's gamma (``lisa`` and ``fixed``).
        interval: LISA's K in optimizer steps; ``None``: the run's length (``fixed``).
        rank: LoRA's rank.
        lora_eh: LoRA also trains the embeddings and the head (unfrozen in place, so they stay tied, in the
            adapters' optimizer, at their rate times ``eh_lr_scale``).
        lisa: More keyword arguments of :class:`~lightning_lisa.LISA`.
        eh_lr_scale: The embeddings and head's learning rate over the blocks' or the adapters' (a parameter
            group of their own: ``CausalLMModule(always_active_lr_scale=...)``).
        role: ``"core"`` (run on every task), ``"variant"`` (run on the variant tasks) or ``"control"`` (run
            only where ``--arms`` names it).
    """

    name: str
    method: str
    title: str
    grid: tuple[float, ...]
    n_layers: int | None = None
    interval: int | None = 10
    rank: int | None = None
    lisa: dict[str, Any] = field(default_factory=dict)
    eh_lr_scale: float = 1.0
    lora_eh: bool = False
    role: str = "core"

    def record(self) -> dict[str, Any]:
        """The fields ``summary.json`` keeps for this arm."""
        return {
            "method": self.method,
            "title": self.title,
            "n_layers": self.n_layers,
            "interval": self.interval,
            "rank": self.rank,
            "options": {
                **self.lisa,
                **({"eh_lr_scale": self.eh_lr_scale} if self.eh_lr_scale != 1.0 else {}),
                **({"lora_eh": True} if self.lora_eh else {}),
            },
        }


ARMS: dict[str, Arm] = {
    arm.name: arm
    for arm in (
        Arm("full", "full", "full fine-tuning", GRID_FULL, interval=None),
        Arm("lora16", "lora", "LoRA r=16", GRID_LORA, interval=None, rank=16),
        Arm(f"lora{MATCHED_RANK}", "lora", f"LoRA r={MATCHED_RANK}", GRID_LORA, interval=None, rank=MATCHED_RANK),
        Arm("lisa2", "lisa", "LISA gamma=2 K=10", GRID_LISA, n_layers=2),
        Arm("lisa4", "lisa", "LISA gamma=4 K=10", GRID_LISA, n_layers=4),
        Arm("fixed2", "fixed", "fixed 2 blocks + E+H", GRID_LISA, n_layers=2, interval=None),
        Arm("fixed4", "fixed", "fixed 4 blocks + E+H", GRID_LISA, n_layers=4, interval=None),
        Arm("eh", "eh", "embeddings + head only", GRID_LISA, interval=None),
        Arm("lisa6", "lisa", "LISA gamma=6 K=10", GRID_LISA, n_layers=6, role="variant"),
        Arm("lisa2-blocks", "lisa", "LISA gamma=2, blocks only", GRID_LISA, n_layers=2,
            lisa={"always_active": []}, role="variant"),
        Arm("lisa2-eh025", "lisa", "LISA gamma=2, E+H at 0.25x lr", GRID_LISA, n_layers=2, eh_lr_scale=0.25,
            role="variant"),
        Arm("lisa2-offload", "lisa", "LISA gamma=2, offloaded state", GRID_LISA, n_layers=2,
            lisa={"optimizer_state": "offload"}, role="variant"),
        Arm("lora104", "lora", "LoRA r=104", GRID_LORA, interval=None, rank=104, role="variant"),
        Arm(f"lora{MATCHED_RANK}-eh", "lora", f"LoRA r={MATCHED_RANK} + E+H", GRID_LORA, interval=None,
            rank=MATCHED_RANK, lora_eh=True, role="control"),
        Arm(f"lora{MATCHED_RANK}-eh10", "lora", f"LoRA r={MATCHED_RANK} + E+H at 10x lr", GRID_LORA_EH10,
            interval=None, rank=MATCHED_RANK, lora_eh=True, eh_lr_scale=10.0, role="control"),
        Arm("lora16-eh10", "lora", "LoRA r=16 + E+H at 10x lr", GRID_LORA_EH10, interval=None, rank=16,
            lora_eh=True, eh_lr_scale=10.0, role="control"),
    )
}  # fmt: skip
CORE = tuple(name for name, arm in ARMS.items() if arm.role == "core")
VARIANTS = tuple(name for name, arm in ARMS.items() if arm.role == "variant")


def extend(grid: list[float], best: float) -> float | None:
    """The next rate of a grid whose best rate is at an edge; ``None`` when the best is inside or the grid is full.

    Examples:
        >>> extend([1e-4, 3e-4, 1e-3, 3e-3], 3e-3)
        0.01
        >>> extend([1e-4, 3e-4, 1e-3, 3e-3], 1e-4)
        3e-05
        >>> extend([1e-4, 3e-4, 1e-3, 3e-3], 3e-4) is None
        True
    """
    rates = sorted(grid)
    if len(rates) >= MAX_GRID or rates[0] < best < rates[-1]:
        return None
    index = LADDER.index(min(LADDER, key=lambda r: abs(r / best - 1)))
    step = 1 if best >= rates[-1] else -1
    if not 0 <= index + step < len(LADDER):
        return None
    return LADDER[index + step]
