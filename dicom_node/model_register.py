"""Register a model in the registry file: detect and check its files, append a validated entry, keep the comments.

Why: ``dicom-node models add PATH --id ID`` is how a hospital brings its own model
(MONAI bundle, nnU-Net v2 results folder, TorchScript, ONNX). The registry file is
written by people and carries their comments, so the new entry is appended to its
text (ruamel is not a dependency; PyYAML would drop every comment) and the whole
file is read back and validated before it replaces the old one: a mistake leaves the
file as it was. ``replace=True`` swaps an existing entry's block for the new one (a
new version of the same model id), keeping the fields it had unless new ones are
given. What the file does not hold (labels of a TorchScript, ONNX or nnU-Net model,
its preprocessing) comes from ``extra`` (``--entry FILE``); the error says which
fields are missing and, for nnU-Net, lists the labels of its ``dataset.json``.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from dicom_node.model_catalog import (
    BundleError,
    ModelCatalog,
    ModelEntry,
    ModelFormat,
    ModelKind,
    ModelRegistryError,
    metadata_labels,
    read_bundle_json,
)
from dicom_node.model_files import (
    DetectedModel,
    ModelFilesError,
    inspect_model,
    weight_files,
    weights_digest,
)

__all__ = ["Registered", "RegistrationError", "register_model"]

logger = logging.getLogger(__name__)

#: Entry fields ``extra`` may not set: they come from the command line and the files.
_FROM_COMMAND = ("id", "path", "format")


class RegistrationError(ValueError):
    """A model that cannot be registered; the message names the file, the entry or the field."""


@dataclass(frozen=True)
class Registered:
    """A model now in the registry: its entry, the Device UID and SHA-256 of its weights, what it replaced."""

    entry: ModelEntry
    device_uid: str
    weights_sha256: str
    registry_file: Path
    replaced_version: str | None


def _item_indent(text: str) -> str:
    """The indentation of the registry's list items (``  - id: ...``), two spaces when it has none yet."""
    match = re.search(r"^( *)- +id *:", text, flags=re.MULTILINE)
    return match.group(1) if match else "  "


def _entry_block(entry: dict[str, Any], indent: str) -> str:
    body = yaml.safe_dump([entry], sort_keys=False, default_flow_style=False, allow_unicode=True, width=110)
    return "".join(indent + line if line.strip() else line for line in body.splitlines(keepends=True))


def _block_span(lines: list[str], model_id: str, indent: str) -> tuple[int, int] | None:
    """(first, end) line indexes of the list item of ``model_id`` in the registry text, or None."""
    start_pattern = re.compile(rf"^{indent}- +id *: *['\"]?{re.escape(model_id)}['\"]? *(#.*)?$")
    for first, line in enumerate(lines):
        if start_pattern.match(line.rstrip("\n")):
            end = first + 1
            while end < len(lines):
                stripped = lines[end].rstrip("\n")
                content = stripped.lstrip(" ")
                width = len(stripped) - len(content)
                if content and not content.startswith("#") and width <= len(indent):
                    break
                end += 1
            while end > first + 1 and (not lines[end - 1].strip() or lines[end - 1].lstrip().startswith("#")):
                end -= 1  # blank lines and comments before the next item stay with it
            return first, end
    return None


def _read_registry(registry_file: Path) -> tuple[str, dict[str, Any]]:
    try:
        text = registry_file.read_text()
    except FileNotFoundError as exc:
        raise RegistrationError(f"model registry {registry_file} does not exist: copy config/models.yaml there "
                                "and set routing.models_file to it") from exc
    ModelCatalog.from_file(registry_file)  # the file must be valid before anything is added
    raw = yaml.safe_load(text) or {}
    entries = {str(item.get("id")): item for item in raw.get("models") or [] if isinstance(item, dict)}
    return text, entries


def _missing_fields_hint(detected: DetectedModel, model_format: ModelFormat) -> str:
    """What an entry of this format needs beyond the command line, as a template for ``--entry``."""
    if model_format == "nnunet":
        labels = "\n".join(
            f"  - {{value: {value}, bundle_value: {value}, name: {name}, code: {{value: CODE, scheme: SCT, "
            f"meaning: MEANING}}, category: {{value: '123037004', scheme: SCT, meaning: Anatomical Structure}}}}"
            for name, value in sorted(detected.dataset_labels.items(), key=lambda item: item[1]))
        return f"give --entry FILE with the coded concept of each label of its dataset.json:\nlabels:\n{labels}"
    if model_format in ("torchscript", "onnx"):
        return ("give --entry FILE with 'preprocessing' (spacing_mm, window_hu, roi_size) and 'labels' (value, name, "
                "code, category of each output channel); see config/models.yaml")
    return "give --entry FILE with 'labels' (value, bundle_value, name, code, category); see config/models.yaml"


def _check_bundle_labels(path: Path, entry: ModelEntry) -> None:
    if entry.format != "monai_bundle" or entry.labels is not None:
        return
    try:
        labels = metadata_labels(read_bundle_json(path, "metadata.json"), str(path))
    except BundleError as exc:
        raise RegistrationError(str(exc)) from exc
    if not labels:
        raise RegistrationError(f"MONAI bundle {path}: configs/metadata.json has no dicom_node.labels; "
                                + _missing_fields_hint(DetectedModel(path, "monai_bundle", entry.kind, None, {}, ()),
                                                       "monai_bundle"))


