"""Synthetic CT series: a deterministic chest phantom written as valid DICOM.

Why: the DICOM receiver's tests, its throughput benchmark (a 300-slice 512x512
series) and the training package all need realistic CT series without patient
data. Everything here is deterministic in ``seed`` (pixels *and* UIDs), so a test
can regenerate the exact series it expects to receive.

What:

* :class:`SeriesGeometry` - the acquisition grid and its patient-space placement
  (any orientation; slice positions go along the slice normal).
* :func:`simple_body_phantom` - a chest-like volume in Hounsfield units.
* :func:`ct_series_datasets` - one CT Image Storage instance per slice that
  validates with dicom3tools ``dciodvfy``.
* :func:`write_series` / :func:`encode_series` - Part 10 files, and copies in the
  other transfer syntaxes pydicom can *encode* (deflate, implicit VR, RLE,
  JPEG 2000 lossless, JPEG-LS lossless when an encoder is installed).
* :func:`generate_ct_series` - all of the above in one call.

JPEG baseline (1.2.840.10008.1.2.4.50) and JPEG lossless (.57/.70) cannot be
encoded by pydicom; tests that need them should compress the written files with
DCMTK (``dcmcjpeg``, ``dcmcjpls``, ``dcmcrle``). DCMTK is deliberately not used
here so the module only depends on numpy and pydicom (+ pylibjpeg plugins).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import get_encoder
from pydicom.uid import (
    UID,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    PYDICOM_IMPLEMENTATION_UID,
    RLELossless,
    generate_uid,
)
from pydicom.valuerep import DSfloat

__all__ = [
    "GeneratedSeries",
    "SeriesGeometry",
    "ct_series_datasets",
    "encode_series",
    "generate_ct_series",
    "simple_body_phantom",
    "write_series",
]

Vec3 = tuple[float, float, float]

#: Namespace mixed into every generated UID so phantom UIDs never collide with
#: UIDs generated from the same seed by another tool.
_UID_NAMESPACE = "dicom-ai-node/training.phantoms.ct_series/v1"

#: Fixed acquisition date/time: the series must be byte-identical run to run.
_STUDY_DATE = "20240115"
_STUDY_TIME = "093000"

#: Transfer syntaxes that only need a different byte layout at write time.
_NATIVE_SYNTAXES = frozenset(
    {ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian}
)
#: Lossless compressed syntaxes pydicom can encode (given an installed plugin).
_COMPRESSED_SYNTAXES = frozenset({RLELossless, JPEG2000Lossless, JPEGLSLossless})

# Nominal tissue values (HU) of the phantom.
AIR_HU = -1000
LUNG_HU = -850
SOFT_TISSUE_HU = 40
BONE_HU = 700
NOISE_SD_HU = 10.0
# Range a 12-bit CT scanner reports; the phantom is clipped to it.
_HU_MIN, _HU_MAX = -1024, 3071


@dataclass(frozen=True)
class SeriesGeometry:
    """Voxel grid of a CT series and where it lies in patient coordinates (mm).

    ``pixel_spacing`` follows DICOM (0028,0030): (spacing between rows,
    spacing between columns). ``orientation`` is ImageOrientationPatient: the
    row direction cosines (direction of increasing column index) followed by the
    column direction cosines. Slices are stacked along the normal
    ``row x column`` so that non-axial series get correct positions.
    ``origin`` is the ImagePositionPatient (centre of the first voxel) of the
    first slice; when omitted it is chosen so the in-plane field of view is
    centred on the patient axis at z = 0.
    """

    rows: int
    columns: int
    slices: int
    pixel_spacing: tuple[float, float] = (0.7, 0.7)
    slice_spacing: float = 1.25
    slice_thickness: float = 1.25
    origin: Vec3 | None = None
    orientation: tuple[float, float, float, float, float, float] = (
        1.0, 0.0, 0.0, 0.0, 1.0, 0.0,
    )

    def __post_init__(self) -> None:
        """Validate the grid and resolve a default (centred) origin."""
        if min(self.rows, self.columns, self.slices) < 1:
            raise ValueError(f"rows/columns/slices must be >= 1, got {self}")
        if min(self.pixel_spacing) <= 0 or self.slice_spacing <= 0 or self.slice_thickness <= 0:
            raise ValueError("spacings and slice thickness must be positive")
        if len(self.orientation) != 6:
            raise ValueError("orientation needs 6 direction cosines")
        r, c = self.row_cosines, self.column_cosines
        if not (
            math.isclose(float(np.linalg.norm(r)), 1.0, abs_tol=1e-4)
            and math.isclose(float(np.linalg.norm(c)), 1.0, abs_tol=1e-4)
            and abs(float(np.dot(r, c))) < 1e-4
        ):
            raise ValueError(f"orientation {self.orientation} is not two orthonormal vectors")
        if self.origin is None:
            half_width = (self.columns - 1) / 2.0 * self.pixel_spacing[1]
            half_height = (self.rows - 1) / 2.0 * self.pixel_spacing[0]
            centred = -half_width * r - half_height * c
            object.__setattr__(self, "origin", tuple(float(v) for v in centred))

    @property
    def row_cosines(self) -> npt.NDArray[np.float64]:
        """Unit vector along a row (increasing column index)."""
        return np.asarray(self.orientation[:3], dtype=np.float64)

    @property
    def column_cosines(self) -> npt.NDArray[np.float64]:
        """Unit vector along a column (increasing row index)."""
        return np.asarray(self.orientation[3:], dtype=np.float64)

    @property
    def normal(self) -> npt.NDArray[np.float64]:
        """Slice normal, ``row x column``; slice k lies k*slice_spacing along it."""
        n = np.cross(self.row_cosines, self.column_cosines)
        return n / np.linalg.norm(n)

    @property
    def shape(self) -> tuple[int, int, int]:
        """Volume shape as (slices, rows, columns)."""
        return (self.slices, self.rows, self.columns)

    def slice_position(self, k: int) -> Vec3:
        """ImagePositionPatient (mm) of slice ``k`` (0-based)."""
        if not 0 <= k < self.slices:
            raise IndexError(f"slice {k} outside 0..{self.slices - 1}")
        assert self.origin is not None  # resolved in __post_init__
        pos = np.asarray(self.origin, dtype=np.float64) + k * self.slice_spacing * self.normal
        return (float(pos[0]), float(pos[1]), float(pos[2]))

    def slice_location(self, k: int) -> float:
        """SliceLocation of slice ``k``: its position projected on the normal."""
        return float(np.dot(self.slice_position(k), self.normal))


@dataclass(frozen=True)
class GeneratedSeries:
    """What :func:`generate_ct_series` wrote, for tests to assert against."""

    paths: list[Path]
    study_uid: str
    series_uid: str
    frame_of_reference_uid: str
    sop_instance_uids: list[str]
    geometry: SeriesGeometry
    transfer_syntax_uid: str = ExplicitVRLittleEndian
    volume_hu: npt.NDArray[np.int16] | None = field(default=None, repr=False)


def simple_body_phantom(geometry: SeriesGeometry, seed: int = 0) -> npt.NDArray[np.int16]:
    """Chest-like volume in HU, shape (slices, rows, columns), dtype int16.

    An elliptical soft-tissue body (~40 HU) in air (-1000 HU) with two lungs
    (~-850 HU) that taper towards both ends of the stack, a bone disc (~700 HU)
    for the spine, plus Gaussian noise (sd 10 HU) drawn from
    ``numpy.random.default_rng(seed)``; values are clipped to the 12-bit CT
    range -1024..3071. Anatomy is defined in normalised image
    coordinates so it fills the field of view whatever the grid size.
    Vectorised per slice: 300x512x512 takes well under a second.
    """
    s, rows, cols = geometry.shape
    y = np.linspace(-1.0, 1.0, rows, dtype=np.float32)[:, None]
    x = np.linspace(-1.0, 1.0, cols, dtype=np.float32)[None, :]

    def ellipse(cx: float, cy: float, ax: float, ay: float) -> npt.NDArray[np.float32]:
        # <= 1 inside the ellipse; comparing against s**2 scales it by s.
        return ((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2

    body = ellipse(0.0, 0.05, 0.85, 0.62) <= 1.0
    spine = ellipse(0.0, 0.45, 0.11, 0.11) <= 1.0
    left_q = ellipse(-0.38, -0.02, 0.27, 0.42)
    right_q = ellipse(0.38, -0.02, 0.27, 0.42)

    # Lung cross-section scale per slice: full in the middle, shrinking to 0.3.
    t = np.linspace(-1.0, 1.0, s, dtype=np.float32) if s > 1 else np.zeros(1, np.float32)
    lung_scale_sq = (0.3 + 0.7 * np.sqrt(np.clip(1.0 - t**2, 0.0, 1.0))) ** 2

    base = np.full((rows, cols), AIR_HU, dtype=np.int16)
    base[body] = SOFT_TISSUE_HU
    base[spine] = BONE_HU
    lung_q = np.where(body, np.minimum(left_q, right_q), np.inf)

    # Inverse-transform sampling from a 65536-entry table of rounded N(0, sd)
    # draws: statistically Gaussian, and ~5x faster than drawing 78M normals.
    rng = np.random.default_rng(seed)
    noise_table = np.rint(rng.standard_normal(1 << 16) * NOISE_SD_HU).astype(np.int16)
    vol = np.empty((s, rows, cols), dtype=np.int16)
    lung_hu = np.int16(LUNG_HU)
    for k in range(s):  # slice-wise keeps temporaries in cache
        anatomy = np.where(lung_q <= lung_scale_sq[k], lung_hu, base)
        idx = rng.integers(0, 1 << 16, size=(rows, cols), dtype=np.uint16)
        np.add(anatomy, noise_table[idx], out=vol[k])
    np.clip(vol, _HU_MIN, _HU_MAX, out=vol)
    return vol


def _uid(*parts: object) -> UID:
    """Deterministic UID from the module namespace and ``parts``."""
    return generate_uid(entropy_srcs=[_UID_NAMESPACE, *(str(p) for p in parts)])


def _ds(value: float) -> DSfloat:
    """Decimal String that always fits the 16-character DS limit."""
    return DSfloat(round(float(value), 6) + 0.0, auto_format=True)


def _pixel_representation(
    volume_hu: npt.NDArray[np.integer] | npt.NDArray[np.floating],
    intercept: float,
    slope: float,
) -> tuple[type[np.integer], int]:
    """Stored dtype and PixelRepresentation for ``(HU - intercept) / slope``.

    Unsigned (0) when every stored value is >= 0 (the usual intercept -1024),
    otherwise signed (1); decided once per series so all slices agree. Raises
    ValueError if the stored values do not fit 16 bits.
    """
    if slope == 0:
        raise ValueError("rescale_slope must be non-zero")
    ends = np.rint((np.array([volume_hu.min(), volume_hu.max()], np.float64) - intercept) / slope)
    lo, hi = float(ends.min()), float(ends.max())
    if lo >= 0 and hi <= np.iinfo(np.uint16).max:
        return np.uint16, 0
    if lo >= np.iinfo(np.int16).min and hi <= np.iinfo(np.int16).max:
        return np.int16, 1
    raise ValueError(
        f"stored values {lo:.0f}..{hi:.0f} do not fit 16 bits with "
        f"intercept {intercept} and slope {slope}"
    )


def _stored_slice(
    slice_hu: npt.NDArray[np.integer] | npt.NDArray[np.floating],
    intercept: float,
    slope: float,
    dtype: type[np.integer],
) -> bytes:
    """Little-endian stored-value bytes of one slice."""
    if np.issubdtype(slice_hu.dtype, np.integer) and slope == 1 and float(intercept).is_integer():
        stored = slice_hu.astype(np.int32) - int(intercept)  # exact integer path
    else:
        stored = np.rint((slice_hu.astype(np.float64) - intercept) / slope)
    return stored.astype(np.dtype(dtype).newbyteorder("<")).tobytes()


def ct_series_datasets(
    volume_hu: npt.NDArray[np.integer] | npt.NDArray[np.floating],
    geometry: SeriesGeometry,
    *,
    study_uid: str | None = None,
    series_uid: str | None = None,
    frame_of_reference_uid: str | None = None,
    patient_id: str = "PHANTOM-0001",
    patient_name: str = "Phantom^Chest",
    accession_number: str = "",
    series_number: int = 1,
    series_description: str = "Synthetic CT",
    study_description: str = "Synthetic chest CT",
    seed: int = 0,
    rescale_intercept: float = -1024.0,
    rescale_slope: float = 1.0,
) -> list[Dataset]:
    """One complete CT Image Storage instance per slice of ``volume_hu``.

    Stored values are ``round((HU - intercept) / slope)``, unsigned 16-bit when
    all are non-negative, else signed (PixelRepresentation set to match). The
    instances carry every Type 1/2 attribute of the CT Image IOD (Patient,
    General Study, General Series, Frame of Reference, General Equipment,
    General Image, Image Plane, Image Pixel, CT Image, VOI LUT, SOP Common) and
    validate with ``dciodvfy``. File meta is Explicit VR Little Endian.

    ``seed`` only drives UID generation: missing UIDs are derived from it (and
    from the patient ID / parent UIDs), so the same arguments always give the
    same UIDs and an explicit ``study_uid`` yields distinct child UIDs.
    """
    volume = np.asarray(volume_hu)
    if volume.shape != geometry.shape:
        raise ValueError(f"volume shape {volume.shape} != geometry shape {geometry.shape}")

    study_uid = UID(study_uid or _uid("study", seed, patient_id))
    series_uid = UID(series_uid or _uid("series", seed, study_uid, series_number))
    frame_of_reference_uid = UID(frame_of_reference_uid or _uid("for", seed, study_uid))
    dtype, pixel_rep = _pixel_representation(volume, rescale_intercept, rescale_slope)

    # Attributes shared by every slice go into a template that is deep-copied
    # per slice (3-5x faster than building each dataset element by element).
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "PHANTOM_CT_1"

    ds = Dataset()
    ds.file_meta = meta
    # SOP Common
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.InstanceCreationDate = _STUDY_DATE
    ds.InstanceCreationTime = _STUDY_TIME
    ds.SOPClassUID = CTImageStorage
    # General Study / Series / Image dates
    ds.StudyDate = _STUDY_DATE
    ds.SeriesDate = _STUDY_DATE
    ds.AcquisitionDate = _STUDY_DATE
    ds.ContentDate = _STUDY_DATE
    ds.StudyTime = _STUDY_TIME
    ds.SeriesTime = _STUDY_TIME
    ds.AcquisitionTime = _STUDY_TIME
    ds.ContentTime = _STUDY_TIME
    ds.AccessionNumber = accession_number
    ds.Modality = "CT"
    # General Equipment
    ds.Manufacturer = "Synthetic Phantom"
    ds.InstitutionName = "Phantom Institution"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = study_description
    ds.SeriesDescription = series_description
    ds.ManufacturerModelName = "ct_series"
    # Patient
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    # CT acquisition
    ds.BodyPartExamined = "CHEST"
    ds.SliceThickness = _ds(geometry.slice_thickness)
    ds.KVP = _ds(120)
    ds.SpacingBetweenSlices = _ds(geometry.slice_spacing)
    ds.SoftwareVersions = "1"
    ds.ConvolutionKernel = "STANDARD"
    ds.PatientPosition = "HFS"
    # Relationship
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = "1"
    ds.SeriesNumber = series_number
    ds.AcquisitionNumber = 1
    # Image Plane / Frame of Reference
    ds.ImageOrientationPatient = [_ds(v) for v in geometry.orientation]
    ds.FrameOfReferenceUID = frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    # Image Pixel
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = geometry.rows
    ds.Columns = geometry.columns
    ds.PixelSpacing = [_ds(v) for v in geometry.pixel_spacing]
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = pixel_rep
    # VOI LUT (soft-tissue window) and CT Image rescale
    ds.WindowCenter = _ds(40)
    ds.WindowWidth = _ds(400)
    ds.RescaleIntercept = _ds(rescale_intercept)
    ds.RescaleSlope = _ds(rescale_slope)
    ds.RescaleType = "HU"
    template = ds

    datasets: list[Dataset] = []
    for k in range(geometry.slices):
        ds = copy.deepcopy(template)
        sop_uid = _uid("sop", series_uid, k)
        ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
        ds.SOPInstanceUID = sop_uid
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [_ds(v) for v in geometry.slice_position(k)]
        ds.SliceLocation = _ds(geometry.slice_location(k))
        ds.add_new(
            0x7FE00010,
            "OW",
            _stored_slice(volume[k], rescale_intercept, rescale_slope, dtype),
        )
        datasets.append(ds)
    return datasets


def write_series(datasets: Sequence[Dataset], out_dir: str | Path) -> list[Path]:
    """Write each dataset as a DICOM Part 10 file ``IM{index:05d}.dcm``.

    The encoding (including deflate) follows each dataset's
    ``file_meta.TransferSyntaxUID``. Returns the paths in input order.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    for index, ds in enumerate(datasets):
        path = out / f"IM{index:05d}.dcm"
        pydicom.dcmwrite(path, ds, enforce_file_format=True)
        paths.append(path)
    return paths


