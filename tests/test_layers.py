"""The package's layers (src/ddim/__init__.py): each usable without the ones above it, imports only downward, no
import cycles, imports inside functions only of optional packages."""
from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from collections import defaultdict
from pathlib import Path

import pytest

from conftest import REPO, child_env

SRC = REPO / "src"
# Rank of each part: a module may import the parts of its own rank or below, never above.  Rank 0 are the helpers
# every layer shares (settings checks, atomic files, downloads).
RANK = {"ddim": 0, "ddim.config": 0, "ddim.files": 0, "ddim.downloads": 0,
        "ddim.diffusion": 1,
        "ddim.models": 2,
        "ddim.accel": 3, "ddim.training": 3, "ddim.checkpoints": 3, "ddim.data": 3, "ddim.evaluation": 3}
# Distribution names in pyproject.toml whose import name differs.
IMPORT_NAME = {"hydra-core": "hydra", "torch-fidelity": "torch_fidelity", "pillow": "PIL", "scikit-learn": "sklearn",
               "hydra-submitit-launcher": "hydra_plugins"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(imported module, whether the import sits inside a function) for every import of ``path``."""
    tree = ast.parse(path.read_text())
    package = []  # the package relative imports start from (scripts have none)
    if path.is_relative_to(SRC):
        package = _module_name(path).split(".") if path.name == "__init__.py" else _module_name(path).split(".")[:-1]
    inner = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
             for n in ast.walk(f) if n is not f}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, id(node) in inner) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            found += [(module, id(node) in inner)]
    return found


def _private_names(path: Path) -> list[str]:
    """Underscore names ``path`` imports from a ddim module: another module's internals."""
    return [f"{path.relative_to(REPO)}: {n.module}.{a.name}" for n in ast.walk(ast.parse(path.read_text()))
            if isinstance(n, ast.ImportFrom) and (n.level or (n.module or "").split(".")[0] == "ddim")
            for a in n.names if a.name.startswith("_")]


def _part(module: str) -> str:
    return ".".join(module.split(".")[:2])


def _package_modules() -> dict[str, list[tuple[str, bool]]]:
    return {_module_name(p): _imports(p) for p in sorted((SRC / "ddim").rglob("*.py"))}


def test_every_part_has_a_rank():
    parts = {_part(m) for m in _package_modules()}
    assert parts == set(RANK), f"add the new part to RANK (and to the list in src/ddim/__init__.py): {parts ^ set(RANK)}"


def test_imports_go_only_downward():
    upward = [f"{m} (rank {RANK[_part(m)]}) imports {t} (rank {RANK[_part(t)]})"
              for m, imports in _package_modules().items() for t, _ in imports
              if t.split(".")[0] == "ddim" and RANK[_part(t)] > RANK[_part(m)]]
    assert not upward, "\n".join(upward)


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` (a path that returns to its start), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [node, nxt] if nxt in path else [node, nxt]
            if nxt not in state and (found := visit(nxt, path + [node])):
                return found
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start, [])):
            return found
    return None


def test_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycles_between_modules_or_parts():
    modules = _package_modules()
    by_module = {m: {t for t, _ in imports if t in modules and t != m} for m, imports in modules.items()}
    # "from ddim.x import name" may name a module of package ddim.x: count it as importing the package.
    assert _cycle({m: {t for t in ts if not m.startswith(t + ".")} for m, ts in by_module.items()}) is None
    by_part = defaultdict(set)
    for m, imports in modules.items():
        by_part[_part(m)] |= {_part(t) for t, _ in imports if t.split(".")[0] == "ddim" and _part(t) != _part(m)}
    assert _cycle(by_part) is None


def _required_imports() -> set[str]:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {d.split(";")[0].split("[")[0].split("=")[0].split(">")[0].split("<")[0].strip() for d in deps}
    return {IMPORT_NAME.get(n, n.replace("-", "_")) for n in names} | {"ddim"}


def test_imports_inside_functions_are_of_optional_packages_only():
    required = _required_imports()
    scripts = [REPO / "train.py", REPO / "evaluate.py", *sorted((REPO / "bench").rglob("*.py"))]
    files = sorted((SRC / "ddim").rglob("*.py")) + scripts
    inner = [f"{p.relative_to(REPO)}: {t}" for p in files for t, is_inner in _imports(p)
             if is_inner and (t.split(".")[0] in required or t.split(".")[0] in sys.stdlib_module_names)]
    assert not inner, "import these at the top of the file:\n" + "\n".join(inner)


def test_no_private_names_imported_across_modules():
    files = [*sorted((SRC / "ddim").rglob("*.py")), REPO / "train.py", REPO / "evaluate.py",
             *sorted((REPO / "bench").rglob("*.py"))]
    assert [p for f in files for p in _private_names(f)] == []


@pytest.mark.parametrize("module, absent", [
    ("ddim.diffusion", ("lightning", "hydra", "omegaconf", "torchvision")),
    ("ddim.models", ("lightning", "hydra", "torchvision")),
    ("ddim.checkpoints", ("lightning", "hydra", "torchvision")),
    ("ddim.accel", ("lightning", "hydra", "torchvision")),
])
def test_lower_layers_load_without_the_frameworks(module, absent):
    code = f"import sys, {module}; print(' '.join(m for m in {absent!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=child_env(), check=True)
    assert out.stdout.split() == [], f"importing {module} loads {out.stdout.split()}"
