"""Helpers for the result-builder tests (SEG, GSPS, SR): small phantom volumes, label maps, validators.

Why: every builder test needs the same things - a generated CT series written
to disk and read back as a :class:`workers.volume.Volume` (single-frame or
multi-frame, any orientation), a synthetic label map or detections placed in
patient space, and the dicom3tools validators with their output split into
errors and warnings. Written once here so the SEG, GSPS and SR tests agree.

Volumes are loaded with the workers' own ``workers.volume.load_series``, so the
builders are tested on exactly what the pipeline hands them.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

import highdicom as hd
import numpy as np
import numpy.typing as npt
import pydicom
from pydicom.uid import generate_uid

from dicom_node.contracts import AlgorithmInfo, CodedConcept, Detection, SegmentLabel
from training.labels import CHEST_LABELS, LabelSpec
from training.phantoms.ct_series import SeriesGeometry, ct_series_datasets, simple_body_phantom, write_series
from workers.volume import Volume, load_series

__all__ = [
    "ALGORITHM",
    "AXIAL",
    "LABELS",
    "OBLIQUE",
    "dcentvfy_findings",
    "dciodvfy_findings",
    "detection",
    "multiframe_volume",
    "segment_label",
    "sphere_mask",
    "volume_from_files",
    "voxel_centres_mm",
    "write_phantom_series",
]

DCIODVFY = shutil.which("dciodvfy") or "/usr/bin/dciodvfy"
DCENTVFY = shutil.which("dcentvfy") or "/usr/bin/dcentvfy"

#: 64x64x24 axial, 3 mm slices, 4 mm pixels (a 256 mm field of view).
AXIAL = SeriesGeometry(rows=64, columns=64, slices=24, pixel_spacing=(4.0, 4.0), slice_spacing=3.0, slice_thickness=3.0)

_C, _S = np.cos(np.radians(30.0)), np.sin(np.radians(30.0))
_CB, _SB = np.cos(np.radians(20.0)), np.sin(np.radians(20.0))
#: An oblique series (rotated 30 degrees about z, tilted 20 degrees), anisotropic pixels, not square.
OBLIQUE = SeriesGeometry(
    rows=56,
    columns=48,
    slices=20,
    pixel_spacing=(4.5, 5.0),
    slice_spacing=4.0,
    slice_thickness=4.0,
    orientation=(
        round(float(_C), 6), round(float(_S), 6), 0.0,
        round(float(-_S * _CB), 6), round(float(_C * _CB), 6), round(float(_SB), 6),
    ),
)

ALGORITHM = AlgorithmInfo(name="Chest organs test net", version="1.2.3", model_id="chest-organs-test")


def segment_label(spec: LabelSpec) -> SegmentLabel:
    """Our contract's label for one entry of the training label table."""
    return SegmentLabel(
        value=spec.value,
        name=spec.name,
        property_category=CodedConcept(value=spec.category_value, scheme=spec.scheme, meaning=spec.category_meaning),
        property_type=CodedConcept(value=spec.code_value, scheme=spec.scheme, meaning=spec.code_meaning),
        color_rgb=spec.color_rgb,
    )


#: The chest labels (body, lung, heart, bone, nodule) as a model would declare them.
LABELS: tuple[SegmentLabel, ...] = tuple(segment_label(spec) for spec in CHEST_LABELS)


def write_phantom_series(
    out_dir: Path,
    geometry: SeriesGeometry,
    *,
    seed: int,
    reverse_instance_numbers: bool = False,
) -> list[Path]:
    """Write a phantom CT series with full patient/study identification; returns the file paths.

    ``reverse_instance_numbers`` numbers the instances against the slice
    position (as feet-first acquisitions do), so that instance order and slice
    order differ and a builder that confuses them is caught.
    """
    datasets = ct_series_datasets(
        simple_body_phantom(geometry, seed),
        geometry,
        seed=seed,
        patient_id=f"PAT-{seed:04d}",
        patient_name=f"Phantom^Outputs{seed}",
        accession_number=f"ACC{seed:05d}",
        series_number=3,
        series_description="Phantom source CT",
    )
    if reverse_instance_numbers:
        for ds in datasets:
            ds.InstanceNumber = len(datasets) + 1 - int(ds.InstanceNumber)
        datasets.reverse()
    return write_series(datasets, out_dir)