def encode_series(datasets: Sequence[Dataset], transfer_syntax_uid: str) -> list[Dataset]:
    """Copies of ``datasets`` in ``transfer_syntax_uid`` (originals untouched).

    Supported: Explicit/Implicit VR Little Endian and Deflated Explicit VR LE
    (the byte layout is applied when written, e.g. by :func:`write_series`),
    RLE Lossless and JPEG 2000 Lossless (pylibjpeg plugins), and JPEG-LS
    Lossless when a JPEG-LS encoder (pyjpegls) is installed. SOP Instance UIDs
    are kept because the encodings are lossless.

    Raises ValueError naming the UID for anything else - notably JPEG baseline
    and JPEG lossless, which pydicom cannot encode (use DCMTK ``dcmcjpeg`` on
    written files for those).
    """
    uid = UID(transfer_syntax_uid)
    if uid not in _NATIVE_SYNTAXES and uid not in _COMPRESSED_SYNTAXES:
        raise ValueError(f"cannot encode transfer syntax {uid} ({uid.name}) with pydicom")
    if uid in _COMPRESSED_SYNTAXES and not get_encoder(uid).is_available:
        raise ValueError(
            f"cannot encode transfer syntax {uid} ({uid.name}): no encoder plugin installed"
        )

    encoded: list[Dataset] = []
    for ds in datasets:
        out = copy.deepcopy(ds)
        if out.file_meta.TransferSyntaxUID.is_compressed:
            out.decompress(generate_instance_uid=False)
        if uid in _COMPRESSED_SYNTAXES:
            out.compress(uid, generate_instance_uid=False)
        else:
            out.file_meta.TransferSyntaxUID = uid
        encoded.append(out)
    return encoded


