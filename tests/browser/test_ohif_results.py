"""The node's results as a radiologist sees them in the real OHIF v3 viewer.

A PACS (real Orthanc with its DICOMweb plugin) auto-routes a chest CT phantom with two nodules to the node,
which runs both demo models (chest CT segmentation, lung nodule detection) and sends SEG, SRs, GSPS and the
burned-in overlay (SC) back to Orthanc. OHIF 3.13.2 (``tests/browser/ohif.py``: its built viewer and
Orthanc's DICOMweb on one origin) opens the study in headless Chromium, and:

* the SEG overlay lands on the lungs: the pixels the overlay changed on the shown slice (a screenshot before
  and after the SEG is loaded) are compared with the SEG's own mask of that slice, projected onto the canvas
  with the viewport's own canvas-to-world transform (IoU);
* the measurement panel lists every detection of the detection SR with its title ("Lung nodule, 12 mm,
  85 %"), after the radiologist answers OHIF's "continue tracking measurements?" prompt;
* the SC overlay series ("AI overlay - not for primary diagnosis") is shown in colour.

Screenshots of every step go to the browser conftest's ``screenshot_dir`` (``ohif-NN-*.png``).
"""

from __future__ import annotations

import io
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import numpy.typing as npt
import pydicom
import pytest
import requests
from PIL import Image
from selenium.webdriver.common.action_chains import ActionChains
from selenium.common.exceptions import JavascriptException
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

from auto_routing import pacs_routing_to_node
from peers import Orthanc, wait_for
from tests.browser.ohif import OhifServer
from training.data.dicom_pair import write_dicom_case
from training.phantoms.chest import ChestPhantom, PhantomConfig, generate_chest_phantom

pytestmark = pytest.mark.slow

SEG_SERIES, SEG_SR_SERIES, DETECTION_SR_SERIES, GSPS_SERIES = 9011, 9012, 9022, 9023
SC_CLASSES = {"1.2.840.10008.5.1.4.1.1.7", "1.2.840.10008.5.1.4.1.1.7.4"}
OVERLAY_TEXT = "AI overlay"


@dataclass(frozen=True)
class Delivered:
    """A study in Orthanc with the node's results, and OHIF serving it."""

    orthanc: Orthanc
    ohif: OhifServer
    study_uid: str
    phantom: ChestPhantom
    ct: dict[str, pydicom.Dataset]  # SOP Instance UID -> source CT header
    series: dict[int, str]  # series number -> Orthanc series id

    def instance(self, series_number: int) -> pydicom.Dataset:
        (first, *_) = self.orthanc.get(f"/series/{self.series[series_number]}")["Instances"]
        return pydicom.dcmread(io.BytesIO(self.orthanc.instance_file(first)))


@pytest.fixture(scope="module")
def delivered(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Delivered]:
    work = tmp_path_factory.mktemp("ohif")
    phantom = generate_chest_phantom(PhantomConfig(nodule_count=(2, 2), nodule_diameter_mm=(12.0, 18.0)), seed=4242)
    series_dir, _ = write_dicom_case(phantom, work / "case", seed=4242)
    files = sorted(series_dir.glob("*.dcm"))
    ct = {str(ds.SOPInstanceUID): ds for ds in (pydicom.dcmread(f, stop_before_pixels=True) for f in files)}
    study_uid = str(next(iter(ct.values())).StudyInstanceUID)
    with pacs_routing_to_node(work, "ohif", destination={"outputs": ["SEG", "SR", "GSPS", "SC"]},
                              plugins=["libOrthancDicomWeb.so"]) as (orthanc, _node):
        orthanc.upload_files(files)
        orthanc_study = wait_for("the study in Orthanc", lambda: orthanc.lookup_study(study_uid))

        def results() -> dict[int, str] | None:
            try:
                listed = orthanc.get(f"/studies/{orthanc_study}/series")
            except requests.RequestException:
                return None  # a busy peer's dropped answer is "not yet"; the deadline still holds
            found = {int(s["MainDicomTags"].get("SeriesNumber", 0)): s["ID"] for s in listed}
            return found if {SEG_SERIES, SEG_SR_SERIES, DETECTION_SR_SERIES, GSPS_SERIES} <= set(found) else None

        series = wait_for("SEG, both SRs and GSPS of the node in Orthanc", results, timeout=240, interval=1.0)
        time.sleep(2)  # an SC series the node sends in the same delivery arrives with them
        series = results() or series
        ohif = OhifServer(orthanc.url).start()
        try:
            yield Delivered(orthanc, ohif, study_uid, phantom, ct, series)
        finally:
            ohif.stop()


# -- driving OHIF -------------------------------------------------------------------------------------------


