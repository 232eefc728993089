"""Layers that point one way: apps -> export -> quantize -> core, with the pipeline, the final report and
the CLI on top. Every import counts, the ones inside functions too; so does a string given to
importlib.import_module. No module may import one of a higher layer, and no group of modules may
import each other in a circle.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"lowrank": "lowrank", "quantize": "lowrank.quantize", "export": "lowrank.export", "apps": "lowrank.apps"}
TOP = ("lowrank.cli", "lowrank.pipeline", "lowrank.report", "lowrank.exporting")  # orchestration: may import anything
LAYERS = ("core", "quantize", "export", "apps", "top")


def layer(module: str) -> int:
    if any(module == t or module.startswith(t + ".") for t in TOP):
        return LAYERS.index("top")
    for name in ("apps", "export", "quantize"):
        if module == f"lowrank.{name}" or module.startswith(f"lowrank.{name}."):
            return LAYERS.index(name)
    return LAYERS.index("core")


def modules(root: Path, packages: dict[str, str]) -> dict[str, Path]:
    found = {}
    for folder, package in packages.items():
        for path in sorted((root / folder).rglob("*.py")):
            parts = path.relative_to(root / folder).with_suffix("").parts
            name = ".".join((package, *parts)).removesuffix(".__init__")
            found[name] = path
    return found


def imports(path: Path, known: dict[str, Path]) -> list[tuple[str, int, str]]:
    """(imported module, line, how) for every import of a known module in ``path``, wherever it stands."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno, "import") for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:  # `from lowrank import runrecord` imports the module lowrank.runrecord
                full = f"{node.module}.{alias.name}"
                found.append((full if full in known else node.module, node.lineno, "import"))
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "import_module" and node.args:
            arg = node.args[0]
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                found.append((arg.value, node.lineno, "import_module"))
            elif isinstance(arg, ast.JoinedStr) and arg.values and isinstance(arg.values[0], ast.Constant) \
                    and str(arg.values[0].value).startswith("lowrank"):
                found.append((f"{arg.values[0].value}*", node.lineno, "import_module of a computed name"))
    return [(name, line, how) for name, line, how in found if name in known or name.endswith("*")]


def problems(root: Path = ROOT, packages: dict[str, str] = PACKAGES) -> list[str]:
    known = modules(root, packages)
    graph: dict[str, set[str]] = {}
    found = []
    for module, path in known.items():
        graph[module] = set()
        for target, line, how in imports(path, known):
            where = f"{path.relative_to(root)}:{line}"
            if target.endswith("*"):
                if layer(module) != LAYERS.index("top"):
                    found.append(f"{where}: {how} '{target}' hides which module it imports")
                continue
            if target != module:
                graph[module].add(target)
            if layer(target) > layer(module):
                found.append(f"{where}: {module} ({LAYERS[layer(module)]}) imports {target} "
                             f"({LAYERS[layer(target)]}), a higher layer")
    found += [f"import cycle: {' -> '.join(cycle)}" for cycle in cycles(graph)]
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle through each strongly connected group of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups = []

    def visit(v: str) -> None:
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
            group = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.add(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(group)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_cycle_in(graph, group) for group in groups]


def _cycle_in(graph: dict[str, set[str]], group: set[str]) -> list[str]:
    """The shortest path from the group's first module back to itself (breadth first)."""
    start = min(group)
    parent: dict[str, str] = {}
    queue = [start]
    while queue:
        v = queue.pop(0)
        for w in sorted(graph[v] & group):
            if w == start:
                path = [v]
                while path[-1] != start:
                    path.append(parent[path[-1]])
                return path[::-1] + [start]
            if w not in parent:
                parent[w] = v
                queue.append(w)
    raise AssertionError(f"{sorted(group)} is not strongly connected")


def test_the_package_imports_only_downward_and_has_no_cycles():
    assert problems() == []


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    for folder in PACKAGES:
        (tmp_path / folder).mkdir(exist_ok=True)
    return tmp_path


def test_a_lazy_upward_import_is_caught(tmp_path):
    root = _tree(tmp_path, {"lowrank/models.py": "def f():\n    from lowrank.export.gguf import write\n",
                            "export/gguf.py": "from lowrank import errors\n", "lowrank/errors.py": ""})
    assert problems(root) == ["lowrank/models.py:2: lowrank.models (core) imports lowrank.export.gguf (export), "
                              "a higher layer"]


def test_a_core_module_importing_the_pipeline_is_caught(tmp_path):
    root = _tree(tmp_path, {"lowrank/sft.py": "from lowrank import pipeline\n", "lowrank/pipeline.py": ""})
    assert problems(root) == ["lowrank/sft.py:1: lowrank.sft (core) imports lowrank.pipeline (top), a higher layer"]


def test_a_cycle_within_a_layer_is_caught(tmp_path):
    root = _tree(tmp_path, {"lowrank/plan.py": "def f():\n    import importlib\n"
                                               "    return importlib.import_module('lowrank.sft')\n",
                            "lowrank/sft.py": "from lowrank import plan\n"})
    assert problems(root) == ["import cycle: lowrank.plan -> lowrank.sft -> lowrank.plan"]


def test_an_import_module_of_a_computed_name_is_caught_below_the_top(tmp_path):
    root = _tree(tmp_path, {"lowrank/plan.py": "import importlib\n\ndef f(stage):\n"
                                               "    return importlib.import_module(f'lowrank.{stage}')\n",
                            "lowrank/cli/__init__.py": "import importlib\n\ndef f(name):\n"
                                                       "    return importlib.import_module(f'lowrank.cli.{name}')\n"})
    assert problems(root) == ["lowrank/plan.py:4: import_module of a computed name 'lowrank.*' hides which "
                              "module it imports"]


def test_downward_imports_pass(tmp_path):
    root = _tree(tmp_path, {"apps/app.py": "from lowrank.export import gguf\nfrom lowrank import models\n",
                            "export/gguf.py": "from lowrank.quantize import merge\n",
                            "quantize/merge.py": "from lowrank.models import f\n", "lowrank/models.py": "",
                            "lowrank/cli/run.py": "from lowrank.apps import app\n"})
    assert problems(root) == []
