"""Every module of the package imports, and its import graph stays a one-way street.

(a) Each module under src/circuit_breakers imports without error, in this process and afresh (only that module
    requested, nothing of the package loaded before), so an import that works only after some other module
    happens to have loaded first fails here. A missing third-party package fails with its name and the extra
    that installs it, never a skip.
(b) An AST scan of the package builds its module import graph and checks:
    - no cycle through module-level imports (those under `if TYPE_CHECKING:` count: a type checker follows them);
    - layering: data/ does not reach up into judges/attacks/evaluation/training/serving/probes; judges/ does not
      import attacks/; only the top-level cli.py (and its `python -m` shim __main__.py) imports a `*.cli`
      module; the core modules (config, models, hidden, losses, data/) never import training/evaluation/
      serving/probes. Layering rules count lazy imports (inside function bodies) too: a lazy import is still a
      dependency.

How an import becomes edges: `import a.b.c` and `from a.b.c import x` run a/__init__, a/b/__init__ and a/b/c
(and a/b/c/x if x is a submodule), so the importer gets an edge to each of them. Edges to the importer's own
ancestor packages are dropped when they only come from loading a submodule (`from . import x`,
`from circuit_breakers.config import ...`): Python initialises a package before any module in it, so that
is no dependency on the package having finished. `from <ancestor> import name`, where name is no submodule,
keeps its edge: it needs the ancestor's __init__ to have got that far.
"""
from __future__ import annotations

import ast
import importlib
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
PACKAGE = "circuit_breakers"
PKG_DIR = SRC / PACKAGE