def volume_from_files(paths: Sequence[Path]) -> Volume:
    """A series on disk as a Volume, loaded the way the workers load it (``workers.volume.load_series``)."""
    return load_series(paths)


def multiframe_volume(paths: Sequence[Path], out_path: Path) -> Volume:
    """Convert a written single-frame series to one Legacy Converted Enhanced CT file and load it as a Volume.

    The instances are passed to the converter in reverse file order, so the
    multi-frame's frame numbers need not follow slice position: a builder must
    use ``volume.frames`` to find the frame of a slice.
    """
    singles = [pydicom.dcmread(p) for p in reversed(list(paths))]
    enhanced = hd.legacy.LegacyConvertedEnhancedCTImage(
        legacy_datasets=singles,
        series_instance_uid=generate_uid(entropy_srcs=["outputs_fixtures", str(singles[0].SeriesInstanceUID)]),
        series_number=4,
        sop_instance_uid=generate_uid(entropy_srcs=["outputs_fixtures", str(singles[0].SOPInstanceUID)]),
        instance_number=1,
    )
    # A scanner's enhanced CT names the body part at the top level; highdicom's converter drops it.
    enhanced.BodyPartExamined = singles[0].BodyPartExamined
    enhanced.save_as(out_path, enforce_file_format=True)
    return load_series([out_path])


def voxel_centres_mm(volume: Volume) -> npt.NDArray[np.float64]:
    """LPS position of every voxel centre, shape (slices, rows, columns, 3)."""
    grid = np.stack(np.meshgrid(*(np.arange(n) for n in volume.shape), indexing="ij"), axis=-1)
    return volume.index_to_world(grid.reshape(-1, 3)).reshape(*volume.shape, 3)


def sphere_mask(volume: Volume, centre_mm: Sequence[float], radius_mm: float) -> npt.NDArray[np.bool_]:
    """Voxels whose centre lies within ``radius_mm`` of ``centre_mm`` (LPS)."""
    return np.linalg.norm(voxel_centres_mm(volume) - np.asarray(centre_mm), axis=-1) <= radius_mm


def detection(volume: Volume, index: Sequence[float], diameter_mm: float, score: float, label: SegmentLabel) -> Detection:
    """A spherical finding centred at fractional voxel ``index`` (slice, row, column) of ``volume``."""
    centre = volume.index_to_world(index)
    return Detection(
        centre_mm=(float(centre[0]), float(centre[1]), float(centre[2])),
        size_mm=(diameter_mm, diameter_mm, diameter_mm),
        diameter_mm=diameter_mm,
        score=score,
        label=label,
    )


def dciodvfy_findings(path: Path) -> tuple[list[str], list[str]]:
    """(errors, warnings) that dciodvfy reports for one file (it writes them to stderr)."""
    proc = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=60, check=False)
    lines = (proc.stdout + proc.stderr).splitlines()
    return [ln for ln in lines if "Error" in ln], [ln for ln in lines if "Warning" in ln]


def dcentvfy_findings(paths: Sequence[Path]) -> tuple[list[str], list[str]]:
    """(errors, warnings) that dcentvfy reports for a set of files of one study."""
    proc = subprocess.run([DCENTVFY, *map(str, paths)], capture_output=True, text=True, timeout=60, check=False)
    lines = (proc.stdout + proc.stderr).splitlines()
    return [ln for ln in lines if "Error" in ln], [ln for ln in lines if "Warning" in ln]
