"""The package's shape: data flows one way. Every import in `nws/`, inside functions included,
points to the importing module's own layer or an earlier one, and no modules import each other
in a cycle. A module longer than 350 lines says at its top why it is one module."""

from __future__ import annotations

import ast
import graphlib
from collections.abc import Iterable, Mapping

from tests.conftest import ROOT

LAYERS = [
    (
        "nws",
        "nws.errors",
        "nws.interrupts",
        "nws.logs",
        "nws.progress",
        "nws.processes",
        "nws.checks",
        "nws.diskspace",
        "nws.net",
        "nws.net.fidelity",
        "nws.backend",
    ),
    ("nws.space",),
    ("nws.data",),
    ("nws.net.cnn", "nws.net.layers"),
    (
        "nws.net.compiled",
        "nws.net.augmentation",
        "nws.net.pipeline",
        "nws.net.optimizers",
        "nws.net.training",
        "nws.net.pack",
    ),
    ("nws.net.snapshots", "nws.net.regions", "nws.net.symmetry"),
    ("nws.tracking",),
    ("nws.campaign",),
    ("nws.zoo",),
    ("nws.formats",),
    ("nws.meta",),
    ("nws.registry",),
    ("nws.commands",),
    ("nws.cli",),
]
"""The data flow, first to last: a module may import its own layer and earlier ones. A package
named here (`nws.data`) holds all its modules; `nws` alone is the package's own __init__."""
LONG = 350
LONG_REASON = "Why one module:"
"""How a module longer than LONG lines starts the paragraph of its docstring that says why."""


def modules() -> dict[str, ast.Module]:
    """Every module of nws/, parsed, by dotted name (a package by its own name)."""
    parsed = {}
    for path in sorted((ROOT / "nws").rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        parsed[".".join(parts)] = ast.parse(path.read_text(), str(path))
    return parsed


def import_graph(parsed: Mapping[str, ast.Module]) -> dict[str, set[str]]:
    """Module -> the nws modules it imports, at any depth (in functions, under TYPE_CHECKING).
    `from a import b` counts `a` and, when it is a module, `a.b`. A package's __init__ that
    imports its own modules (a package's face) is not an edge back: importing those runs it first
    in any case."""
    packages = {name for name, tree in parsed.items() if name == "nws" or _is_package(name, parsed)}

    def resolve(name: str) -> str | None:
        while name and name not in parsed:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {name: set() for name in parsed}
    for name, tree in parsed.items():
        package = name if name in packages else name.rpartition(".")[0]
        for node in ast.walk(tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*up, base] if base else up)
                targets = [base, *(f"{base}.{alias.name}" for alias in node.names)]
            for target in targets:
                if target == "nws" or target.startswith("nws."):
                    found = resolve(target)
                    if found and found != name and not (name in packages and found.startswith(name + ".")):
                        graph[name].add(found)
    return graph


def _is_package(name: str, parsed: Mapping[str, ast.Module]) -> bool:
    return any(other.startswith(name + ".") for other in parsed)


def layer_of(module: str) -> int | None:
    """The layer of the longest entry naming `module` or a package above it (`nws.net` itself is
    one entry, its modules others)."""
    found = [
        (len(entry), index)
        for index, layer in enumerate(LAYERS)
        for entry in layer
        if module == entry or (entry != "nws" and module.startswith(entry + "."))
    ]
    return max(found)[1] if found else None


def cycles(graph: Mapping[str, Iterable[str]]) -> list[str]:
    """One import cycle, as `a -> b -> a`, if there is one (graphlib finds it)."""
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as error:
        return [" -> ".join(reversed(error.args[1]))]
    return []


def back_edges(graph: Mapping[str, Iterable[str]]) -> list[str]:
    """Every import of a module of a later layer: `importer -> imported (layer a < layer b)`."""
    found = []
    for module, imported in sorted(graph.items()):
        for target in sorted(imported):
            own, theirs = layer_of(module), layer_of(target)
            if theirs > own:
                found.append(f"{module} -> {target} (layer {own} imports layer {theirs})")
    return found


def test_every_module_has_a_layer():
    assert [m for m in modules() if layer_of(m) is None] == []


def test_no_import_cycle_among_nws_modules():
    assert cycles(import_graph(modules())) == []


def test_every_import_points_to_its_own_layer_or_an_earlier_one():
    assert back_edges(import_graph(modules())) == []


def test_a_long_module_says_why_it_is_one_module():
    silent = []
    for path in sorted((ROOT / "nws").rglob("*.py")):
        text = path.read_text()
        if len(text.splitlines()) > LONG and LONG_REASON not in (ast.get_docstring(ast.parse(text)) or ""):
            silent.append(path.relative_to(ROOT).as_posix())
    assert silent == []


def test_the_checks_find_a_cycle_a_back_edge_and_a_function_level_import():
    """The checks above can fail: on a cycle, an import against the data flow, and one that is
    made inside a function."""
    source = {
        "nws.zoo.store": "from nws.meta import samples\n",
        "nws.meta.samples": "def zoo():\n    from nws.zoo import store\n",
        "nws.meta": "from nws.meta import samples\n",
        "nws.zoo": "",
        "nws": "",
    }
    graph = import_graph({name: ast.parse(text) for name, text in source.items()})
    assert graph["nws.meta.samples"] == {"nws.zoo", "nws.zoo.store"}
    assert graph["nws.meta"] == set()  # a package's face importing its own module
    assert cycles(graph) in (
        ["nws.meta.samples -> nws.zoo.store -> nws.meta.samples"],
        ["nws.zoo.store -> nws.meta.samples -> nws.zoo.store"],
    )
    assert back_edges(graph) == [
        "nws.zoo.store -> nws.meta (layer 8 imports layer 10)",
        "nws.zoo.store -> nws.meta.samples (layer 8 imports layer 10)",
    ]
