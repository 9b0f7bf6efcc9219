"""Readers and writers for the dataset formats people already have.

Why: a training pipeline is only useful if it consumes the data sites already
hold and produces data other tools read. This package converts between the
in-memory chest phantom (:mod:`training.phantoms.chest`: HU volume, label map,
LPS nodule list) and

* :mod:`training.data.decathlon` - the Medical Segmentation Decathlon /
  nnU-Net layout (imagesTr/labelsTr NIfTI + dataset.json);
* :mod:`training.data.boxes` - the LUNA16-style box list used by MONAI's
  detection tutorials (world RAS ``cccwhd`` boxes in a JSON data list);
* :mod:`training.data.dicom_pair` - a DICOM CT series plus a DICOM SEG, what a
  hospital exports from its own annotations (imports highdicom; import the
  submodule directly).

Coordinate conventions are documented in each module; the rule of thumb is
that our arrays are (z, y, x) and our world is DICOM LPS, while NIfTI arrays
are (x, y, z) with a RAS world.
"""

from training.data.boxes import (
    BoxEntry,
    boxes_to_nodules,
    nodule_box_entry,
    nodules_to_boxes,
    read_box_list,
    write_box_list,
)
from training.data.decathlon import (
    DecathlonCase,
    LoadedCase,
    load_case,
    read_decathlon,
    write_decathlon,
)

__all__ = [
    "BoxEntry",
    "DecathlonCase",
    "LoadedCase",
    "boxes_to_nodules",
    "load_case",
    "nodule_box_entry",
    "nodules_to_boxes",
    "read_box_list",
    "read_decathlon",
    "write_box_list",
    "write_decathlon",
]
