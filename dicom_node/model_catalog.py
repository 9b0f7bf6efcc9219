"""The model catalog: which models the node serves (``config/models.yaml``) and what their bundles say, from files only.

Why in the shared lower layer: the workers turn a registry entry into a running
network, but the admin pages, the REST API and ``dicom-node models`` also need the
entries and what each bundle's ``configs/metadata.json`` says (labels, input,
evaluation figures). Both sides read them here, so there is one parser and one
set of validation rules, and the node's web process never imports the workers'
code (nor torch or MONAI). Nothing here builds a network or reads weights.

Registry file format (see ``config/models.yaml``)::

    models:
      - id: chest-ct-segmentation          # what routing rules name
        kind: segmentation                 # segmentation | detection
        format: monai_bundle               # monai_bundle | torchscript
        path: package://workers/bundles/chest_ct_segmentation
        version: "0.1.0"                   # must match the bundle metadata's version
        name: Chest CT segmentation        # optional: algorithm name in SEG/SR (default: metadata name)
        manufacturer: Example Hospital AI  # optional: who made the model (default: the node's manufacturer)
        device_uid: "1.2.3.4.5"            # optional: the model version's Device UID (default: from its weights)
        labels:                            # optional for bundles with a dicom_node section
          - {value: 1, name: spleen, bundle_value: 1,
             code: {value: "78961009", scheme: SCT, meaning: Spleen},
             category: {value: "123037004", scheme: SCT, meaning: Anatomical Structure},
             color_rgb: [157, 108, 162]}
        overrides: {}                      # optional: MONAI config ids (bundles), DetectorConfig fields (detectors)
        preprocessing: {...}               # torchscript only: TorchScriptPreprocessing

The file is validated as a whole when it is read (unknown keys, missing fields and
contradictions are errors that name the file, the entry and the field) and paths
are resolved then. Without a file (``routing.models_file`` unset) the node serves
the two demo models shipped in ``workers/bundles`` (:meth:`ModelCatalog.demo`, the
same entries as ``config/models.yaml``).

Paths: absolute; ``package://PACKAGE/sub/path`` (inside an installed Python
package, e.g. the demo bundles shipped in ``workers/bundles``; found without
importing the package); or relative to the catalog's ``base_dir`` (by default the
folder of the YAML file).
"""

from __future__ import annotations

import importlib.util
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Self

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from dicom_node.contracts import UID_PATTERN, AlgorithmInfo, CodedConcept, SegmentLabel
from dicom_node.model_domain import InputDomain, NumberRange
from dicom_node.palette import label_colour
from dicom_node.plausibility_rules import PlausibilityRules

__all__ = [
    "PACKAGE_SCHEME",
    "RESULT_SERIES_OFFSETS",
    "BundleError",
    "BundleLabel",
    "ModelCatalog",
    "ModelEntry",
    "ModelFormat",
    "ModelKind",
    "ModelRegistryError",
    "NnUNetOptions",
    "TorchScriptPreprocessing",
    "UnknownModel",
    "algorithm_info",
    "bundle_version",
    "declared_modality",
    "demo_entries",
    "derived_device_uid",
    "label_mapping",
    "metadata_labels",
    "output_channel_def",
    "read_bundle_json",
    "read_json_object",
    "resolve_model_path",
]

logger = logging.getLogger(__name__)

#: What a model gives: a label map, or findings in patient coordinates.
ModelKind = Literal["segmentation", "detection", "classification"]
#: monai_bundle: a MONAI bundle folder; torchscript: one .ts file; onnx: one .onnx file (ONNX Runtime);
#: nnunet: an nnU-Net v2 trained-model folder (dataset.json, plans.json, fold_*/checkpoint_*.pth).
ModelFormat = Literal["monai_bundle", "torchscript", "onnx", "nnunet"]
#: Series number of each kind of result, added to a model's base number (see ModelCatalog.result_series).
RESULT_SERIES_OFFSETS = {"SEG": 1, "SR": 2, "GSPS": 3, "PMAP": 4, "SC": 5, "KO": 8, "NOTICE": 9}
#: Prefix of paths inside an installed Python package.
PACKAGE_SCHEME = "package://"

