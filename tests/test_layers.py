"""The package's layers import in one direction: utils and models <- data <- evaluation <- training <- apps.

Every `import` and `from ... import` in `src/merit_hf` is read with `ast` (function-level imports included, since a
lazy upward import is still an upward dependency), resolved to a module of the package, and checked against the rank
of the layer it lives in. Within one layer, modules must not import each other in a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE_ROOT = Path(__file__).resolve().parents[1] / "src" / "merit_hf"

# Layer of each top-level part of the package; a module may import only from layers of a rank <= its own.
LAYER_RANKS = {
    "utils": 0,
    "models": 1,
    "data": 2,
    "evaluation": 3,
    "training": 4,
    "quickstart": 5,
    "embedding": 5,
    "hub": 5,
}
# The package facade (`merit_hf/__init__.py`) re-exports the public names; nothing inside may import it.
FACADE = "merit_hf"
# Old module paths of 0.1, kept one release as aliases of their new modules (`sys.modules[__name__] = ...`); they
# sit outside the layers, and no module of the package may import them.
ALIASES = {
    "merit_hf.configuration_merit",
    "merit_hf.modeling_merit",
    "merit_hf.modeling_merit_report",
    "merit_hf.feature_extraction_merit",
    "merit_hf.processing_merit",
    "merit_hf.inference_precision",
    "merit_hf.cards",
    "merit_hf.training.arguments",
    "merit_hf.training.throughput",
    "merit_hf.data.wfdb_records",
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """The merit_hf modules `path` imports, as absolute dotted names (a `from package import name` counts as the
    submodule when `name` is one, else as the package)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.split(".")[0] == "merit_hf")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            elif node.module and node.module.split(".")[0] == "merit_hf":
                target = node.module
            else:
                continue
            for alias in node.names:
                candidate = f"{target}.{alias.name}"
                is_module = (PACKAGE_ROOT.parent / candidate.replace(".", "/")).with_suffix(".py").is_file() or (
                    PACKAGE_ROOT.parent / candidate.replace(".", "/") / "__init__.py"
                ).is_file()
                found.add(candidate if is_module else target)
    return found


def layer_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def package_modules() -> dict[str, Path]:
    """Every module of the package but the aliases."""
    modules = {module_name(path): path for path in sorted(PACKAGE_ROOT.rglob("*.py"))}
    return {module: path for module, path in modules.items() if module not in ALIASES}


def test_every_part_of_the_package_has_a_layer():
    unranked = {layer_of(module) for module in package_modules()} - set(LAYER_RANKS) - {None}
    assert not unranked, f"add these parts of merit_hf to LAYER_RANKS (or move them into a layer): {sorted(unranked)}"


def test_no_module_imports_a_higher_layer_or_the_facade():
    problems = []
    for module, path in package_modules().items():
        own = layer_of(module)
        if own is None:  # the facade itself
            continue
        for target in sorted(imported_modules(path)):
            if target == FACADE or target in ALIASES:
                problems.append(f"{module} imports {target}, which only re-exports (import the module itself)")
                continue
            other = layer_of(target)
            if LAYER_RANKS[other] > LAYER_RANKS[own]:
                problems.append(f"{module} ({own}, rank {LAYER_RANKS[own]}) imports {target} ({other}, rank "
                                f"{LAYER_RANKS[other]})")  # fmt: skip
    assert not problems, "upward imports:\n" + "\n".join(problems)


def test_no_import_cycles_between_modules():
    modules = package_modules()
    edges = {
        module: {target for target in imported_modules(path) if target in modules and target != module}
        for module, path in modules.items()
        if layer_of(module) is not None
    }
    # A package's __init__ re-exporting its own submodules is not a cycle of design; drop package -> own child.
    for module in edges:
        edges[module] = {target for target in edges[module] if not target.startswith(module + ".")}
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(module: str) -> None:
        state[module] = 1
        stack.append(module)
        for target in sorted(edges.get(module, ())):
            if state.get(target) == 1:
                cycles.append(" -> ".join(stack[stack.index(target) :] + [target]))
            elif target not in state:
                visit(target)
        stack.pop()
        state[module] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("from ..training.pretrain import main\n", "merit_hf.training.pretrain"),
        ("from merit_hf.training import pretrain\n", "merit_hf.training.pretrain"),
        ("def f():\n    from ..training import probe\n", "merit_hf.training.probe"),
    ],
)
def test_the_checker_sees_an_upward_import_written_any_way(tmp_path, monkeypatch, source, expected):
    fake = PACKAGE_ROOT / "data" / "collator.py"  # resolved against data/, so each source is an upward import
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: source if self == fake else Path.read_text(self))
    found = imported_modules(fake)
    assert expected in found
    assert LAYER_RANKS[layer_of(expected)] > LAYER_RANKS["data"]


@pytest.mark.parametrize("alias", sorted(ALIASES))
def test_an_old_module_path_is_the_new_module_itself(alias):
    import importlib
    import sys

    module = importlib.import_module(alias)
    assert sys.modules[alias] is module
    assert module.__name__ != alias, f"{alias} should alias the moved module, not be a copy of it"
