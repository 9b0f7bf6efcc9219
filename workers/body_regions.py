"""Which body regions a CT volume actually covers, judged from the image in well under a second.

INTERFACE STUB: the survey itself is being written; the types below are the contract
that the applicability check (workers/applicability.py) and the plausibility checks
(workers/plausibility.py) use.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from dicom_node.model_domain import BodyRegion, ImageRegions
from workers.volume import Volume

__all__ = ["BodyRegionSurvey", "RegionExtent", "survey_body_regions"]


@dataclass(frozen=True)
class RegionExtent:
    """One region the volume covers: its slices (indices into the volume), extent and completeness.

    ``complete``: the region's landmark organ (lungs for chest, skull for head) lies wholly
    inside the field of view; None where the survey does not judge it.
    """

    region: BodyRegion
    first_slice: int
    last_slice: int
    extent_mm: float
    complete: bool | None
    evidence: str


@dataclass(frozen=True, eq=False)
class BodyRegionSurvey:
    """What the image shows. ``body_mask`` and ``lung_mask`` are on the survey grid:
    ``volume.array[::step[0], ::step[1], ::step[2]]`` (bool arrays of that shape).
    ``lung_mask`` is the lungs with their holes (vessels, nodules) filled.
    ``available`` False (``notes`` say why) when the image could not be judged.
    """

    available: bool
    regions: tuple[RegionExtent, ...]
    step: tuple[int, int, int]
    body_mask: npt.NDArray[np.bool_]
    lung_mask: npt.NDArray[np.bool_]
    seconds: float
    notes: tuple[str, ...] = ()
    measurements: dict[str, Any] = field(default_factory=dict)

    def region(self, name: str) -> RegionExtent | None:
        return next((r for r in self.regions if r.region == name), None)

    def image_regions(self) -> ImageRegions:
        """The survey as the shared decision type :class:`dicom_node.model_domain.ImageRegions`."""
        return ImageRegions(
            available=self.available,
            regions=tuple(r.region for r in self.regions),
            complete=tuple(r.region for r in self.regions if r.complete),
            evidence=tuple(r.evidence for r in self.regions) + self.notes,
            seconds=self.seconds,
        )


def survey_body_regions(volume: Volume) -> BodyRegionSurvey:
    """Survey ``volume`` (see the module docstring)."""
    raise NotImplementedError("being written")
