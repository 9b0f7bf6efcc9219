"""The label palette stays distinct for colour-blind readers, from the CT's greys and from bone; labels use it.

How: each colour is passed through Machado, Oliveira & Fernandes (2009) simulations of
protanopia, deuteranopia and tritanopia (severity 1, applied to linear sRGB), converted to
CIE L*a*b* (D65) and compared with CIEDE2000. Thresholds: two palette colours differ by at
least 11 under every vision (about 5x a just-noticeable difference); each differs by at
least 15 from the grey of its own lightness (a CT shows every grey) and by at least 12
from bone's old label colour (241, 214, 145; Okabe-Ito orange is 14.2 from it under
deuteranopia); each has L* >= 45 so it shows on dark lung. The old demo pair nodule
(255, 230, 0) / bone (241, 214, 145) is measured too: it fails (under 6 with tritanopia),
which is why the palette exists.
"""

from __future__ import annotations

import itertools
import numpy as np
import numpy.typing as npt
import pytest

from dicom_node.model_catalog import BundleLabel, ModelCatalog, metadata_labels, read_bundle_json
from dicom_node.palette import PALETTE_RGB, is_grey, label_colour, palette_colour

#: Machado et al. 2009, Table: severity 1.0 (linear RGB -> linear RGB).
MACHADO = {
    "protanopia": np.array([[0.152286, 1.052583, -0.204868], [0.114503, 0.786281, 0.099216],
                            [-0.003882, -0.048116, 1.051998]]),
    "deuteranopia": np.array([[0.367322, 0.860646, -0.227968], [0.280085, 0.672501, 0.047413],
                              [-0.011820, 0.042940, 0.968881]]),
    "tritanopia": np.array([[1.255528, -0.076749, -0.178779], [-0.078411, 0.930809, 0.147602],
                            [0.004733, 0.691367, 0.303900]]),
}
VISIONS = ("normal", *MACHADO)
OLD_BONE = (241, 214, 145)
OLD_NODULE = (255, 230, 0)
MIN_BETWEEN = 11.0
MIN_FROM_GREY = 15.0
MIN_FROM_BONE = 12.0

_SRGB_TO_XYZ = np.array([[0.4124564, 0.3575761, 0.1804375], [0.2126729, 0.7151522, 0.0721750],
                         [0.0193339, 0.1191920, 0.9503041]])
_WHITE_D65 = np.array([0.95047, 1.0, 1.08883])


def _linear(rgb: tuple[int, int, int]) -> npt.NDArray[np.float64]:
    c = np.asarray(rgb, dtype=np.float64) / 255.0
    return np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)


def seen_lab(rgb: tuple[int, int, int], vision: str) -> npt.NDArray[np.float64]:
    """CIE L*a*b* of ``rgb`` as seen with ``vision`` (the simulation clipped to the sRGB gamut)."""
    linear = _linear(rgb)
    if vision != "normal":
        linear = np.clip(MACHADO[vision] @ linear, 0.0, 1.0)
    xyz = _SRGB_TO_XYZ @ linear / _WHITE_D65
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.array([116 * f[1] - 16, 500 * (f[0] - f[1]), 200 * (f[1] - f[2])])


def ciede2000(lab1: npt.NDArray[np.float64], lab2: npt.NDArray[np.float64]) -> float:
    """CIEDE2000 colour difference (Sharma, Wu & Dalal 2005)."""
    (l1, a1, b1), (l2, a2, b2) = lab1, lab2
    c_bar = (np.hypot(a1, b1) + np.hypot(a2, b2)) / 2
    g = 0.5 * (1 - np.sqrt(c_bar**7 / (c_bar**7 + 25**7)))
    a1p, a2p = (1 + g) * a1, (1 + g) * a2
    c1p, c2p = np.hypot(a1p, b1), np.hypot(a2p, b2)
    h1 = np.degrees(np.arctan2(b1, a1p)) % 360
    h2 = np.degrees(np.arctan2(b2, a2p)) % 360
    dh = 0.0 if c1p * c2p == 0 else (h2 - h1 + 180) % 360 - 180
    d_hue = 2 * np.sqrt(c1p * c2p) * np.sin(np.radians(dh / 2))
    l_bar, cp_bar = (l1 + l2) / 2, (c1p + c2p) / 2
    if c1p * c2p == 0:
        h_bar = h1 + h2
    elif abs(h1 - h2) <= 180:
        h_bar = (h1 + h2) / 2
    else:
        h_bar = (h1 + h2 + 360) / 2 if h1 + h2 < 360 else (h1 + h2 - 360) / 2
    t = (1 - 0.17 * np.cos(np.radians(h_bar - 30)) + 0.24 * np.cos(np.radians(2 * h_bar))
         + 0.32 * np.cos(np.radians(3 * h_bar + 6)) - 0.20 * np.cos(np.radians(4 * h_bar - 63)))
    rotation = -np.sin(np.radians(60 * np.exp(-(((h_bar - 275) / 25) ** 2)))) * 2 * np.sqrt(
        cp_bar**7 / (cp_bar**7 + 25**7))
    s_l = 1 + 0.015 * (l_bar - 50) ** 2 / np.sqrt(20 + (l_bar - 50) ** 2)
    s_c, s_h = 1 + 0.045 * cp_bar, 1 + 0.015 * cp_bar * t
    d_l, d_c = (l2 - l1) / s_l, (c2p - c1p) / s_c
    return float(np.sqrt(d_l**2 + d_c**2 + (d_hue / s_h) ** 2 + rotation * d_c * (d_hue / s_h)))