class BundleError(ValueError):
    """A bundle that cannot be served, or a result it cannot give; the message names the bundle and the cause."""


class ModelRegistryError(ValueError):
    """A registry file, entry or path that cannot be used; the message names the file, entry and field."""


class UnknownModel(LookupError):
    """A model id that the registry does not list."""


# --------------------------------------------------------------------------- labels


class BundleLabel(BaseModel):
    """One label as ``dicom_node.labels`` in bundle metadata and ``labels`` in ``config/models.yaml`` write it.

    ``value`` is the value in the node's label map (and the SEG segment it becomes);
    ``bundle_value`` the value the model outputs for it (default: ``value``): a
    label-map value for a segmentation model, a class index for a detector.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    value: int = Field(ge=1, le=255)
    name: str = Field(min_length=1)
    code: CodedConcept
    category: CodedConcept
    #: Display colour; None (or a grey): the palette's colour for ``value`` (:mod:`dicom_node.palette`).
    color_rgb: tuple[int, int, int] | None = None
    bundle_value: int | None = Field(default=None, ge=0)

    @property
    def display_rgb(self) -> tuple[int, int, int]:
        """The colour every output shows this label in: ``color_rgb``, else (or when grey) the palette's."""
        return label_colour(self.value, self.color_rgb)

    def segment_label(self) -> SegmentLabel:
        """The shared contract type of this label, its colour settled (:attr:`display_rgb`)."""
        return SegmentLabel(
            value=self.value,
            name=self.name,
            property_category=self.category,
            property_type=self.code,
            color_rgb=self.display_rgb,
        )


def label_mapping(entries: Sequence[BundleLabel], where: str) -> dict[int, SegmentLabel]:
    """``{bundle value: SegmentLabel}`` of label entries; ``where`` names their source in errors.

    Raises :class:`BundleError` when two entries share a ``value`` or a ``bundle_value``.
    """
    mapping: dict[int, SegmentLabel] = {}
    values: set[int] = set()
    for i, entry in enumerate(entries):
        source = entry.value if entry.bundle_value is None else entry.bundle_value
        if source in mapping:
            raise BundleError(f"{where}: labels[{i}] ({entry.name!r}) maps bundle value {source} a second time")
        if entry.value in values:
            raise BundleError(f"{where}: labels[{i}] ({entry.name!r}) uses label value {entry.value} a second time")
        values.add(entry.value)
        mapping[source] = entry.segment_label()
    return mapping


# --------------------------------------------------------------------------- bundle metadata


def read_bundle_json(bundle_dir: Path, name: str) -> dict[str, Any]:
    """``configs/<name>`` of a bundle as a dict (BundleError when missing or not a JSON object)."""
    return read_json_object(bundle_dir / "configs" / name, f"bundle {bundle_dir}: no configs/{name}")


def read_json_object(path: Path, missing: str) -> dict[str, Any]:
    """The JSON object in the model file ``path``; BundleError saying ``missing`` when there is no such file,
    naming the path when it is not JSON or not an object."""
    try:
        content = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise BundleError(missing) from exc
    except json.JSONDecodeError as exc:
        raise BundleError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(content, dict):
        raise BundleError(f"{path} must hold a JSON object, got {type(content).__name__}")
    return content


def bundle_version(bundle_dir: Path) -> str | None:
    """The ``version`` of a bundle's ``configs/metadata.json`` (None when it gives none)."""
    version = read_bundle_json(bundle_dir, "metadata.json").get("version")
    return None if version is None else str(version)


def metadata_labels(meta: Mapping[str, Any], where: str) -> list[BundleLabel] | None:
    """The ``dicom_node.labels`` of bundle metadata as entries, or None when there are none."""
    entries = (meta.get("dicom_node") or {}).get("labels")
    if not entries:
        return None
    try:
        return [BundleLabel.model_validate(entry) for entry in entries]
    except ValidationError as exc:
        raise BundleError(f"{where}: dicom_node.labels is invalid: {exc}") from exc


