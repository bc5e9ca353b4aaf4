"""The package's layers and what may import what: the rules of docs/architecture.md, enforced."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lightning_lisa"

#: Layer of a module (by its path in the package) -> the layers it may import from the package.
ALLOWED: dict[str, set[str]] = {
    "root": {"core", "strategies", "monitoring", "estimate", "recipes"},  # __init__ re-exports, __main__ runs the CLI
    "core": {"core", "strategies"},
    "strategies": {"core", "strategies"},
    "monitoring": {"core", "strategies", "monitoring"},
    "estimate": {"core", "estimate"},
    "recipes": {"core", "strategies", "monitoring", "estimate", "recipes"},
    "testing": {"core", "strategies", "monitoring", "estimate", "recipes", "testing"},  # the harness: used by none
}

#: Third-party packages only the application layers may import at module level.
APPLICATION_ONLY = {"transformers", "jsonargparse", "tokenizers", "peft", "matplotlib"}


def layer_of(path: Path) -> str:
    parts = path.relative_to(PACKAGE).parts
    if parts in (("__init__.py",), ("__main__.py",)):
        return "root"
    return parts[0] if len(parts) > 1 else "core"


def imported_modules(tree: ast.Module, module_level_only: bool) -> list[str]:
    """Absolute module names imported by the file (all imports, or only those at module level)."""
    nodes = tree.body if module_level_only else list(ast.walk(tree))
    names: list[str] = []
    for node in nodes:
        if isinstance(node, ast.If) and module_level_only:  # `if TYPE_CHECKING:` imports never run
            continue
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
    return names


def package_layer(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "lightning_lisa":
        return None
    if len(parts) > 1 and parts[1] in ALLOWED and parts[1] != "core":
        return parts[1]
    return "core"


SOURCES = sorted(p for p in PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_flow_one_way(path: Path):
    layer = layer_of(path)
    tree = ast.parse(path.read_text())
    wrong = [
        m
        for m in imported_modules(tree, module_level_only=False)
        if (target := package_layer(m)) is not None and target not in ALLOWED[layer]
    ]
    assert not wrong, f"{layer} module {path.name} imports {wrong}; allowed layers: {sorted(ALLOWED[layer])}"


@pytest.mark.parametrize(
    "path",
    [p for p in SOURCES if layer_of(p) in ("root", "core", "strategies", "monitoring", "testing")],
    ids=lambda p: p.name,
)
def test_core_layers_import_no_application_package_at_module_level(path: Path):
    tree = ast.parse(path.read_text())
    heavy = [m for m in imported_modules(tree, module_level_only=True) if m.split(".")[0] in APPLICATION_ONLY]
    assert not heavy, f"{path.name} imports {heavy} at module level; import them where they are needed"


# Lightning imports torchmetrics, which imports transformers when it is installed: what was loaded before
# lightning_lisa is imported is not ours. From then on, any new import of these packages fails.
BLOCKER = """
import importlib.abc, sys
import lightning.pytorch
BLOCKED = {"jsonargparse", "transformers", "tokenizers", "peft"}
BEFORE = {m for m in sys.modules if m.split(".")[0] in BLOCKED}
class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in BLOCKED and name not in BEFORE:
            raise ModuleNotFoundError(f"No module named {name!r} (blocked: LISA must not need it)")
        return None
sys.meta_path.insert(0, Blocker())
"""

PLAIN_TORCH_RUN = """
import lightning.pytorch as pl, torch
from torch import nn
from lightning_lisa import LISA

class Net(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(16, 8)
        self.blocks = nn.ModuleList([nn.Linear(8, 8) for _ in range(4)])
        self.head = nn.Linear(8, 16)
    def training_step(self, batch, batch_idx):
        x = self.embed(batch)
        for block in self.blocks:
            x = torch.relu(block(x))
        return nn.functional.cross_entropy(self.head(x).flatten(0, 1), batch.flatten())
    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)

net = Net()
before = [b.weight.detach().clone() for b in net.blocks]
lisa = LISA(n_layers=1, interval=2, layers="blocks", always_active=["embed", "head"])
data = torch.utils.data.DataLoader(torch.randint(0, 16, (8, 4)), batch_size=2)
trainer = pl.Trainer(max_steps=2, callbacks=[lisa], logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
trainer.fit(net, data)
changed = [i for i, b in enumerate(net.blocks) if not torch.equal(b.weight, before[i])]
assert changed == lisa.active_layers, (changed, lisa.active_layers)
assert "jsonargparse" not in sys.modules
print("ok")
"""


def test_core_trains_a_plain_torch_model_without_the_application_packages():
    # `pip install lightning-lisa` without extras: the callback trains a plain torch model without jsonargparse,
    # transformers or tokenizers installed
    result = subprocess.run(
        [sys.executable, "-c", BLOCKER + PLAIN_TORCH_RUN], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")


def test_the_command_line_names_the_extra_when_its_packages_are_missing():
    code = BLOCKER + "from lightning_lisa.recipes import cli_main\nsys.argv = ['lightning-lisa', '--help']\ncli_main()"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert result.returncode != 0
    assert 'pip install "lightning-lisa[cli]"' in result.stderr