def open_study(driver: WebDriver, delivered: Delivered) -> None:
    """The study in OHIF's basic viewer, the CT shown, the first-visit tour dismissed."""
    driver.get(delivered.ohif.viewer_url(delivered.study_uid))
    WebDriverWait(driver, 60).until(lambda d: d.execute_script(
        "const e = window.cornerstone && window.cornerstone.getRenderingEngines()[0];"
        "return !!e && e.getViewports().some(v => v.getCurrentImageId && v.getCurrentImageId());"))
    for skip in driver.find_elements(By.XPATH, "//*[text()='Skip all']"):
        skip.click()


def load_series(driver: WebDriver, description: str) -> None:
    """Double-click the study browser's thumbnail of the series whose description starts with ``description``."""
    thumbnail = WebDriverWait(driver, 30).until(lambda d: d.find_element(
        By.XPATH, f"//*[@data-cy='series-description-label'][starts-with(normalize-space(.), '{description}')]"))
    ActionChains(driver).double_click(thumbnail).perform()


def answer_yes(driver: WebDriver, timeout: float = 30) -> None:
    """Answer OHIF's viewport prompt ("continue tracking measurements?", "open this Segmentation?") with Yes."""
    WebDriverWait(driver, timeout).until(lambda d: d.find_elements(By.CSS_SELECTOR, "[data-cy=yes-hydrate-btn]"))
    driver.find_element(By.CSS_SELECTOR, "[data-cy=yes-hydrate-btn]").click()


_VIEWPORT_STATE = """
const vp = window.cornerstone.getRenderingEngines()[0].getViewports()
  .find(v => v.element.closest('[data-cy=viewport-pane]') && v.getCurrentImageId && v.getCurrentImageId());
const rect = vp.canvas.getBoundingClientRect();
const w = p => Array.from(vp.canvasToWorld(p));
return {imageId: vp.getCurrentImageId(), left: rect.left, top: rect.top, width: rect.width, height: rect.height,
        origin: w([0, 0]), dx: w([1, 0]), dy: w([0, 1])};
"""


def viewport_state(driver: WebDriver) -> dict[str, Any]:
    return dict(driver.execute_script(_VIEWPORT_STATE))


def show_slice(driver: WebDriver, sop_instance_uid: str) -> None:
    """Scroll the viewport to the image of ``sop_instance_uid``."""
    driver.execute_script("""
        const vp = window.cornerstone.getRenderingEngines()[0].getViewports()
          .find(v => v.getCurrentImageId && v.getCurrentImageId());
        const index = vp.getImageIds().findIndex(id => id.includes(arguments[0]));
        return window.cornerstone.utilities.jumpToSlice(vp.element, {imageIndex: index});""", sop_instance_uid)
    WebDriverWait(driver, 20).until(lambda d: sop_instance_uid in viewport_state(d)["imageId"])
    time.sleep(1.5)  # the render after the jump


def showing(driver: WebDriver, sop_instance_uids: list[str], timeout: float = 30) -> None:
    """Wait until the viewport shows one of ``sop_instance_uids`` (while OHIF builds the viewport, it has none
    yet and the script reading it fails: that is "not yet")."""
    WebDriverWait(driver, timeout, ignored_exceptions=[JavascriptException]).until(
        lambda d: any(uid in viewport_state(d)["imageId"] for uid in sop_instance_uids))


def canvas_pixels(driver: WebDriver, state: dict[str, Any]) -> npt.NDArray[np.int16]:
    """The viewport's canvas as RGB (a screenshot cropped to the canvas; device pixel ratio 1)."""
    shot = Image.open(io.BytesIO(driver.get_screenshot_as_png())).convert("RGB")
    box = (round(state["left"]), round(state["top"]), round(state["left"] + state["width"]),
           round(state["top"] + state["height"]))
    return np.asarray(shot.crop(box), dtype=np.int16)


def mask_on_canvas(mask: npt.NDArray[np.bool_], header: pydicom.Dataset, state: dict[str, Any],
                   shape: tuple[int, int]) -> npt.NDArray[np.bool_]:
    """``mask`` (rows x columns of the image ``header``) seen on the canvas: each canvas pixel's centre taken to
    the patient frame with the viewport's canvas-to-world transform, then into the image's pixel grid."""
    origin, dx, dy = (np.asarray(state[k], dtype=np.float64) for k in ("origin", "dx", "dy"))
    ys, xs = np.mgrid[0:shape[0], 0:shape[1]] + 0.5
    world = origin + xs[..., None] * (dx - origin) + ys[..., None] * (dy - origin)
    position = np.asarray(header.ImagePositionPatient, dtype=np.float64)
    orientation = np.asarray(header.ImageOrientationPatient, dtype=np.float64)
    row_spacing, column_spacing = (float(v) for v in header.PixelSpacing)
    column = np.rint((world - position) @ orientation[:3] / column_spacing).astype(int)
    row = np.rint((world - position) @ orientation[3:] / row_spacing).astype(int)
    inside = (row >= 0) & (row < mask.shape[0]) & (column >= 0) & (column < mask.shape[1])
    projected = np.zeros(shape, dtype=bool)
    projected[inside] = mask[row[inside], column[inside]]
    return projected