# Third-party packages a module may need at import time that the base install does not bring: the extra to install.
OPTIONAL = {"fastapi": "serve", "starlette": "serve", "uvicorn": "serve", "datasets": "datasets",
            "deepspeed": "deepspeed", "httpx": "dev", "openai": "dev", "selenium": "dev"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


FILES = {_module_name(p): p for p in sorted(PKG_DIR.rglob("*.py")) if "__pycache__" not in p.parts}
MODULES = sorted(FILES)
PACKAGES = {name for name, path in FILES.items() if path.name == "__init__.py"}


def _rel(name: str) -> str:
    return str(FILES[name].relative_to(ROOT))


def _missing_message(module: str, error: ModuleNotFoundError) -> str:
    missing = (error.name or "").split(".")[0]
    if missing and missing != PACKAGE:
        extra = OPTIONAL.get(missing)
        how = f"pip install -e '.[{extra}]'" if extra else "a dependency missing from pyproject.toml?"
        return f"{module} needs the package {missing!r}, which is not installed ({how}): {error}"
    return f"{module}: {error}"


# --- (a) every module imports ----------------------------------------------------------------------------------

def test_the_scan_sees_the_package():
    assert PACKAGE in FILES and f"{PACKAGE}.cli" in FILES and len(MODULES) > 20, MODULES


@pytest.mark.parametrize("module", MODULES)
def test_module_imports(module):
    if module.endswith(".__main__"):  # importing it runs the CLI and exits: compile it; its import is scanned below
        compile(FILES[module].read_text(), str(FILES[module]), "exec")
        return
    try:
        importlib.import_module(module)
    except ModuleNotFoundError as e:
        pytest.fail(_missing_message(module, e))


_FRESH = r"""
import importlib, json, sys, traceback
modules, package = json.loads(sys.argv[1]), sys.argv[2]
failures = {}
for module in modules:
    for name in [n for n in sys.modules if n == package or n.startswith(package + ".")]:
        del sys.modules[name]
    try:
        importlib.import_module(module)
    except BaseException as e:
        failures[module] = [type(e).__name__, getattr(e, "name", None), traceback.format_exc(limit=-6)]
print(json.dumps(failures))
"""


def test_every_module_imports_first():
    """Each module imported with nothing of the package loaded before: catches imports that work only in some
    order (a cycle that breaks when entered from the other side). One subprocess, so the session's modules stay."""
    modules = [m for m in MODULES if not m.endswith(".__main__")]
    proc = subprocess.run([sys.executable, "-c", _FRESH, json.dumps(modules), PACKAGE], capture_output=True,
                          text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    failures = json.loads(proc.stdout.strip().splitlines()[-1])
    lines = []
    for module, (kind, name, tb) in failures.items():
        head = f"{module} ({_rel(module)}): {kind}"
        if kind == "ModuleNotFoundError" and name and name.split(".")[0] != PACKAGE:
            extra = OPTIONAL.get(name.split(".")[0])
            head += f" -- needs {name!r}" + (f" (pip install -e '.[{extra}]')" if extra else "")
        lines.append(f"{head}\n{tb}")
    assert not failures, "modules that fail to import on their own:\n" + "\n".join(lines)


# --- (b) the import graph --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    line: int
    kind: str  # "module" (runs at import), "type_checking" (under `if TYPE_CHECKING:`), "lazy" (in a function),
    #            "dynamic" (a module name handed to importlib.import_module at run time; counted like "lazy")

    def where(self) -> str:
        return f"{_rel(self.source)}:{self.line} ({self.kind}) {self.source} -> {self.target}"


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _resolve(module: str, level: int, name: str | None) -> str | None:
    if not level:
        return name
    package = module if module in PACKAGES else module.rpartition(".")[0]
    parts = package.split(".")
    if level - 1 > len(parts) - 1:
        return None
    base = ".".join(parts[: len(parts) - (level - 1)])
    return f"{base}.{name}" if name else base


def _chain(dotted: str) -> list[str]:
    """The package's modules that importing `dotted` runs: each prefix that is a module of ours."""
    parts = dotted.split(".")
    return [p for p in (".".join(parts[: i + 1]) for i in range(len(parts))) if p in FILES]


def _is_ancestor(package: str, module: str) -> bool:
    return module.startswith(package + ".")


def _targets(module: str, node: ast.stmt) -> list[str]:
    """The modules of the package that this import statement needs (before dropping ancestor side effects)."""
    found: list[tuple[str, bool]] = []  # (target, needs its namespace filled, not merely initialising)
    if isinstance(node, ast.Import):
        for alias in node.names:
            chain = _chain(alias.name)
            found += [(t, False) for t in chain]
    else:
        base = _resolve(module, node.level, node.module)
        if base is None or not (base == PACKAGE or base.startswith(PACKAGE + ".")):
            return []
        chain = _chain(base)
        found += [(t, False) for t in chain]
        for alias in node.names:
            sub = f"{base}.{alias.name}"
            if sub in FILES:
                found.append((sub, False))
            elif base in FILES:
                found.append((base, True))  # a name from base's namespace (or `*`)
    out = []
    for target, needs_namespace in found:
        if target == module:
            continue
        if _is_ancestor(target, module) and not needs_namespace:
            continue
        if target not in out:
            out.append(target)
    return out


def _import_module_call(module: str, node: ast.Call) -> str | None:
    """`importlib.import_module("x.y")` / `import_module(".y", __name__|"pkg")` with a constant name."""
    func = node.func
    name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
    if name != "import_module" or not node.args or not isinstance(node.args[0], ast.Constant):
        return None
    target = node.args[0].value
    if not isinstance(target, str):
        return None
    if target.startswith("."):
        level = len(target) - len(target.lstrip("."))
        anchor = module
        if len(node.args) > 1 and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str):
            anchor = node.args[1].value
        elif len(node.args) > 1 and isinstance(node.args[1], ast.Name) and node.args[1].id == "__name__":
            anchor = module
        anchor_package = anchor if anchor in PACKAGES else anchor.rpartition(".")[0]
        parts = anchor_package.split(".")
        base = ".".join(parts[: len(parts) - (level - 1)])
        rest = target.lstrip(".")
        target = f"{base}.{rest}" if rest else base
    return target


class _Scanner(ast.NodeVisitor):
    def __init__(self, module: str):
        self.module = module
        self.edges: list[Edge] = []
        self.depth = 0  # function nesting
        self.type_checking = 0

    def _kind(self) -> str:
        return "lazy" if self.depth else ("type_checking" if self.type_checking else "module")

    def _add(self, targets, line):
        self.edges += [Edge(self.module, t, line, self._kind()) for t in targets]

    def visit_Import(self, node):
        self._add(_targets(self.module, node), node.lineno)

    visit_ImportFrom = visit_Import

    def visit_Call(self, node):
        target = _import_module_call(self.module, node)
        if target:
            chain = [t for t in _chain(target) if t != self.module and not _is_ancestor(t, self.module)]
            self._add(chain, node.lineno)
        self.generic_visit(node)

    def _function(self, node):
        for decorator in node.decorator_list:  # decorators and defaults run at definition time
            self.visit(decorator)
        self.depth += 1
        for child in node.body:
            self.visit(child)
        self.depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = _function

    def visit_Lambda(self, node):
        self.depth += 1
        self.visit(node.body)
        self.depth -= 1

    def visit_If(self, node):
        if _is_type_checking(node.test):
            self.type_checking += 1
            for child in node.body:
                self.visit(child)
            self.type_checking -= 1
            for child in node.orelse:
                self.visit(child)
        else:
            self.generic_visit(node)


def _dynamic(module: str, tree: ast.Module) -> list[Edge]:
    """In a module that calls import_module with a computed name: each string constant naming a module of the
    package (absolutely, or relative to this package) -- e.g. cli.py's table of subcommand modules."""
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and "import_module" in ast.dump(n.func)]
    if not calls:
        return []
    package = module if module in PACKAGES else module.rpartition(".")[0]
    relative = any(len(c.args) > 1 for c in calls)  # import_module(".x", __name__): names relative to here
    edges = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            names = (node.value, f"{package}.{node.value.lstrip('.')}") if relative else (node.value,)
            for name in names:
                if name in FILES and name != module:
                    edges += [Edge(module, t, node.lineno, "dynamic") for t in _chain(name)
                              if t != module and not _is_ancestor(t, module)]
                    break
    return list(dict.fromkeys(edges))


