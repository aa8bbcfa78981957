"""The module structure of `keras_vmoe`, read from the source with `ast`.

The import graph has one node per module of the package (a package is its
`__init__.py`, named by the package: `keras_vmoe.models`). Every `import`
and `from ... import` statement anywhere in a module counts, at the top or
inside a function (a lazy import is still a dependency), except those under
`if TYPE_CHECKING:`. A statement gives one edge per imported name:

- `import a.b.c` -> `a.b.c` (the longest prefix that is a module of the
  package);
- `from a.b import c` -> `a.b.c` when `a.b.c` is a module, else the
  package `a.b` (its `__init__.py`, whose re-export `c` is);
- relative imports are resolved against the importing module first.

Python also runs the `__init__.py` of every parent package before a module
(`import keras_vmoe.models.stats` runs `keras_vmoe/models/__init__.py`).
Those implicit parent imports are not edges: a package `__init__` that
re-exports its submodules' names would otherwise close a cycle with each
of them. This is the one exception ("cycles through package `__init__`
re-exports"); an explicit edge into a package `__init__` is an ordinary
edge, so a submodule that imports a name from its own package
(`from keras_vmoe.models import list_presets`) closes a reported cycle.

Rules:
(a) the graph has no cycle;
(b) nothing under `keras_vmoe.models` or `keras_vmoe.layers` imports
    `keras_vmoe.training`, `keras_vmoe.cli` or `keras_vmoe.analysis`
    (dependencies point from training / analysis / CLI down to the models
    and layers, never up).
"""

import ast
import os

import pytest

PACKAGE = "keras_vmoe"
ROOT = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), PACKAGE
)
LOWER = ("keras_vmoe.models", "keras_vmoe.layers")
UPPER = ("keras_vmoe.training", "keras_vmoe.cli", "keras_vmoe.analysis")


def _modules(root=ROOT, package=PACKAGE):
    """{dotted name: (path, is_package)} of every module under `root`."""
    modules = {}
    for folder, _, files in os.walk(root):
        relative = os.path.relpath(folder, os.path.dirname(root))
        prefix = relative.replace(os.sep, ".")
        if not os.path.isfile(os.path.join(folder, "__init__.py")):
            continue
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(folder, name)
            if name == "__init__.py":
                modules[prefix] = (path, True)
            else:
                modules[f"{prefix}.{name[:-3]}"] = (path, False)
    assert package in modules, f"no package {package!r} under {root!r}"
    return modules


def _is_type_checking(test):
    """True for the test of `if TYPE_CHECKING:` / `if typing.TYPE_CHECKING:`."""
    if isinstance(test, ast.Name):
        return test.id == "TYPE_CHECKING"
    if isinstance(test, ast.Attribute):
        return test.attr == "TYPE_CHECKING"
    return False


