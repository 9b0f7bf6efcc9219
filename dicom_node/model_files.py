"""What a model folder or file is, whether it is complete, and the identity of its weights; from files only.

Why: ``dicom-node models add`` takes a path a hospital copied onto the machine and
must say, before anything is registered, which format it is (MONAI bundle, nnU-Net v2
results folder, TorchScript file, ONNX file) and which file is missing, naming it;
weights are never downloaded (a Model Zoo bundle's ``large_files.yml`` is pointed at,
not fetched). The Device UID of a model in its results must stay the same while its
weights stay the same and change when they change: it is derived from the SHA-256 of
the weight files (:func:`weights_digest`, :func:`device_uid_for_digest`). Nothing
here imports torch, MONAI or the workers; it reads JSON and hashes bytes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from pydicom.uid import generate_uid

if TYPE_CHECKING:  # model_catalog imports this module for ModelCatalog.device_uid
    from dicom_node.model_catalog import ModelEntry, ModelFormat, ModelKind

__all__ = [
    "DetectedModel",
    "ModelFilesError",
    "cached_weights_digest",
    "detect_format",
    "device_uid_for_digest",
    "inspect_model",
    "weight_files",
    "weights_digest",
]

logger = logging.getLogger(__name__)

#: File name suffixes of the single-file formats.
_FILE_FORMATS: dict[str, ModelFormat] = {".ts": "torchscript", ".onnx": "onnx"}
#: Entropy prefix of the Device UIDs of model weights (so they never collide with other derived UIDs).
_DEVICE_UID_SOURCE = "dicom-ai-node model weights sha256"
_FOLD = re.compile(r"^fold_(\d+|all)$")
_CHUNK = 1 << 20


class ModelFilesError(ValueError):
    """A model path of unknown format, or one that lacks a file; the message names the path and the file."""


@dataclass(frozen=True)
class DetectedModel:
    """What :func:`inspect_model` found: the format, the kind it suggests, the version and labels it declares.

    ``version``: the bundle metadata's ``version`` (None for other formats); ``kind``: the bundle's
    ``dicom_node.kind`` or ``segmentation``; ``dataset_labels``: nnU-Net ``dataset.json`` labels
    (``{name: value}``, background left out); ``folds``: the nnU-Net fold folders present.
    """

    path: Path
    format: ModelFormat
    kind: ModelKind
    version: str | None
    dataset_labels: dict[str, int]
    folds: tuple[str, ...]


def detect_format(path: Path) -> ModelFormat:
    """The format of ``path``: a ``.ts``/``.onnx`` file, a bundle folder (``configs/metadata.json``) or an
    nnU-Net results folder (``dataset.json``); ModelFilesError names what was looked for otherwise."""
    path = Path(path)
    if not path.exists():
        raise ModelFilesError(f"model path {path} does not exist")
    if path.is_file():
        found = _FILE_FORMATS.get(path.suffix.lower())
        if found is None:
            raise ModelFilesError(f"model file {path}: unknown format (suffix {path.suffix!r}; expected "
                                  f"{', '.join(_FILE_FORMATS)}, or a bundle or nnU-Net folder)")
        return found
    if (path / "configs" / "metadata.json").is_file() or (path / "configs" / "inference.json").is_file():
        return "monai_bundle"
    if (path / "dataset.json").is_file() or (path / "plans.json").is_file():
        return "nnunet"
    raise ModelFilesError(f"model folder {path}: neither a MONAI bundle (configs/metadata.json, "
                          "configs/inference.json) nor an nnU-Net v2 results folder (dataset.json, plans.json, "
                          "fold_*/checkpoint_final.pth)")


def _require(path: Path, relative: str, what: str, hint: str = "") -> Path:
    target = path / relative
    if not target.is_file():
        raise ModelFilesError(f"{what} {path}: missing file {relative}{hint}")
    return target


def _read_json(path: Path, relative: str, what: str) -> dict[str, Any]:
    target = _require(path, relative, what)
    try:
        content = json.loads(target.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelFilesError(f"{what} {path}: {relative} is not valid JSON: {exc}") from exc
    if not isinstance(content, dict):
        raise ModelFilesError(f"{what} {path}: {relative} must hold a JSON object")
    return content


def _fold_dirs(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_dir() and _FOLD.match(p.name))


def inspect_model(path: Path, model_format: ModelFormat | None = None, *, folds: Sequence[int | str] | None = None,
                  checkpoint: str = "checkpoint_final.pth") -> DetectedModel:
    """Check that ``path`` is a complete model of ``model_format`` (detected when None); what it declares.

    Raises ModelFilesError naming the missing or broken file. Weights are only checked to exist
    (a bundle without ``models/model.pt`` is refused, with a pointer at its ``large_files.yml``).
    ``folds``/``checkpoint``: the nnU-Net folds that must hold ``checkpoint`` (default: every fold found).
    """
    path = Path(path)
    found = detect_format(path)
    if model_format is not None and model_format != found:
        raise ModelFilesError(f"model path {path} looks like {found}, not {model_format}")
    if found in ("torchscript", "onnx"):
        if path.stat().st_size == 0:
            raise ModelFilesError(f"{found} file {path} is empty")
        return DetectedModel(path, found, "segmentation", None, {}, ())
    if found == "monai_bundle":
        what = "MONAI bundle"
        meta = _read_json(path, "configs/metadata.json", what)
        _read_json(path, "configs/inference.json", what)
        hint = (" (weights are never downloaded: fetch the files large_files.yml lists yourself)"
                if (path / "large_files.yml").is_file() else "")
        _require(path, "models/model.pt", what, hint)
        kind = (meta.get("dicom_node") or {}).get("kind") or "segmentation"
        if kind not in ("segmentation", "detection", "classification"):
            raise ModelFilesError(f"{what} {path}: configs/metadata.json dicom_node.kind {kind!r} is not "
                                  "segmentation, detection or classification")
        version = meta.get("version")
        return DetectedModel(path, found, cast("ModelKind", kind), None if version is None else str(version), {}, ())
    what = "nnU-Net results folder"
    dataset = _read_json(path, "dataset.json", what)
    _read_json(path, "plans.json", what)
    labels = dataset.get("labels")
    if not isinstance(labels, dict) or not labels:
        raise ModelFilesError(f"{what} {path}: dataset.json has no 'labels'")
    present = {p.name.removeprefix("fold_"): p for p in _fold_dirs(path)}
    if not present:
        raise ModelFilesError(f"{what} {path}: missing fold folder fold_0 (no fold_* folder)")
    wanted = [str(f) for f in folds] if folds is not None else sorted(present)
    for fold in wanted:
        _require(path, f"fold_{fold}/{checkpoint}", what)
    dataset_labels = {str(name): int(value) for name, value in labels.items()
                      if isinstance(value, int) and value != 0}
    return DetectedModel(path, found, "segmentation", None, dataset_labels, tuple(f"fold_{f}" for f in wanted))


def weight_files(path: Path, model_format: ModelFormat, entry: ModelEntry | None = None) -> list[Path]:
    """The files whose bytes are the model's weights: the file itself (TorchScript, ONNX), every file in a
    bundle's ``models/``, the checkpoint of each used fold of an nnU-Net folder (``entry.nnunet``)."""
    path = Path(path)
    if model_format in ("torchscript", "onnx"):
        files = [path]
    elif model_format == "monai_bundle":
        folder = path / "models"
        files = sorted(f for f in folder.rglob("*") if f.is_file()) if folder.is_dir() else []
    else:
        options = entry.nnunet if entry is not None else None
        checkpoint = options.checkpoint if options is not None else "checkpoint_final.pth"
        if options is not None:
            files = [path / f"fold_{fold}" / checkpoint for fold in options.folds]
        else:
            files = [fold / checkpoint for fold in _fold_dirs(path)]
    missing = [f for f in files if not f.is_file()]
    if missing or not files:
        name = missing[0] if missing else path / ("models/model.pt" if model_format == "monai_bundle" else "fold_0")
        raise ModelFilesError(f"{model_format} model {path}: missing weight file {name}")
    return files