def _scan() -> list[Edge]:
    edges = []
    for module, path in FILES.items():
        tree = ast.parse(path.read_text(), str(path))
        scanner = _Scanner(module)
        scanner.visit(tree)
        edges += scanner.edges + _dynamic(module, tree)
    return list(dict.fromkeys(edges))


EDGES = _scan()


def _cycles(edges: list[Edge]) -> list[list[Edge]]:
    """One cycle (as its edges) per strongly connected component with more than one module."""
    graph: dict[str, dict[str, Edge]] = {}
    for e in edges:
        graph.setdefault(e.source, {}).setdefault(e.target, e)
    index, low, on_stack, stack, components, counter = {}, {}, set(), [], [], [0]

    def connect(v):  # Tarjan; the graph is small, recursion is fine
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, {}):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(set(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)

    cycles = []
    for component in components:
        start = min(component)
        # shortest path back to start inside the component (BFS)
        previous, frontier, found = {start: None}, [start], None
        while frontier and not found:
            nxt = []
            for v in frontier:
                for w, e in sorted(graph.get(v, {}).items()):
                    if w not in component:
                        continue
                    if w == start:
                        found = e
                        break
                    if w not in previous:
                        previous[w] = e
                        nxt.append(w)
                if found:
                    break
            frontier = nxt
        path, e = [found], found
        while previous[e.source] is not None:
            e = previous[e.source]
            path.append(e)
        cycles.append(list(reversed(path)))
    return cycles


def _under(module: str, *packages: str) -> bool:
    return any(module == f"{PACKAGE}.{p}" or module.startswith(f"{PACKAGE}.{p}.") for p in packages)


def _violations(rule) -> list[str]:
    return sorted(e.where() for e in EDGES if rule(e))


def test_the_scan_finds_imports():
    """The scanner itself: a few edges every version of the package has."""
    pairs = {(e.source, e.target) for e in EDGES}
    assert (f"{PACKAGE}.__main__", f"{PACKAGE}.cli") in pairs
    assert any(e.source == f"{PACKAGE}.cli" and e.target == f"{PACKAGE}.config" for e in EDGES)
    assert any(e.source == f"{PACKAGE}.cli" and e.target.endswith(".cli") and e.kind == "dynamic" for e in EDGES), \
        "cli.py's importlib.import_module of the subcommand modules is not seen"


def test_the_scan_resolves_imports_as_python_runs_them():
    here = f"{PACKAGE}.training.checkpoint"

    def targets(source):
        return _targets(here, ast.parse(source).body[0])

    assert targets("from . import trainer") == [f"{PACKAGE}.training.trainer"]  # no edge to its own package
    assert targets("from .trainer import RRTrainer") == [f"{PACKAGE}.training.trainer"]
    assert targets("from ..data import schema") == [f"{PACKAGE}.data", f"{PACKAGE}.data.schema"]
    assert targets(f"import {PACKAGE}.judges.base") == [f"{PACKAGE}.judges", f"{PACKAGE}.judges.base"]
    assert targets(f"from {PACKAGE} import RRConfig") == [PACKAGE]  # needs the root __init__ to have got there
    assert targets("from torch import nn") == []
    scanner = _Scanner(here)
    scanner.visit(ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .trainer import A\n"
                            "def f():\n    from .lora import B\nclass C:\n    from .zero import D\n"))
    assert [(e.target.rsplit(".", 1)[1], e.kind) for e in scanner.edges] == [
        ("trainer", "type_checking"), ("lora", "lazy"), ("zero", "module")]
    loop = [Edge("a", "b", 1, "module"), Edge("b", "c", 2, "type_checking"), Edge("c", "a", 3, "module"),
            Edge("c", "d", 4, "module")]
    assert [[e.line for e in cycle] for cycle in _cycles(loop)] == [[1, 2, 3]]


