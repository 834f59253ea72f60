"""The package's layers import one way: no import cycle among its modules (deferred imports
included), no layer importing one above it, no private name imported across modules."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# where each installed package's modules live (setup.cfg's package_dir)
SOURCES = {
    "dmq_fx": ROOT / "dmq_fx",
    "dmq_fx.passes": ROOT / "passes",
    "dmq_fx.observers": ROOT / "observers",
}
# which subpackages each layer may import (besides itself and dmq_fx.errors / dmq_fx.version)
ALLOWED = {
    "dmq_fx.observers": set(),
    "dmq_fx.graph": {"dmq_fx.observers"},
    "dmq_fx.passes": {"dmq_fx.graph", "dmq_fx.quantize", "dmq_fx.observers"},
    "dmq_fx.quantize": {"dmq_fx.graph", "dmq_fx.observers", "dmq_fx.passes"},
    "dmq_fx.methods": {"dmq_fx.graph", "dmq_fx.observers", "dmq_fx.passes", "dmq_fx.quantize"},
    "dmq_fx.lowering": {"dmq_fx.graph", "dmq_fx.observers", "dmq_fx.passes", "dmq_fx.quantize"},
    "dmq_fx.workflow": {
        "dmq_fx.graph",
        "dmq_fx.observers",
        "dmq_fx.passes",
        "dmq_fx.quantize",
        "dmq_fx.methods",
        "dmq_fx.lowering",
    },
}
LEAVES = {"dmq_fx.errors", "dmq_fx.metrics", "dmq_fx.version"}


def _modules() -> dict[str, Path]:
    out = {}
    for package, folder in SOURCES.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([package, *parts])] = path
    return out


MODULES = _modules()


def _resolve(name: str) -> str | None:
    """The package module ``name`` refers to (a module, or the module defining a name)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str, path: Path) -> list[tuple[str, str | None]]:
    """(imported module, imported name) for every import statement, at any depth."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, None) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            out += [(base, a.name) for a in node.names]
    return out


def _edges() -> dict[str, set[str]]:
    edges = {m: set() for m in MODULES}
    for module, path in MODULES.items():
        for base, name in _imports(module, path):
            full = f"{base}.{name}" if name else base
            target = _resolve(full if full in MODULES else base)
            if target and target != module and target != "dmq_fx":
                edges[module].add(target)
    return edges


def _layer(module: str) -> str:
    for layer in sorted(ALLOWED, key=len, reverse=True):
        if module == layer or module.startswith(layer + "."):
            return layer
    return module


def test_no_import_cycles_among_the_package_modules():
    edges = _edges()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(edges[m]):
            assert state.get(n) != 1, "import cycle: " + " -> ".join(stack[stack.index(n) :] + [n])
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m)


def test_layers_import_only_the_layers_below():
    wrong = []
    for module, targets in _edges().items():
        layer = _layer(module)
        if layer not in ALLOWED:
            continue  # the API facade (dmq_fx/__init__, __main__) and the leaves
        for target in targets:
            other = _layer(target)
            if other != layer and other not in LEAVES and other not in ALLOWED[layer]:
                wrong.append(f"{module} imports {target}")
    assert not wrong, wrong


def test_no_private_name_imported_across_modules():
    wrong = [
        f"{module} imports {base}.{name}"
        for module, path in MODULES.items()
        for base, name in _imports(module, path)
        if base.startswith("dmq_fx") and name and name.startswith("_") and name != "__version__"
    ]
    assert not wrong, wrong


def test_the_import_parser_finds_known_edges():
    """The checks above are not vacuous: the parser sees imports, including these."""
    edges = _edges()
    assert "dmq_fx.quantize.modes" in edges["dmq_fx.quantize.observe"]
    assert "dmq_fx.graph.meta" in edges["dmq_fx.quantize.modes"]
    assert "dmq_fx.lowering.convert" in edges["dmq_fx.workflow.serialization"]
