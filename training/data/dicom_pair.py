"""A DICOM CT series plus a DICOM SEG: what a hospital exports from its annotations.

Why: sites that annotate in their PACS or in 3D Slicer / OHIF export a CT
series and a Segmentation object referencing it, not NIfTI. Writing phantoms
this way tests the node's DICOM path end to end and gives realistic fixtures;
reading it turns a site's own annotations into training data.

* :func:`write_dicom_case` writes ``out_dir/series/IM#####.dcm`` (one CT Image
  Storage instance per slice, via :mod:`training.phantoms.ct_series`) and
  ``out_dir/seg.dcm``: a BINARY Segmentation with one segment per label
  present in the label map, coded with the SNOMED CT concepts of
  :data:`training.labels.CHEST_LABELS` (so it validates with ``dciodvfy``).
* :func:`read_dicom_case` sorts the slices along their normal, rebuilds the HU
  volume and maps every segment back to its label value *by its coded
  property type* (falling back to the segment label), so SEGs numbered
  differently by other tools load correctly.

Only axial series (ImageOrientationPatient 1\\0\\0\\0\\1\\0, the grid of
:class:`training.phantoms.chest.ChestPhantom`) are read.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import highdicom as hd
import numpy as np
import numpy.typing as npt
import pydicom
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid

from training.labels import CHEST_LABELS, LabelSpec, label_by_code, label_by_name
from training.phantoms.ct_series import SeriesGeometry, ct_series_datasets, write_series

if TYPE_CHECKING:
    from training.phantoms.chest import ChestPhantom

__all__ = [
    "DicomCase",
    "read_dicom_case",
    "read_series",
    "segment_description",
    "write_dicom_case",
]

Vec3 = tuple[float, float, float]
_UID_NAMESPACE = "dicom-ai-node/training.data.dicom_pair/v1"
_AXIAL = np.array([1.0, 0.0, 0.0, 0.0, 1.0, 0.0])


class DicomCase(NamedTuple):
    """A case read back from DICOM: (z, y, x) HU and labels, spacing (z, y, x), LPS origin."""

    volume_hu: npt.NDArray[np.int16]
    labels: npt.NDArray[np.uint8]
    spacing_mm: Vec3
    origin_xyz_mm: Vec3


def segment_description(spec: LabelSpec, segment_number: int) -> hd.seg.SegmentDescription:
    """highdicom description of a label: SNOMED CT category/type, colour, MANUAL."""
    return hd.seg.SegmentDescription(
        segment_number=segment_number,
        segment_label=spec.name,
        segmented_property_category=Code(spec.category_value, spec.scheme, spec.category_meaning),
        segmented_property_type=Code(spec.code_value, spec.scheme, spec.code_meaning),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
        tracking_uid=generate_uid(entropy_srcs=[_UID_NAMESPACE, "tracking", spec.code_value]),
        tracking_id=f"{spec.name}",
        display_color=hd.color.CIELabColor.from_rgb(*spec.color_rgb),
    )


def write_dicom_case(
    phantom: ChestPhantom,
    out_dir: str | Path,
    *,
    seed: int,
    patient_id: str | None = None,
    patient_name: str = "Phantom^Chest",
) -> tuple[Path, Path]:
    """Write ``phantom`` as ``out_dir/series/*.dcm`` plus ``out_dir/seg.dcm``.

    Geometry comes from the phantom: rows = y, columns = x, pixel spacing
    (sy, sx), slice spacing sz, origin = ``origin_xyz_mm``, axial orientation.
    ``seed`` makes every UID deterministic (CT and SEG); ``patient_id``
    defaults to ``PHANTOM-{seed:06d}``. Returns (series_dir, seg_path).
    """
    out = Path(out_dir)
    nz, ny, nx = phantom.volume_hu.shape
    sz, sy, sx = phantom.spacing_mm
    geometry = SeriesGeometry(
        rows=ny,
        columns=nx,
        slices=nz,
        pixel_spacing=(sy, sx),
        slice_spacing=sz,
        slice_thickness=float(phantom.slice_thickness_mm or sz),
        origin=phantom.origin_xyz_mm,
    )
    pid = patient_id or f"PHANTOM-{seed:06d}"
    datasets = ct_series_datasets(
        phantom.volume_hu,
        geometry,
        seed=seed,
        patient_id=pid,
        patient_name=patient_name,
        series_description="Synthetic chest CT phantom",
    )
    series_dir = out / "series"
    write_series(datasets, series_dir)

    # Segment numbers must run 1..N: number the labels present, in value order.
    present = [spec for spec in CHEST_LABELS if np.any(phantom.labels == spec.value)]
    lut = np.zeros(256, dtype=np.uint8)
    for number, spec in enumerate(present, start=1):
        lut[spec.value] = number
    segment_map = lut[phantom.labels]
    series_uid = datasets[0].SeriesInstanceUID
    seg = hd.seg.Segmentation(
        source_images=datasets,
        pixel_array=segment_map,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[segment_description(s, i) for i, s in enumerate(present, start=1)],
        series_instance_uid=generate_uid(entropy_srcs=[_UID_NAMESPACE, "series", series_uid]),
        series_number=100,
        sop_instance_uid=generate_uid(entropy_srcs=[_UID_NAMESPACE, "sop", series_uid]),
        instance_number=1,
        manufacturer="dicom-ai-node",
        manufacturer_model_name="training.data.dicom_pair",
        software_versions="0.1.0",
        device_serial_number="0",
        content_description="Synthetic phantom ground truth",
        content_label="GROUND_TRUTH",
        content_creator_name="Phantom^Generator",
        series_description="Phantom labels",
    )
    seg_path = out / "seg.dcm"
    seg.save_as(seg_path, enforce_file_format=True)
    return series_dir, seg_path


def read_series(series_dir: str | Path) -> tuple[list[pydicom.Dataset], npt.NDArray[np.int16], Vec3, Vec3]:
    """Slices of an axial CT series sorted along the normal, with HU volume and grid.

    Returns (datasets in slice order, HU (z, y, x) int16, spacing (z, y, x),
    LPS origin = ImagePositionPatient of the first slice). Every file in the
    directory must belong to one series; slice spacing is the median distance
    between consecutive positions along the normal.
    """
    paths = sorted(p for p in Path(series_dir).iterdir() if p.is_file())
    datasets = [pydicom.dcmread(p) for p in paths]
    if not datasets:
        raise FileNotFoundError(f"no DICOM files in {series_dir}")
    if len({str(ds.SeriesInstanceUID) for ds in datasets}) != 1:
        raise ValueError(f"{series_dir} holds more than one series")
    iop = np.asarray([float(v) for v in datasets[0].ImageOrientationPatient])
    if not np.allclose(iop, _AXIAL, atol=1e-4):
        raise ValueError(f"only axial series are supported, got orientation {iop.tolist()}")
    normal = np.cross(iop[:3], iop[3:])
    positions = np.array([[float(v) for v in ds.ImagePositionPatient] for ds in datasets])
    order = np.argsort(positions @ normal, kind="stable")
    datasets = [datasets[i] for i in order]
    positions = positions[order]
    hu = np.empty((len(datasets), int(datasets[0].Rows), int(datasets[0].Columns)), dtype=np.int16)
    for k, ds in enumerate(datasets):
        slope, intercept = float(ds.get("RescaleSlope", 1.0)), float(ds.get("RescaleIntercept", 0.0))
        hu[k] = np.rint(ds.pixel_array.astype(np.float64) * slope + intercept).astype(np.int16)
    steps = np.diff(positions @ normal)
    sz = float(np.median(steps)) if steps.size else float(datasets[0].get("SliceThickness", 1.0))
    sy, sx = (float(v) for v in datasets[0].PixelSpacing)
    origin = tuple(float(v) for v in positions[0])
    return datasets, hu, (round(sz, 6), sy, sx), (origin[0], origin[1], origin[2])


def _segment_label_values(seg: hd.seg.Segmentation) -> npt.NDArray[np.uint8]:
    """LUT segment number -> our label value, from each segment's coded type."""
    numbers = [int(item.SegmentNumber) for item in seg.SegmentSequence]
    lut = np.zeros(max(numbers, default=0) + 1, dtype=np.uint8)
    for item in seg.SegmentSequence:
        code = item.SegmentedPropertyTypeCodeSequence[0]
        try:
            spec = label_by_code(str(code.CodeValue), str(code.CodingSchemeDesignator))
        except KeyError:
            spec = label_by_name(str(item.SegmentLabel))  # KeyError: unknown segment
        lut[int(item.SegmentNumber)] = spec.value
    return lut


def read_dicom_case(series_dir: str | Path, seg_path: str | Path) -> DicomCase:
    """Load a CT series and its SEG as (HU, labels, spacing, origin), our conventions.

    Segments are mapped to label values by SNOMED CT type code (then by
    segment label); slices the SEG has no frames for are background.
    """
    datasets, hu, spacing, origin = read_series(series_dir)
    seg = hd.seg.segread(seg_path)
    lut = _segment_label_values(seg)
    numbers = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=[str(ds.SOPInstanceUID) for ds in datasets],
        combine_segments=True,
        relabel=False,
        assert_missing_frames_are_empty=True,
        dtype=np.uint16,
    )
    labels = lut[numbers]
    return DicomCase(hu, labels, spacing, origin)