def test_no_import_cycle():
    cycles = _cycles([e for e in EDGES if e.kind in ("module", "type_checking")])
    report = "\n\n".join("cycle:\n  " + "\n  ".join(e.where() for e in cycle) for cycle in cycles)
    assert not cycles, f"module-level import cycles (TYPE_CHECKING imports count):\n{report}"


def test_data_does_not_import_the_layers_above():
    bad = _violations(lambda e: _under(e.source, "data") and _under(
        e.target, "judges", "attacks", "evaluation", "training", "serving", "probes"))
    assert not bad, "data/ imports a layer above it:\n" + "\n".join(bad)


def test_judges_do_not_import_attacks():
    bad = _violations(lambda e: _under(e.source, "judges") and _under(e.target, "attacks"))
    assert not bad, "judges/ imports attacks/:\n" + "\n".join(bad)


def test_only_the_cli_imports_cli_modules():
    entry = {f"{PACKAGE}.cli", f"{PACKAGE}.__main__"}  # __main__.py is `python -m circuit_breakers` -> cli.main
    bad = _violations(lambda e: e.source not in entry and (e.target == f"{PACKAGE}.cli" or e.target.endswith(".cli")))
    assert not bad, "a module other than circuit_breakers/cli.py imports a *.cli module:\n" + "\n".join(bad)


CORE = ("config", "models", "hidden", "losses", "data")


def test_core_modules_do_not_import_training_evaluation_serving_probes():
    bad = _violations(lambda e: _under(e.source, *CORE) and _under(
        e.target, "training", "evaluation", "serving", "probes"))
    assert not bad, "a core module imports training/evaluation/serving/probes:\n" + "\n".join(bad)
