"""The package's modules import each other in one direction: the graph of every ``import`` and
``from ... import`` between pnr_kernels modules (module level and inside functions alike, since a
deferred import is still a dependency) has no cycle."""
import ast
import os

import pytest

import pnr_kernels

ROOT = os.path.dirname(pnr_kernels.__file__)


def _modules():
    """{dotted name: path} of every Python module of the package (packages by their __init__)."""
    found = {}
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__" and os.path.isfile(os.path.join(folder, d, "__init__.py")))
        parts = ["pnr_kernels", *os.path.relpath(folder, ROOT).split(os.sep)]
        parts = [p for p in parts if p != "."]
        for name in sorted(files):
            if name.endswith(".py"):
                stem = name[:-3]
                found[".".join(parts if stem == "__init__" else [*parts, stem])] = os.path.join(folder, name)
    return found


def _resolve(current, is_package, level, target):
    """The dotted name ``from <level dots><target>`` means inside module ``current``."""
    if level == 0:
        return target
    base = current.split(".") if is_package else current.split(".")[:-1]
    base = base[:len(base) - (level - 1)]
    return ".".join([*base, target] if target else base)


def import_graph():
    """{module: set of pnr_kernels modules it imports}. ``from X import name`` counts as an import
    of ``X.name`` when that is a module, else of ``X``. A package's own __init__ is reached only
    when it is imported by name (the implicit import of parent packages is no edge)."""
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        is_package = path.endswith("__init__.py")
        with open(path) as f:
            tree = ast.parse(f.read(), filename=path)
        edges = set()
        for node in ast.walk(tree):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                source = _resolve(name, is_package, node.level, node.module)
                targets = [f"{source}.{alias.name}" if f"{source}.{alias.name}" in modules else source
                           for alias in node.names]
            edges |= {t for t in targets if t in modules and t != name}
        graph[name] = edges
    return graph


def find_cycle(graph):
    """One cycle of ``graph`` as a list of nodes (first == last), or None."""
    state = {}  # 1: on the current path, 2: done
    path = []

    def visit(node):
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_the_graph_sees_the_package():
    graph = import_graph()
    assert {"pnr_kernels", "pnr_kernels.losses", "pnr_kernels.registry", "pnr_kernels.bench.runner"} <= set(graph)
    assert "pnr_kernels.registry" in graph["pnr_kernels.losses"]
    # a deferred import inside a function is an edge too
    assert "pnr_kernels.bench.report" in graph["pnr_kernels.bench.runner"]


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_the_package_import_graph_has_no_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_library_never_imports_the_bench():
    graph = import_graph()
    offenders = sorted(f"{m} -> {t}" for m, targets in graph.items() if not m.startswith("pnr_kernels.bench")
                       for t in targets if t.startswith("pnr_kernels.bench"))
    assert not offenders, offenders


def test_the_bench_modules_import_one_way():
    """runner (the command line) sits on top: peers, limits, report and distributed import no other
    bench module but dtypes, so each can be used (and tested) without the runner."""
    graph = import_graph()
    lower = ["peers", "limits", "report", "distributed", "dtypes"]
    assert {f"pnr_kernels.bench.{m}" for m in lower} <= set(graph)
    offenders = sorted(f"{m} -> {t}" for m in lower for t in graph[f"pnr_kernels.bench.{m}"]
                       if t.startswith("pnr_kernels.bench") and t != "pnr_kernels.bench.dtypes")
    assert not offenders, offenders


def test_registering_without_a_public_function_names_it():
    from pnr_kernels import losses, registry

    namespace = dict(vars(losses))
    del namespace["nt_xent_loss"]
    with pytest.raises(KeyError, match="nt_xent_loss"):
        registry.register_public_functions(namespace)
    assert registry.LOSSES["nt_xent"].function is losses.nt_xent_loss
