"""Medical Segmentation Decathlon / nnU-Net dataset layout (NIfTI + dataset.json).

Why: the Decathlon layout is what nnU-Net (v1 directly, v2 via
``nnUNetv2_convert_MSD_dataset``), MONAI's ``load_decathlon_datalist`` and
most public segmentation datasets use, so phantoms written this way train with
existing tools, and a site's existing Decathlon data loads into our pipeline.

Layout written by :func:`write_decathlon`::

    out_dir/
      dataset.json
      imagesTr/NAME.nii.gz   HU, int16 (or float32), (x, y, z) array
      labelsTr/NAME.nii.gz   uint8 label map (values of training.labels)
      imagesTs/NAME.nii.gz   test images (when test_fraction > 0)
      labelsTs/NAME.nii.gz   test labels - an extension for evaluation that the
                             Decathlon tools ignore

Geometry: our volumes are (z, y, x) arrays in DICOM LPS world coordinates;
NIfTI stores (x, y, z) arrays with a RAS world. The array is transposed and
the affine maps voxel (i, j, k) to RAS::

    [-sx   0   0  -ox]
    [  0 -sy   0  -oy]
    [  0   0  sz   oz]

(``origin_xyz_mm`` = (ox, oy, oz) in LPS), so ``nibabel.aff2axcodes`` gives
('L', 'P', 'S') and a voxel's RAS world position is its LPS position with x and
y negated. :func:`load_case` reorients any NIfTI to that orientation and
inverts exactly (affines are float32 in NIfTI; the shortest decimal of each
float32 value is recovered, so 2.2 mm comes back as 2.2, not 2.2000000477).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import nibabel as nib
import numpy as np
import numpy.typing as npt

from training.labels import label_names

if TYPE_CHECKING:
    from training.phantoms.chest import ChestPhantom

__all__ = [
    "DecathlonCase",
    "LoadedCase",
    "case_from_image",
    "from_nifti",
    "load_case",
    "lps_affine",
    "read_decathlon",
    "to_nifti",
    "write_dataset_json",
    "write_decathlon",
    "write_decathlon_case",
]

Vec3 = tuple[float, float, float]
Split = Literal["training", "test"]
_SUFFIX = ".nii.gz"
#: Axis codes (nibabel, RAS-based) of our array axes x, y, z: +X LPS is patient left.
LPS_AXCODES = ("L", "P", "S")


@dataclass(frozen=True)
class DecathlonCase:
    """One case of a Decathlon dataset: its name, image and (optional) label file."""

    name: str
    image: Path
    label: Path | None
    split: Split = "training"


class LoadedCase(NamedTuple):
    """A case in our conventions: (z, y, x) arrays, spacing (z, y, x) mm, LPS origin."""

    volume_hu: npt.NDArray[Any]
    labels: npt.NDArray[np.uint8] | None
    spacing_mm: Vec3
    origin_xyz_mm: Vec3


def lps_affine(spacing_mm: Sequence[float], origin_xyz_mm: Sequence[float]) -> npt.NDArray[np.float64]:
    """RAS NIfTI affine of an axial (z, y, x) LPS grid (see the module docstring)."""
    sz, sy, sx = (float(s) for s in spacing_mm)
    ox, oy, oz = (float(o) for o in origin_xyz_mm)
    return np.array(
        [[-sx, 0.0, 0.0, -ox], [0.0, -sy, 0.0, -oy], [0.0, 0.0, sz, oz], [0.0, 0.0, 0.0, 1.0]],
        dtype=np.float64,
    )


def to_nifti(
    volume_zyx: npt.NDArray[Any],
    spacing_mm: Sequence[float],
    origin_xyz_mm: Sequence[float],
) -> nib.Nifti1Image:
    """NIfTI-1 image of a (z, y, x) array on an axial LPS grid.

    The array is stored (x, y, z) in its own dtype; sform and qform both carry
    the affine with code 1 (scanner), units are mm.
    """
    affine = lps_affine(spacing_mm, origin_xyz_mm)
    data = np.ascontiguousarray(np.asarray(volume_zyx).transpose(2, 1, 0))
    img = nib.Nifti1Image(data, affine)
    img.header.set_data_dtype(data.dtype)
    img.header.set_xyzt_units("mm")
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    return img


def _f32(value: float) -> float:
    """Shortest decimal that round-trips the float32 nearest ``value``.

    NIfTI stores the affine as float32; this recovers 2.2 from 2.2000000477.
    """
    return float(np.format_float_positional(np.float32(value), unique=True, trim="0"))


def from_nifti(img: nib.spatialimages.SpatialImage) -> tuple[npt.NDArray[Any], Vec3, Vec3]:
    """(z, y, x) array, spacing (z, y, x) mm and LPS origin of a NIfTI image.

    Any orientation is first reoriented (axis permutation / flips only) to the
    ('L', 'P', 'S') grid of our volumes; a trailing singleton channel axis is
    dropped. Oblique affines are mapped to the closest such grid (spacings are
    the column norms), which is exact for files written by :func:`to_nifti`.
    """
    current = nib.orientations.io_orientation(img.affine)
    wanted = nib.orientations.axcodes2ornt(LPS_AXCODES)
    transform = nib.orientations.ornt_transform(current, wanted)
    if not np.array_equal(transform, [[0, 1], [1, 1], [2, 1]]):  # not already L, P, S
        img = img.as_reoriented(transform)
    data = np.asanyarray(img.dataobj)
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise ValueError(f"expected a 3D image, got shape {data.shape}")
    affine = np.asarray(img.affine, dtype=np.float64)
    sx, sy, sz = (_f32(float(np.linalg.norm(affine[:3, i]))) for i in range(3))
    ox, oy, oz = -affine[0, 3], -affine[1, 3], affine[2, 3]
    origin = (_f32(ox) + 0.0, _f32(oy) + 0.0, _f32(oz) + 0.0)
    return np.ascontiguousarray(data.transpose(2, 1, 0)), (sz, sy, sx), origin


def write_decathlon_case(
    out_dir: str | Path,
    name: str,
    phantom: ChestPhantom,
    *,
    split: Split = "training",
    image_dtype: Literal["int16", "float32"] = "int16",
) -> DecathlonCase:
    """Write one phantom's image and label NIfTI files into ``out_dir``.

    Training cases go to imagesTr/labelsTr, test cases to imagesTs/labelsTs.
    Does not touch dataset.json (see :func:`write_dataset_json`), so large
    datasets can be streamed one case at a time.
    """
    root = Path(out_dir)
    suffix = "Tr" if split == "training" else "Ts"
    image = root / f"images{suffix}" / f"{name}{_SUFFIX}"
    label = root / f"labels{suffix}" / f"{name}{_SUFFIX}"
    image.parent.mkdir(parents=True, exist_ok=True)
    label.parent.mkdir(parents=True, exist_ok=True)
    volume = phantom.volume_hu.astype(np.dtype(image_dtype), copy=False)
    nib.save(to_nifti(volume, phantom.spacing_mm, phantom.origin_xyz_mm), image)
    labels = phantom.labels.astype(np.uint8, copy=False)
    nib.save(to_nifti(labels, phantom.spacing_mm, phantom.origin_xyz_mm), label)
    return DecathlonCase(name=name, image=image, label=label, split=split)


def write_dataset_json(
    out_dir: str | Path,
    training: Sequence[str],
    test: Sequence[str] = (),
    *,
    name: str = "SyntheticChestCT",
    description: str = "Synthetic chest CT phantoms with body, lung, heart, bone and nodule labels",
) -> Path:
    """Write the Decathlon dataset.json listing ``training`` and ``test`` case names."""
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    doc: dict[str, Any] = {
        "name": name,
        "description": description,
        "reference": "dicom-ai-node training.phantoms.chest (synthetic, no patient data)",
        "licence": "CC0-1.0",
        "release": "1.0",
        "tensorImageSize": "3D",
        "modality": {"0": "CT"},
        "labels": {str(k): v for k, v in label_names().items()},
        "numTraining": len(training),
        "numTest": len(test),
        "training": [
            {"image": f"./imagesTr/{n}{_SUFFIX}", "label": f"./labelsTr/{n}{_SUFFIX}"} for n in training
        ],
        "test": [f"./imagesTs/{n}{_SUFFIX}" for n in test],
    }
    path = root / "dataset.json"
    path.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    return path


def split_names(names: Sequence[str], test_fraction: float) -> tuple[list[str], list[str]]:
    """(training, test): the last ``round(len * test_fraction)`` names are test cases."""
    if not 0.0 <= test_fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {test_fraction}")
    n_test = int(round(len(names) * test_fraction))
    cut = len(names) - n_test
    return list(names[:cut]), list(names[cut:])


def write_decathlon(
    out_dir: str | Path,
    cases: Sequence[ChestPhantom],
    names: Sequence[str] | None = None,
    test_fraction: float = 0.0,
) -> Path:
    """Write ``cases`` as a Decathlon dataset in ``out_dir``; returns ``out_dir``.

    ``names`` default to ``chest_0000``, ``chest_0001``, ...; the last
    ``round(len(cases) * test_fraction)`` cases become test cases.
    """
    names = list(names) if names is not None else [f"chest_{i:04d}" for i in range(len(cases))]
    if len(names) != len(cases) or len(set(names)) != len(names):
        raise ValueError("names must be unique and one per case")
    training, test = split_names(names, test_fraction)
    test_set = set(test)
    for name, phantom in zip(names, cases):
        write_decathlon_case(out_dir, name, phantom, split="test" if name in test_set else "training")
    write_dataset_json(out_dir, training, test)
    return Path(out_dir)


def _resolve(root: Path, rel: str) -> Path:
    """A dataset.json path (``./imagesTr/x.nii.gz``) relative to the dataset root."""
    return (root / rel).resolve() if not Path(rel).is_absolute() else Path(rel)


def _case_name(path: str | Path) -> str:
    """Case name of an image file: its file name without ``.nii.gz`` / ``.nii``."""
    name = Path(path).name
    for suffix in (_SUFFIX, ".nii"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def read_decathlon(dataset_dir: str | Path, *, include_test: bool = False) -> list[DecathlonCase]:
    """Cases listed in ``dataset_dir/dataset.json``, training first.

    With ``include_test`` the test images follow, each with its labelsTs file
    when one exists (else ``label=None``). Paths are resolved against the
    dataset directory; missing files raise FileNotFoundError.
    """
    root = Path(dataset_dir)
    doc = json.loads((root / "dataset.json").read_text(encoding="utf-8"))
    cases: list[DecathlonCase] = []
    for item in doc.get("training", []):
        image = _resolve(root, item["image"])
        label = _resolve(root, item["label"]) if item.get("label") else None
        cases.append(DecathlonCase(_case_name(image), image, label, "training"))
    if include_test:
        for item in doc.get("test", []):
            rel = item["image"] if isinstance(item, dict) else item
            image = _resolve(root, rel)
            guess = image.parent.parent / "labelsTs" / image.name
            cases.append(DecathlonCase(_case_name(image), image, guess if guess.exists() else None, "test"))
    for case in cases:
        for path in (case.image, case.label):
            if path is not None and not path.exists():
                raise FileNotFoundError(path)
    return cases


def case_from_image(image: str | Path) -> DecathlonCase:
    """The case of an image file; its label is the same file name in the sibling
    ``labelsTr`` / ``labelsTs`` folder of ``imagesTr`` / ``imagesTs`` when present."""
    path = Path(image)
    split: Split = "test" if path.parent.name == "imagesTs" else "training"
    label = path.parent.parent / path.parent.name.replace("images", "labels", 1) / path.name
    has_label = path.parent.name.startswith("images") and label.exists()
    return DecathlonCase(_case_name(path), path, label if has_label else None, split)


def load_case(case: DecathlonCase | str | Path) -> LoadedCase:
    """Load a case as (volume (z, y, x), labels (z, y, x) uint8 or None, spacing, LPS origin).

    ``case`` is a :class:`DecathlonCase` or the path of an image (its label is
    found with :func:`case_from_image`). Integer images come back int16 when
    they fit (HU), otherwise in their stored dtype; scaled or float images as
    float32. Raises ValueError when the label grid differs from the image grid.
    """
    if not isinstance(case, DecathlonCase):
        case = case_from_image(case)
    volume, spacing, origin = from_nifti(nib.load(case.image))
    if np.issubdtype(volume.dtype, np.integer):
        if volume.size and volume.min() >= -32768 and volume.max() <= 32767:
            volume = volume.astype(np.int16, copy=False)
    else:
        volume = volume.astype(np.float32, copy=False)
    labels: npt.NDArray[np.uint8] | None = None
    if case.label is not None:
        lab, lspacing, lorigin = from_nifti(nib.load(case.label))
        if lab.shape != volume.shape or not np.allclose(lspacing, spacing) or not np.allclose(lorigin, origin):
            raise ValueError(f"label grid of {case.name} does not match its image")
        labels = np.rint(lab).astype(np.uint8) if not np.issubdtype(lab.dtype, np.integer) else lab.astype(np.uint8)
    return LoadedCase(volume, labels, spacing, origin)
