"""The shape of the package: imports point down, one public home per name, short functions.

These tests read the source (``ast``), not the running modules, so that an
import inside a function counts as much as one at the top of a file.

Layers
------
:data:`LAYERS` is the module map, bottom first. Its units are the top-level
modules and subpackages of ``blocklowrank`` (a subpackage's modules belong to
its unit). A module may import from its own layer or any layer below; an
import of a higher layer is an *upward edge* and fails. Imports inside one
layer must not form a cycle: the module graph (every module) and the package
graph (every unit) are both checked for cycles.

The root package ``blocklowrank`` loads its exports lazily (``__getattr__``
over its ``_EXPORTS`` table, so that ``import blocklowrank`` and
``blocklowrank --help`` stay light); the edges of the root are read from that
table.
"""

from __future__ import annotations

import ast
import importlib
import re
from collections import defaultdict
from pathlib import Path

import blocklowrank

PACKAGE = Path(blocklowrank.__file__).parent

#: The module map, bottom first: (layer, its units). The root package is its own unit, "blocklowrank".
LAYERS = (
    ("floor", {"_version", "_validation", "_params", "_parallel", "_io", "_extras"}),
    ("layout", {"layout", "_linalg", "_descent"}),
    ("numerical kernels", {"_svd", "_allocation", "permutations"}),
    ("fits in a data metric", {"_metric"}),
    ("the container", {"factors"}),
    ("the engine", {"_engine"}),
    ("the estimator base", {"estimators"}),
    ("the registry of structures", {"structures"}),
    ("budget tools and converters", {"budget", "compare", "convert"}),
    ("the core API", {"blocklowrank"}),
    ("files: checkpoints and run logs", {"checkpoints", "sweep"}),
    ("calibration statistics (their file; the torch collector)", {"calibration"}),
    ("PEFT adapter files", {"peft"}),
    ("the checkpoint study", {"study"}),
    ("adapter extraction", {"extract"}),
    ("adapter training", {"adapters"}),
    ("data and the test kit", {"datasets", "testing"}),
    ("the experiments", {"experiments"}),
    ("the command line", {"cli", "__main__"}),
)
LEVEL = {unit: level for level, (_, units) in enumerate(LAYERS) for unit in units}


