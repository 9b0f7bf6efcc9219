"""The training package's shape: no import cycle between its modules, no module over 700 lines.

Why: ``segmentation.py`` and ``lesion_plots.py`` once imported each other (through a
function-level import), which made either impossible to read or change alone.
Every import counts here, also those inside functions and under ``TYPE_CHECKING``:
a lazy import hides a cycle from Python, not from a reader.
"""

from __future__ import annotations

import ast
from collections.abc import Mapping
from pathlib import Path

TRAINING = Path(__file__).resolve().parents[3] / "training"
MAX_LINES = 700


def module_name(path: Path, root: Path) -> str:
    """``training.a.b`` of ``root/a/b.py`` (``training.a`` of ``root/a/__init__.py``), ``root`` the package."""
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(source: str, name: str, known: set[str], *, is_package: bool = False) -> set[str]:
    """The modules of ``known`` that the module ``name`` (a package's ``__init__`` with ``is_package``) imports."""
    package = name if is_package else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # `from training.x import y` imports training.x.y when y is a module, else a name of training.x
            candidates = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for candidate in candidates:
            while candidate and candidate not in known:  # `import training.a.b.c` of a name c: its module
                candidate = candidate.rpartition(".")[0]
            if candidate and candidate != name:
                found.add(candidate)
    return found


def import_graph(root: Path) -> dict[str, set[str]]:
    """Module -> the package's modules it imports, for every ``.py`` file under ``root``."""
    paths = {module_name(path, root): path for path in sorted(root.rglob("*.py"))}
    known = set(paths)
    return {name: imported_modules(path.read_text(encoding="utf-8"), name, known, is_package=path.name == "__init__.py")
            for name, path in paths.items()}


def find_cycle(graph: Mapping[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` as ``[a, b, ..., a]``, or None."""
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_find_cycle_sees_a_function_level_import_cycle(tmp_path: Path) -> None:
    package = tmp_path / "training"
    (package / "seg").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "seg" / "__init__.py").write_text("from training.seg.train import fit\n")
    (package / "seg" / "train.py").write_text("from training.plots import draw\n")
    (package / "plots.py").write_text("def draw():\n    from training.seg import train\n")
    (package / "loop.py").write_text("from . import plots\n")
    (package / "seg" / "data.py").write_text("from .. import loop\n")
    paths = {module_name(p, package): p for p in package.rglob("*.py")}
    graph = {n: imported_modules(p.read_text(), n, set(paths)) for n, p in paths.items()}
    assert graph["training.loop"] == {"training.plots"}
    assert graph["training.seg.data"] == {"training.loop"}
    assert graph["training.seg"] == {"training.seg.train"}
    assert find_cycle(graph) == ["training.plots", "training.seg.train", "training.plots"]
    (package / "plots.py").write_text("def draw():\n    pass\n")
    graph["training.plots"] = imported_modules((package / "plots.py").read_text(), "training.plots", set(paths))
    assert find_cycle(graph) is None


def test_training_modules_import_no_cycle() -> None:
    graph = import_graph(TRAINING)
    assert "training.segmentation.train" in graph and "training.loop" in graph["training.segmentation.train"]
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle in training/: " + " -> ".join(cycle or [])


def test_no_training_module_is_over_700_lines() -> None:
    lengths = {path.relative_to(TRAINING.parent).as_posix(): len(path.read_text(encoding="utf-8").splitlines())
               for path in TRAINING.rglob("*.py")}
    assert lengths, f"no module found under {TRAINING}"
    too_long = {path: n for path, n in lengths.items() if n > MAX_LINES}
    assert not too_long, f"training modules over {MAX_LINES} lines (split them): {too_long}"
