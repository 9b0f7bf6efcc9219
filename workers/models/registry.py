"""The model registry: which models the workers can run (``config/models.yaml``), each loaded once per process.

Why: routing rules name models by id; the worker needs to turn an id into a
ready :class:`~workers.models.base.Model` without knowing its format, and must
not reload a network for every job. The registry file is validated as a whole
when it is read (unknown keys, missing fields and contradictions are errors that
name the entry and the field), paths are resolved then, and the bundles
themselves are loaded on first use and cached in the :class:`ModelRegistry`
instance (a worker process builds one registry and keeps it).

File format (see ``config/models.yaml``)::

    models:
      - id: chest-ct-segmentation          # what routing rules name
        kind: segmentation                 # segmentation | detection
        format: monai_bundle               # monai_bundle | torchscript
        path: package://workers/bundles/chest_ct_segmentation
        version: "0.1.0"                   # must match the bundle metadata's version
        name: Chest CT segmentation        # optional: algorithm name in SEG/SR (default: metadata name)
        labels:                            # optional for bundles with a dicom_node section
          - {value: 1, name: spleen, bundle_value: 1,
             code: {value: "78961009", scheme: SCT, meaning: Spleen},
             category: {value: "123037004", scheme: SCT, meaning: Anatomical Structure},
             color_rgb: [157, 108, 162]}
        overrides: {}                      # optional: MONAI config ids (bundles), DetectorConfig fields (detectors)
        preprocessing: {...}               # torchscript only: TorchScriptPreprocessing

Without a file (``routing.models_file`` unset) the node serves the two demo models
shipped in ``workers/bundles`` (:func:`default_registry`, the same entries as
``config/models.yaml``).

Paths: absolute; ``package://PACKAGE/sub/path`` (inside an installed Python
package, e.g. the demo bundles shipped in ``workers/bundles``); or relative to the
registry's ``base_dir`` (by default the folder of the YAML file).
"""

from __future__ import annotations

import importlib.resources
import logging
import os
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from dicom_node.contracts import SegmentLabel
from workers.models.base import Model, ModelKind
from workers.models.monai_bundle import (
    BundleLabel,
    MonaiBundleModel,
    label_mapping,
    read_bundle_json,
    resolve_device,
)
from workers.models.torchscript import TorchScriptPreprocessing, TorchScriptSegmentationModel

__all__ = [
    "ModelEntry",
    "ModelFormat",
    "ModelRegistry",
    "ModelRegistryError",
    "UnknownModel",
    "build_model",
    "default_registry",
    "demo_entries",
    "load_model_registry",
    "resolve_model_path",
]

logger = logging.getLogger(__name__)

ModelFormat = Literal["monai_bundle", "torchscript"]
#: Prefix of paths inside an installed Python package.
PACKAGE_SCHEME = "package://"


class ModelRegistryError(ValueError):
    """A registry file, entry or path that cannot be used; the message names the file, entry and field."""


class UnknownModel(LookupError):
    """A model id that the registry does not list."""


