"""The one set of label colours: SEG recommended display colours, the overlay series, GSPS and the web preview.

Why one palette: a radiologist who sees a nodule orange in the SEG overlay must see it
orange in the burned-in overlay series and in the preview, and must be able to tell it
from the other labels and from the CT itself - also when colour-blind (about 1 in 12
men). The old demo colours failed that: nodule yellow (255, 230, 0) next to bone
(241, 214, 145) is a difference of a few CIE units under tritanopia.

How it was chosen: the colours of Okabe & Ito's colour-universal-design palette that
stay distinct under simulated protanopia, deuteranopia and tritanopia (Machado et al.
2009, severity 1) - orange, sky blue, blue, vermillion - completed by two colours
searched on an sRGB grid for the largest smallest difference to the others. Okabe-Ito's
yellow is left out (too near the old bone colour and, under tritanopia, near white
bone), its bluish green and reddish purple too (they turn grey under deuteranopia, and
a grey mark vanishes on a CT). Every colour is light enough (CIE L* >= 45) to show on
dark lung. tests/unit/dicom_node/test_palette.py measures all of this (CIEDE2000).

Which colour a label gets: the one its registry or bundle entry configures
(``color_rgb``), else the palette's colour for its label value (value 1 the first,
wrapping after :data:`PALETTE_RGB`'s length), so the same value - e.g. nodule, 5, in
the segmentation and the detection demo models - has the same colour in every model.
A configured grey is replaced by the palette colour (a grey outline is invisible on a
CT). The colour is settled once, when the label is read (:func:`label_colour`), and
every output draws ``SegmentLabel.color_rgb``.
"""

from __future__ import annotations

__all__ = ["LOW_CONFIDENCE_RGB", "PALETTE_RGB", "is_grey", "label_colour", "palette_colour"]

RGB = tuple[int, int, int]


#: Label colours in slot order (slot = (label value - 1) mod 6). Names for the docs:
#: violet, sky blue, green, blue, orange, vermillion.
PALETTE_RGB: tuple[RGB, ...] = (
    (135, 120, 255),  # violet (grid search)
    (86, 180, 233),  # sky blue (Okabe-Ito)
    (105, 150, 90),  # green (grid search; Okabe-Ito's bluish green greys out under deuteranopia)
    (0, 114, 178),  # blue (Okabe-Ito)
    (230, 159, 0),  # orange (Okabe-Ito) - value 5, nodule in the demo models
    (213, 94, 0),  # vermillion (Okabe-Ito)
)

#: How findings under a model's display threshold are drawn where they are drawn at all (dashed in the preview,
#: outlined only for destinations that ask): a light grey reads as "uncertain" and no label owns it.
LOW_CONFIDENCE_RGB: RGB = (200, 200, 200)

#: Channels closer than this count as a grey.
_GREY_SPREAD = 24


def palette_colour(value: int) -> RGB:
    """The palette's colour for label value ``value`` (1 = first slot); ValueError for a value below 1."""
    if value < 1:
        raise ValueError(f"label value {value} has no palette colour (label values start at 1)")
    return PALETTE_RGB[(value - 1) % len(PALETTE_RGB)]


def is_grey(rgb: RGB) -> bool:
    """Whether ``rgb`` is (near) grey, so that it would not stand out on a greyscale image."""
    return max(rgb) - min(rgb) < _GREY_SPREAD


def label_colour(value: int, configured: RGB | None) -> RGB:
    """The display colour of label ``value``: ``configured`` unless absent or grey, else the palette's."""
    if configured is None or is_grey(configured):
        return palette_colour(value)
    return (int(configured[0]), int(configured[1]), int(configured[2]))