def generate_ct_series(
    out_dir: str | Path,
    *,
    slices: int = 300,
    rows: int = 512,
    columns: int = 512,
    seed: int = 0,
    geometry: SeriesGeometry | None = None,
    transfer_syntax_uid: str = ExplicitVRLittleEndian,
    keep_volume: bool = False,
    **dataset_kwargs: object,
) -> GeneratedSeries:
    """Build the phantom, make its instances and write them to ``out_dir``.

    ``geometry``, when given, replaces ``slices``/``rows``/``columns``.
    ``seed`` drives both the noise and the UIDs; ``dataset_kwargs`` go to
    :func:`ct_series_datasets` (patient_id, series_number, ...). A transfer
    syntax other than Explicit VR LE goes through :func:`encode_series`.
    ``keep_volume`` returns the HU volume too (memory: 150 MB at 300x512x512).
    """
    geom = geometry or SeriesGeometry(rows=rows, columns=columns, slices=slices)
    volume = simple_body_phantom(geom, seed)
    datasets = ct_series_datasets(volume, geom, seed=seed, **dataset_kwargs)  # type: ignore[arg-type]
    if UID(transfer_syntax_uid) != ExplicitVRLittleEndian:
        datasets = encode_series(datasets, transfer_syntax_uid)
    paths = write_series(datasets, out_dir)
    first = datasets[0]
    return GeneratedSeries(
        paths=paths,
        study_uid=str(first.StudyInstanceUID),
        series_uid=str(first.SeriesInstanceUID),
        frame_of_reference_uid=str(first.FrameOfReferenceUID),
        sop_instance_uids=[str(ds.SOPInstanceUID) for ds in datasets],
        geometry=geom,
        transfer_syntax_uid=str(UID(transfer_syntax_uid)),
        volume_hu=volume if keep_volume else None,
    )
