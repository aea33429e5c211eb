"""The package's import graph: every arrow points down the layers, and no module imports
itself around a circle (lazy imports inside functions count too)."""

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "nnslim"

#: lowest first: a package may import only from packages before it (and from itself)
LAYERS = [
    "_version",
    "base",  # inputs and running the model, modes, linear-like helpers, config, serialize, ...
    "record",  # the edit record: describe, diff, replay
    "profiling",
    "modules",  # compressed modules and their conversions
    "graph",  # analysis only: tracing, attention and MLP layouts
    "io",  # save/load, Hugging Face round trips
    "core",  # Transform, Context, Report, select, calibration
    "transforms",
    "large",
    "evaluate",  # the pinned perplexity evaluation
    "train",
    "testing",
    "demo",
    "cli",
    "__main__",
    "",  # nnslim/__init__.py
]


def _module(path: Path) -> str:
    parts = list(path.relative_to(PKG).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports() -> dict[str, set[str]]:
    """``module -> modules it imports`` (within nnslim, dotted from the package root)."""
    out: dict[str, set[str]] = {}
    for f in PKG.rglob("*.py"):
        mod = _module(f)
        here = mod.split(".") if f.name == "__init__.py" else mod.split(".")[:-1]
        here = [p for p in here if p]
        deps: set[str] = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = here[: len(here) - (node.level - 1)]
                target = ".".join([*base, *([node.module] if node.module else [])])
                if node.module is None:  # from . import x: each name may be a module
                    deps |= {".".join([*base, a.name]) for a in node.names}
                else:
                    deps.add(target)
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("nnslim."):
                deps.add(node.module.removeprefix("nnslim."))
        out[mod] = {d for d in deps if d}
    return out


def _layer(mod: str) -> str:
    return mod.split(".")[0] if mod else ""


def test_every_import_points_down_the_layers():
    order = {name: i for i, name in enumerate(LAYERS)}
    wrong = []
    for mod, deps in _imports().items():
        for dep in deps:
            a, b = _layer(mod), _layer(dep)
            assert a in order and b in order, f"{mod} -> {dep}: add its package to LAYERS"
            if a != b and order[b] > order[a]:
                wrong.append(f"{mod or 'nnslim'} -> {dep}")
    assert not wrong, "imports pointing up the layers:\n" + "\n".join(sorted(wrong))


def test_no_module_imports_itself_around_a_circle():
    graph = _imports()
    modules = set(graph)

    def real(dep: str) -> str | None:  # "pkg.mod.name" imports resolve to the module
        while dep and dep not in modules:
            dep = dep.rpartition(".")[0]
        return dep or None

    edges = {m: {r for d in deps if (r := real(d)) and r != m} for m, deps in graph.items()}
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(edges.get(m, ())):
            if state.get(n) == 1:
                cycles.append([*path[path.index(n) :], n] if n in path else [m, n])
            elif n not in state:
                visit(n, [*path, n])
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m, [m])
    # a package's __init__ re-exporting its modules is not a circle of code
    cycles = [c for c in cycles if not any(m == _layer(m) or not m for m in c[:-1])]
    assert not cycles, "import circles:\n" + "\n".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize("layer", [name for name in LAYERS if name])
def test_every_layer_exists(layer):
    assert (PKG / layer).is_dir() or (PKG / f"{layer}.py").is_file()
