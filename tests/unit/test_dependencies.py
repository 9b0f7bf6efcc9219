"""The extras of pyproject.toml match the code: a base install receives, routes, serves the web UI and delivers.

Why: ``pip install dicom-node`` must give a receive-only or web-only machine without
the ML stack (torch, MONAI, ONNX Runtime, matplotlib), ``[worker]`` what runs models,
``[train]`` what trains them. A third-party import that its layer's extras do not
provide breaks one kind of machine only, so it is checked here for every module:

* every import (at any depth, parsed, not run) of the node and the shared layer must
  come from the base dependencies (or what they depend on), of ``workers`` from
  ``[worker]``, of ``training`` from ``[train]``;
* a fresh interpreter in which torch, MONAI, ignite, ONNX Runtime, matplotlib, SciPy
  and nibabel cannot be imported still runs the command line and starts ``serve``
  with deliveries but no inference in its process (``queue.embedded_worker_queues: [io]``),
  which answers C-ECHO.
"""

from __future__ import annotations

import importlib.metadata as metadata
import re
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

from tests.unit.test_import_layers import REPO_ROOT, imported_modules, layer_of_files

PYPROJECT = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8"))
OUR_PACKAGES = {"dicom_node", "workers", "training", "tests"}
#: The extras each layer's code may use.
LAYER_EXTRAS = {"shared": (), "node": (), "workers": ("worker",), "training": ("worker", "train")}
#: What a base install must not import (the ML stack).
ML_STACK = ("torch", "monai", "ignite", "onnxruntime", "onnx", "matplotlib", "scipy", "nibabel")


def _name(text: str) -> str:
    return re.sub(r"[-_.]+", "-", text).lower()


def _declared(extras: tuple[str, ...]) -> list[Requirement]:
    """The requirements of the base install plus ``extras``, following self-references (``dicom-node[worker]``)."""
    wanted, done, found = list(extras), set(), [Requirement(text) for text in PYPROJECT["project"]["dependencies"]]
    optional = PYPROJECT["project"]["optional-dependencies"]
    while wanted:
        extra = wanted.pop()
        if extra in done:
            continue
        done.add(extra)
        for text in optional[extra]:
            requirement = Requirement(text)
            if _name(requirement.name) == "dicom-node":
                wanted.extend(requirement.extras)
            else:
                found.append(requirement)
    return found


def installed_closure(requirements: list[Requirement]) -> set[str]:
    """Normalised names of the distributions ``requirements`` install, with what they depend on (markers of
    this interpreter, the extras asked for)."""
    seen: set[str] = set()
    queue = [(requirement, frozenset(requirement.extras)) for requirement in requirements]
    while queue:
        requirement, extras = queue.pop()
        name = _name(requirement.name)
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = metadata.requires(requirement.name) or []
        except metadata.PackageNotFoundError:
            continue
        for text in requires:
            child = Requirement(text)
            if child.marker is None or any(child.marker.evaluate({"extra": extra}) for extra in (*extras, "")):
                queue.append((child, frozenset(child.extras)))
    return seen


def third_party_imports(path: Path) -> dict[str, int]:
    """Top-level names of the third-party modules ``path`` imports (anywhere), each with its first line."""
    found: dict[str, int] = {}
    for line, module in imported_modules((REPO_ROOT / path).read_text(encoding="utf-8"), str(path)):
        top = module.split(".")[0]
        if top not in sys.stdlib_module_names and top not in OUR_PACKAGES and top != "__future__":
            found.setdefault(top, line)
    return found


def test_base_dependencies_hold_no_ml_stack() -> None:
    base = {_name(requirement.name) for requirement in _declared(())}
    assert not base & {"torch", "monai", "pytorch-ignite", "onnxruntime", "onnx", "matplotlib", "scipy", "nibabel"}
    worker = {_name(requirement.name) for requirement in _declared(("worker",))}
    assert {"torch", "monai", "onnxruntime"} <= worker and "matplotlib" not in worker
    dev = {_name(requirement.name) for requirement in _declared(("dev",))}
    assert {"torch", "matplotlib", "onnx", "pytest"} <= dev  # `make test` installs everything


def test_every_import_is_provided_by_its_layers_extras() -> None:
    providers = metadata.packages_distributions()
    closures = {layer: installed_closure(_declared(extras)) for layer, extras in LAYER_EXTRAS.items()}
    missing = []
    for path, layer in sorted(layer_of_files().items()):
        if layer not in closures:  # the wiring layer: it imports each side only where that side is installed
            continue
        for module, line in third_party_imports(path).items():
            dists = {_name(dist) for dist in providers.get(module, [])}
            assert dists, f"{path}:{line} imports {module}, which no installed distribution provides"
            if not dists & closures[layer]:
                missing.append(f"{path.as_posix()}:{line} ({layer}) imports {module} from {sorted(dists)}, not in "
                               f"{' + '.join(('base', *LAYER_EXTRAS[layer]))}")
    assert not missing, "imports their install does not provide (pyproject.toml extras):\n" + "\n".join(missing)


def test_the_checker_sees_a_missing_dependency() -> None:
    closure = installed_closure(_declared(()))
    assert "pynetdicom" in closure and "starlette" in closure  # declared, and brought by fastapi
    assert "torch" not in closure and "matplotlib" not in closure


#: Runs in a fresh interpreter: the ML stack cannot be imported, then the command line and a node without
#: inference run. argv: data folder, DICOM port, web port.
_BASE_INSTALL = textwrap.dedent(f"""
    import importlib.abc, sys
    BLOCKED = {ML_STACK!r}

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"No module named {{name!r}} (not in a base install)")
            return None

    sys.meta_path.insert(0, Block())
    from pathlib import Path
    from pynetdicom import AE
    from dicom_node.app.cli import build_parser
    from dicom_node.app.node import Node
    from dicom_node.settings import load_settings

    build_parser()  # every command's options, the training commands included
    data, port, web_port = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    settings = load_settings(None, {{"data_dir": data, "dicom.port": port, "web.port": web_port,
                                    "queue.embedded_worker_queues": ["io"]}})
    node = Node(settings)
    node.start()
    try:
        ae = AE(ae_title="ECHOSCU")
        ae.add_requested_context("1.2.840.10008.1.1")
        assoc = ae.associate("127.0.0.1", port, ae_title=settings.dicom.ae_title)
        assert assoc.is_established, "no association"
        print("echo", assoc.send_c_echo().Status)
        assoc.release()
    finally:
        node.stop()
    print("loaded", sorted({{name.split(".")[0] for name in sys.modules}} & set(BLOCKED)))
""")


def test_a_base_install_runs_the_cli_and_a_node_without_inference(tmp_path: Path) -> None:
    from tests.conftest import free_port

    done = subprocess.run([sys.executable, "-c", _BASE_INSTALL, str(tmp_path), str(free_port()), str(free_port())],
                          capture_output=True, text=True, cwd=REPO_ROOT, timeout=180, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "echo 0" in done.stdout and "loaded []" in done.stdout, done.stdout