class ModelEntry(BaseModel):
    """One model of ``config/models.yaml`` (see the module docstring for the fields)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", max_length=64)
    kind: ModelKind
    format: ModelFormat
    path: str = Field(min_length=1)
    version: str = Field(min_length=1, max_length=64)
    name: str | None = Field(default=None, min_length=1, max_length=64)
    labels: tuple[BundleLabel, ...] | None = None
    overrides: dict[str, Any] = Field(default_factory=dict)
    preprocessing: TorchScriptPreprocessing | None = None

    @model_validator(mode="after")
    def _consistent(self) -> ModelEntry:
        if self.format == "torchscript":
            if self.kind != "segmentation":
                raise ValueError("format torchscript serves segmentation models only; use a bundle for detection")
            if self.preprocessing is None:
                raise ValueError("format torchscript needs 'preprocessing' (spacing_mm, window_hu, roi_size)")
            if not self.labels:
                raise ValueError("format torchscript needs 'labels' (a .ts file carries none)")
            if self.overrides:
                raise ValueError("'overrides' apply to bundles; a torchscript entry takes 'preprocessing'")
        elif self.preprocessing is not None:
            raise ValueError("'preprocessing' is for torchscript entries; a bundle brings its own")
        if self.labels is not None:
            if not self.labels:
                raise ValueError("'labels' is empty: leave it out to use the bundle's own labels")
            if self.kind == "detection" and any(label.bundle_value is None for label in self.labels):
                raise ValueError("detection labels need 'bundle_value' (the detector's class index)")
        return self

    def label_mapping(self) -> dict[int, SegmentLabel] | None:
        """``{model output value: SegmentLabel}`` of the entry's labels, or None to use the bundle's."""
        return None if self.labels is None else label_mapping(self.labels, f"model {self.id!r}")


class _RegistryFile(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    models: tuple[ModelEntry, ...] = Field(min_length=1)


def resolve_model_path(path: str, base_dir: Path) -> Path:
    """The filesystem path of an entry's ``path`` (absolute, ``package://...`` or relative to ``base_dir``)."""
    if path.startswith(PACKAGE_SCHEME):
        package, _, inside = path[len(PACKAGE_SCHEME):].partition("/")
        if not package or not inside:
            raise ModelRegistryError(f"path {path!r} must be {PACKAGE_SCHEME}PACKAGE/sub/path")
        try:
            root = importlib.resources.files(package)
        except ModuleNotFoundError as exc:
            raise ModelRegistryError(f"path {path!r}: package {package!r} is not installed") from exc
        return Path(str(root.joinpath(inside)))
    candidate = Path(path).expanduser()
    return candidate if candidate.is_absolute() else (base_dir / candidate)


def _format_errors(exc: ValidationError, raw: Any, source: str) -> str:
    """One line per problem: the entry (index and id) and the dotted field."""
    lines = []
    entries = raw.get("models") if isinstance(raw, Mapping) else None
    for error in exc.errors():
        loc = list(error["loc"])
        where = "top level"
        if len(loc) >= 2 and loc[0] == "models" and isinstance(loc[1], int):
            index = loc[1]
            entry = entries[index] if isinstance(entries, list) and index < len(entries) else None
            entry_id = entry.get("id") if isinstance(entry, Mapping) else None
            where = f"models[{index}]" + (f" (id {entry_id!r})" if entry_id else "")
            loc = loc[2:]
        field = ".".join(str(part) for part in loc) or "(entry)"
        value = f", got {error['input']!r}" if error["type"] != "missing" and loc else ""
        lines.append(f"{where}: {field}: {error['msg']}{value}")
    return f"{source}: invalid model registry:\n  " + "\n  ".join(lines)


def build_model(entry: ModelEntry, path: Path, device: str | torch.device | None = None) -> Model:
    """Load the model an entry describes from ``path`` (already resolved) onto ``device``."""
    labels = entry.label_mapping()
    common: dict[str, Any] = {"device": device, "model_id": entry.id, "name": entry.name}
    if entry.format == "torchscript":
        assert entry.preprocessing is not None and labels is not None  # checked by ModelEntry
        return TorchScriptSegmentationModel(
            path, preprocessing=entry.preprocessing, labels=labels, version=entry.version, **common
        )
    if entry.kind == "detection":
        from workers.models.nodule_detector import NoduleDetectorModel

        return NoduleDetectorModel(path, labels=labels, overrides=entry.overrides, version=entry.version, **common)
    return MonaiBundleModel(path, labels=labels, overrides=entry.overrides, version=entry.version, **common)


def _bundle_version(path: Path) -> str | None:
    version = read_bundle_json(path, "metadata.json").get("version")
    return None if version is None else str(version)


