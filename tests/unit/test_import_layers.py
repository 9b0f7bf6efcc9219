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
    # package on a machine that has it (the [train] extra). It is the CLI, not serving: a node command (`serve`,
    # `worker`, ...) builds its parser without them (test_node_commands_never_import_training).
    "dicom_node/app/cli.py": "registers the `dicom-node train` and `phantom` commands",
}

#: A ``training`` module named in a bundle config's ``$`` expression (``$import training...``, ``$training.x(...)``).
_TRAINING_IN_EXPRESSION = re.compile(rf"(?<![\w.]){FORBIDDEN}(\.\w+|\s|$)")


def _is_forbidden(module: str) -> bool:
    return module == FORBIDDEN or module.startswith(FORBIDDEN + ".")


def _constant_string(node: ast.AST) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def imported_modules(source: str, filename: str, *, names: bool = False) -> Iterator[tuple[int, str]]:
    """(line, module) of every import in ``source``, at any depth: statements, and calls of
    ``importlib.import_module`` / ``__import__`` with a literal module name. With ``names``,
    ``from package import name`` also yields ``package.name`` (``name`` may be a submodule)."""
    for node in ast.walk(ast.parse(source, filename=filename)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            # A relative import stays inside its own package, which is not `training` for these modules.
            if node.level == 0 and node.module:
                yield node.lineno, node.module
                if names:
                    for alias in node.names:
                        yield node.lineno, f"{node.module}.{alias.name}"
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


# --------------------------------------------------------------------------- the layers of dicom_node and workers

#: Every module of ``dicom_node`` in its layer (DESIGN.md, "Layers"), as glob patterns; a module in no layer fails
#: :func:`test_every_module_is_in_one_layer` (place it). The layers and what each may import:
#:
#: * ``shared`` - the lower layer both sides use: contracts, settings, the database and its repositories, the typed
#:   configuration (rules with their pure evaluator, destinations), the model catalog and what a model declares,
#:   the storage layout and its reader (spool, study store), the queue's names and protocol. Imports ``shared`` only.
#: * ``node`` - receive, completion and routing loop, delivery, web, the admin commands. Imports ``shared`` and
#:   ``node``, never ``workers``.
#: * ``app`` - the wiring layer: builds the processes from settings; may import everything.
#: ``workers`` (a package of its own) imports ``shared`` only; ``training`` imports ``workers`` and ``shared``.
LAYERS: dict[str, tuple[str, ...]] = {
    "shared": (
        "dicom_node/__init__.py", "dicom_node/contracts.py", "dicom_node/settings.py", "dicom_node/config_lookup.py",
        "dicom_node/db/**/*.py", "dicom_node/routing.py", "dicom_node/destinations.py", "dicom_node/delivery_types.py",
        "dicom_node/result_variants.py",
        "dicom_node/model_catalog.py", "dicom_node/model_domain.py", "dicom_node/model_declarations.py",
        "dicom_node/model_files.py", "dicom_node/model_register.py", "dicom_node/plausibility_rules.py",
        "dicom_node/spool.py", "dicom_node/study_store.py", "dicom_node/queue.py", "dicom_node/work_in_flight.py",
        "dicom_node/stopping.py", "dicom_node/tls_files.py", "dicom_node/header.py", "dicom_node/codestream.py",
        "dicom_node/dataset_layout.py", "dicom_node/study_status.py", "dicom_node/palette.py",
        "dicom_node/node_client.py", "dicom_node/multipart_stream.py", "dicom_node/http_study_store.py",
        "dicom_node/remote_outbox.py",
    ),
    "node": (
        "dicom_node/scp*.py", "dicom_node/scp_accel/**/*.py", "dicom_node/association_server.py", "dicom_node/ingest.py",
        "dicom_node/indexer.py", "dicom_node/storage_classes.py", "dicom_node/stow_intake.py", "dicom_node/recovery.py", "dicom_node/completion.py", "dicom_node/conductor.py",
        "dicom_node/study_facts.py", "dicom_node/periodic.py", "dicom_node/dispatch.py", "dicom_node/scu.py",
        "dicom_node/stow.py", "dicom_node/held_results.py", "dicom_node/applicability_preview.py",
        "dicom_node/config_files.py", "dicom_node/config_service/**/*.py",
        "dicom_node/access.py", "dicom_node/web/**/*.py", "dicom_node/admin_cli.py", "dicom_node/users_cli.py",
        "dicom_node/studies_cli.py", "dicom_node/study_actions.py", "dicom_node/retention.py",
        "dicom_node/housekeeping_cli.py",
    ),
    "app": ("dicom_node/app/**/*.py", "dicom_node/__main__.py"),
}
#: What each layer may import, of the three packages (``workers`` and ``training`` are layers of their own).
MAY_IMPORT: dict[str, frozenset[str]] = {
    "shared": frozenset({"shared"}),
    "node": frozenset({"shared", "node"}),
    "app": frozenset({"shared", "node", "app", "workers", "training"}),
    "workers": frozenset({"shared", "workers"}),
    "training": frozenset({"shared", "workers", "training"}),
}


def _python_files(package: str) -> list[Path]:
    return sorted(path.relative_to(REPO_ROOT) for path in (REPO_ROOT / package).rglob("*.py")
                  if "__pycache__" not in path.parts)


def layer_of_files() -> dict[Path, str]:
    """Each module of ``dicom_node``, ``workers`` and ``training`` with its layer; a pattern matching nothing fails."""
    layers: dict[Path, str] = {}
    for layer, patterns in LAYERS.items():
        for pattern in patterns:
            matches = [path.relative_to(REPO_ROOT) for path in REPO_ROOT.glob(pattern) if "__pycache__" not in path.parts]
            assert matches, f"{pattern} matches no module any more: update LAYERS"
            for path in matches:
                assert layers.get(path, layer) == layer, f"{path} is in two layers: {layers[path]} and {layer}"
                layers[path] = layer
    for package in ("workers", "training"):
        layers.update(dict.fromkeys(_python_files(package), package))
    return layers


def module_file(module: str, files: dict[str, Path]) -> Path | None:
    """The file of ``module`` or of its longest known parent (``dicom_node.db.jobs.JobRow`` -> db/jobs.py)."""
    name = module
    while name:
        if name in files:
            return files[name]
        name = name.rpartition(".")[0]
    return None


def layer_violations(layers: dict[Path, str]) -> list[str]:
    """``"path:line (layer) imports module (layer)"`` for every import across layers that :data:`MAY_IMPORT` forbids."""
    files = {".".join(path.with_suffix("").parts).removesuffix(".__init__"): path for path in layers}
    found: dict[tuple[Path, int, Path], str] = {}
    for path, layer in sorted(layers.items()):
        for line, module in imported_modules((REPO_ROOT / path).read_text(encoding="utf-8"), str(path), names=True):
            target = module_file(module, files)
            if target is not None and layers[target] not in MAY_IMPORT[layer]:
                found.setdefault((path, line, target), f"{path.as_posix()}:{line} ({layer}) imports "
                                                        f"{target.as_posix()} ({layers[target]})")
    return list(found.values())


def test_every_module_is_in_one_layer() -> None:
    layers = layer_of_files()
    unplaced = [path.as_posix() for path in _python_files("dicom_node") if path not in layers]
    assert not unplaced, f"modules in no layer (add them to LAYERS in {Path(__file__).name}): {unplaced}"
    assert layers[Path("dicom_node/web/preview.py")] == "node" and layers[Path("dicom_node/db/jobs.py")] == "shared"


def test_the_layer_check_finds_imports_across_layers(tmp_path: Path) -> None:
    source = ("from dicom_node.db import jobs\n"
              "def preview():\n"
              "    from dicom_node import scp\n"
              "    import workers.pipeline\n")
    found = [(line, module) for line, module in imported_modules(source, "x.py", names=True)]
    assert (3, "dicom_node.scp") in found and (1, "dicom_node.db.jobs") in found and (4, "workers.pipeline") in found
    files = {"dicom_node.scp": Path("dicom_node/scp.py"), "dicom_node.db.jobs": Path("dicom_node/db/jobs.py")}
    assert module_file("dicom_node.db.jobs.JobRow", files) == Path("dicom_node/db/jobs.py")
    assert module_file("dicom_node.elsewhere", files) is None
    assert "node" not in MAY_IMPORT["shared"] and "workers" not in MAY_IMPORT["node"]
    assert "node" not in MAY_IMPORT["workers"] and "app" not in MAY_IMPORT["workers"]


def test_imports_follow_the_layers() -> None:
    """shared imports shared; the node never imports workers; workers never import the node or the wiring layer;
    training never imports the node; only dicom_node.app imports both sides."""
    violations = layer_violations(layer_of_files())
    assert not violations, "imports across layers (DESIGN.md, 'Layers'):\n" + "\n".join(violations)


def test_the_web_app_and_the_model_catalog_load_neither_workers_nor_torch_nor_monai() -> None:
    """What the models page does - build the app, read the registry and every bundle's metadata - in a fresh
    interpreter, which then holds no module of ``workers``, torch or MONAI (an import may hide behind another)."""
    script = (
        "import sys\n"
        "from pathlib import Path\n"
        "from dicom_node.model_catalog import ModelCatalog, metadata_labels, read_bundle_json\n"
        "from dicom_node.settings import load_settings\n"
        "from dicom_node.web.app import create_app\n"
        "import dicom_node.web.preview\n"
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


def test_node_commands_never_import_training() -> None:
    """A node command (here ``studies``, which parses its arguments as ``serve`` and ``worker`` do) runs in a
    fresh interpreter that then holds no module of ``training``; ``dicom-node --help`` still lists ``train``."""
    script = (
        "import sys\n"
        "from dicom_node.app.cli import build_parser, main\n"
        "code = main(['studies', '--data-dir', sys.argv[1]])\n"
        "loaded = sorted({name.split('.')[0] for name in sys.modules} & {'training'})\n"
        "help_text = build_parser().format_help()\n"
        "print(code, loaded, 'train' in help_text and 'phantom' in help_text)\n"
    )
    with tempfile.TemporaryDirectory() as data_dir:
        done = subprocess.run([sys.executable, "-c", script, data_dir], capture_output=True, text=True,
                              cwd=REPO_ROOT, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "1 [] True", done.stdout
