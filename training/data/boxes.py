"""LUNA16-style detection box lists, as used by MONAI's detection tutorials.

Why: MONAI's RetinaNet lung nodule tutorial (and the models trained with it)
read a JSON data list of images with world-coordinate boxes. Writing our
phantom nodules in that format lets the tutorial code train on phantoms
unchanged, and reading it lets us evaluate against existing LUNA16-style lists.

Format::

    {"training":   [{"image": "imagesTr/x.nii.gz",
                     "box":   [[cx, cy, cz, w, h, d], ...],
                     "label": [0, ...],
                     "diameter_mm": [...], "kind": [...]}, ...],
     "validation": [...]}

Boxes are ``cccwhd`` (centre, then full extents) in millimetres in the world
coordinates of the NIfTI image, i.e. RAS and consistent with its affine (see
:mod:`training.data.decathlon`): the LPS centre of a nodule has its x and y
negated; the extents are unchanged (the box is axis-aligned). With MONAI load
the images with ``LoadImaged`` (NibabelReader) and convert the boxes with
``AffineBoxToImageCoordinated(..., affine_lps_to_ras=False)``. Label 0 is
"nodule". ``diameter_mm`` and ``kind`` are extra keys that MONAI ignores.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from training.phantoms.chest import NODULE_KINDS, Nodule, NoduleKind

__all__ = [
    "NODULE_CLASS",
    "BoxEntry",
    "Box",
    "boxes_to_nodules",
    "lps_to_ras_box",
    "nodule_box_entry",
    "nodules_to_boxes",
    "ras_to_lps_box",
    "read_box_list",
    "write_box_list",
]

Box = tuple[float, float, float, float, float, float]
Vec3 = tuple[float, float, float]
#: Class index of a nodule in the box list (the only class).
NODULE_CLASS = 0


def lps_to_ras_box(box: Sequence[float]) -> Box:
    """``cccwhd`` box in LPS world -> the same box in RAS world (negate cx, cy)."""
    cx, cy, cz, w, h, d = (float(v) for v in box)
    return (-cx + 0.0, -cy + 0.0, cz, w, h, d)


def ras_to_lps_box(box: Sequence[float]) -> Box:
    """``cccwhd`` box in RAS world -> LPS world (the conversion is its own inverse)."""
    return lps_to_ras_box(box)


@dataclass
class BoxEntry:
    """One image of a box list; the fields are named (and ordered) like the JSON keys.

    ``image`` is the path as written in the JSON; ``box`` the RAS world
    ``cccwhd`` mm boxes; ``label`` one class index per box; ``diameter_mm``
    and ``kind`` optional per-box extras (empty when the list came from
    elsewhere without them). ``dataclasses.asdict(entry)`` is the JSON object
    (with boxes as tuples).
    """

    image: str
    box: list[Box] = field(default_factory=list)
    label: list[int] = field(default_factory=list)
    diameter_mm: list[float] = field(default_factory=list)
    kind: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        """Reject lists of mismatched lengths and boxes that are not 6 numbers."""
        n = len(self.box)
        if len(self.label) != n:
            raise ValueError(f"{self.image}: {n} boxes but {len(self.label)} labels")
        for extra in (self.diameter_mm, self.kind):
            if extra and len(extra) != n:
                raise ValueError(f"{self.image}: extras must have one value per box")
        self.box = [tuple(float(v) for v in b) for b in self.box]  # type: ignore[misc]
        if any(len(b) != 6 for b in self.box):
            raise ValueError(f"{self.image}: boxes must be [cx, cy, cz, w, h, d]")

    def to_json(self) -> dict[str, Any]:
        """The JSON object of this entry (MONAI keys first, extras only when present)."""
        doc: dict[str, Any] = {
            "image": self.image,
            "box": [list(b) for b in self.box],
            "label": [int(v) for v in self.label],
        }
        if self.diameter_mm:
            doc["diameter_mm"] = [float(v) for v in self.diameter_mm]
        if self.kind:
            doc["kind"] = list(self.kind)
        return doc

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> BoxEntry:
        """Parse one JSON entry; a missing ``label`` list means all nodules (class 0)."""
        boxes = [tuple(float(v) for v in b) for b in doc.get("box", [])]
        labels = [int(v) for v in doc.get("label", [NODULE_CLASS] * len(boxes))]
        return cls(
            image=str(doc["image"]),
            box=cast(list[Box], boxes),
            label=labels,
            diameter_mm=[float(v) for v in doc.get("diameter_mm", [])],
            kind=[str(v) for v in doc.get("kind", [])],
        )


def nodules_to_boxes(nodules: Sequence[Nodule]) -> list[Box]:
    """RAS world ``cccwhd`` boxes of LPS nodules (one per nodule, same order)."""
    return [lps_to_ras_box(n.box_xyz_mm) for n in nodules]


def nodule_box_entry(image: str, nodules: Sequence[Nodule]) -> BoxEntry:
    """Box-list entry for ``image`` (path as it should appear in the JSON)."""
    return BoxEntry(
        image=image,
        box=nodules_to_boxes(nodules),
        label=[NODULE_CLASS] * len(nodules),
        diameter_mm=[float(n.diameter_mm) for n in nodules],
        kind=[n.kind for n in nodules],
    )


def boxes_to_nodules(
    entry: BoxEntry,
    spacing_mm: Sequence[float],
    origin_xyz_mm: Sequence[float],
    *,
    label: int | None = NODULE_CLASS,
) -> list[Nodule]:
    """LPS nodules of the boxes of ``entry`` (class ``label``; None: every box).

    ``spacing_mm`` (z, y, x) and ``origin_xyz_mm`` (LPS) describe the image grid
    and give each nodule its voxel centre. The diameter is ``diameter_mm`` when
    stored, else the mean box extent; the kind is ``kind`` when stored and
    valid, else "solid".
    """
    sz, sy, sx = (float(s) for s in spacing_mm)
    ox, oy, oz = (float(o) for o in origin_xyz_mm)
    out: list[Nodule] = []
    for i, (box, cls) in enumerate(zip(entry.box, entry.label)):
        if label is not None and cls != label:
            continue
        cx, cy, cz, w, h, d = ras_to_lps_box(box)
        diameter = entry.diameter_mm[i] if entry.diameter_mm else (w + h + d) / 3.0
        kind = entry.kind[i] if entry.kind and entry.kind[i] in NODULE_KINDS else "solid"
        out.append(
            Nodule(
                centre_zyx=((cz - oz) / sz, (cy - oy) / sy, (cx - ox) / sx),
                centre_xyz_mm=(cx, cy, cz),
                diameter_mm=float(diameter),
                kind=cast(NoduleKind, kind),
            )
        )
    return out


def write_box_list(
    path: str | Path,
    entries: Mapping[str, Sequence[BoxEntry]] | Sequence[BoxEntry],
) -> Path:
    """Write a box list JSON; returns its path.

    ``entries`` maps split names ("training", "validation", ...) to entries; a
    plain sequence is written as "training" with an empty "validation".
    """
    splits: Mapping[str, Sequence[BoxEntry]]
    splits = entries if isinstance(entries, Mapping) else {"training": entries, "validation": []}
    doc = {split: [e.to_json() for e in items] for split, items in splits.items()}
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    return out


def read_box_list(path: str | Path) -> dict[str, list[BoxEntry]]:
    """Read a box list JSON: split name -> entries (image paths as written)."""
    doc = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(doc, dict):
        raise ValueError(f"{path}: a box list is a JSON object of splits")
    return {
        split: [BoxEntry.from_json(e) for e in items]
        for split, items in doc.items()
        if isinstance(items, list)
    }