def iou(a: npt.NDArray[np.bool_], b: npt.NDArray[np.bool_]) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


def shot(driver: WebDriver, folder: Path, name: str) -> Path:
    path = folder / f"ohif-{name}.png"
    driver.save_screenshot(str(path))
    return path


# -- the checks ---------------------------------------------------------------------------------------------


def test_seg_overlay_lands_on_the_lungs(delivered: Delivered, browser: WebDriver, screenshot_dir: Path) -> None:
    seg = hd.seg.Segmentation.from_dataset(delivered.instance(SEG_SERIES))
    segments = {int(item.SegmentNumber): item for item in seg.SegmentSequence}
    (lung,) = [n for n, item in segments.items()
               if item.SegmentedPropertyTypeCodeSequence[0].CodeMeaning.lower() == "lung"]
    # The CT slice with the most lung, and every segment's mask on it (as the SEG says, not the model).
    areas = {uid: int(seg.get_pixels_by_source_instance([uid], segment_numbers=[lung]).sum())
             for uid in delivered.ct}
    slice_uid = max(areas, key=areas.__getitem__)
    masks = seg.get_pixels_by_source_instance([slice_uid], segment_numbers=sorted(segments))[0].astype(bool)
    lung_mask = masks[..., sorted(segments).index(lung)]
    assert lung_mask.sum() > 1000, f"the SEG's lung on its widest slice has only {lung_mask.sum()} pixels"

    open_study(browser, delivered)
    show_slice(browser, slice_uid)
    state = viewport_state(browser)
    before = canvas_pixels(browser, state)
    shot(browser, screenshot_dir, "01-ct-widest-lung-slice")

    load_series(browser, "AI chest anatomy - SEG")
    answer_yes(browser)
    WebDriverWait(browser, 60).until(lambda d: d.execute_script(
        "return window.cornerstoneTools.segmentation.state.getSegmentations().length > 0"))
    show_slice(browser, slice_uid)
    state = viewport_state(browser)
    after = canvas_pixels(browser, state)
    shot(browser, screenshot_dir, "02-seg-overlay")

    # What the overlay changed, and which segment's colour each changed pixel moved towards.
    colours = browser.execute_script("""
        const ts = window.cornerstoneTools.segmentation;
        const s = ts.state.getSegmentations()[0];
        const vpId = window.cornerstone.getRenderingEngines()[0].getViewports()
          .find(v => v.getCurrentImageId && v.getCurrentImageId()).id;
        return Object.keys(s.segments).map(i => [Number(i), s.segments[i].label,
          Array.from(ts.config.color.getSegmentIndexColor(vpId, s.segmentationId, Number(i))).slice(0, 3)]);""")
    changed = np.abs(after - before).sum(axis=2) > 24
    union = mask_on_canvas(masks.any(axis=2), delivered.ct[slice_uid], state, changed.shape)
    lung_on_canvas = mask_on_canvas(lung_mask, delivered.ct[slice_uid], state, changed.shape)
    by_label = {label: np.asarray(rgb, dtype=np.float64) for _, label, rgb in colours}
    # Blending moves a pixel from its grey towards its segment's colour: the segment whose colour lies most
    # nearly in the direction the pixel moved is the one drawn there.
    towards = (after - before).astype(np.float64)
    cosines = []
    for rgb in by_label.values():
        target = rgb - before
        cosines.append((towards * target).sum(axis=2)
                       / (np.linalg.norm(towards, axis=2) * np.linalg.norm(target, axis=2) + 1e-9))
    closest = np.argmax(np.stack(cosines), axis=0)
    lung_coloured = changed & (closest == list(by_label).index(
        next(label for label in by_label if label.lower().startswith("lung"))))
    figures = {"overlay vs all segments": iou(changed, union), "lung colour vs lung mask": iou(lung_coloured,
                                                                                              lung_on_canvas)}
    print(f"\nSEG overlay on slice {slice_uid}: {figures}; segment colours {colours}")
    Image.fromarray(np.stack([changed, union, lung_coloured & lung_on_canvas], axis=2).astype(np.uint8) * 255).save(
        screenshot_dir / "ohif-02b-overlay-changed-r-mask-g-lung-agree-b.png")
    assert figures["overlay vs all segments"] > 0.9, figures
    assert figures["lung colour vs lung mask"] > 0.9, figures


