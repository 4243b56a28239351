"""Imports run one way: no cycles among tessera's modules, and the runtime package below every trainer.

The graph is read from the source with `ast`, not by importing it. It holds every `import` and `from ...
import` statement of a module, at module level and inside functions alike: a lazy import inside a function
still makes the two modules depend on each other, and a cycle through one only moves the failure from
import time to the first call. `from pkg import name` is an edge to `pkg.name` when that is a module, else
to `pkg`; a submodule's import does not count as an edge to its package's `__init__`.
"""

import ast
import json
import subprocess
import sys
from pathlib import Path

import tessera

PACKAGE = Path(tessera.__file__).resolve().parent
# What tessera.runtime (checkpoints, distributed setup, metrics, budgets, schedules) must never import.
ABOVE_RUNTIME = ("tessera.model", "tessera.unimodal", "tessera.eval", "tessera.tokenizers", "tessera.train",
                 "tessera.data", "tessera.cli")


def _modules() -> dict[str, tuple[Path, bool]]:
    out = {}
    for f in PACKAGE.rglob("*.py"):
        parts = list(f.relative_to(PACKAGE.parent).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_pkg else parts)] = (f, is_pkg)
    return out


def import_graph() -> dict[str, set[str]]:
    """Module name -> the tessera modules it imports (see the module docstring)."""
    mods = _modules()
    graph = {}
    for name, (path, is_pkg) in mods.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name in mods)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the module's package, one level up per extra dot
                    pkg = name if is_pkg else name.rsplit(".", 1)[0]
                    for _ in range(node.level - 1):
                        pkg = pkg.rsplit(".", 1)[0]
                    base = f"{pkg}.{base}" if base else pkg
                for a in node.names:
                    target = f"{base}.{a.name}"
                    deps.add(target if target in mods else base)
        graph[name] = {d for d in deps if d in mods and d != name}
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_cycle_finder_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycles(graph) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_the_graph_sees_lazy_and_relative_imports():
    graph = import_graph()
    assert "tessera.unimodal.image" in graph["tessera.unimodal"]  # load_codec's lazy import
    assert "tessera.runtime.checkpoint" in graph["tessera.train.pretrain"]
    assert len(graph) > 40


def test_no_import_cycles():
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_runtime_imports_nothing_above_it():
    """Statically (every import, lazy ones too), and for real: importing each runtime module in a fresh
    interpreter loads no tessera module above the runtime beyond what `import tessera` itself loads (the
    package's `__init__`, which every submodule import runs first: `tessera.Audio`)."""
    graph = import_graph()
    runtime = sorted(m for m in graph if m == "tessera.runtime" or m.startswith("tessera.runtime."))
    assert "tessera.runtime.schedule" in runtime and "tessera.runtime.checkpoint" in runtime
    for m in runtime:
        bad = sorted(d for d in graph[m] if d.startswith(ABOVE_RUNTIME))
        assert not bad, f"{m} imports {', '.join(bad)}"
    code = ("import importlib, json, sys\n"
            "import tessera\n"
            "package = sorted(k for k in sys.modules if k.startswith('tessera'))\n"
            f"for m in {runtime!r}:\n"
            "    importlib.import_module(m)\n"
            "print(json.dumps([package, sorted(k for k in sys.modules if k.startswith('tessera'))]))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=PACKAGE.parent, timeout=120,
                       check=False)
    assert r.returncode == 0, r.stderr[-2000:]
    package, loaded = json.loads(r.stdout.strip().splitlines()[-1])
    assert set(runtime) <= set(loaded)
    added = [m for m in loaded if m not in package and m.startswith(ABOVE_RUNTIME)]
    assert not added, f"importing tessera.runtime loaded {', '.join(added)}"


def test_the_codecs_import_nothing_of_the_evaluation():
    """Codec evaluations take a judge as an argument; the digits judges are built at the command line."""
    graph = import_graph()
    for m, deps in graph.items():
        if m.startswith("tessera.unimodal"):
            bad = sorted(d for d in deps if d.startswith(("tessera.eval", "tessera.data")))
            assert not bad, f"{m} imports {', '.join(bad)}"
