"""The package's import direction: no cycles, and no import against the layer order.

The allowed imports are read from the ``layers`` block of ``docs/architecture.md`` (the one
place that states them). Every ``import`` / ``from … import`` of every module counts,
including those inside functions. The checker is also run on copies of the package with a
planted cycle and a planted upward import, which it must report.
"""
from __future__ import annotations

import ast
import pathlib
import re
import shutil
from typing import Dict, List, Set, Tuple

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PKG = "nns_cuda"


def read_rules(doc: pathlib.Path = ROOT / "docs" / "architecture.md") -> Dict[str, Set[str]]:
    """``{group: {groups it may import}}`` from the fenced ``layers`` block of the document."""
    text = doc.read_text(encoding="utf-8")
    m = re.search(r"```layers\n(.*?)```", text, re.S)
    assert m, f"{doc} has no ```layers block"
    rules: Dict[str, Set[str]] = {}
    for line in m.group(1).splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        group, _, allowed = line.partition(":")
        rules[group.strip()] = set(allowed.split())
    return rules


def module_name(path: pathlib.Path, root: pathlib.Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _exists(root: pathlib.Path, mod: str) -> bool:
    p = root.joinpath(*mod.split("."))
    return p.with_suffix(".py").is_file() or (p / "__init__.py").is_file()


def collect_imports(root: pathlib.Path) -> Dict[str, List[Tuple[str, int]]]:
    """``{module: [(imported package module, line), ...]}`` for every module under ``root/nns_cuda``."""
    out: Dict[str, List[Tuple[str, int]]] = {}
    for path in sorted((root / PKG).rglob("*.py")):
        mod = module_name(path, root)
        is_pkg = path.name == "__init__.py"
        here = mod if is_pkg else mod.rpartition(".")[0]
        deps: List[Tuple[str, int]] = []
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                deps += [(a.name, node.lineno) for a in node.names if a.name.split(".")[0] == PKG]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = here.split(".")
                    base = base[: len(base) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                if target.split(".")[0] != PKG:
                    continue
                for a in node.names:  # `from pkg import sub` imports the sub-module
                    sub = f"{target}.{a.name}"
                    deps.append((sub if _exists(root, sub) or a.name == "_C" else target, node.lineno))
            elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module":
                if node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str) \
                        and node.args[0].value.startswith(PKG + "."):
                    deps.append((node.args[0].value, node.lineno))
        out[mod] = deps
    return out


def group_of(mod: str) -> str:
    """The layer group of a module: ``nns_cuda.engine.graph`` -> ``engine``; the facade -> ``""``."""
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else ""


def find_cycles(imports: Dict[str, List[Tuple[str, int]]]) -> List[List[str]]:
    """Strongly connected components of more than one module (or a module importing itself)."""
    graph = {m: sorted({d for d, _ in deps if d in imports}) for m, deps in imports.items()}
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on: Set[str] = set()
    comps: List[List[str]] = []
    counter = [0]

    def visit(v: str) -> None:  # Tarjan, iterative enough for a package of this size
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
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
            if len(comp) > 1 or v in graph[v]:
                comps.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return comps


def layer_violations(imports: Dict[str, List[Tuple[str, int]]], rules: Dict[str, Set[str]]) -> List[str]:
    """Every import of a group that the rules do not allow, as ``'a.b:12 imports c.d (x may import ...)'``."""
    bad = []
    for mod, deps in imports.items():
        src = group_of(mod)
        if src == "":  # the facade re-exports every layer; nothing may import it (below)
            continue
        if src == "__main__":
            allowed = {"app"}
        else:
            assert src in rules, f"module {mod} belongs to no group of docs/architecture.md; add its group there"
            allowed = rules[src]
        for dep, line in deps:
            dst = group_of(dep)
            if dst == src:
                continue
            if dst == "" or dst not in allowed:
                what = "the package facade (import the module that defines the name)" if dst == "" else dst
                bad.append(f"{mod}:{line} imports {dep} — {src} may import only {sorted(allowed) or 'nothing'}, not {what}")
    return bad


def check(root: pathlib.Path, rules: Dict[str, Set[str]]) -> List[str]:
    imports = collect_imports(root)
    problems = [f"import cycle: {' -> '.join(c)}" for c in find_cycles(imports)]
    return problems + layer_violations(imports, rules)


def test_rules_cover_every_group():
    rules = read_rules()
    groups = {group_of(m) for m in collect_imports(ROOT)} - {"", "__main__"}
    assert groups <= set(rules), f"groups without rules in docs/architecture.md: {sorted(groups - set(rules))}"
    for g, allowed in rules.items():
        assert allowed <= set(rules) | {"_C"}, f"{g} may import unknown groups {sorted(allowed - set(rules))}"


def test_package_has_no_cycles_and_no_upward_imports():
    problems = check(ROOT, read_rules())
    assert not problems, "\n".join(problems)


@pytest.fixture
def package_copy(tmp_path):
    shutil.copytree(ROOT / PKG, tmp_path / PKG, ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    return tmp_path


def _plant(root: pathlib.Path, rel: str, code: str) -> None:
    p = root / PKG / rel
    p.write_text(p.read_text(encoding="utf-8") + "\n\n" + code + "\n", encoding="utf-8")


def test_planted_cycle_is_caught(package_copy):
    assert check(package_copy, read_rules()) == []
    # two modules of one layer importing each other, one of them inside a function
    _plant(package_copy, "engine/graph.py", "def _planted():\n    from nns_cuda.engine import scanner  # noqa")
    problems = check(package_copy, read_rules())
    assert any(p.startswith("import cycle:") and "nns_cuda.engine.graph" in p for p in problems), problems


def test_planted_upward_import_is_caught(package_copy):
    _plant(package_copy, "ops/reference/stats.py", "def _planted():\n    from nns_cuda.analysis import fq  # noqa")
    problems = check(package_copy, read_rules())
    assert any("nns_cuda.ops.reference.stats" in p and "not analysis" in p for p in problems), problems


def test_planted_facade_import_is_caught(package_copy):
    _plant(package_copy, "engine/graph.py", "from nns_cuda import __version__  # noqa")
    problems = check(package_copy, read_rules())
    assert any("nns_cuda.engine.graph" in p and "facade" in p for p in problems), problems
