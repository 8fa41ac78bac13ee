"""Import direction, read from every module's AST (ARCHITECTURE.md's layers, bottom to top):

    core (tmpq.core) < quant < supernet < evaluators | search < deploy (tmpq.deploy) < jobs (tmpq.jobs)
    < face (tmpq, tmpq.cli, tmpq.api, tmpq.__main__)

A module may import its own package and the layers below it. Violations: an import from a higher layer or from a
peer library (evaluators <-> search), anything importing the face from outside it, a bare top-level ``quant`` /
``supernet`` / ``search`` / ``evaluators`` (they install as ``tmpq.*`` only), a first-party name outside the package
(``benchmarks``, ``tests``: the installed tmpq has neither), a private name (``_x``) taken across packages or from
``benchmarks/`` and ``tests/`` (scanned for that rule only; ``PRIVATE_OK`` lists the exceptions), and torch in the
search library, directly or transitively.

What counts as an import: ``import a.b``, ``from a.b import c``, relative imports (``from ..jobs import config``,
resolved against the importing module's package) and ``importlib.import_module("a.b")`` / ``__import__("a.b")``
with a literal name (a computed name, like the face's name table, cannot be read and is not counted).

Torch in search is traced through the AST: from each search module, every first-party module it imports at import
time (module-level imports, with the packages above them, whose ``__init__`` runs first) is followed in turn, and a
module reached that imports torch or a third-party package that loads torch (``HEAVY``) counts against the search
module, named with the chain. Imports inside functions are not followed (they run later, and a first-party one is a
violation of its own). ``test_importing_the_search_library_loads_no_torch`` checks the same on the real repo by
importing every search module in a fresh interpreter, which also catches a third-party package missing from ``HEAVY``.

A new violation fails (``KNOWN`` lists none), and so would a listed one that is gone (so such a list only shrinks).
An internal import inside a function hides the graph and is a violation too, except in the face's deferrals
(``LAZY_OK``): ``tmpq.cli.main``, which imports the commands once the arguments are parsed (``tmpq --help`` and
usage errors take 0.09 s instead of the 2.4 s that torch, diffusers and pandas cost), and calling the package
``tmpq.search`` (it imports ``tmpq.api`` then). The package ``tmpq`` itself (every ``import tmpq.core...`` runs
``tmpq/__init__``) resolves its public names through a name table on first access. Third-party imports inside
functions (ray, pytorch-fid, optuna's storages) are not counted.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from collections import deque
from pathlib import Path

import pytest

from conftest import REPO

FOLDERS = {"tmpq": "tmpq", "quant": "tmpq.quant", "supernet": "tmpq.supernet", "search": "tmpq.search",
           "evaluators": "tmpq.evaluators"}
BARE = ("quant", "supernet", "search", "evaluators")
# first-party folders outside the package: the package may not import them; they are scanned for private reaches
OUTSIDE = ("benchmarks", "tests")
OUTSIDE_NAMES = ("benchmarks", "tests", "conftest")
RANK = {"core": 0, "quant": 1, "supernet": 2, "evaluators": 3, "search": 3, "deploy": 4, "jobs": 5, "face": 6}
# third-party packages that load torch when imported (the search library may reach none of them)
HEAVY = ("torch", "torchvision", "torchao", "diffusers", "transformers", "pytorch_fid", "safetensors.torch")

# violations allowed for now (none since the jobs, the deployment layer and the run config moved; an entry added here
# must name its issue)
KNOWN: set[str] = set()
# the functions that may import tmpq inside their body (the face's deferrals; see the module docstring)
LAZY_OK = {("tmpq.cli", "main"), ("tmpq", "__call__")}
# (file under benchmarks/ or tests/, private name) pairs a test may take from tmpq, each with its reason
PRIVATE_OK: set[tuple[str, str]] = {
    # the int8 deployment's input quantizer, checked level for level against the calibrated one (fused and not);
    # an implementation detail of the converted layers, not a name for users
    ("tests/test_export.py", "_StaticInput"),
}


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    parts[0] = FOLDERS[parts[0]]
    return ".".join(parts)


def layer(mod: str) -> str:
    if mod == "tmpq.core" or mod.startswith("tmpq.core."):
        return "core"
    for lib in ("quant", "supernet", "evaluators", "search"):
        if mod == f"tmpq.{lib}" or mod.startswith(f"tmpq.{lib}."):
            return lib
    for kind in ("deploy", "jobs"):
        if mod == f"tmpq.{kind}" or mod.startswith(f"tmpq.{kind}."):
            return kind
    return "face"


def package(mod: str) -> str:
    """The unit a private name may not leave: a layer's package (the face: one module)."""
    kind = layer(mod)
    return kind if kind != "face" else mod


def _absolute(src: str, is_package: bool, level: int, module: str | None) -> str:
    """The absolute name of a relative import ``level`` dots up from module ``src``."""
    base = src.split(".") if is_package else src.split(".")[:-1]
    base = base[:len(base) - (level - 1)] if level > 1 else base
    return ".".join(base + ([module] if module else []))