def algorithm_info(meta: Mapping[str, Any], bundle_dir: Path, model_id: str | None, name: str | None,
                   version: str | None) -> AlgorithmInfo:
    """Name, version and registry id of a bundle's model; explicit values win over the metadata's."""
    return AlgorithmInfo(
        name=(name or str(meta.get("name") or bundle_dir.name))[:64],
        version=str(version or meta.get("version") or "unknown")[:64],
        model_id=model_id or bundle_dir.name,
    )


def derived_device_uid(model_id: str, version: str) -> str:
    """A Device UID made from a model's registry id and version: the same version always gets the same UID."""
    from pydicom.uid import generate_uid

    return str(generate_uid(entropy_srcs=["dicom-ai-node model", model_id, version]))


def declared_modality(meta: Mapping[str, Any]) -> str | None:
    """The input modality the bundle declares (dicom_node section first, then network_data_format)."""
    node_modality = ((meta.get("dicom_node") or {}).get("input") or {}).get("modality")
    if node_modality:
        return str(node_modality)
    image = ((meta.get("network_data_format") or {}).get("inputs") or {}).get("image") or {}
    modality = image.get("modality")
    return str(modality) if modality else None


def output_channel_def(meta: Mapping[str, Any]) -> dict[int, str] | None:
    """``{value: name}`` of the bundle's ``pred`` output (``network_data_format``), or None if not declared."""
    pred = ((meta.get("network_data_format") or {}).get("outputs") or {}).get("pred") or {}
    channel_def = pred.get("channel_def")
    if not isinstance(channel_def, Mapping) or not channel_def:
        return None
    return {int(k): str(v) for k, v in channel_def.items()}


# --------------------------------------------------------------------------- registry entries