# ---------------------------------------------------------------------------- reading the source
def _module_name(path):
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _unit(module):
    """The layer unit of a module: ``blocklowrank.checkpoints._select`` -> ``checkpoints``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def _is_package(module):
    return MODULES[module].name == "__init__.py"


def _resolve(module, node):
    """The base module of an ``ImportFrom`` (relative imports resolved)."""
    if not node.level:
        return node.module
    base = module.split(".") if _is_package(module) else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module):
    """``[(target module, line)]``: every internal import of ``module``, inside functions too."""
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(module, node)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.append((sub if sub in MODULES else base, node.lineno))
    if module == "blocklowrank":  # the lazy exports of the root
        for node in tree.body:
            if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "_EXPORTS" for t in node.targets):
                found += [(f"blocklowrank.{m}", node.lineno) for m in ast.literal_eval(node.value).values()]
    out = []
    for target, line in found:
        if target == "blocklowrank" or target.startswith("blocklowrank."):
            while target not in MODULES:  # ``import blocklowrank.x.y`` names a module; an attribute path its module
                target = target.rsplit(".", 1)[0]
            if target != module:
                out.append((target, line))
    return out


EDGES = {module: _imports(module) for module in MODULES}


def _cycles(graph):
    """The strongly connected components of more than one node (Tarjan), each sorted."""
    index, low, stack, on, comps = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return comps


def _describe(comp, graph, where):
    inside = set(comp)
    return (
        "cycle among "
        + ", ".join(comp)
        + ": "
        + "; ".join(f"{a} -> {b}{where(a, b)}" for a in comp for b in sorted(graph.get(a, ())) if b in inside)
    )


# ---------------------------------------------------------------------------- imports point down
def test_every_unit_has_a_layer():
    units = {_unit(m) for m in MODULES}
    assert not units - set(LEVEL), f"place these in LAYERS: {sorted(units - set(LEVEL))}"
    assert not set(LEVEL) - units, f"LAYERS names units that do not exist: {sorted(set(LEVEL) - units)}"


def test_no_import_points_up():
    upward = [
        f"{a} (line {line}, layer {LAYERS[LEVEL[_unit(a)]][0]!r}) imports {b} (layer {LAYERS[LEVEL[_unit(b)]][0]!r})"
        for a, targets in EDGES.items()
        for b, line in targets
        if LEVEL.get(_unit(b), -1) > LEVEL.get(_unit(a), len(LAYERS))
    ]
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_no_module_cycle():
    graph = {a: {b for b, _ in targets} for a, targets in EDGES.items()}
    lines = {(a, b): line for a, targets in EDGES.items() for b, line in targets}
    found = [_describe(c, graph, lambda a, b: f" (line {lines[a, b]})") for c in _cycles(graph)]
    assert not found, "\n".join(found)


def test_no_package_cycle():
    graph, via = defaultdict(set), {}
    for a, targets in EDGES.items():
        for b, line in targets:
            if _unit(a) != _unit(b):
                graph[_unit(a)].add(_unit(b))
                via.setdefault((_unit(a), _unit(b)), f"{a}:{line} imports {b}")
    found = [_describe(c, graph, lambda a, b: f" ({via[a, b]})") for c in _cycles(graph)]
    assert not found, "\n".join(found)


def test_the_graph_reader_sees_function_level_and_relative_imports():
    # the reader itself, on modules whose imports are known
    lines = (PACKAGE / "_parallel.py").read_text(encoding="utf-8").splitlines()
    line = next(i for i, text in enumerate(lines, 1) if text.startswith("from ._params import"))
    assert ("blocklowrank._params", line) in EDGES["blocklowrank._parallel"]  # relative, module level
    cli = {b for b, _ in EDGES["blocklowrank.cli"]}
    assert {"blocklowrank.extract", "blocklowrank.study"} <= cli  # only inside functions there
    assert "blocklowrank.structures" in {b for b, _ in EDGES["blocklowrank"]}  # the root's lazy table


# ---------------------------------------------------------------------------- one public home per name
def _public(module):
    return not any(part.startswith("_") for part in module.split(".")[1:])


PUBLIC = [m for m in MODULES if _public(m)]


def _home(module):
    """The public module that owns what ``module`` defines: itself, or its nearest public package."""
    while not _public(module):
        module = module.rsplit(".", 1)[0]
    return module


def _definer(module, name, seen=()):
    """The module whose source defines ``name`` as ``module`` sees it (following imports and the lazy root)."""
    if (module, name) in seen or module not in MODULES:
        return None
    seen = seen + ((module, name),)
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name == name:
            return module
        targets = (
            node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        )
        if any(isinstance(t, ast.Name) and t.id == name for t in targets):
            if module == "blocklowrank" or name != "_EXPORTS":
                return module
        if isinstance(node, ast.ImportFrom):
            for alias in node.names:
                if (alias.asname or alias.name) == name:
                    base = _resolve(module, node)
                    return _definer(base, alias.name, seen) if base.startswith("blocklowrank") else base
    if module == "blocklowrank":
        exports = importlib.import_module("blocklowrank")._EXPORTS
        if name in exports:
            return _definer(f"blocklowrank.{exports[name]}", name, seen)
    return None


def _exports():
    """``{public module: __all__}``."""
    return {m: list(getattr(importlib.import_module(m), "__all__", ())) for m in PUBLIC}


def test_every_public_name_has_one_home():
    """Each name in a public module's ``__all__`` has exactly one public home.

    The rule: a module is public when no part of its path after
    ``blocklowrank`` starts with ``_``. A name is *defined* by the module whose
    source defines it (a ``def``, a ``class`` or an assignment at module level;
    imports are followed). Its *home* is that module if it is public, else the
    nearest public package above it: ``blocklowrank.structures._grid.BlockLowRank``
    lives in ``blocklowrank.structures``, ``blocklowrank._engine.Approximation`` in
    ``blocklowrank``. A name may be in the ``__all__`` of its home and, when
    its home is in the core layers (up to "the core API" in :data:`LAYERS`), of
    the root ``blocklowrank``; in any other module's ``__all__`` it has a
    second home. A package's ``__init__`` re-exporting from its own private
    submodule is therefore fine; re-exporting from a public submodule, or from
    an unrelated module, is not. Every name must be defined inside the package.
    """
    core = {unit for level, (_, units) in enumerate(LAYERS) if level <= LEVEL["blocklowrank"] for unit in units}
    problems = []
    for module, names in _exports().items():
        for name in names:
            definer = _definer(module, name)
            if definer is None or not definer.startswith("blocklowrank"):
                problems.append(f"{module}.{name}: not defined in the package (from {definer})")
                continue
            home = _home(definer)
            allowed = {home} | ({"blocklowrank"} if _unit(home) in core else set())
            if module not in allowed:
                problems.append(f"{module}.{name}: a second home (its home is {home})")
    assert not problems, "\n".join(problems)


def test_the_home_rule_sees_second_homes():
    # the rule itself, on made-up exports: a public submodule re-exported by its package has two homes
    assert _home("blocklowrank.structures._grid") == "blocklowrank.structures"
    assert _home("blocklowrank._engine") == "blocklowrank"
    assert _definer("blocklowrank", "approximate") == "blocklowrank.structures"
    assert _definer("blocklowrank.checkpoints", "Checkpoint") == "blocklowrank.checkpoints._safetensors"
    assert _definer("blocklowrank.study", "DEFAULT_N_BLOCKS") == "blocklowrank.study._run"


# ---------------------------------------------------------------------------- docstrings
_PRIVATE_PATH = re.compile(r"blocklowrank(?:\.[A-Za-z]\w*)*\._\w+")
_DOTTED = re.compile(r"blocklowrank(?:\.\w+)+")


def _public_docstrings():
    """``(where, docstring)`` of every public module, and of every public class and function in any module."""
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        if _public(module) and ast.get_docstring(tree):
            yield module, ast.get_docstring(tree)

        def visit(node, prefix):
            for child in node.body:
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    if child.name.startswith("_"):
                        continue
                    if ast.get_docstring(child):
                        yield f"{prefix}.{child.name}", ast.get_docstring(child)
                    if isinstance(child, ast.ClassDef):
                        yield from visit(child, f"{prefix}.{child.name}")

        yield from visit(tree, module)


def test_no_public_docstring_points_at_a_private_module():
    found = [f"{where}: {hit}" for where, doc in _public_docstrings() for hit in _PRIVATE_PATH.findall(doc)]
    assert not found, "point users at the public home instead:\n" + "\n".join(found)


def _resolves(dotted):
    parts = dotted.split(".")
    for k in range(len(parts), 0, -1):
        module = ".".join(parts[:k])
        if module in MODULES:
            obj = importlib.import_module(module)
            for attr in parts[k:]:
                if not hasattr(obj, attr):
                    return False
                obj = getattr(obj, attr)
            return True
    return False


def test_every_dotted_name_in_a_public_docstring_exists():
    found = sorted(
        {f"{where}: {hit}" for where, doc in _public_docstrings() for hit in _DOTTED.findall(doc) if not _resolves(hit)}
    )
    assert not found, "docstrings name what does not exist (moved or renamed?):\n" + "\n".join(found)


# ---------------------------------------------------------------------------- short functions, short files
MAX_FUNCTION_LINES = 80
MAX_FILE_LINES = 600


def _code_lines(node, lines):
    """Lines of code of a function: from its first statement after the docstring to its end,
    blank and comment-only lines not counted (0 for a function that is only a docstring)."""
    body = node.body
    if (
        isinstance(body[0], ast.Expr)
        and isinstance(body[0].value, ast.Constant)
        and isinstance(body[0].value.value, str)
    ):
        body = body[1:]
    if not body:
        return 0
    text = lines[body[0].lineno - 1 : node.end_lineno]
    return sum(1 for line in text if line.strip() and not line.strip().startswith("#"))


def _long_functions():
    found = []
    for module, path in MODULES.items():
        source = path.read_text(encoding="utf-8")
        lines = source.splitlines()
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = _code_lines(node, lines)
                if n > MAX_FUNCTION_LINES:
                    found.append(f"{module}.{node.name} (line {node.lineno}): {n} lines of code")
    return found


def test_the_line_counter():
    source = 'def f(x):\n    """Doc.\n\n    More.\n    """\n    # a comment\n\n    y = x\n    return y\n'
    (node,) = ast.parse(source).body
    assert _code_lines(node, source.splitlines()) == 2


def test_no_function_is_over_80_lines_of_code():
    found = _long_functions()
    assert not found, "split these:\n" + "\n".join(found)


def test_no_library_file_is_over_600_lines_without_a_reason():
    """A longer file says why in its module docstring, in a line starting "(Over 600 lines"."""
    found = []
    for module, path in MODULES.items():
        n = len(path.read_text(encoding="utf-8").splitlines())
        doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
        if n > MAX_FILE_LINES and not any(line.startswith("(Over 600 lines") for line in doc.splitlines()):
            found.append(f"{module}: {n} lines")
    assert not found, "shorten these, or say why in the module docstring:\n" + "\n".join(found)
