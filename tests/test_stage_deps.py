"""Every code file a stage imports is a declared dependency of that stage in dvc.yaml.

A stage that imports a module DVC does not know about is marked up to date after that module
changes: a stale result reported as current. This test crawls each stage script's imports
(transitively, within `cxrlt`, function-level imports included) and checks that dvc.yaml
declares each file or a folder holding it. Stages come from DVC itself, so `foreach` stages
and `${...}` paths are resolved as `dvc repro` resolves them.
"""

from __future__ import annotations

import ast
import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"


def _module_file(name: str) -> Path | None:
    """src/ path of a `cxrlt...` module (a package's __init__.py), None if not ours."""
    if name != "cxrlt" and not name.startswith("cxrlt."):
        return None
    base = SRC.joinpath(*name.split("."))
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    return None


def _trivial(path: Path) -> bool:
    """A module with nothing but a docstring, `__future__` imports and constant assignments
    (e.g. `__version__`) cannot change what a stage computes."""
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            continue
        if isinstance(node, ast.ImportFrom) and node.module == "__future__":
            continue
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant):
            continue
        return False
    return True


def _imported_modules(path: Path) -> set[str]:
    """Names of the cxrlt modules a file imports anywhere in its body (parents included:
    importing `cxrlt.a.b` runs `cxrlt/a/__init__.py`)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            # `from cxrlt.x import y` may import the submodule y
            names.update(f"{node.module}.{a.name}" for a in node.names)
    out = set()
    for name in names:
        parts = name.split(".")
        out.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return {n for n in out if _module_file(n) is not None}


def imported_files(script: Path) -> set[Path]:
    """The stage script and every cxrlt file it reaches through imports."""
    seen: set[Path] = {script}
    todo = [script]
    while todo:
        for name in _imported_modules(todo.pop()):
            f = _module_file(name)
            if f is not None and f not in seen:
                seen.add(f)
                todo.append(f)
    return seen


def _stages():
    from dvc.repo import Repo

    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    with Repo(str(ROOT)) as repo:
        return [
            (stage.addressing, stage.cmd, [Path(d.def_path) for d in stage.deps])
            for stage in repo.index.stages
            if getattr(stage, "cmd", None)
        ]


STAGES = _stages()


def test_every_stage_runs_a_stage_script():
    assert STAGES
    for name, cmd, _ in STAGES:
        assert re.search(r"python stages/\w+\.py", cmd), (name, cmd)


@pytest.mark.parametrize("name,cmd,deps", STAGES, ids=[s[0] for s in STAGES])
def test_stage_declares_every_code_file_it_imports(name, cmd, deps):
    script = ROOT / re.search(r"stages/\w+\.py", cmd).group(0)
    declared = [(ROOT / d).resolve() for d in deps]
    missing = []
    for f in sorted(imported_files(script)):
        if _trivial(f):
            continue
        f = f.resolve()
        if not any(f == d or d in f.parents for d in declared):
            missing.append(str(f.relative_to(ROOT)))
    assert not missing, f"stage {name}: dvc.yaml does not declare {missing}"


def test_crawler_follows_function_level_and_from_imports(tmp_path):
    """The crawler must see imports inside functions and `from package import module`."""
    script = tmp_path / "s.py"
    script.write_text("from cxrlt import metrics\n\ndef main():\n    import cxrlt.data.cache\n")
    files = {str(p.relative_to(SRC)) for p in imported_files(script) if p != script}
    assert {"cxrlt/metrics.py", "cxrlt/data/cache.py", "cxrlt/data/__init__.py"} <= files
    assert "cxrlt/labels.py" in files  # metrics imports labels: transitive


def test_stage_scripts_import_their_own_checkouts_code(tmp_path: Path):
    """`dvc exp run --queue` runs each experiment in a copy of the repository, while the editable
    install points at the main checkout's src/: without `stages/cxrlt` (a link to ../src/cxrlt,
    first on a stage script's path) a queued run would execute whatever the main checkout's code
    is at that moment, not the code its dvc.lock records."""
    import shutil
    import subprocess
    import sys

    assert (ROOT / "stages" / "cxrlt").is_symlink() and (ROOT / "stages" / "cxrlt").resolve() == SRC / "cxrlt"
    copy = tmp_path / "exp"
    shutil.copytree(ROOT / "stages", copy / "stages", symlinks=True)
    shutil.copytree(SRC, copy / "src", ignore=shutil.ignore_patterns("__pycache__"))
    (copy / "stages" / "probe.py").write_text("import cxrlt.stage\nprint(cxrlt.stage.__file__)\n")
    out = subprocess.run([sys.executable, str(copy / "stages" / "probe.py")], capture_output=True, text=True,
                         check=True, cwd=copy).stdout.strip()  # fmt: skip
    assert Path(out).resolve() == (copy / "src" / "cxrlt" / "stage.py").resolve()
