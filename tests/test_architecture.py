"""The package's import rules (docs/ARCHITECTURE.md), checked by parsing every module's imports.

Rules:
- `model/`, `losses.py` and `quant.py` import torch and each other only;
- `storage.py`, `tokenizer.py`, `runinfo.py` and `progress.py` import nothing of ours;
- teachers never import the student side (model, losses, quant, data, training, checkpoint, export);
- every other layer imports only the layers the table in docs/ARCHITECTURE.md allows it;
- nothing in the package or scripts imports a root entry-point script;
- imports of our own modules sit at module level (an import hidden inside a function is how a
  cycle gets dodged), and the module-level import graph has no cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "bitnet_kde"
ENTRY_POINTS = {p.stem for p in ROOT.glob("*.py")}
STDLIB_OK = {"__future__", "math", "dataclasses", "typing", "collections", "functools", "itertools", "contextlib"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def resolve(node: ast.ImportFrom, importer: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = importer.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(path: Path, me: str | None = None) -> list[tuple[str, bool]]:
    """(imported module, at module level?) for every import statement of module `me` at `path`.

    `from pkg import name` counts as importing `pkg.name` when that is one of our modules.
    Imports under `if TYPE_CHECKING:` count as module level (they never run).
    """
    tree = ast.parse(path.read_text(), filename=str(path))
    me = me or module_name(path)
    found: list[tuple[str, bool]] = []

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = top and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend((a.name, top) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                mod = resolve(child, me, path.name == "__init__.py")
                for a in child.names:
                    sub = f"{mod}.{a.name}"
                    found.append((sub if is_ours(sub) and module_path(sub) else mod, top))
            visit(child, nested)

    visit(tree, True)
    return found


def is_ours(name: str) -> bool:
    return name == "bitnet_kde" or name.startswith("bitnet_kde.") or name.split(".")[0] in ENTRY_POINTS


def module_path(name: str) -> Path | None:
    rel = Path(*name.split("."))
    for p in (ROOT / rel.with_suffix(".py"), ROOT / rel / "__init__.py"):
        if p.is_file():
            return p
    return None


def package_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


MODULES = package_modules()


def our_imports(name: str, *, top_only: bool = False) -> set[str]:
    return {m for m, top in imports_of(MODULES[name]) if is_ours(m) and (top or not top_only)}


def in_area(name: str, *areas: str) -> bool:
    return any(name == f"bitnet_kde.{a}" or name.startswith(f"bitnet_kde.{a}.") for a in areas)


def test_modules_found():
    # guards the test itself: the walk must see the package's layers
    for name in ("bitnet_kde.model.bitnet", "bitnet_kde.losses", "bitnet_kde.teachers.base", "bitnet_kde.storage"):
        assert name in MODULES


LAYERS = {  # area -> layer, as in the table of docs/ARCHITECTURE.md
    "quant": "student math", "losses": "student math", "model": "student math",
    "storage": "bottom", "tokenizer": "bottom", "runinfo": "bottom", "progress": "bottom",
    "teachers": "teachers", "kd": "traces", "data": "training", "training": "training",
    "checkpoint": "formats", "export": "formats",
    "eval": "stages", "dryrun": "stages", "settings": "stages", "cli": "stages", "env": "stages",
    "records": "stages",
    "pipeline": "stages",
}
MAY_IMPORT = {  # layer -> the layers it may import (besides its own)
    "student math": set(),
    "bottom": set(),
    "teachers": {"bottom"},
    "traces": {"teachers", "bottom"},
    "training": {"student math", "traces", "bottom"},
    "formats": {"student math", "bottom"},
    "stages": {"student math", "bottom", "teachers", "traces", "training", "formats"},
}


def layer_of(name: str) -> str:
    area = name.split(".")[1]
    assert area in LAYERS, f"{name}: add its area to LAYERS here and to the table in docs/ARCHITECTURE.md"
    return LAYERS[area]


@pytest.mark.parametrize("name", [m for m in MODULES if m != "bitnet_kde"])
def test_each_layer_imports_only_the_layers_below(name):
    mine = layer_of(name)
    for mod in our_imports(name):
        if mod != "bitnet_kde" and not mod.split(".")[0] in ENTRY_POINTS:
            theirs = layer_of(mod)
            assert theirs == mine or theirs in MAY_IMPORT[mine], f"{name} ({mine}) imports {mod} ({theirs})"


@pytest.mark.parametrize("name", [m for m in MODULES if in_area(m, "model", "losses", "quant")])
def test_model_losses_quant_import_only_torch(name):
    for mod, _ in imports_of(MODULES[name]):
        root = mod.split(".")[0]
        if is_ours(mod):
            assert in_area(mod, "model", "losses", "quant") or mod == "bitnet_kde", f"{name} imports {mod}"
        else:
            assert root == "torch" or root in STDLIB_OK, f"{name} imports {mod}: only torch is allowed here"


@pytest.mark.parametrize("name", ["bitnet_kde.storage", "bitnet_kde.tokenizer", "bitnet_kde.runinfo",
                                  "bitnet_kde.progress"])
def test_bottom_layer_imports_nothing_of_ours(name):
    assert name in MODULES
    assert our_imports(name) == set()


@pytest.mark.parametrize("name", [m for m in MODULES if in_area(m, "teachers")])
def test_teachers_never_import_the_student_side(name):
    student = ("model", "losses", "quant", "data", "training", "checkpoint", "export", "eval")
    bad = {m for m in our_imports(name) if in_area(m, *student)}
    assert not bad, f"{name} imports {sorted(bad)}"


def test_package_and_scripts_never_import_entry_points():
    for path in [*MODULES.values(), *sorted((ROOT / "scripts").glob("*.py"))]:
        bad = {m for m, _ in imports_of(path) if m.split(".")[0] in ENTRY_POINTS}
        assert not bad, f"{path.relative_to(ROOT)} imports entry points {sorted(bad)}"


@pytest.mark.parametrize("name", list(MODULES))
def test_our_imports_are_at_module_level(name):
    hidden = our_imports(name) - our_imports(name, top_only=True)
    assert not hidden, f"{name} imports {sorted(hidden)} inside a function"


def test_no_import_cycles():
    graph = {n: {m for m in our_imports(n, top_only=True) if m in MODULES} for n in MODULES}
    # a package's __init__ importing its own submodules is how packages re-export: not a cycle
    for n, deps in graph.items():
        if MODULES[n].name == "__init__.py":
            deps -= {m for m in deps if m.startswith(n + ".")}
    state: dict[str, int] = {}
    stack: list[str] = []

    def walk(n: str) -> None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                cycle = stack[stack.index(m):] + [m]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if m not in state:
                walk(m)
        stack.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            walk(n)


def test_rules_catch_violations(tmp_path):
    # the parser sees a hidden import, a relative import and a from-import of a submodule
    src = tmp_path / "probe.py"
    src.write_text("import torch\nfrom bitnet_kde import storage\nfrom . import quant\n\n"
                   "def f():\n    from bitnet_kde.model import bitnet\n")
    found = imports_of(src, "bitnet_kde.probe")
    assert ("torch", True) in found
    assert ("bitnet_kde.storage", True) in found
    assert ("bitnet_kde.quant", True) in found
    assert ("bitnet_kde.model.bitnet", False) in found
