"""The floors of the code base, checked on its source: jobs -> pipelines -> rna_core.

- no import cycle among the modules of rna_core and pipelines (module-level imports; a package's
  `__init__` is its own node, so `from .sibling import x` inside a package is no cycle);
- rna_core imports neither Ray nor MLflow, anywhere (a researcher uses it in a notebook);
- pipelines imports no job, rna_core no pipeline;
- no module imports another module's private (`_name`) names;
- no function-level import of one of our own modules inside rna_core or pipelines (an import
  hidden in a function to dodge a cycle); jobs may import late, to validate arguments first;
- every module of pipelines is one stage: at most MAX_PIPELINE_LINES lines.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
OURS = ("rna_core", "pipelines", "jobs")
MAX_PIPELINE_LINES = 400


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for top in OURS for p in sorted((REPO / top).rglob("*.py"))}


MODULES = _modules()


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.dump(node.test)


def _imports(name: str, path: Path) -> list[tuple[ast.AST, list[tuple[str, list[str]]], bool]]:
    """(node, [(imported module, [imported names])], at module level) for every import statement."""
    is_pkg = path.name == "__init__.py"
    out = []

    def resolve(node: ast.AST) -> list[tuple[str, list[str]]]:
        if isinstance(node, ast.Import):
            return [(a.name, []) for a in node.names]
        base = name.split(".") if is_pkg else name.split(".")[:-1]
        if node.level:
            base = base[: len(base) - (node.level - 1)]
            module = ".".join(base + ([node.module] if node.module else []))
        else:
            module = node.module or ""
        found = []
        for a in node.names:  # `from pkg import submodule` imports the submodule
            sub = f"{module}.{a.name}"
            found.append((sub, []) if sub in MODULES else (module, [a.name]))
        return found

    def walk(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if _is_type_checking(child):
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                out.append((child, resolve(child), top))
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                walk(child, False)
            else:
                walk(child, top)

    walk(ast.parse(path.read_text()), True)
    return out


IMPORTS = {name: _imports(name, path) for name, path in MODULES.items()}


def _ours(module: str) -> bool:
    return module.split(".")[0] in OURS


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for name, imports in IMPORTS.items():
        if name.startswith("jobs"):
            continue
        graph[name] = {m for _, found, top in imports if top for m, _ in found if m in MODULES and m != name}
    return graph


def test_no_import_cycle_among_rna_core_and_pipelines():
    graph = _graph()
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt) :] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert len(graph) > 60  # the check saw the code base


def test_the_floors_point_one_way_and_rna_core_imports_no_ray_or_mlflow():
    wrong = []
    for name, imports in IMPORTS.items():
        for _, found, _top in imports:
            for module, _ in found:
                root = module.split(".")[0]
                if name.startswith("rna_core") and root in ("ray", "mlflow", "pipelines", "jobs"):
                    wrong.append(f"{name} imports {module}")
                if name.startswith("pipelines") and root == "jobs":
                    wrong.append(f"{name} imports {module}")
    assert not wrong, wrong


def test_no_module_imports_private_names_of_another():
    wrong = []
    for name, imports in IMPORTS.items():
        for _, found, _top in imports:
            for module, names in found:
                if not _ours(module) or module == name:
                    continue
                hidden = [part for part in module.split(".") if part.startswith("_") and part != "__init__"]
                hidden += [n for n in names if n.startswith("_")]
                if hidden:
                    wrong.append(f"{name} imports {module}: {', '.join(hidden)}")
    assert not wrong, wrong


def test_no_function_level_imports_of_our_own_modules_in_rna_core_and_pipelines():
    wrong = []
    for name, imports in IMPORTS.items():
        if name.startswith("jobs"):
            continue
        for node, found, top in imports:
            ours = [m for m, _ in found if _ours(m)]
            if not top and ours:
                wrong.append(f"{name} line {node.lineno}: {', '.join(ours)}")
    assert not wrong, wrong


def test_every_pipelines_module_is_one_stage_of_one_job():
    sizes = {name: len(path.read_text().splitlines()) for name, path in MODULES.items() if name.startswith("pipelines")}
    too_long = {name: n for name, n in sizes.items() if n > MAX_PIPELINE_LINES}
    assert not too_long, too_long
    for package in ("pipelines.sweep", "pipelines.evaluation"):
        assert package in MODULES  # the sweep and evaluation jobs are packages of stages
    stages = {
        "pipelines.sweep": {"spec", "trial", "summary", "driver"},
        "pipelines.evaluation": {"source", "plan", "store", "tasks", "fanout", "job"},
    }
    for package, names in stages.items():
        assert {m.rsplit(".", 1)[1] for m in MODULES if m.startswith(package + ".")} == names


def _module_level_roots(start: str) -> set[str]:
    """Top-level packages imported, at module level, by `start` and everything it imports of ours."""
    roots: set[str] = set()
    seen, todo = set(), [start]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts)) if ".".join(parts[:i]) in MODULES]  # parent packages
        for _, found, top in IMPORTS[name]:
            for module, _ in found if top else ():
                if module in MODULES:
                    todo.append(module)
                elif not _ours(module):
                    roots.add(module.split(".")[0])
    return roots


def test_parsing_a_sweep_and_the_rna_core_package_import_no_ray():
    """The sweep job checks a config before Ray starts, and rna_core runs without Ray installed."""
    for start in ("pipelines.sweep.spec", "rna_core"):
        roots = _module_level_roots(start)
        assert "torch" in roots and not {"ray", "mlflow"} & roots, (start, sorted(roots))


def test_the_checks_can_fail(tmp_path):
    """The cycle and private-name checks flag a module that does what they forbid."""
    global IMPORTS
    fake = tmp_path / "rna_core" / "fake.py"
    fake.parent.mkdir()
    fake.write_text("from rna_core.config import _coerce\nimport ray\n\ndef f():\n    from rna_core import paths\n")
    saved = dict(IMPORTS)
    try:
        IMPORTS["rna_core.fake"] = _imports("rna_core.fake", fake)
        with pytest.raises(AssertionError, match="_coerce"):
            test_no_module_imports_private_names_of_another()
        with pytest.raises(AssertionError, match="imports ray"):
            test_the_floors_point_one_way_and_rna_core_imports_no_ray_or_mlflow()
        with pytest.raises(AssertionError, match="rna_core.fake line 5"):
            test_no_function_level_imports_of_our_own_modules_in_rna_core_and_pipelines()
        IMPORTS["rna_core.errors"] = IMPORTS["rna_core.errors"] + [(None, [("rna_core.config", [])], True)]
        with pytest.raises(pytest.fail.Exception, match="import cycle"):
            test_no_import_cycle_among_rna_core_and_pipelines()
    finally:
        IMPORTS = saved