def test_ciede2000_matches_sharmas_reference_pairs() -> None:
    """Pairs 1, 7 and 17 of Sharma et al.'s test data (the formula is what the thresholds are in)."""
    assert ciede2000(np.array([50, 2.6772, -79.7751]), np.array([50, 0, -82.7485])) == pytest.approx(2.0425, abs=1e-4)
    assert ciede2000(np.array([50, 0, 0]), np.array([50, -1, 2])) == pytest.approx(2.3669, abs=1e-4)
    assert ciede2000(np.array([50, 2.5, 0]), np.array([73, 25, -18])) == pytest.approx(27.1492, abs=1e-4)


def test_simulations_keep_greys_grey_and_lose_red_green() -> None:
    for vision in MACHADO:
        grey = seen_lab((128, 128, 128), vision)
        assert abs(grey[1]) < 1.0 and abs(grey[2]) < 1.0, vision
    red, green = (200, 60, 60), (90, 130, 40)
    assert ciede2000(seen_lab(red, "normal"), seen_lab(green, "normal")) > 40
    assert ciede2000(seen_lab(red, "deuteranopia"), seen_lab(green, "deuteranopia")) < 15


@pytest.mark.parametrize("vision", VISIONS)
def test_palette_colours_stay_apart(vision: str) -> None:
    labs = [seen_lab(rgb, vision) for rgb in PALETTE_RGB]
    closest = min((ciede2000(labs[i], labs[j]), PALETTE_RGB[i], PALETTE_RGB[j])
                  for i, j in itertools.combinations(range(len(labs)), 2))
    assert closest[0] >= MIN_BETWEEN, f"{vision}: {closest[1]} and {closest[2]} differ by {closest[0]:.1f}"


@pytest.mark.parametrize("vision", VISIONS)
def test_palette_colours_stand_out_from_ct_greys_and_bone(vision: str) -> None:
    bone = seen_lab(OLD_BONE, vision)
    for rgb in PALETTE_RGB:
        lab = seen_lab(rgb, vision)
        from_grey = ciede2000(lab, np.array([lab[0], 0.0, 0.0]))
        assert from_grey >= MIN_FROM_GREY, f"{vision}: {rgb} is {from_grey:.1f} from the grey of its L*"
        assert ciede2000(lab, bone) >= MIN_FROM_BONE, f"{vision}: {rgb} too near bone {OLD_BONE}"
        assert seen_lab(rgb, "normal")[0] >= 45.0, f"{rgb} is too dark for dark lung"


def test_the_old_nodule_yellow_was_too_near_bone() -> None:
    """The problem the palette solves, measured by the same rule: it would fail the threshold."""
    worst = min(ciede2000(seen_lab(OLD_NODULE, v), seen_lab(OLD_BONE, v)) for v in VISIONS)
    assert worst < 6.0


def test_labels_take_the_palette_unless_a_colour_is_configured() -> None:
    assert palette_colour(1) == PALETTE_RGB[0] and palette_colour(len(PALETTE_RGB) + 1) == PALETTE_RGB[0]
    assert label_colour(5, None) == PALETTE_RGB[4] and label_colour(5, (10, 200, 30)) == (10, 200, 30)
    assert label_colour(2, (128, 128, 120)) == PALETTE_RGB[1], "a configured grey would vanish on a CT"
    assert is_grey((90, 90, 100)) and not is_grey(PALETTE_RGB[1])
    with pytest.raises(ValueError, match="label value 0"):
        palette_colour(0)
    code = {"value": "27925004", "scheme": "SCT", "meaning": "Nodule"}
    plain = BundleLabel.model_validate({"value": 5, "name": "nodule", "code": code, "category": code})
    assert plain.color_rgb is None and plain.display_rgb == plain.segment_label().color_rgb == palette_colour(5)


def test_demo_models_show_each_label_in_its_palette_colour() -> None:
    """The shipped bundles are on the palette; nodule has one colour in the segmentation and the detector."""
    catalog = ModelCatalog.demo()
    nodule_colours = set()
    for model_id in catalog.ids:
        labels = metadata_labels(read_bundle_json(catalog.path(model_id), "metadata.json"), model_id) or []
        for label in labels:
            assert label.display_rgb in PALETTE_RGB, f"{model_id}: {label.name} {label.display_rgb}"
            if label.name == "nodule":
                nodule_colours.add(label.display_rgb)
    assert nodule_colours == {palette_colour(5)}