def test_measurement_panel_lists_every_detection_with_its_title(delivered: Delivered, browser: WebDriver,
                                                               screenshot_dir: Path) -> None:
    report = delivered.instance(DETECTION_SR_SERIES)
    titles = [str(item.TextValue) for group in _groups(report) for item in group.ContentSequence
              if item.ValueType == "TEXT" and item.ConceptNameCodeSequence[0].CodeValue == "121106"]
    assert len(titles) >= len(delivered.phantom.nodules), titles
    assert all(re.fullmatch(r"Nodule, \d+ mm, \d+ %", title) for title in titles), titles

    open_study(browser, delivered)
    load_series(browser, "AI lung nodules - SR")
    answer_yes(browser)  # "Do you want to continue tracking measurements for this study?"
    browser.find_element(By.CSS_SELECTOR, "[data-cy=trackedMeasurements-btn]").click()
    def listed(driver: WebDriver) -> str | None:
        text = str(driver.find_element(By.TAG_NAME, "body").text)
        return text if f"Measurements ({len(titles)})" in text else None

    panel = WebDriverWait(browser, 30).until(listed)
    shot(browser, screenshot_dir, "03-measurement-panel")
    for title in titles:
        assert title in panel, f"{title!r} is not in OHIF's measurement panel:\n{panel}"


def test_burned_in_overlay_series_is_shown(delivered: Delivered, browser: WebDriver, screenshot_dir: Path) -> None:
    orthanc = delivered.orthanc
    study = orthanc.lookup_study(delivered.study_uid)

    def overlay_series() -> list[dict[str, Any]] | None:
        found = [s for s in orthanc.get(f"/studies/{study}/series")
                 if OVERLAY_TEXT in s["MainDicomTags"].get("SeriesDescription", "")]
        return found or None

    overlays = wait_for(f"a '{OVERLAY_TEXT}' series in Orthanc (destination outputs name SC)", overlay_series,
                        timeout=30, interval=1.0)
    instances = [orthanc.instance_tags(i) for s in overlays for i in s["Instances"]]
    assert {tags["SOPClassUID"] for tags in instances} <= SC_CLASSES
    assert all("not for primary diagnosis" in s["MainDicomTags"]["SeriesDescription"] for s in overlays)
    uids = [tags["SOPInstanceUID"] for tags in instances]

    open_study(browser, delivered)
    load_series(browser, OVERLAY_TEXT)
    showing(browser, uids)
    time.sleep(1.5)
    pixels = canvas_pixels(browser, viewport_state(browser))
    shot(browser, screenshot_dir, "04-sc-overlay")
    chroma = pixels.max(axis=2) - pixels.min(axis=2)
    assert (chroma > 60).sum() > 200, "the overlay series shows no coloured outline"


def test_the_segmentation_report_opens_on_a_slice_with_its_outlines(delivered: Delivered, browser: WebDriver,
                                                                    screenshot_dir: Path) -> None:
    """Each segment's volume is outlined on its widest slice: OHIF opens the report there (it showed a black
    viewport when no group had coordinates) and draws the outline with the segment's volume."""
    report = delivered.instance(SEG_SR_SERIES)
    outlined = [str(item.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
                for group in _groups(report) for item in group.ContentSequence if item.ValueType == "SCOORD"]
    titles = [str(item.TextValue) for group in _groups(report) for item in group.ContentSequence
              if item.ValueType == "TEXT" and item.ConceptNameCodeSequence[0].CodeValue == "121106"]
    assert outlined and len(titles) == len(outlined), (outlined, titles)
    assert any(re.fullmatch(r"Lung: \d+\.\d mL, mean -\d+ HU", title) for title in titles), titles
    assert set(outlined) <= set(delivered.ct)

    open_study(browser, delivered)
    load_series(browser, "AI chest anatomy - SR")
    showing(browser, outlined)
    time.sleep(1.5)
    pixels = canvas_pixels(browser, viewport_state(browser))
    shot(browser, screenshot_dir, "05-segmentation-report")
    assert pixels.std() > 20, "the segmentation report opens on a blank viewport"
    chroma = pixels.max(axis=2) - pixels.min(axis=2)
    assert (chroma > 60).sum() > 100, "no outline is drawn on the report's slice"


def _groups(report: pydicom.Dataset) -> list[pydicom.Dataset]:
    (measurements,) = [item for item in report.ContentSequence
                       if item.ConceptNameCodeSequence[0].CodeValue == "126010"]  # Imaging Measurements
    return list(measurements.ContentSequence)
