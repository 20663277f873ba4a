"""Every DVC stage's ``deps`` cover the code it runs, and list no code it does not run.

The code a stage runs is the import closure, inside ``spo_core``, of its stage module
(``python -m spo_core.stages.<stage>``): a static walk over the source (no import, so nothing heavy
loads) that follows every import statement, including those inside functions, relative imports,
``from package import submodule``, the package ``__init__`` files that importing a submodule
executes, and modules that a registry imports by name (``importlib.import_module(f"pkg.{name}")``
over a literal tuple of names, as ``spo_core.scorers.base.build_scorer`` does).
"""

from __future__ import annotations

import ast
from functools import lru_cache
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PKG = "spo_core"


def _module_file(name: str) -> Path | None:
    """The source file of module ``name`` (``a.b`` -> a/b.py or a/b/__init__.py), if it is in the repo."""
    base = ROOT / Path(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _is_package(name: str) -> bool:
    return (ROOT / Path(*name.split(".")) / "__init__.py").is_file()


def _package_modules(pkg: str) -> list[str]:
    folder = ROOT / Path(*pkg.split("."))
    return sorted(f"{pkg}.{p.stem}" for p in folder.glob("*.py") if p.stem != "__init__")


def _resolve_relative(module: str, level: int, target: str | None) -> str:
    parts = module.split(".")
    base = parts if _is_package(module) else parts[:-1]  # a package's own __init__ is level 1's base
    base = base[: len(base) - (level - 1)] if level > 1 else base
    return ".".join(base + ([target] if target else []))


def _names_iterated(node: ast.AST, parents: dict[ast.AST, ast.AST], var: str) -> list[str] | None:
    """The string constants of ``for var in (<literals>)`` enclosing ``node``, if there is such a loop."""
    p = parents.get(node)
    while p is not None:
        if isinstance(p, ast.For) and isinstance(p.target, ast.Name) and p.target.id == var \
                and isinstance(p.iter, (ast.Tuple, ast.List)) \
                and all(isinstance(e, ast.Constant) and isinstance(e.value, str) for e in p.iter.elts):
            return [e.value for e in p.iter.elts]
        p = parents.get(p)
    return None


def _dynamic_imports(call: ast.Call, parents: dict[ast.AST, ast.AST]) -> list[str] | str:
    """Modules an ``importlib.import_module(...)`` call imports, or a description if it cannot be resolved."""
    if not call.args:
        return "import_module() without arguments"
    arg = call.args[0]
    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
        return [arg.value]
    if isinstance(arg, ast.JoinedStr) and len(arg.values) == 2 and isinstance(arg.values[0], ast.Constant) \
            and isinstance(arg.values[1], ast.FormattedValue) and isinstance(arg.values[1].value, ast.Name):
        prefix, var = arg.values[0].value, arg.values[1].value.id
        names = _names_iterated(call, parents, var)
        if names is not None:
            return [prefix + n for n in names]
        if prefix.endswith("."):  # a name built at run time: any module of that package may load
            return _package_modules(prefix[:-1])
    return f"import_module({ast.unparse(arg)}) at line {call.lineno}"


def _imports(module: str) -> tuple[set[str], list[str]]:
    """Modules inside spo_core that ``module`` imports anywhere, and imports that could not be resolved."""
    tree = ast.parse(_module_file(module).read_text(encoding="utf-8"))
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    found: set[str] = set()
    unresolved: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _resolve_relative(module, node.level, node.module) if node.level else node.module
            found.add(base)
            # `from pkg import sub` imports the submodule pkg.sub when there is one.
            found.update(f"{base}.{a.name}" for a in node.names if _module_file(f"{base}.{a.name}"))
        elif isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None
            if name == "import_module":
                got = _dynamic_imports(node, parents)
                if isinstance(got, str):
                    unresolved.append(f"{module}: {got}")
                else:
                    found.update(got)
    inside = {m for m in found if m == PKG or m.startswith(PKG + ".")}
    return {m for m in inside if _module_file(m)}, unresolved


@lru_cache(maxsize=None)
def closure(module: str) -> tuple[frozenset[str], tuple[str, ...]]:
    """Files (repo-relative) of every spo_core module ``module`` runs, and unresolved dynamic imports."""
    todo, seen, unresolved = [module], set(), []
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        # Importing a.b.c first runs a/__init__.py and a/b/__init__.py.
        parts = m.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]
        deps, bad = _imports(m)
        todo += sorted(deps)
        unresolved += bad
    files = set()
    for m in seen:
        path = _module_file(m)
        # An empty __init__.py runs nothing; one with code (spo_core/__init__.py) counts.
        if path is not None and (path.name != "__init__.py" or path.read_text(encoding="utf-8").strip()):
            files.add(path.relative_to(ROOT).as_posix())
    return frozenset(files), tuple(unresolved)


def _stages() -> dict[str, dict]:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def _stage_module(stage: dict) -> str:
    cmd = stage["cmd"].split()
    assert cmd[:2] == ["python", "-m"] and cmd[2].startswith("spo_core.stages."), stage["cmd"]
    return cmd[2]


def _covers(dep: str, file: str) -> bool:
    return file == dep or file.startswith(dep.rstrip("/") + "/")


def test_the_closure_follows_every_kind_of_import():
    files, unresolved = closure("spo_core.stages.train_spo")
    assert not unresolved
    for f in ("spo_core/__init__.py", "spo_core/library_logs.py",  # the package __init__ runs on any import
              "spo_core/stages/train_spo.py", "spo_core/methods/spo.py", "spo_core/losses.py",
              "spo_core/scorers/base.py", "spo_core/scorers/step_aware.py",  # by name, through build_scorer
              "spo_core/scorers/toy.py", "spo_core/toyworld/rater.py",  # what a registered scorer imports
              "spo_core/preference/time_clip.py"):  # imported inside a function of step_aware.py
        assert f in files, f
    assert "spo_core/stages/__init__.py" not in files  # empty
    assert "spo_core/ablation.py" not in files and "spo_core/stages/train_d3po.py" not in files


@pytest.mark.parametrize("name", sorted(_stages()))
def test_stage_deps_cover_exactly_the_code_it_runs(name):
    stage = _stages()[name]
    files, unresolved = closure(_stage_module(stage))
    assert not unresolved, f"stage {name}: imports the test cannot follow: {unresolved}"
    code_deps = [d for d in stage.get("deps", []) if d == PKG or d.startswith(PKG + "/")]
    missing = sorted(f for f in files if not any(_covers(d, f) for d in code_deps))
    stale = sorted(d for d in code_deps if not any(_covers(d, f) for f in files))
    assert not missing, f"dvc.yaml stage '{name}' runs code its deps omit: add {missing}"
    assert not stale, f"dvc.yaml stage '{name}' depends on code it never imports: remove {stale}"
