"""The chest label map, with its SNOMED CT codes, in one place.

Why: the synthetic phantoms, the dataset writers (NIfTI label maps, DICOM SEG),
the bundle metadata and the node's SEG output must agree on what label value 3
means and how it is coded in DICOM. Every one of them imports the table below
instead of repeating codes, so a change happens in exactly one place.

This module depends on nothing but the standard library so that light-weight
consumers (bundle metadata, CLIs) can import it without pulling in highdicom.
"""

from __future__ import annotations

from dataclasses import dataclass

from dicom_node.palette import palette_colour

__all__ = [
    "BACKGROUND",
    "CHEST_LABELS",
    "LabelSpec",
    "label_by_code",
    "label_by_name",
    "label_by_value",
    "label_names",
]

#: Name of label value 0 (no segment in a DICOM SEG).
BACKGROUND = "background"

#: Coding scheme designator of SNOMED CT in DICOM.
SCT = "SCT"

#: SNOMED CT category shared by the normal anatomy labels.
_ANATOMY = ("123037004", "Anatomical Structure")
#: SNOMED CT category of lesions: labels in it get lesion-wise evaluation figures.
_ALTERED = ("49755003", "Morphologically Altered Structure")
LESION_CATEGORY_VALUE = _ALTERED[0]


@dataclass(frozen=True)
class LabelSpec:
    """One non-background label of a label map and its DICOM coding.

    ``value`` is the integer stored in label maps (NIfTI, numpy); ``name`` the
    short machine name used in dataset.json and file names. ``code_value`` /
    ``code_meaning`` are the SNOMED CT concept of the segmented property type
    and ``category_value`` / ``category_meaning`` its property category, as put
    in a DICOM SEG Segment Sequence. ``color_rgb`` is the recommended display
    colour (0-255 per channel), converted to CIELab when written to DICOM.
    """

    value: int
    name: str
    code_value: str
    code_meaning: str
    category_value: str
    category_meaning: str
    color_rgb: tuple[int, int, int]
    scheme: str = SCT

    def __post_init__(self) -> None:
        """Reject values a uint8 label map or a DICOM segment cannot carry."""
        if not 1 <= self.value <= 255:
            raise ValueError(f"label value must be 1..255, got {self.value}")
        if any(not 0 <= c <= 255 for c in self.color_rgb) or len(self.color_rgb) != 3:
            raise ValueError(f"color_rgb must be three 0..255 values, got {self.color_rgb}")


#: Labels of the synthetic chest CT phantom, in label-value order (1..5), in the node's palette colours.
#: ``body`` covers all soft tissue, fat, muscle, mediastinum and abdomen that
#: no other label claims; pulmonary vessels inside the lungs are ``lung`` (as
#: in public lung segmentation datasets); ``bone`` is every bone.
CHEST_LABELS: tuple[LabelSpec, ...] = (
    LabelSpec(1, "body", "38266002", "Entire body", *_ANATOMY, palette_colour(1)),
    LabelSpec(2, "lung", "39607008", "Lung", *_ANATOMY, palette_colour(2)),
    LabelSpec(3, "heart", "80891009", "Heart", *_ANATOMY, palette_colour(3)),
    LabelSpec(4, "bone", "272673000", "Bone structure", *_ANATOMY, palette_colour(4)),
    LabelSpec(5, "nodule", "27925004", "Nodule", *_ALTERED, palette_colour(5)),
)


def label_names(specs: tuple[LabelSpec, ...] = CHEST_LABELS) -> dict[int, str]:
    """``{0: "background", value: name, ...}`` - the Decathlon ``labels`` mapping."""
    return {0: BACKGROUND, **{s.value: s.name for s in specs}}


def label_by_value(value: int, specs: tuple[LabelSpec, ...] = CHEST_LABELS) -> LabelSpec:
    """The spec whose label-map value is ``value`` (KeyError if none)."""
    for spec in specs:
        if spec.value == value:
            return spec
    raise KeyError(value)


def label_by_name(name: str, specs: tuple[LabelSpec, ...] = CHEST_LABELS) -> LabelSpec:
    """The spec called ``name``, case-insensitively (KeyError if none)."""
    for spec in specs:
        if spec.name.lower() == name.lower():
            return spec
    raise KeyError(name)


def label_by_code(
    code_value: str, scheme: str = SCT, specs: tuple[LabelSpec, ...] = CHEST_LABELS
) -> LabelSpec:
    """The spec coded ``(code_value, scheme)``, e.g. from a SEG segment (KeyError if none)."""
    for spec in specs:
        if spec.code_value == str(code_value) and spec.scheme == scheme:
            return spec
    raise KeyError((code_value, scheme))
