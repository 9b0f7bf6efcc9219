"""The model registry of a worker: the catalog of ``config/models.yaml``, each model loaded once per process.

Why: routing rules name models by id; the worker needs to turn an id into a
ready :class:`~workers.models.base.Model` without knowing its format, and must
not reload a network for every job. Reading and validating the registry file
(entries, paths, labels; see :mod:`dicom_node.model_catalog` for the format) is
the shared lower layer's job, so that the node's web pages and CLI read the same
file without importing this package; :class:`ModelRegistry` adds what only a
worker does: it loads each model on first use and caches it (a worker process
builds one registry and keeps it).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from dicom_node.model_catalog import (
    PACKAGE_SCHEME,
    ModelCatalog,
    ModelEntry,
    ModelFormat,
    ModelRegistryError,
    UnknownModel,
    bundle_version,
    demo_entries,
    resolve_model_path,
)
from workers.models.base import Model
from workers.models.loading import resolve_device
from workers.models.monai_bundle import MonaiBundleModel
from workers.models.torchscript import TorchScriptSegmentationModel

__all__ = [
    "PACKAGE_SCHEME",
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


def build_model(entry: ModelEntry, path: Path, device: str | torch.device | None = None) -> Model:
    """Load the model an entry describes from ``path`` (already resolved) onto ``device``."""
    labels = entry.label_mapping()
    common: dict[str, Any] = {"device": device, "model_id": entry.id, "name": entry.name}
    if entry.kind == "classification" and entry.format in ("monai_bundle", "torchscript"):
        from workers.models.classification import MonaiBundleClassifier, TorchScriptClassifier

        if entry.format == "torchscript":
            assert entry.preprocessing is not None and labels is not None  # checked by ModelEntry
            return TorchScriptClassifier(path, preprocessing=entry.preprocessing, labels=labels,
                                         version=entry.version, **common)
        return MonaiBundleClassifier(path, labels=labels, overrides=entry.overrides, version=entry.version, **common)
    if entry.format == "torchscript":
        assert entry.preprocessing is not None and labels is not None  # checked by ModelEntry
        return TorchScriptSegmentationModel(
            path, preprocessing=entry.preprocessing, labels=labels, version=entry.version, **common
        )
    if entry.format == "nnunet":
        # dynamic_network_architectures is imported only where nnU-Net folders are served
        from workers.models.nnunet import NnUNetModel, NnUNetOptions

        assert labels is not None  # checked by ModelEntry
        return NnUNetModel(path, options=entry.nnunet or NnUNetOptions(), labels=labels, version=entry.version,
                           **common)
    if entry.format == "onnx" and entry.kind == "segmentation":
        # onnxruntime is imported only where ONNX models are served
        from workers.models.onnx_model import OnnxSegmentationModel

        assert entry.preprocessing is not None and labels is not None  # checked by ModelEntry
        return OnnxSegmentationModel(
            path, preprocessing=entry.preprocessing, labels=labels, version=entry.version, **common
        )
    if entry.kind == "detection" and entry.format == "monai_bundle":
        from workers.models.retinanet import RetinaNetBundleModel, is_retinanet_bundle

        if is_retinanet_bundle(path):  # MONAI RetinaNet (Model Zoo layout); others are the demo CenterNet
            return RetinaNetBundleModel(path, labels=labels, overrides=entry.overrides, version=entry.version,
                                        **common)
    if entry.kind == "detection":
        from workers.models.nodule_detector import NoduleDetectorModel

        return NoduleDetectorModel(path, labels=labels, overrides=entry.overrides, version=entry.version, **common)
    return MonaiBundleModel(path, labels=labels, overrides=entry.overrides, version=entry.version, **common)


class ModelRegistry(ModelCatalog):
    """The models a worker may run, by id; :meth:`load` gives each one loaded once per process and device.

    Built like a :class:`~dicom_node.model_catalog.ModelCatalog` (``entries``,
    ``base_dir``, ``source``, or :meth:`from_file` / :meth:`demo`). Thread-safe. A
    process forked after models were loaded loads its own copies (CUDA state does
    not survive a fork).
    """

    def __init__(self, entries: Sequence[ModelEntry], base_dir: Path, source: str = "model registry") -> None:
        super().__init__(entries, base_dir, source)
        self._loaded: dict[tuple[str, str], Model] = {}
        self._pid = os.getpid()
        self._lock = threading.Lock()

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
        path = self.path(entry.id)
        where = f"{self.source}: model {entry.id!r}"
        if not path.exists():
            raise ModelRegistryError(f"{where}: path {entry.path!r} ({path}) does not exist")
        if entry.format == "monai_bundle":
            found = bundle_version(path)
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
    return ModelRegistry.from_file(path, base_dir)


def default_registry() -> ModelRegistry:
    """The registry of the demo models (:func:`demo_entries`): what a node without a models file serves."""
    return ModelRegistry.demo()
