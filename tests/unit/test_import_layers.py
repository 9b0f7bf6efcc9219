"""Serving never imports ``training``; the shipped bundles name no ``training.`` target.

Why (DESIGN.md, "Layers"): ``training/`` imports ``workers.models``, never the
reverse, and exports bundles whose targets live in ``workers.models``. A node or
GPU worker is installed without the ``[train]`` extra; an import of ``training``
anywhere on the serving path (even one inside a function, run only when a model
loads) or a bundle config that builds a ``training.`` class breaks it there only.

How: every module under ``workers/`` and ``dicom_node/`` is parsed with :mod:`ast`
(not imported, so an import inside a function counts as much as one at the top),
and every ``_target_`` and ``$`` expression of the shipped bundles' configs is read.

The same parser keeps the other rule of "Layers": the node's receive/route/web code
and the shared lower layer never import ``workers`` (only the wiring layer that
builds the processes may), and a fresh interpreter that builds the web app and
reads the model registry holds no module of ``workers``, torch or MONAI.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
SERVING_PACKAGES = ("workers", "dicom_node")
FORBIDDEN = "training"

#: Modules allowed to import ``training``, each with the reason.
ALLOWED = {
    # The command-line entry registers `dicom-node train ...` and `dicom-node phantom`, which run the training
    # package on a machine that has it (the [train] extra). It is the CLI, not serving: `serve` and `worker`
    # never reach those imports.
    "dicom_node/cli.py": "registers the `dicom-node train` and `phantom` commands",
}

#: A ``training`` module named in a bundle config's ``$`` expression (``$import training...``, ``$training.x(...)``).
_TRAINING_IN_EXPRESSION = re.compile(rf"(?<![\w.]){FORBIDDEN}(\.\w+|\s|$)")


def _is_forbidden(module: str) -> bool:
    return module == FORBIDDEN or module.startswith(FORBIDDEN + ".")


def _constant_string(node: ast.AST) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def imported_modules(source: str, filename: str) -> Iterator[tuple[int, str]]:
    """(line, module) of every import in ``source``, at any depth: statements, and calls of
    ``importlib.import_module`` / ``__import__`` with a literal module name."""
    for node in ast.walk(ast.parse(source, filename=filename)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            # A relative import stays inside its own package, which is not `training` for these modules.
            if node.level == 0 and node.module:
                yield node.lineno, node.module
        elif isinstance(node, ast.Call) and node.args:
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
            module = _constant_string(node.args[0])
            if name in ("import_module", "__import__") and module is not None:
                yield node.lineno, module


def serving_modules() -> list[Path]:
    """Every Python file of the serving packages, relative to the repository root."""
    files = [path.relative_to(REPO_ROOT) for package in SERVING_PACKAGES
             for path in sorted((REPO_ROOT / package).rglob("*.py")) if "__pycache__" not in path.parts]
    assert files, f"no Python module under {SERVING_PACKAGES} in {REPO_ROOT}"
    return files


def training_imports(path: Path) -> list[str]:
    """``"path:line imports module"`` for each import of ``training`` in the module at ``path`` (repo-relative)."""
    source = (REPO_ROOT / path).read_text(encoding="utf-8")
    return [f"{path.as_posix()}:{line} imports {module}"
            for line, module in imported_modules(source, str(path)) if _is_forbidden(module)]


def test_the_parser_finds_imports_inside_functions_and_by_importlib() -> None:
    source = (
        "import os\n"
        "from training import cli\n"
        "def load():\n"
        "    from training.detection import detect\n"
        "    import training.networks as networks\n"
        "    importlib.import_module('training.postprocessing')\n"
        "    from . import sibling\n"
        "    from trainingwheels import x\n"
    )
    found = [(line, module) for line, module in imported_modules(source, "example.py") if _is_forbidden(module)]
    assert found == [(2, "training"), (4, "training.detection"), (5, "training.networks"),
                     (6, "training.postprocessing")]


def test_serving_code_never_imports_training() -> None:
    modules = serving_modules()
    for allowed in ALLOWED:
        assert Path(allowed) in modules, f"ALLOWED names {allowed}, which is no longer a serving module"
    offending = [hit for path in modules if path.as_posix() not in ALLOWED for hit in training_imports(path)]
    assert not offending, "serving code imports the training package (move what it needs to workers.models):\n" + (
        "\n".join(offending))


def _config_strings(value: Any, where: str) -> Iterator[tuple[str, str, str]]:
    """(where, key, string) of every string value in a parsed JSON config, ``key`` the name it is stored under."""
    if isinstance(value, dict):
        for key, item in value.items():
            if isinstance(item, str):
                yield f"{where}/{key}", str(key), item
            else:
                yield from _config_strings(item, f"{where}/{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            if isinstance(item, str):
                yield f"{where}/{index}", "", item
            else:
                yield from _config_strings(item, f"{where}/{index}")


def training_targets(config: Any, where: str) -> list[str]:
    """Each ``_target_`` or ``$`` expression of a MONAI bundle config that names the training package."""
    found = []
    for place, key, text in _config_strings(config, where):
        if key == "_target_" and _is_forbidden(text.strip()):
            found.append(f"{place}: {text}")
        elif text.startswith("$") and _TRAINING_IN_EXPRESSION.search(text[1:]):
            found.append(f"{place}: {text}")
    return found


def test_the_config_check_finds_targets_and_expressions() -> None:
    config = {"network_def": {"_target_": "training.networks.X", "inner": [{"_target_": "workers.models.Y"}]},
              "imports": ["$import training.detection", "$import numpy"], "run": "$@x.training.y", "note": "training."}
    assert training_targets(config, "c") == ["c/network_def/_target_: training.networks.X",
                                             "c/imports/0: $import training.detection"]


@pytest.mark.parametrize("config", sorted((REPO_ROOT / "workers" / "bundles").glob("*/configs/*.json")),
                         ids=lambda path: f"{path.parent.parent.name}/{path.name}")
def test_shipped_bundle_configs_name_no_training_target(config: Path) -> None:
    found = training_targets(json.loads(config.read_text(encoding="utf-8")), config.name)
    assert not found, f"{config.relative_to(REPO_ROOT)} names the training package (use workers.models):\n" + (
        "\n".join(found))


def test_every_shipped_bundle_has_configs() -> None:
    bundles = sorted(path for path in (REPO_ROOT / "workers" / "bundles").iterdir() if path.is_dir())
    assert bundles, "no shipped bundle under workers/bundles"
    for bundle in bundles:
        assert (bundle / "configs" / "inference.json").is_file(), f"{bundle.name}: no configs/inference.json"


# --------------------------------------------------------------------------- the node's code never imports workers

#: The node's receive, route, deliver and web code, and the shared lower layer under it (DESIGN.md, "Layers"):
#: none of it may import ``workers``. The wiring layer (node.py, cli.py, admin_cli.py) builds the serve and
#: worker processes and may import both sides.
NODE_MODULES = (
    "dicom_node/web/**/*.py", "dicom_node/db/**/*.py", "dicom_node/routing.py", "dicom_node/conductor.py",
    "dicom_node/completion.py", "dicom_node/scp*.py", "dicom_node/ingest.py", "dicom_node/dispatch.py",
    "dicom_node/scu.py", "dicom_node/stow.py", "dicom_node/contracts.py", "dicom_node/settings.py",
    "dicom_node/model_catalog.py", "dicom_node/model_files.py", "dicom_node/model_register.py",
)
WORKERS = "workers"


def _imports_workers(module: str) -> bool:
    return module == WORKERS or module.startswith(WORKERS + ".")


def node_modules() -> list[Path]:
    """The files of :data:`NODE_MODULES`, repository-relative; each pattern must still match a file."""
    found: dict[Path, None] = {}
    for pattern in NODE_MODULES:
        matches = sorted(path.relative_to(REPO_ROOT) for path in REPO_ROOT.glob(pattern)
                         if "__pycache__" not in path.parts)
        assert matches, f"{pattern} matches no module any more: update NODE_MODULES"
        found.update(dict.fromkeys(matches))
    return list(found)


def workers_imports(path: Path, source: str) -> list[str]:
    """``"path:line imports module"`` for each import of ``workers`` in ``source`` (the module at ``path``)."""
    return [f"{path.as_posix()}:{line} imports {module}"
            for line, module in imported_modules(source, str(path)) if _imports_workers(module)]


def test_the_parser_finds_workers_imports_and_not_the_db_module_of_that_name() -> None:
    source = (
        "from dicom_node.db import workers\n"
        "from dicom_node.db.workers import list_workers\n"
        "def describe():\n"
        "    from workers.models.registry import default_registry\n"
        "    import workers.volume\n"
        "    importlib.import_module('workers.models.monai_bundle')\n"
        "    from .workers import heartbeat\n"
        "    import workersuite\n"
    )
    assert workers_imports(Path("example.py"), source) == [
        "example.py:4 imports workers.models.registry", "example.py:5 imports workers.volume",
        "example.py:6 imports workers.models.monai_bundle"]


def test_node_code_never_imports_workers() -> None:
    modules = node_modules()
    assert Path("dicom_node/web/preview.py") in modules and Path("dicom_node/db/jobs.py") in modules
    offending = [hit for path in modules
                 for hit in workers_imports(path, (REPO_ROOT / path).read_text(encoding="utf-8"))]
    assert not offending, ("the node's receive/route/web code imports the workers (read through "
                           "dicom_node.model_catalog or another shared module instead):\n" + "\n".join(offending))


def test_the_web_app_and_the_model_catalog_load_neither_workers_nor_torch_nor_monai() -> None:
    """What the models page does - build the app, read the registry and every bundle's metadata - in a fresh
    interpreter, which then holds no module of ``workers``, torch or MONAI (an import may hide behind another)."""
    script = (
        "import sys\n"
        "from pathlib import Path\n"
        "from dicom_node.model_catalog import ModelCatalog, metadata_labels, read_bundle_json\n"
        "from dicom_node.settings import load_settings\n"
        "from dicom_node.web.app import create_app\n"
        "import dicom_node.web.preview, dicom_node.web.slice_stack\n"
        "create_app(load_settings(None, {'data_dir': Path(sys.argv[1])}))\n"
        "catalog = ModelCatalog.demo()\n"
        "for model_id in catalog.ids:\n"
        "    metadata_labels(read_bundle_json(catalog.path(model_id), 'metadata.json'), model_id)\n"
        "print(sorted({name.split('.')[0] for name in sys.modules} & {'workers', 'torch', 'monai', 'training'}))\n"
    )
    with tempfile.TemporaryDirectory() as data_dir:
        done = subprocess.run([sys.executable, "-c", script, data_dir], capture_output=True, text=True,
                              cwd=REPO_ROOT, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", f"the web process loaded {done.stdout.strip()}"