class TorchScriptPreprocessing(BaseModel):
    """What a TorchScript segmentation network expects, as ``preprocessing`` in ``config/models.yaml``.

    ``spacing_mm``: voxel spacing (x, y, z after RAS reorientation, mm) the
    network was trained at. ``window_hu``: HU range scaled to 0..1 (clipped).
    ``roi_size``: sliding-window size (x, y, z voxels); ``sw_batch_size``,
    ``overlap``, ``padding_mode`` as MONAI's ``SlidingWindowInferer`` takes them.
    The network outputs one channel per label value (channel i = value i,
    softmax + argmax).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    spacing_mm: tuple[float, float, float]
    window_hu: tuple[float, float]
    roi_size: tuple[int, int, int]
    sw_batch_size: int = Field(default=1, ge=1)
    overlap: float = Field(default=0.25, ge=0.0, lt=1.0)
    padding_mode: Literal["constant", "replicate", "reflect", "circular"] = "constant"

    @field_validator("spacing_mm")
    @classmethod
    def _positive_spacing(cls, value: tuple[float, float, float]) -> tuple[float, float, float]:
        if any(not v > 0 for v in value):
            raise ValueError(f"spacing_mm must be three positive values (x, y, z mm), got {value}")
        return value

    @field_validator("window_hu")
    @classmethod
    def _ordered_window(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not value[0] < value[1]:
            raise ValueError(f"window_hu must be [low, high] with low < high, got {list(value)}")
        return value

    @field_validator("roi_size")
    @classmethod
    def _positive_roi(cls, value: tuple[int, int, int]) -> tuple[int, int, int]:
        if any(v < 1 for v in value):
            raise ValueError(f"roi_size must be three positive voxel counts (x, y, z), got {value}")
        return value


class NnUNetOptions(BaseModel):
    """How to run an nnU-Net v2 trained-model folder (``nnunet`` in a registry entry of format nnunet).

    ``configuration``: the folder's configuration to use (``3d_fullres``, ``3d_lowres``, ``2d``,
    ...; a cascade's ``3d_cascade_fullres`` needs its ``3d_lowres`` beside it); ``folds``: the
    folds to ensemble (``all`` is nnU-Net's fold trained on every case); ``checkpoint``: the file
    name in each fold folder; ``use_mirroring`` and ``tile_step_size`` as nnU-Net's predictor
    takes them.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    configuration: str = Field(default="3d_fullres", min_length=1)
    folds: tuple[int | Literal["all"], ...] = (0,)
    checkpoint: str = Field(default="checkpoint_final.pth", min_length=1)
    use_mirroring: bool = True
    tile_step_size: float = Field(default=0.5, gt=0.0, le=1.0)


class ModelEntry(BaseModel):
    """One model of ``config/models.yaml`` (see the module docstring for the fields)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", max_length=64)
    kind: ModelKind
    format: ModelFormat
    path: str = Field(min_length=1)
    version: str = Field(min_length=1, max_length=64)
    name: str | None = Field(default=None, min_length=1, max_length=64)
    #: Who made the model (Manufacturer of the results' Contributing Equipment item); None: the node's.
    manufacturer: str | None = Field(default=None, min_length=1, max_length=64)
    #: Device UID of this model version in every result's Contributing Equipment; None: derived from the weights
    #: (:meth:`ModelCatalog.device_uid`). Give a new one with every new version.
    device_uid: str | None = Field(default=None, max_length=64, pattern=UID_PATTERN)
    labels: tuple[BundleLabel, ...] | None = None
    overrides: dict[str, Any] = Field(default_factory=dict)
    preprocessing: TorchScriptPreprocessing | None = None
    nnunet: NnUNetOptions | None = None
    input_domain: InputDomain | None = None
    plausibility: PlausibilityRules | None = None
    title: str | None = Field(default=None, min_length=1, max_length=40)
    series_number: int | None = Field(default=None, ge=1, le=2**31 - 100)
    #: Seconds one job of this model is expected to take here, until the node has learned it from finished jobs
    #: (the order in which workers take queued jobs: :mod:`dicom_node.db.job_scheduling`).
    expected_seconds: float | None = Field(default=None, gt=0, le=86_400)
    #: Detections scoring under this (0..1) are reported in the SR as low-confidence but not outlined in the GSPS
    #: and the overlay series, unless a destination asks (``outline_low_confidence``); None: all outlined.
    display_threshold: float | None = Field(default=None, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _consistent(self) -> ModelEntry:
        if self.format in ("torchscript", "onnx"):
            if self.kind == "detection":
                raise ValueError(f"format {self.format} serves segmentation and classification models; "
                                 "use a bundle for detection")
            if self.preprocessing is None:
                raise ValueError(f"format {self.format} needs 'preprocessing' (spacing_mm, window_hu, roi_size)")
            if not self.labels:
                raise ValueError(f"format {self.format} needs 'labels' (the file carries none)")
            if self.overrides:
                raise ValueError(f"'overrides' apply to bundles; a {self.format} entry takes 'preprocessing'")
        elif self.preprocessing is not None:
            raise ValueError("'preprocessing' is for torchscript and onnx entries; bundles and nnU-Net folders "
                             "bring their own")
        if self.format == "nnunet":
            if self.kind != "segmentation":
                raise ValueError("format nnunet serves segmentation models")
            if not self.labels:
                raise ValueError("format nnunet needs 'labels': the coded concept of each label of its dataset.json "
                                 "(bundle_value: the label's value there)")
        elif self.nnunet is not None:
            raise ValueError("'nnunet' options are for entries of format nnunet")
        if self.display_threshold is not None and self.kind != "detection":
            raise ValueError(f"'display_threshold' ({self.display_threshold}) applies to detection models, "
                             f"not to a {self.kind} model")
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


def _package_root(package: str, inside: str, path: str) -> Path:
    """The folder of an installed package, found by its import spec (the package is not imported)."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError) as exc:
        raise ModelRegistryError(f"path {path!r}: package {package!r} is not installed") from exc
    if spec is None:
        raise ModelRegistryError(f"path {path!r}: package {package!r} is not installed")
    locations = list(spec.submodule_search_locations or [])
    if not locations:
        raise ModelRegistryError(f"path {path!r}: {package!r} is a module, not a package")
    # A namespace package spans several folders: the one that holds the path.
    return next((Path(folder) for folder in locations if (Path(folder) / inside).exists()), Path(locations[0]))


def resolve_model_path(path: str, base_dir: Path) -> Path:
    """The filesystem path of an entry's ``path`` (absolute, ``package://...`` or relative to ``base_dir``)."""
    if path.startswith(PACKAGE_SCHEME):
        package, _, inside = path[len(PACKAGE_SCHEME):].partition("/")
        if not package or not inside:
            raise ModelRegistryError(f"path {path!r} must be {PACKAGE_SCHEME}PACKAGE/sub/path")
        return _package_root(package, inside, path) / inside
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


def demo_entries() -> tuple[ModelEntry, ...]:
    """The demo models shipped in ``workers/bundles``; ``config/models.yaml`` lists the same entries."""
    return (
        ModelEntry(id="chest-ct-segmentation", kind="segmentation", format="monai_bundle",
                   path=f"{PACKAGE_SCHEME}workers/bundles/chest_ct_segmentation", version="0.1.0",
                   title="AI chest anatomy", expected_seconds=40, input_domain=DEMO_CHEST_CT,
                   plausibility=DEMO_SEGMENTATION_PLAUSIBILITY),
        ModelEntry(id="lung-nodule-detection", kind="detection", format="monai_bundle",
                   path=f"{PACKAGE_SCHEME}workers/bundles/lung_nodule_detection", version="0.1.0",
                   title="AI lung nodules", expected_seconds=6, input_domain=DEMO_CHEST_CT,
                   plausibility=DEMO_DETECTION_PLAUSIBILITY, display_threshold=DEMO_DETECTION_DISPLAY_THRESHOLD),
    )


def _check_series_blocks(entries: Sequence[ModelEntry], source: str) -> None:
    """Two models whose blocks of ten result series numbers overlap would share series: refuse."""
    bases = [(entry.series_number if entry.series_number is not None else 9000 + 10 * (i + 1), entry.id)
             for i, entry in enumerate(entries)]
    bases.sort()
    for (low, first), (high, second) in zip(bases, bases[1:]):
        if high - low < 10:
            raise ModelRegistryError(
                f"{source}: models {first!r} and {second!r} have result series numbers {low} and {high}: each model "
                "needs a block of ten (series_number 9010, 9020, ...)")


#: What the demo models were made for: axial chest CT. Not complete coverage: the phantoms they were
#: trained and are shown on cut the lungs at the first and last slice (a hospital's lung model would ask it).
DEMO_CHEST_CT = InputDomain(
    modalities=("CT",), body_regions=("chest",), complete_coverage=False, slices=NumberRange(min=10),
    pixel_spacing_mm=NumberRange(min=0.3, max=3.0), slice_spacing_mm=NumberRange(min=0.3, max=6.0),
    orientations=("axial",),
)


#: The demo segmentation's results must pass these: lungs and heart of a human size, inside the body, the
#: heart between the lungs, nodules in the lungs, and not too unsure of itself (out-of-distribution signal).
#: Lung gets 5 % outside the body: the network's body label is a few voxels thick at the skin, so a thin band
#: of lung just outside it survives the bundle's keep-inside-body step (at most 1.4 % on six phantoms).
DEMO_SEGMENTATION_PLAUSIBILITY = PlausibilityRules.model_validate({
    "volumes_ml": {"lung": {"min": 1000, "max": 9000}, "heart": {"min": 100, "max": 1500}, "nodule": {"max": 500}},
    "inside_body": ["lung", "heart", "nodule"],
    "outside_fraction_by_label": {"lung": 0.05},
    "adjacent": {"heart": [{"label": "lung", "sides": "both"}], "nodule": ["lung"]},
    "max_low_confidence_fraction": 0.1,
})
#: The demo detector's findings must lie in the lungs.
DEMO_DETECTION_PLAUSIBILITY = PlausibilityRules(findings_inside="lungs", findings_margin_mm=5.0)
#: The demo detector's display threshold: on its 32 held-out phantoms (bundle metadata, ``evaluation.held_out``)
#: scores of 0.34 and more give 0.125 false positives per scan (0.29: 0.5; it reports from 0.3 up), at a
#: sensitivity of 0.87 for nodules of 6 mm and more (0.89 at 0.29) - so the outlines are nearly all real, and the
#: findings between 0.3 and 0.34 are still in the SR, marked low-confidence.
DEMO_DETECTION_DISPLAY_THRESHOLD = 0.34


class ModelCatalog:
    """The models of a registry, by id, with their resolved paths; nothing is loaded.

    ``entries``: validated entries (unique ids); ``base_dir``: where relative
    paths start; ``source``: names the registry in errors (usually its file).
    The workers' :class:`workers.models.registry.ModelRegistry` adds loading.
    """

    def __init__(self, entries: Sequence[ModelEntry], base_dir: Path, source: str = "model registry") -> None:
        ids = [entry.id for entry in entries]
        duplicates = sorted({i for i in ids if ids.count(i) > 1})
        if duplicates:
            raise ModelRegistryError(f"{source}: model ids {duplicates} are listed more than once")
        self.source = source
        self.base_dir = Path(base_dir)
        self._entries = {entry.id: entry for entry in entries}
        _check_series_blocks(entries, source)
        self._paths: dict[str, Path] = {}
        for index, entry in enumerate(entries):
            try:
                self._paths[entry.id] = resolve_model_path(entry.path, self.base_dir)
            except ModelRegistryError as exc:
                raise ModelRegistryError(f"{source}: models[{index}] (id {entry.id!r}): path: {exc}") from exc

    @classmethod
    def from_file(cls, path: Path, base_dir: Path | None = None) -> Self:
        """Read and validate a registry file (``config/models.yaml``).

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
        return cls(parsed.models, base_dir if base_dir is not None else path.parent, source=str(path))

    @classmethod
    def demo(cls) -> Self:
        """The demo models (:func:`demo_entries`): what a node without a models file serves."""
        return cls(demo_entries(), base_dir=Path(__file__).resolve().parent, source="built-in demo models")

    @classmethod
    def configured(cls, models_file: Path | None) -> Self:
        """The registry a node's settings name (``routing.models_file``), or the demo models when none."""
        return cls.demo() if models_file is None else cls.from_file(models_file)

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

    def device_uid(self, model_id: str, *, derive: bool = False) -> str:
        """The Device UID of ``model_id``: its entry's ``device_uid`` when given, else derived from the SHA-256 of
        its weights, so the same weights give the same UID and new weights a new one (the hash is cached per file
        path, mtime and size).

        Raises :class:`dicom_node.model_files.ModelFilesError` naming a missing weight file, unless ``derive``:
        then a model without readable weight files gets :func:`derived_device_uid` of its id and version (the
        same version, the same UID).
        """
        from dicom_node.model_files import ModelFilesError, cached_weights_digest, device_uid_for_digest, weight_files

        entry = self.entry(model_id)
        if entry.device_uid is not None:
            return entry.device_uid
        path = self._paths[model_id]
        try:
            return device_uid_for_digest(cached_weights_digest(weight_files(path, entry.format, entry), path))
        except (ModelFilesError, OSError) as exc:
            if not derive:
                raise
            logger.warning("%s: model %r: Device UID from its id and version, not its weights: %s",
                           self.source, model_id, exc)
            return derived_device_uid(entry.id, entry.version)

    def identify(self, model_id: str, loaded: AlgorithmInfo | None = None) -> AlgorithmInfo:
        """``model_id`` as the equipment that made a result: ``loaded`` (what the loaded model calls itself;
        default: the entry's name, else title, else id, and version) with the registry's Device UID
        (:meth:`device_uid`, derived from id and version when the weights cannot be read) and manufacturer."""
        entry = self.entry(model_id)
        algorithm = loaded or AlgorithmInfo(name=(entry.name or entry.title or entry.id)[:64], version=entry.version,
                                            model_id=entry.id)
        return algorithm.model_copy(update={"device_uid": self.device_uid(model_id, derive=True),
                                            "manufacturer": entry.manufacturer or algorithm.manufacturer})

    def display_threshold(self, model_id: str) -> float | None:
        """The score under which ``model_id``'s detections are low-confidence (reported, not outlined by
        default; :mod:`workers.outputs.confidence`), or None when its entry sets none."""
        return self.entry(model_id).display_threshold

    def input_domain(self, model_id: str) -> InputDomain:
        """What ``model_id`` was made for: its entry's ``input_domain``, else its bundle's
        ``dicom_node.input_domain``, else only the modality the bundle declares (no region constraint).

        Raises ModelRegistryError when the bundle's declaration is invalid.
        """
        entry = self.entry(model_id)
        if entry.input_domain is not None:
            return entry.input_domain
        meta = self._metadata(model_id)
        declared = (meta.get("dicom_node") or {}).get("input_domain")
        if declared is not None:
            try:
                return InputDomain.model_validate(declared)
            except ValidationError as exc:
                raise ModelRegistryError(f"{self.source}: model {model_id!r}: the bundle's dicom_node.input_domain "
                                         f"is invalid: {exc}") from exc
        modality = declared_modality(meta)
        return InputDomain(modalities=(modality,) if modality else ())

    def plausibility(self, model_id: str) -> PlausibilityRules | None:
        """The rules ``model_id``'s results must pass before they are sent (entry, else bundle metadata
        ``dicom_node.plausibility``), or None when it declares none."""
        entry = self.entry(model_id)
        where = f"{self.source}: model {model_id!r}"
        rules = entry.plausibility
        if rules is None:
            declared = (self._metadata(model_id).get("dicom_node") or {}).get("plausibility")
            if declared is None:
                return None
            try:
                rules = PlausibilityRules.model_validate(declared)
            except ValidationError as exc:
                raise ModelRegistryError(f"{where}: the bundle's dicom_node.plausibility is invalid: {exc}") from exc
        misfits = rules.misfits(entry.kind)
        if misfits:
            raise ModelRegistryError(f"{where}: plausibility rule(s) {', '.join(misfits)} cannot judge a "
                                     f"{entry.kind} model's results")
        known = self._label_names(model_id)
        unknown = sorted(rules.label_names() - known) if known else []
        if unknown:
            raise ModelRegistryError(f"{where}: plausibility names label(s) {', '.join(map(repr, unknown))}, "
                                     f"the model's labels are {', '.join(sorted(known))}")
        return rules

    def _label_names(self, model_id: str) -> set[str]:
        """The names of the model's labels (entry, else bundle metadata); empty when unknown."""
        entry = self.entry(model_id)
        if entry.labels is not None:
            return {label.name for label in entry.labels}
        try:
            labels = metadata_labels(self._metadata(model_id), model_id) or []
        except BundleError:
            return set()
        return {label.name for label in labels}

    def check(self) -> None:
        """Read every model's declarations now (input domain, plausibility rules): a mistake is an error at
        start, naming the model and the field, instead of a held or failed job later."""
        for model_id in self.ids:
            self.input_domain(model_id)
            self.plausibility(model_id)

    def _metadata(self, model_id: str) -> dict[str, Any]:
        """A bundle's ``configs/metadata.json`` ({} for other formats or when it cannot be read)."""
        if self.entry(model_id).format != "monai_bundle":
            return {}
        try:
            return read_bundle_json(self._paths[model_id], "metadata.json")
        except BundleError as exc:
            logger.warning("%s: model %r: %s", self.source, model_id, exc)
            return {}

    def result_series(self, model_id: str, kind: str) -> tuple[int, str]:
        """Series number and description of ``model_id``'s results of ``kind`` (SEG, SR, GSPS, PMAP, SC, KO, NOTICE).

        Each model has its own block of ten series numbers (``series_number`` in its entry, else
        9000 + 10 x its position in the registry, from 1): SEG +1, SR +2, GSPS +3, the explanation
        map's Parametric Map +4 and colour overlay Secondary Captures +5, the Key Object Selection
        of the key images +8, the "AI analysis not performed" SR +9. The description names the model, the object and the version, for example
        "AI lung nodules - SR (lung-nodule-detection 0.1.0)", so two models' SRs never look alike.
        """
        entry = self.entry(model_id)
        base = entry.series_number if entry.series_number is not None else 9000 + 10 * (self.ids.index(model_id) + 1)
        what = {"NOTICE": "not performed", "KO": "key images"}.get(kind, kind)
        tail = f" - {what} ({entry.id} {entry.version})"
        title = entry.title or f"AI {entry.name or entry.id}"
        description = (title[: max(8, 64 - len(tail))] + tail)[:64]
        return base + RESULT_SERIES_OFFSETS[kind], description