class ModelRegistry:
    """The models a worker may run, by id; :meth:`load` gives each one loaded once per process and device.

    ``entries``: validated entries (unique ids); ``base_dir``: where relative
    paths start; ``source``: names the registry in errors (usually its file).
    Thread-safe. A process forked after models were loaded loads its own copies
    (CUDA state does not survive a fork).
    """

    def __init__(self, entries: Sequence[ModelEntry], base_dir: Path, source: str = "model registry") -> None:
        ids = [entry.id for entry in entries]
        duplicates = sorted({i for i in ids if ids.count(i) > 1})
        if duplicates:
            raise ModelRegistryError(f"{source}: model ids {duplicates} are listed more than once")
        self.source = source
        self.base_dir = Path(base_dir)
        self._entries = {entry.id: entry for entry in entries}
        self._paths = {}
        for index, entry in enumerate(entries):
            try:
                self._paths[entry.id] = resolve_model_path(entry.path, self.base_dir)
            except ModelRegistryError as exc:
                raise ModelRegistryError(f"{source}: models[{index}] (id {entry.id!r}): path: {exc}") from exc
        self._loaded: dict[tuple[str, str], Model] = {}
        self._pid = os.getpid()
        self._lock = threading.Lock()

    @property
    def ids(self) -> tuple[str, ...]:
        """Model ids in file order."""
        return tuple(self._entries)

    def entry(self, model_id: str) -> ModelEntry:
        """The entry of ``model_id`` (UnknownModel listing the known ids otherwise)."""
        try:
            return self._entries[model_id]
        except KeyError:
            raise UnknownModel(f"{self.source}: no model {model_id!r} (known: {', '.join(self.ids)})") from None

    def path(self, model_id: str) -> Path:
        """The resolved filesystem path of ``model_id``'s bundle or file."""
        self.entry(model_id)
        return self._paths[model_id]

    def load(self, model_id: str, device: str | torch.device | None = None) -> Model:
        """``model_id`` loaded on ``device`` (default: GPU if available, else CPU), from the cache after the first call.

        Raises UnknownModel for an id not listed, ModelRegistryError when the
        path is missing or the bundle's version differs from the entry's, and the
        loaders' errors (BundleError) for unusable bundles.
        """
        entry = self.entry(model_id)
        dev = resolve_device(device)
        key = (model_id, str(dev))
        with self._lock:
            if self._pid != os.getpid():  # forked: the parent's models (and CUDA context) are not ours
                self._loaded.clear()
                self._pid = os.getpid()
            model = self._loaded.get(key)
            if model is None:
                model = self._load(entry, dev)
                self._loaded[key] = model
            return model

    def _load(self, entry: ModelEntry, device: torch.device) -> Model:
        path = self._paths[entry.id]
        where = f"{self.source}: model {entry.id!r}"
        if not path.exists():
            raise ModelRegistryError(f"{where}: path {entry.path!r} ({path}) does not exist")
        if entry.format == "monai_bundle":
            found = _bundle_version(path)
            if found is not None and found != entry.version:
                raise ModelRegistryError(
                    f"{where}: registry says version {entry.version!r}, the bundle's metadata says {found!r}"
                )
        logger.info("loading model %s (%s %s) from %s on %s", entry.id, entry.format, entry.kind, path, device)
        return build_model(entry, path, device)


def load_model_registry(path: Path, base_dir: Path | None = None) -> ModelRegistry:
    """Read and validate a registry file (``config/models.yaml``); models load later, on :meth:`ModelRegistry.load`.

    ``base_dir``: where relative model paths start (default: the file's folder).
    Raises ModelRegistryError naming the file, the entry and the field.
    """
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError as exc:
        raise ModelRegistryError(f"model registry {path} does not exist") from exc
    except yaml.YAMLError as exc:
        raise ModelRegistryError(f"{path}: not valid YAML: {exc}") from exc
    try:
        parsed = _RegistryFile.model_validate(raw)
    except ValidationError as exc:
        raise ModelRegistryError(_format_errors(exc, raw, str(path))) from exc
    for index, entry in enumerate(parsed.models):
        if entry.labels is not None:
            try:
                label_mapping(entry.labels, f"{path}: models[{index}] (id {entry.id!r})")
            except ValueError as exc:
                raise ModelRegistryError(str(exc)) from exc
    return ModelRegistry(parsed.models, base_dir if base_dir is not None else path.parent, source=str(path))


def demo_entries() -> tuple[ModelEntry, ...]:
    """The demo models shipped in ``workers/bundles``; ``config/models.yaml`` lists the same entries."""
    return (
        ModelEntry(id="chest-ct-segmentation", kind="segmentation", format="monai_bundle",
                   path=f"{PACKAGE_SCHEME}workers/bundles/chest_ct_segmentation", version="0.1.0"),
        ModelEntry(id="lung-nodule-detection", kind="detection", format="monai_bundle",
                   path=f"{PACKAGE_SCHEME}workers/bundles/lung_nodule_detection", version="0.1.0"),
    )


def default_registry() -> ModelRegistry:
    """The registry of the demo models (:func:`demo_entries`): what a node without a models file serves."""
    return ModelRegistry(demo_entries(), base_dir=Path(__file__).resolve().parent, source="built-in demo models")
