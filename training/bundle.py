"""MONAI bundles: the contract between training and serving.

Why: the node's workers run every network through a MONAI bundle, the same
folder layout the MONAI Model Zoo uses, so a bundle trained here also runs with
MONAI's own tools (``python -m monai.bundle run``) and a Model Zoo bundle can be
served by the node. Segmentation and detection training both export through
:func:`write_bundle`, so both bundles have one layout and one metadata shape.

What a bundle written here holds::

    BUNDLE/
      configs/metadata.json    MONAI bundle metadata (meta_schema_20240725) + a "dicom_node" section
      configs/inference.json   MONAI config: preprocessing, network_def, inferer, postprocessing, evaluator
      models/model.pt          the network's state_dict (what inference.json's CheckpointLoader loads)
      models/model.ts          TorchScript (torch.jit.script, else torch.jit.trace), when the network allows
      docs/README.md           what the model is, its labels, its figures and how to run it

The ``dicom_node`` section of the metadata is what the node reads to serve the
model::

    "dicom_node": {
      "kind": "segmentation" | "detection",
      "input": {"modality": "CT", "spacing_mm": [x, y, z], "intensity_window_hu": [lo, hi]},
      "labels": [{"value": 2, "name": "lung",
                  "code": {"value": "39607008", "scheme": "SCT", "meaning": "Lung"},
                  "category": {"value": "123037004", "scheme": "SCT", "meaning": "Anatomical Structure"},
                  "color_rgb": [128, 174, 231]}, ...],
      "evaluation": {...figures measured on held-out data...}
    }

``spacing_mm`` is in the order of MONAI's ``Spacingd(pixdim=...)`` after
``Orientationd("RAS")``: x (right-left), y (anterior-posterior), z (inferior-superior).
"""

from __future__ import annotations

import copy
import importlib.metadata
import json
import logging
import platform
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from workers.models.detection_network import CenterNetDetector
from workers.models.postprocessing import DropSmallComponentsd
from workers.models.segmentation_networks import AnatomyWithNoduleBranch
from workers.models.small_nodules import SmallNoduleStage

__all__ = [
    "BUNDLE_KINDS",
    "METADATA_SCHEMA_URL",
    "ct_network_data_format",
    "dicom_node_section",
    "label_entries",
    "moved_targets",
    "read_bundle_metadata",
    "record_evaluation",
    "target_name",
    "validate_metadata",
    "with_current_targets",
    "write_bundle",
]

logger = logging.getLogger(__name__)

#: The MONAI bundle metadata schema the metadata follows (the Model Zoo's current one).
METADATA_SCHEMA_URL = (
    "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20240725.json"
)

#: Values of ``dicom_node.kind``.
BUNDLE_KINDS = ("segmentation", "detection")

#: Packages a bundle's inference.json needs besides MONAI, PyTorch and NumPy:
#: nibabel reads/writes NIfTI, pytorch-ignite runs SupervisedEvaluator/CheckpointLoader.
_REQUIRED_PACKAGES = ("nibabel", "pytorch-ignite")
#: Needed only by ``python -m monai.bundle`` (its command line is built with fire).
_OPTIONAL_PACKAGES = ("fire",)


def _package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _versions(names: Iterable[str]) -> dict[str, str]:
    return {name: version for name in names if (version := _package_version(name)) is not None}


def label_entries(specs: Iterable[Any]) -> list[dict[str, Any]]:
    """The ``dicom_node.labels`` list for label specs (``training.labels.LabelSpec`` or alike).

    Each spec needs ``value, name, code_value, code_meaning, category_value,
    category_meaning, color_rgb`` and may have ``scheme`` (default ``SCT``).
    """
    entries = []
    for spec in specs:
        scheme = getattr(spec, "scheme", "SCT")
        entries.append(
            {
                "value": int(spec.value),
                "name": str(spec.name),
                "code": {"value": str(spec.code_value), "scheme": scheme, "meaning": str(spec.code_meaning)},
                "category": {
                    "value": str(spec.category_value),
                    "scheme": scheme,
                    "meaning": str(spec.category_meaning),
                },
                "color_rgb": [int(c) for c in spec.color_rgb],
            }
        )
    return entries


