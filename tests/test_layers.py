"""The package is layered: every module imports only modules listed before it here, so imports form no cycle and
no arrow points up. A new module must be placed in LAYERS (the README's Layout section follows this order)."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "continuum"

LAYERS = [
    # vocabulary and small helpers, importing nothing of ours
    "continuum.knobs", "continuum.files", "continuum.timing", "continuum.allocator",
    # the layers and what computes them
    "continuum.compiled", "continuum.triton_kernels", "continuum.kernels", "continuum.strategy", "continuum.norm",
    "continuum.block", "continuum.cost",
    # models
    "continuum.models.base", "continuum.models.small", "continuum.models.xception", "continuum.models.inception",
    "continuum.models.convert", "continuum.models",
    # data, settings, training
    "continuum.data", "continuum.config", "continuum.train", "continuum.tracking", "continuum.checkpoint", "continuum",
    # the sweep (the only place Optuna lives)
    "continuum.sweep", "continuum.sweep.settings", "continuum.sweep.record",
    "continuum.analysis",  # statistics over the record's columns (a retrain reads a search's Pareto front)
    "continuum.sweep.points", "continuum.sweep.storage", "continuum.sweep.tables", "continuum.sweep.signals",
    "continuum.sweep.objective",
    "continuum.sweep.study", "continuum.sweep.workers",
    # results -> plots -> report -> the campaign's measurements and report
    "continuum.results", "continuum.plots", "continuum.report", "continuum.arm_latency", "continuum.campaign",
    # command lines
    "continuum.sweep.cli", "continuum.sweep.worker", "continuum.sweep.__main__", "continuum.spectrum",
    "continuum.bench", "continuum.cli", "continuum.__main__",
]


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def known(name: str) -> str | None:
    """The listed module ``name`` stands for: itself, or the module it is an attribute of."""
    while name and name not in LAYERS:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(path: Path) -> set[str]:
    """continuum modules imported anywhere in ``path`` (also inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.split(".")[0] == "continuum"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "continuum":
            found |= {known(f"{node.module}.{alias.name}") or node.module for alias in node.names}
    return {known(name) or name for name in found}


GRAPH = {module_name(path): imports_of(path) for path in sorted(ROOT.rglob("*.py"))}


def test_every_module_is_placed_in_a_layer():
    assert sorted(set(GRAPH) - set(LAYERS)) == [], "add new modules to LAYERS (and the README's Layout)"
    assert sorted(set(LAYERS) - set(GRAPH)) == [], "LAYERS names modules that do not exist"


@pytest.mark.parametrize("module", LAYERS)
def test_imports_point_down(module):
    upward = sorted(name for name in GRAPH[module] if LAYERS.index(name) >= LAYERS.index(module))
    assert upward == [], f"{module} imports {upward}, listed at or above it"


def test_no_import_cycle():
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in sorted(GRAPH[module]):
            assert state.get(target) != "open", "import cycle: " + " -> ".join([*path, module, target])
            if target not in state:
                visit(target, [*path, module])
        state[module] = "done"

    for module in GRAPH:
        if module not in state:
            visit(module, [])