def _string_import(node: ast.AST) -> str | None:
    """The literal name of an ``importlib.import_module("...")`` / ``import_module("...")`` / ``__import__("...")``
    call, else None."""
    if not (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)):
        return None
    f = node.func
    name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None
    return node.args[0].value if name in ("import_module", "__import__") else None


def _imports(tree: ast.AST, src: str = "", is_package: bool = False):
    """(absolute module, names, enclosing function or None) of every import (the outermost function names it)."""
    in_fn: dict[int, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for n in ast.walk(node):
                if n is not node:
                    in_fn.setdefault(id(n), node.name)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            target = node.module if node.level == 0 else _absolute(src, is_package, node.level, node.module)
            if target:
                yield target, [a.name for a in node.names], in_fn.get(id(node))
        elif isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, [], in_fn.get(id(node))
        elif (name := _string_import(node)) is not None:
            level = len(name) - len(name.lstrip("."))
            target = _absolute(src, is_package, level, name[level:] or None) if level else name
            yield target, [], in_fn.get(id(node))


def _modules(root: Path) -> dict[str, tuple[Path, list]]:
    """Every package module under ``root``: name -> (path, its imports)."""
    found = {}
    for folder in FOLDERS:
        for path in sorted((root / folder).rglob("*.py")):
            src = module_name(root, path)
            found[src] = (path, list(_imports(ast.parse(path.read_text(), str(path)), src,
                                              path.name == "__init__.py")))
    return found


def _heavy(target: str) -> bool:
    return any(target == h or target.startswith(h + ".") for h in HEAVY)


def _loads(mods: dict, src: str) -> list[str]:
    """What importing ``src`` imports at once: the packages above it (their ``__init__`` runs first) and its
    module-level imports, each first-party one with the packages above it and the submodules its names may be."""
    parts = src.split(".")
    out = [p for p in (".".join(parts[:i]) for i in range(1, len(parts))) if p in mods]  # its packages run first
    for target, names, inside in mods[src][1]:
        if inside is not None:
            continue
        parts = target.split(".")
        firsts = [".".join(parts[:i]) for i in range(1, len(parts) + 1)] + [f"{target}.{n}" for n in names]
        out += [t for t in firsts if t in mods] if parts[0] == "tmpq" else [target]
    return out


def _torch_chain(mods: dict, src: str) -> list[str] | None:
    """The shortest chain of first-party modules from ``src`` to a torch-loading import, or None."""
    seen, todo = {src}, deque([[src]])
    while todo:
        chain = todo.popleft()
        for t in _loads(mods, chain[-1]):
            if t not in mods:
                if _heavy(t):
                    return chain + [t]
            elif t not in seen:
                seen.add(t)
                todo.append(chain + [t])
    return None


def violations(root: Path) -> set[str]:
    """The import-direction violations under ``root`` (a tree shaped like the repo)."""
    found = set()
    mods = _modules(root)
    for src, (path, imports) in mods.items():
        for target, names, inside in imports:
            top = target.split(".")[0]
            if top in BARE:
                found.add(f"{src} -> {target} (bare top-level name; use tmpq.{target})")
                continue
            if top in OUTSIDE_NAMES:
                found.add(f"{src} -> {target} (first-party outside the package: the installed tmpq has no {top})")
                continue
            if layer(src) == "search" and _heavy(target):
                found.add(f"{src} -> {target} (the search library imports no torch)")
            if top != "tmpq":
                continue
            if inside is not None and (src, inside) not in LAZY_OK:
                found.add(f"{src} -> {target} (inside {inside}(); import at the top)")
            a, b = layer(src), layer(target)
            if b == "face" and a != "face":
                found.add(f"{src} -> {target} (imports the face)")
            elif a != b and RANK[b] > RANK[a]:
                found.add(f"{src} -> {target} (upward: {b} over {a})")
            elif a != b and RANK[b] == RANK[a]:
                found.add(f"{src} -> {target} (peer library)")
            for n in names:
                if n.startswith("_") and not n.startswith("__") and package(target) != package(src):
                    found.add(f"{src} -> {target}.{n} (private name across packages)")
        if layer(src) == "search":
            chain = _torch_chain(mods, src)
            if chain is not None and len(chain) > 2:  # a direct import is reported above
                found.add(f"{src} -> torch (through {' -> '.join(chain[1:])})")
    for folder in OUTSIDE:
        for path in sorted((root / folder).rglob("*.py")) if (root / folder).is_dir() else ():
            rel = path.relative_to(root).as_posix()
            for target, names, _inside in _imports(ast.parse(path.read_text(), str(path))):
                for n in names:
                    private = n.startswith("_") and not n.startswith("__")
                    if target.split(".")[0] == "tmpq" and private and (rel, n) not in PRIVATE_OK:
                        found.add(f"{rel} -> {target}.{n} (private name from outside the package)")
    return found


def test_the_repo_keeps_its_import_direction():
    found = violations(REPO)
    new = sorted(found - KNOWN)
    gone = sorted(KNOWN - found)
    assert not new, "new import-direction violations:\n" + "\n".join(new)
    assert not gone, "fixed (remove from KNOWN):\n" + "\n".join(gone)


PLANTS = {
    "core imports a library": ("tmpq/core/bad.py", "from tmpq.quant.functional import qrange\n",
                               "tmpq.core.bad -> tmpq.quant.functional (upward: quant over core)"),
    "a library imports the face": ("quant/bad.py", "from tmpq.cli import main\n",
                                   "tmpq.quant.bad -> tmpq.cli (imports the face)"),
    "quant imports supernet": ("quant/bad.py", "import tmpq.supernet\n",
                               "tmpq.quant.bad -> tmpq.supernet (upward: supernet over quant)"),
    "peer libraries": ("evaluators/bad.py", "from tmpq.search.space import SearchSpace\n",
                       "tmpq.evaluators.bad -> tmpq.search.space (peer library)"),
    "a bare top-level name": ("tmpq/core/bad.py", "import search.space\n",
                              "tmpq.core.bad -> search.space (bare top-level name; use tmpq.search.space)"),
    "a private name across packages": ("supernet/bad.py", "from tmpq.quant.functional import _scalar\n",
                                       "tmpq.supernet.bad -> tmpq.quant.functional._scalar (private name across "
                                       "packages)"),
    "torch in the search library": ("search/executors.py", "import torch\n",
                                    "tmpq.search.executors -> torch (the search library imports no torch)"),
    "a relative import upward": ("tmpq/core/bad.py", "from ..jobs import config\n",
                                 "tmpq.core.bad -> tmpq.jobs (upward: jobs over core)"),
    "a relative import of a peer": ("evaluators/bad.py", "from ..search.space import SearchSpace\n",
                                    "tmpq.evaluators.bad -> tmpq.search.space (peer library)"),
    "an importlib string import": ("quant/bad.py", "import importlib\n\nm = importlib.import_module('tmpq.supernet')\n",
                                   "tmpq.quant.bad -> tmpq.supernet (upward: supernet over quant)"),
    "a first-party name outside the package": ("supernet/bad.py", "from benchmarks.common import RowLog\n",
                                               "tmpq.supernet.bad -> benchmarks.common (first-party outside the "
                                               "package: the installed tmpq has no benchmarks)"),
    "torch reached through core": ({"search/space.py": "from tmpq.core.mid import f\n",
                                    "tmpq/core/mid.py": "from . import heavy\n",
                                    "tmpq/core/heavy.py": "import diffusers\n"},
                                   "tmpq.search.space -> torch (through tmpq.core.mid -> tmpq.core.heavy -> "
                                   "diffusers)"),
    "torch reached through a package's __init__": ({"search/groups.py": "from tmpq.core.errors import TmpqError\n",
                                                   "tmpq/core/__init__.py": "import torch\n"},
                                                  "tmpq.search.groups -> torch (through tmpq.core -> torch)"),
    "a private name taken by a benchmark": ("benchmarks/bad.py", "def f():\n    from tmpq.jobs.search import _search\n",
                                            "benchmarks/bad.py -> tmpq.jobs.search._search (private name from "
                                            "outside the package)"),
    "a private name taken by a test": ("tests/test_bad.py", "from tmpq.commands import _given\n",
                                       "tests/test_bad.py -> tmpq.commands._given (private name from outside the "
                                       "package)"),
}


@pytest.mark.parametrize("case", sorted(PLANTS))
def test_each_kind_of_violation_is_caught(tmp_path, case):
    files, expected = PLANTS[case][:-1], PLANTS[case][-1]
    files = files[0] if isinstance(files[0], dict) else {files[0]: files[1]}
    for folder in (*FOLDERS, "tmpq/core", "tmpq/jobs", *OUTSIDE):
        (tmp_path / folder).mkdir(parents=True, exist_ok=True)
        (tmp_path / folder / "__init__.py").write_text("")
    for rel, code in files.items():
        (tmp_path / rel).write_text(code)
    assert violations(tmp_path) == {expected}


def test_importing_the_search_library_loads_no_torch():
    """The AST trace's cross-check on the real repo: every search module imported in one fresh interpreter, in
    order; the first after which torch is loaded is named."""
    names = sorted(module_name(REPO, p) for p in (REPO / "search").rglob("*.py"))
    code = ("import sys\nfor name in sys.argv[1:]:\n    __import__(name)\n"
            "    if 'torch' in sys.modules:\n        print(name)\n        break\n")
    r = subprocess.run([sys.executable, "-c", code, *names], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout == "", f"importing {r.stdout.strip()} loads torch"


def test_an_internal_import_inside_a_function_is_caught_outside_the_face_deferrals(tmp_path):
    for folder in FOLDERS:
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "__init__.py").write_text("")
    body = "def {}():\n    from tmpq.core.errors import TmpqError\n    return TmpqError\n"
    (tmp_path / "quant" / "x.py").write_text(body.format("f") + "\n\nimport numpy\n\n\ndef g():\n    import ray\n")
    (tmp_path / "tmpq" / "cli.py").write_text(body.format("main") + "\n\n" + body.format("helper"))
    assert violations(tmp_path) == {"tmpq.quant.x -> tmpq.core.errors (inside f(); import at the top)",
                                    "tmpq.cli -> tmpq.core.errors (inside helper(); import at the top)"}