def ct_network_data_format(
    spatial_shape: Sequence[int], pred: Mapping[str, Any], *, is_patch_data: bool = True
) -> dict[str, Any]:
    """MONAI's ``network_data_format`` of a network whose input is one CT channel in HU scaled to [0, 1].

    ``spatial_shape`` is the input's (a training patch, or the whole resized
    image with ``is_patch_data`` False); ``pred`` describes the output.
    """
    return {
        "inputs": {
            "image": {
                "type": "image",
                "format": "hounsfield",
                "modality": "CT",
                "num_channels": 1,
                "spatial_shape": [int(v) for v in spatial_shape],
                "dtype": "float32",
                "value_range": [0, 1],
                "is_patch_data": is_patch_data,
                "channel_def": {"0": "image"},
            }
        },
        "outputs": {"pred": dict(pred)},
    }


def dicom_node_section(
    *,
    kind: str,
    spacing_mm: Sequence[float],
    intensity_window_hu: Sequence[float],
    labels: Iterable[Any],
    evaluation: Mapping[str, Any] | None = None,
    modality: str = "CT",
    **extra: Any,
) -> dict[str, Any]:
    """Build the metadata's ``dicom_node`` section; ``labels`` are label specs or ready entries."""
    label_list = list(labels)
    if label_list and not isinstance(label_list[0], Mapping):
        label_list = label_entries(label_list)
    section = {
        "kind": kind,
        "input": {
            "modality": modality,
            "spacing_mm": [float(v) for v in spacing_mm],
            "intensity_window_hu": [float(v) for v in intensity_window_hu],
        },
        "labels": [dict(entry) for entry in label_list],
        "evaluation": dict(evaluation or {}),
        **extra,
    }
    _validate_dicom_node(section)
    return section


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _validate_code(where: str, code: Any) -> None:
    _require(isinstance(code, Mapping), f"{where} must be an object, got {code!r}")
    for key in ("value", "scheme", "meaning"):
        _require(
            isinstance(code.get(key), str) and code.get(key) != "",
            f"{where}.{key} must be a non-empty string, got {code.get(key)!r}",
        )


def _validate_dicom_node(section: Any) -> None:
    _require(isinstance(section, Mapping), f"metadata['dicom_node'] must be an object, got {section!r}")
    kind = section.get("kind")
    _require(kind in BUNDLE_KINDS, f"dicom_node.kind must be one of {BUNDLE_KINDS}, got {kind!r}")
    inp = section.get("input")
    _require(isinstance(inp, Mapping), f"dicom_node.input must be an object, got {inp!r}")
    _require(isinstance(inp.get("modality"), str), f"dicom_node.input.modality must be a string, got {inp.get('modality')!r}")
    spacing = inp.get("spacing_mm")
    _require(
        isinstance(spacing, Sequence) and len(spacing) == 3 and all(float(v) > 0 for v in spacing),
        f"dicom_node.input.spacing_mm must be three positive numbers [x, y, z], got {spacing!r}",
    )
    window = inp.get("intensity_window_hu")
    _require(
        isinstance(window, Sequence) and len(window) == 2 and float(window[0]) < float(window[1]),
        f"dicom_node.input.intensity_window_hu must be [lo, hi] with lo < hi, got {window!r}",
    )
    labels = section.get("labels")
    _require(isinstance(labels, Sequence) and len(labels) > 0, f"dicom_node.labels must be a non-empty list, got {labels!r}")
    seen: set[int] = set()
    for i, entry in enumerate(labels):
        where = f"dicom_node.labels[{i}]"
        _require(isinstance(entry, Mapping), f"{where} must be an object, got {entry!r}")
        value = entry.get("value")
        _require(isinstance(value, int) and 1 <= value <= 255, f"{where}.value must be an int 1..255, got {value!r}")
        _require(value not in seen, f"{where}.value {value} is given twice")
        seen.add(value)
        _require(isinstance(entry.get("name"), str) and entry["name"], f"{where}.name must be a non-empty string")
        _validate_code(f"{where}.code", entry.get("code"))
        _validate_code(f"{where}.category", entry.get("category"))
        colour = entry.get("color_rgb")
        _require(
            isinstance(colour, Sequence) and len(colour) == 3 and all(0 <= int(c) <= 255 for c in colour),
            f"{where}.color_rgb must be three 0..255 values, got {colour!r}",
        )
    _require(
        isinstance(section.get("evaluation", {}), Mapping),
        f"dicom_node.evaluation must be an object, got {section.get('evaluation')!r}",
    )