def weights_digest(files: Sequence[Path], base: Path) -> str:
    """SHA-256 over the weight files (each its path relative to ``base`` and its bytes' SHA-256), hex."""
    total = hashlib.sha256()
    for file in sorted(files, key=lambda f: _relative(f, base)):
        one = hashlib.sha256()
        with open(file, "rb") as stream:
            while chunk := stream.read(_CHUNK):
                one.update(chunk)
        total.update(_relative(file, base).encode() + b"\0" + one.digest())
    return total.hexdigest()


#: Digests by (base, (file, mtime_ns, size) ...): the models page asks for every model's Device UID each time.
_DIGESTS: dict[tuple[str, tuple[tuple[str, int, int], ...]], str] = {}
_DIGESTS_MAX = 256


def cached_weights_digest(files: Sequence[Path], base: Path) -> str:
    """:func:`weights_digest`, computed again only when a file's path, mtime or size changed."""
    stats = tuple((str(f), (st := f.stat()).st_mtime_ns, st.st_size) for f in files)
    key = (str(base), stats)
    digest = _DIGESTS.get(key)
    if digest is None:
        if len(_DIGESTS) >= _DIGESTS_MAX:
            _DIGESTS.clear()
        digest = _DIGESTS[key] = weights_digest(files, base)
    return digest


def _relative(file: Path, base: Path) -> str:
    base = Path(base)
    if base.is_file() or file == base:
        return file.name
    try:
        return file.relative_to(base).as_posix()
    except ValueError:
        return file.name


def device_uid_for_digest(digest: str) -> str:
    """The Device UID of weights with SHA-256 ``digest``: the same digest always gives the same UID."""
    return str(generate_uid(entropy_srcs=[_DEVICE_UID_SOURCE, digest]))