def register_model(registry_file: Path, path: Path, model_id: str, *, model_format: ModelFormat | None = None,
                   kind: ModelKind | None = None, version: str | None = None, extra: dict[str, Any] | None = None,
                   replace: bool = False) -> Registered:
    """Check the model at ``path``, add its entry to ``registry_file`` (or replace the entry of ``model_id``).

    ``model_format`` None: detected. ``kind`` None: the bundle's ``dicom_node.kind``, else segmentation.
    ``version`` None: the bundle metadata's version (other formats must give one). ``extra``: more entry
    fields (labels, preprocessing, nnunet, input_domain, plausibility, title, series_number, name,
    overrides). Raises RegistrationError (also for a duplicate id without ``replace``); the file is
    only written when the whole new file validates.
    """
    registry_file = Path(registry_file).expanduser().resolve()
    path = Path(path).expanduser().resolve()
    extra = dict(extra or {})
    given = sorted(set(extra) & set(_FROM_COMMAND))
    if given:
        raise RegistrationError(f"--entry may not set {', '.join(given)}: they come from the command line")
    try:
        text, existing = _read_registry(registry_file)
    except ModelRegistryError as exc:
        raise RegistrationError(f"the registry is invalid before anything is added: {exc}") from exc
    previous = existing.get(model_id)
    if previous is not None and not replace:
        raise RegistrationError(f"{registry_file}: model {model_id!r} is already registered (version "
                                f"{previous.get('version')!r}); give --replace to register a new version of it")
    if previous is None and replace:
        raise RegistrationError(f"{registry_file}: no model {model_id!r} to replace (known: "
                                f"{', '.join(existing) or 'none'})")
    nnunet = extra.get("nnunet") or (previous or {}).get("nnunet") or {}
    try:
        detected = inspect_model(path, model_format, folds=nnunet.get("folds"),
                                 checkpoint=nnunet.get("checkpoint", "checkpoint_final.pth"))
    except ModelFilesError as exc:
        raise RegistrationError(str(exc)) from exc
    if detected.version is not None and version is not None and version != detected.version:
        raise RegistrationError(f"--version {version!r} differs from the bundle's configs/metadata.json version "
                                f"{detected.version!r}: workers refuse such an entry")
    version = version or detected.version
    if version is None:
        raise RegistrationError(f"{detected.format} model {path}: give --version (the file declares none)")
    if previous is not None and str(previous.get("version")) == version:
        raise RegistrationError(f"{registry_file}: model {model_id!r} is already at version {version!r}; a new "
                                "registration needs a new version")
    kept = {k: v for k, v in (previous or {}).items() if k not in (*_FROM_COMMAND, "version", "kind")}
    if detected.format not in ("torchscript", "onnx"):
        kept.pop("preprocessing", None)  # fields of the old entry's format that the new one does not take
    if detected.format != "nnunet":
        kept.pop("nnunet", None)
    fields = {"id": model_id, "kind": kind or (previous or {}).get("kind") or detected.kind,
              "format": detected.format, "path": str(path), "version": version, **kept, **extra}
    try:
        entry = ModelEntry.model_validate(fields)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'entry'}: {e['msg']}" for e in exc.errors())
        raise RegistrationError(f"model {model_id!r} ({detected.format} at {path}): {problems}\n"
                                + _missing_fields_hint(detected, detected.format)) from exc
    _check_bundle_labels(path, entry)
    digest = weights_digest(weight_files(path, entry.format, entry), path)
    block = _entry_block(entry.model_dump(mode="json", exclude_none=True, exclude_defaults=True,
                                          include=set(fields)), _item_indent(text))
    new_text = _with_entry(text, block, model_id if previous is not None else None, _item_indent(text),
                           registry_file)
    catalog = _write_validated(registry_file, new_text)
    return Registered(entry=catalog.entry(model_id), device_uid=catalog.device_uid(model_id), weights_sha256=digest,
                      registry_file=registry_file, replaced_version=None if previous is None
                      else str(previous.get("version")))


def _with_entry(text: str, block: str, replaces: str | None, indent: str, registry_file: Path) -> str:
    """The registry text with ``block`` appended (or in place of the item of ``replaces``)."""
    if replaces is None:
        return text + ("" if text.endswith("\n") or not text else "\n") + "\n" + block
    lines = text.splitlines(keepends=True)
    span = _block_span(lines, replaces, indent)
    if span is None:
        raise RegistrationError(f"{registry_file}: cannot find the item '- id: {replaces}' to replace at indent "
                                f"{len(indent)}; edit the file by hand")
    first, end = span
    return "".join(lines[:first]) + block + "".join(lines[end:])


def _write_validated(registry_file: Path, new_text: str) -> ModelCatalog:
    """Validate ``new_text`` as the registry (paths relative to its folder) and only then replace the file."""
    folder = registry_file.parent
    handle, temp_name = tempfile.mkstemp(prefix=f".{registry_file.name}.", suffix=".tmp", dir=folder)
    temp = Path(temp_name)
    try:
        with os.fdopen(handle, "w") as stream:
            stream.write(new_text)
        try:
            catalog = ModelCatalog.from_file(temp, base_dir=folder)
            catalog.check()
        except (ModelRegistryError, BundleError) as exc:
            raise RegistrationError(f"{registry_file} would be invalid with the new entry, left unchanged: "
                                    f"{str(exc).replace(str(temp), str(registry_file))}") from exc
        if registry_file.exists():
            os.chmod(temp, registry_file.stat().st_mode & 0o7777)
        os.replace(temp, registry_file)
    finally:
        temp.unlink(missing_ok=True)
    logger.info("model registry %s rewritten with a new entry", registry_file)
    return ModelCatalog.from_file(registry_file)