def validate_metadata(metadata: Mapping[str, Any]) -> None:
    """Raise ValueError, naming the field, if ``metadata`` lacks what the node and MONAI need."""
    for key in ("version", "monai_version", "pytorch_version", "numpy_version", "task", "description",
                "authors", "copyright", "network_data_format"):
        _require(key in metadata, f"bundle metadata lacks {key!r}")
    ndf = metadata["network_data_format"]
    _require(
        isinstance(ndf, Mapping) and isinstance(ndf.get("inputs"), Mapping) and isinstance(ndf.get("outputs"), Mapping),
        "metadata['network_data_format'] must have 'inputs' and 'outputs' objects",
    )
    _require("image" in ndf["inputs"], "metadata['network_data_format']['inputs'] lacks 'image'")
    for name, spec in {**ndf["inputs"], **ndf["outputs"]}.items():
        for key in ("type", "format", "num_channels", "spatial_shape", "dtype", "value_range", "is_patch_data",
                    "channel_def"):
            _require(key in spec, f"network_data_format entry {name!r} lacks {key!r}")
    _require("dicom_node" in metadata, "bundle metadata lacks the 'dicom_node' section")
    _validate_dicom_node(metadata["dicom_node"])


def _complete_metadata(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """Fill the MONAI bookkeeping fields (versions, schema) that the caller need not know."""
    meta = copy.deepcopy(dict(metadata))
    meta.setdefault("schema", METADATA_SCHEMA_URL)
    meta.setdefault("version", "0.1.0")
    meta.setdefault("changelog", {meta["version"]: "trained and exported by training/"})
    meta.setdefault("monai_version", _package_version("monai") or "unknown")
    meta.setdefault("pytorch_version", torch.__version__.split("+")[0])
    meta.setdefault("numpy_version", np.__version__)
    meta.setdefault("required_packages_version", _versions(_REQUIRED_PACKAGES))
    meta.setdefault("optional_packages_version", _versions(_OPTIONAL_PACKAGES))
    meta.setdefault("authors", "dicom-node contributors")
    meta.setdefault("copyright", "Copyright (c) dicom-node contributors")
    meta.setdefault("license", "Apache-2.0")
    meta.setdefault("data_type", "nibabel")
    meta.setdefault(
        "intended_use",
        "Research and integration testing of the DICOM AI node; trained on synthetic phantoms, "
        "not for diagnostic use.",
    )
    meta.setdefault("training_environment", {"python": platform.python_version(), "platform": platform.platform()})
    return meta


def _export_torchscript(
    network: torch.nn.Module, example_input: torch.Tensor | None
) -> tuple[torch.jit.ScriptModule | None, str]:
    """Script the network, else trace it on ``example_input``; (module, how) or (None, why not)."""
    with warnings.catch_warnings():
        # torch.jit is deprecated in recent PyTorch, but model.ts is what MONAI bundles ship.
        warnings.filterwarnings("ignore", category=DeprecationWarning, message=r".*torch\.jit")
        return _script_or_trace(network, example_input)


def _script_or_trace(
    network: torch.nn.Module, example_input: torch.Tensor | None
) -> tuple[torch.jit.ScriptModule | None, str]:
    reasons = []
    try:
        scripted = torch.jit.script(network)
        method = "script"
    except Exception as exc:  # noqa: BLE001 - any scripting failure means: try tracing
        reasons.append(f"torch.jit.script failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
        scripted = None
    if scripted is None:
        if example_input is None:
            reasons.append("torch.jit.trace needs example_input, none was given")
            return None, "; ".join(reasons)
        try:
            with torch.no_grad():
                scripted = torch.jit.trace(network, example_input.to("cpu"), check_trace=False)
            method = "trace"
        except Exception as exc:  # noqa: BLE001 - reported as the reason no .ts was written
            reasons.append(f"torch.jit.trace failed: {type(exc).__name__}: {exc}")
            return None, "; ".join(reasons)
    if example_input is not None:
        with torch.no_grad():
            expected = network(example_input)
            got = scripted(example_input)
        if isinstance(expected, torch.Tensor) and isinstance(got, torch.Tensor):
            if expected.shape != got.shape or not torch.allclose(expected, got, rtol=1e-4, atol=1e-5):
                diff = (expected - got).abs().max().item() if expected.shape == got.shape else float("nan")
                return None, f"TorchScript ({method}) output differs from the network's (max |diff| {diff:.3g})"
    return scripted, method


#: Starts the hand-written part of a model card: everything from it on survives a regenerated card.
HAND_WRITTEN_MARKER = "<!-- The part above is written by training/bundle.py"


def write_model_card(bundle_dir: Path, meta: Mapping[str, Any], inference: Mapping[str, Any], ts_note: str) -> None:
    """Write ``docs/README.md`` from the metadata, keeping its hand-written part (from :data:`HAND_WRITTEN_MARKER`).

    The generated part follows the metadata (labels, figures, files); the history,
    limits and experiments of a model are written by hand below it and must not be
    lost when a retrained model or a new held-out figure regenerates the card.
    """
    card = bundle_dir / "docs" / "README.md"
    card.parent.mkdir(parents=True, exist_ok=True)
    kept = ""
    if card.is_file():
        old = card.read_text()
        if HAND_WRITTEN_MARKER in old:
            kept = "\n" + old[old.index(HAND_WRITTEN_MARKER):]
    card.write_text(_readme(meta, inference, ts_note) + kept)


def _readme(meta: Mapping[str, Any], inference: Mapping[str, Any], ts_note: str) -> str:
    node = meta.get("dicom_node", {})
    inp = node.get("input", {})
    lines = [
        f"# {meta.get('name', 'dicom-node model')}",
        "",
        str(meta.get("description", "")),
        "",
        f"* Task: {meta.get('task', '')}",
        f"* Kind: {node.get('kind', '')}",
        f"* Version: {meta.get('version', '')}; MONAI {meta.get('monai_version', '')}, "
        f"PyTorch {meta.get('pytorch_version', '')}",
        f"* Intended use: {meta.get('intended_use', '')}",
        "",
        "## Input",
        "",
        f"{inp.get('modality', 'CT')} volume in Hounsfield units, resampled to "
        f"{inp.get('spacing_mm')} mm (x, y, z after RAS reorientation), intensities "
        f"{inp.get('intensity_window_hu')} HU scaled to 0..1 and clipped.",
        "",
    ]
    if node.get("labels"):
        lines += ["## Labels", "", "| value | name | SNOMED CT | meaning | category | colour |", "|---|---|---|---|---|---|"]
        for entry in node["labels"]:
            code = entry["code"]
            lines.append(
                f"| {entry['value']} | {entry['name']} | {code['scheme']} {code['value']} | {code['meaning']} "
                f"| {entry['category']['meaning']} | {tuple(entry['color_rgb'])} |"
            )
        lines.append("")
    evaluation = node.get("evaluation") or {}
    if evaluation:
        lines += ["## Evaluation", "", "```json", json.dumps(evaluation, indent=2, sort_keys=True), "```", ""]
    network_def = inference.get("network_def", {})
    lines += [
        "## Files",
        "",
        "* `configs/metadata.json` - MONAI bundle metadata, with the node's `dicom_node` section.",
        "* `configs/inference.json` - MONAI inference config "
        f"(network `{network_def.get('_target_', '?')}`).",
        "* `models/model.pt` - the network's state_dict.",
        f"* `models/model.ts` - TorchScript ({ts_note}).",
        "",
        "## Run with MONAI (outside the node)",
        "",
        "```sh",
        "python -m monai.bundle run --config_file BUNDLE/configs/inference.json \\",
        "    --meta_file BUNDLE/configs/metadata.json --bundle_root BUNDLE \\",
        "    --datalist \"['/path/to/ct.nii.gz']\" --output_dir OUT",
        "```",
        "",
        "Needs `monai`, `nibabel`, `pytorch-ignite` and `fire` (for the command line).",
        "",
    ]
    return "\n".join(lines)


def target_name(cls: type) -> str:
    """The ``_target_`` that builds ``cls`` in a bundle config: its import path, e.g.
    ``workers.models.postprocessing.DropSmallComponentsd``.

    Why: an exported bundle must name the class where serving imports it from
    (``workers.models``), whichever module of this package the exporter imported it from.
    """
    return f"{cls.__module__}.{cls.__qualname__}"


def moved_targets() -> dict[str, str]:
    """``{old _target_: current _target_}`` of the classes that moved from this package to ``workers.models``.

    Bundles exported before the move name the old paths; thin re-exports in the
    old modules keep those loading where this package is installed, and
    :func:`with_current_targets` renames them whenever this package reads a base
    bundle or writes one.
    """
    return {
        "training.detection.CenterNetDetector": target_name(CenterNetDetector),
        "training.networks.AnatomyWithNoduleBranch": target_name(AnatomyWithNoduleBranch),
        "training.nodule_candidates.SmallNoduleStage": target_name(SmallNoduleStage),
        "training.postprocessing.DropSmallComponentsd": target_name(DropSmallComponentsd),
    }


def with_current_targets(config: Any) -> Any:
    """A deep copy of a bundle config (or any part of one) whose ``_target_`` s of :func:`moved_targets` name
    the classes' current homes.

    Why: a bundle exported from an older base (a trainer that adds a stage to a
    shipped model) must still name ``workers.models`` targets, so that serving
    never needs this package, and steps are found by their current names.
    """
    moved = moved_targets()
    if isinstance(config, Mapping):
        return {key: (moved.get(value, value) if key == "_target_" and isinstance(value, str)
                      else with_current_targets(value)) for key, value in config.items()}
    if isinstance(config, list):
        return [with_current_targets(value) for value in config]
    return copy.deepcopy(config)


def write_bundle(
    out_dir: str | Path,
    *,
    network: torch.nn.Module,
    network_def: dict[str, Any],
    inference_config: dict[str, Any],
    metadata: dict[str, Any],
    example_input: torch.Tensor | None = None,
) -> Path:
    """Write a MONAI bundle for ``network`` to ``out_dir`` and return the bundle's path.

    ``network_def`` is the MONAI config that rebuilds the network (``{"_target_":
    "SegResNet", ...}``); it replaces any ``network_def`` in ``inference_config``. Targets
    of classes that moved to ``workers.models`` are written with their current names
    (:func:`with_current_targets`).
    ``metadata`` must hold ``task``, ``description``, ``network_data_format`` and the
    ``dicom_node`` section (see :func:`dicom_node_section`); versions and the
    schema are filled in. The state_dict goes to ``models/model.pt``; TorchScript
    to ``models/model.ts`` by ``torch.jit.script``, else ``torch.jit.trace`` on
    ``example_input`` (skipped with a logged reason if neither works or if the
    result's output differs from the network's on ``example_input``).
    """
    out = Path(out_dir)
    meta = _complete_metadata(metadata)
    validate_metadata(meta)
    inference = with_current_targets(inference_config)
    inference["network_def"] = with_current_targets(network_def)

    for sub in ("configs", "models", "docs"):
        (out / sub).mkdir(parents=True, exist_ok=True)

    net = copy.deepcopy(network).to("cpu").eval()
    example = example_input.detach().to("cpu", torch.float32) if example_input is not None else None
    scripted, how = _export_torchscript(net, example)
    ts_path = out / "models" / "model.ts"
    if scripted is None:
        logger.warning("bundle %s: no TorchScript model written: %s", out, how)
        ts_path.unlink(missing_ok=True)
        meta["dicom_node"]["torchscript"] = {"written": False, "reason": how}
        ts_note = f"not written: {how}"
    else:
        meta["dicom_node"]["torchscript"] = {"written": True, "method": how}
        ts_note = f"torch.jit.{how}"

    torch.save({k: v.detach().cpu() for k, v in net.state_dict().items()}, out / "models" / "model.pt")
    if scripted is not None:
        from monai.data import save_net_with_metadata

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=DeprecationWarning, message=r".*torch\.jit")
            save_net_with_metadata(
                scripted,
                str(ts_path),
                include_config_vals=False,
                append_timestamp=False,
                meta_values=meta,
                more_extra_files={"inference.json": json.dumps(inference).encode()},
            )

    (out / "configs" / "metadata.json").write_text(json.dumps(meta, indent=4) + "\n")
    (out / "configs" / "inference.json").write_text(json.dumps(inference, indent=4) + "\n")
    write_model_card(out, meta, inference, ts_note)
    logger.info("wrote bundle %s (TorchScript: %s)", out, ts_note)
    return out


def read_bundle_metadata(bundle_dir: str | Path) -> dict[str, Any]:
    """The bundle's ``configs/metadata.json`` as a dict (FileNotFoundError / ValueError if unusable).

    Bundles from elsewhere (the Model Zoo) have no ``dicom_node`` section; that is
    not an error here, only a malformed one is.
    """
    path = Path(bundle_dir) / "configs" / "metadata.json"
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(meta, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(meta).__name__}")
    if "dicom_node" in meta:
        _validate_dicom_node(meta["dicom_node"])
    return meta


def record_evaluation(bundle_dir: str | Path, name: str, figures: Mapping[str, Any]) -> dict[str, Any]:
    """Store ``figures`` as ``dicom_node.evaluation[name]`` in the bundle's metadata; return the metadata.

    Used to add held-out figures after training (``name="held_out"``); those also
    become the Model Zoo field ``eval_metrics`` when they have a ``mean_dice`` or a
    ``cpm``. ``docs/README.md`` is rewritten to match. ``models/model.ts`` keeps the
    metadata it was written with.
    """
    bundle = Path(bundle_dir)
    meta = read_bundle_metadata(bundle)
    if "dicom_node" not in meta:
        raise ValueError(f"{bundle} has no dicom_node section to record an evaluation in")
    meta["dicom_node"].setdefault("evaluation", {})[name] = json.loads(json.dumps(dict(figures)))
    if name == "held_out":
        for key in ("mean_dice", "cpm"):
            if figures.get(key) is not None:
                meta.setdefault("eval_metrics", {})[key] = figures[key]
    (bundle / "configs" / "metadata.json").write_text(json.dumps(meta, indent=4) + "\n")
    inference = json.loads((bundle / "configs" / "inference.json").read_text())
    ts = meta["dicom_node"].get("torchscript", {})
    ts_note = f"torch.jit.{ts.get('method')}" if ts.get("written") else f"not written: {ts.get('reason', '?')}"
    write_model_card(bundle, meta, inference, ts_note)
    return meta