def _import_nodes(tree):
    """Every Import / ImportFrom node, skipping `if TYPE_CHECKING:` bodies
    (their `else:` branch still counts)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
            continue
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


def _longest_module(name, modules):
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in modules:
            return candidate
    return None


def _targets(node, module, is_package, modules):
    """The modules of the package that one import statement depends on."""
    if isinstance(node, ast.Import):
        for alias in node.names:
            target = _longest_module(alias.name, modules)
            if target is not None:
                yield target
        return
    if node.level:
        base = module.split(".")
        # A package's own name is its `__init__`; level 1 is itself.
        keep = len(base) - node.level + (1 if is_package else 0)
        base = ".".join(base[:keep])
        source = f"{base}.{node.module}" if node.module else base
    else:
        source = node.module
    if source is None:
        return
    for alias in node.names:
        submodule = f"{source}.{alias.name}"
        if submodule in modules:
            yield submodule
        else:
            target = _longest_module(source, modules)
            if target is not None:
                yield target


def import_graph(root=ROOT, package=PACKAGE):
    """{module: {imported module: first line number}}."""
    modules = _modules(root, package)
    graph = {}
    for module, (path, is_package) in sorted(modules.items()):
        with open(path, encoding="utf-8") as file:
            tree = ast.parse(file.read(), filename=path)
        edges = graph.setdefault(module, {})
        for node in _import_nodes(tree):
            for target in _targets(node, module, is_package, modules):
                if target != module:
                    edges.setdefault(target, node.lineno)
    return graph


def find_cycles(graph):
    """One cycle (a list of modules, first == last) per strongly connected
    component with more than one module (Tarjan), sorted."""
    index, low, on_stack, stack, components = {}, {}, set(), [], []

    def connect(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                connect(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(set(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return sorted(_one_cycle(graph, c) for c in components)


def _one_cycle(graph, component):
    """A shortest cycle through the smallest module of `component`."""
    start = min(component)
    paths = {start: [start]}
    queue = [start]
    while queue:
        node = queue.pop(0)
        for target in sorted(graph[node]):
            if target == start:
                return paths[node] + [start]
            if target in component and target not in paths:
                paths[target] = paths[node] + [target]
                queue.append(target)
    raise AssertionError(f"no cycle through {start!r}")  # pragma: no cover


def _describe(graph, cycle):
    return " -> ".join(
        f"{source} (line {graph[source][target]})"
        for source, target in zip(cycle, cycle[1:])
    ) + f" -> {cycle[-1]}"


def _inside(module, packages):
    return any(module == p or module.startswith(p + ".") for p in packages)


@pytest.fixture(scope="module")
def graph():
    return import_graph()


def test_no_import_cycles(graph):
    cycles = find_cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join(
        _describe(graph, cycle) for cycle in cycles
    )


def test_models_and_layers_do_not_import_upward(graph):
    wrong = [
        f"{source} (line {line}) imports {target}"
        for source, edges in sorted(graph.items())
        if _inside(source, LOWER)
        for target, line in sorted(edges.items())
        if _inside(target, UPPER)
    ]
    assert not wrong, "upward imports:\n" + "\n".join(wrong)


# === The checker itself ===
def _write(root, files):
    for name, text in files.items():
        path = os.path.join(root, *name.split("/"))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as file:
            file.write(text)


def test_checker_resolves_modules_names_and_lazy_imports(tmp_path):
    _write(
        tmp_path,
        {
            "pkg/__init__.py": "from pkg.sub import a\n",
            "pkg/sub/__init__.py": "from pkg.sub.a import A\n",
            "pkg/sub/a.py": "import os\nfrom pkg.sub import b\n",
            "pkg/sub/b.py": (
                "from typing import TYPE_CHECKING\n"
                "if TYPE_CHECKING:\n"
                "    from pkg.sub import a\n"
                "def f():\n"
                "    from . import c\n"
                "    from pkg.sub import A\n"
            ),
            "pkg/sub/c.py": "from .a import A\n",
        },
    )
    graph = import_graph(str(tmp_path / "pkg"), "pkg")
    assert graph == {
        "pkg": {"pkg.sub.a": 1},
        "pkg.sub": {"pkg.sub.a": 1},
        "pkg.sub.a": {"pkg.sub.b": 2},
        "pkg.sub.b": {"pkg.sub.c": 5, "pkg.sub": 6},
        "pkg.sub.c": {"pkg.sub.a": 1},
    }
    cycles = find_cycles(graph)
    # b -> c -> a -> b (lazy), and b -> pkg.sub -> a -> b (through the
    # package's `__init__` named explicitly) form one component.
    assert cycles == [["pkg.sub", "pkg.sub.a", "pkg.sub.b", "pkg.sub"]]
    assert "pkg.sub.b (line 6) -> pkg.sub" in _describe(graph, cycles[0])


def test_checker_accepts_a_tree_without_cycles(tmp_path):
    _write(
        tmp_path,
        {
            "pkg/__init__.py": "from pkg import a\nfrom pkg.b import B\n",
            "pkg/a.py": "from pkg import b\n",
            "pkg/b.py": "import json\nB = 1\n",
        },
    )
    graph = import_graph(str(tmp_path / "pkg"), "pkg")
    assert graph == {
        "pkg": {"pkg.a": 1, "pkg.b": 2},
        "pkg.a": {"pkg.b": 1},
        "pkg.b": {},
    }
    assert find_cycles(graph) == []
