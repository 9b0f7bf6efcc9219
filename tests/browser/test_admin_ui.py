"""The admin web UI in a real headless Chromium, against a real running node.

One scenario, as an admin would work through it: a CT study arrives over DICOM
(DCMTK ``storescu``) and the node completes and routes it by itself; its
segmentation job finishes with a real DICOM SEG in the outbox and its delivery
fails until it is dead. In the browser the admin then logs in, writes a routing
rule (first with a regex that does not compile, and sees the error at that field),
tests the rule against the received study, opens the study (timeline, preview
picture), re-sends the dead delivery, finds the changes in the audit log, and looks
at the dashboard, destinations and models pages.

Every step is screenshotted (``NN-what.png`` in the folder the ``screenshot_dir``
fixture prints) and asserted on texts and elements; every page is also checked for
browser console errors (a Content-Security-Policy violation, a failed request, a
script error).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from urllib.parse import quote

import pytest
from selenium.common.exceptions import StaleElementReferenceException, WebDriverException
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import Select, WebDriverWait

from dicom_node.db import users
from dicom_node.db.models import Role
from dicom_node.ingest import utc_now
from dicom_node.routing import DEMO_PIPELINES
from dicom_node.web.passwords import hash_password
from tests.browser.conftest import log_in, wait_for
from tests.browser.scenario import (
    DESTINATION,
    deliver_until_dead,
    finish_with_detections,
    finish_with_seg,
    make_destination,
    send_study,
    wait_for_jobs,
)
from tests.conftest import NodeFactory
from training.phantoms.ct_series import GeneratedSeries

PASSWORD = "browser test password 1"
RULE = "chest-ai"
SEG_PIPELINE, DETECTION_PIPELINE = DEMO_PIPELINES  # the built-in default rule runs both
DELIVERY_ERROR = "association rejected by PACS_MAIN: called AE title not recognised"

Shot = Callable[[str], Path]


def console_errors(driver: WebDriver) -> list[str]:
    """Severe browser console entries since the last call (CSP violations, failed loads, script errors).

    Left out: the status of the page itself (a form sent back with its errors is deliberately a 422).
    """
    page = driver.current_url.split("#")[0]
    ignored = (f"{page} - Failed to load resource",)
    return [entry["message"] for entry in driver.get_log("browser")
            if entry.get("level") == "SEVERE" and not any(i in entry["message"] for i in ignored)]


def make_shot(driver: WebDriver, folder: Path) -> Shot:
    """``shot(name)``: a screenshot of the whole page (the window is grown to the page's height) as ``name.png``."""

    def shot(name: str) -> Path:
        height = int(driver.execute_script(  # the page, plus what the window's frame takes
            "return Math.max(document.body.scrollHeight, document.documentElement.scrollHeight)"
            " + window.outerHeight - window.innerHeight"))
        driver.set_window_size(1440, max(900, min(height, 4000)))
        path = folder / f"{name}.png"
        try:
            assert driver.save_screenshot(str(path)), f"screenshot {path} was not written"
        finally:
            driver.set_window_size(1440, 900)
        errors = console_errors(driver)
        assert not errors, f"browser console errors on {driver.current_url} ({name}): {errors}"
        return path

    return shot


def text_of(driver: WebDriver, css: str) -> str:
    """The visible text of the first element matching ``css``."""
    return str(driver.find_element(By.CSS_SELECTOR, css).text)


def submit(driver: WebDriver, css: str) -> None:
    """Click a submit button and wait for the next page to load."""
    old = driver.find_element(By.TAG_NAME, "html")
    driver.find_element(By.CSS_SELECTOR, css).click()
    WebDriverWait(driver, 10).until(lambda d: _stale(old))
    wait_for(driver, "main")


def _stale(element: WebElement) -> bool:
    """Whether ``element``'s page has been replaced.

    While the old document is being torn down, chromedriver may answer "Node with
    given id does not belong to the document" instead of a stale-element error;
    both mean the page is gone.
    """
    try:
        element.is_enabled()
    except StaleElementReferenceException:
        return True
    except WebDriverException as exc:
        if "does not belong to the document" in str(exc):
            return True
        raise
    return False


@pytest.fixture
def prepared(node_factory: NodeFactory, small_series: GeneratedSeries) -> tuple[str, int, str]:
    """A running node holding one received, routed study with a SEG result and a dead delivery.

    Returns (web base URL, the dead delivery's id, the study's UID).
    """
    node = node_factory()
    users.create_user(node.sessions, "admin", hash_password(PASSWORD), Role.ADMIN, now=utc_now())
    make_destination(node)
    send_study(node, small_series.paths)
    routed = {j.pipeline: j for j in wait_for_jobs(node, small_series.study_uid, 2)}
    assert set(routed) == {SEG_PIPELINE, DETECTION_PIPELINE}, routed
    [delivery] = finish_with_seg(node, routed[SEG_PIPELINE].id, small_series.series_uid, [DESTINATION])
    finish_with_detections(node, routed[DETECTION_PIPELINE].id, small_series.series_uid)
    deliver_until_dead(node, delivery, DELIVERY_ERROR)
    return f"http://127.0.0.1:{node.settings.web.port}", delivery, small_series.study_uid


def test_admin_works_through_rules_study_retry_and_audit(
    browser: WebDriver, screenshot_dir: Path, prepared: tuple[str, int, str]
) -> None:
    base, delivery_id, study_uid = prepared
    driver = browser
    shot = make_shot(driver, screenshot_dir)

    # 1. Log in.
    driver.get(f"{base}/login")
    wait_for(driver, "form.login-card")
    shot("01-login")
    log_in(driver, base, "admin", PASSWORD)
    assert "admin · admin" in text_of(driver, "header.topbar .who")

    # 2. A new routing rule; a condition with a regex that does not compile is refused at that field.
    driver.get(f"{base}/rules/new")
    wait_for(driver, "#rule-form").find_element(By.ID, "name").send_keys(RULE)
    driver.find_element(By.ID, "description").send_keys("Chest CTs to the segmentation model")
    Select(driver.find_element(By.ID, "match")).select_by_value("any")
    Select(driver.find_element(By.ID, "cond-0-attribute")).select_by_value("modality")
    driver.find_element(By.ID, "cond-0-in").send_keys("CT")
    Select(driver.find_element(By.ID, "cond-1-attribute")).select_by_value("study_description")
    driver.find_element(By.ID, "cond-1-regex").send_keys("(")
    Select(driver.find_element(By.ID, "cond-2-attribute")).select_by_value("slice_thickness_mm")
    driver.find_element(By.ID, "cond-2-max").send_keys("1")  # the series is 5 mm: this condition fails
    driver.find_element(By.CSS_SELECTOR, f"input[name=pipelines][value='{SEG_PIPELINE}']").click()
    shot("02-rule-new-filled")
    submit(driver, "#save-rule")
    error = wait_for(driver, "#cond-1-regex-error")
    assert "does not compile" in error.text, error.text
    assert "invalid" in (driver.find_element(By.ID, "cond-1-regex").get_attribute("class") or "")
    assert "was not saved" in text_of(driver, "#form-errors")
    assert driver.find_element(By.ID, "cond-1-regex").get_attribute("value") == "("  # the input is kept
    assert driver.find_element(By.ID, "cond-0-in").get_attribute("value") == "CT"
    assert not driver.find_elements(By.ID, "cond-0-in-error")
    shot("03-rule-invalid-regex")

    regex = driver.find_element(By.ID, "cond-1-regex")
    regex.clear()
    regex.send_keys("chest|thorax")
    submit(driver, "#save-rule")
    assert driver.current_url.startswith(f"{base}/rules?"), driver.current_url
    assert f"Rule {RULE} created." in text_of(driver, "main .flash")
    row = driver.find_element(By.CSS_SELECTOR, f"#rules-table tr[data-rule='{RULE}']")
    assert "enabled" in row.text and SEG_PIPELINE in row.text and "matches /chest|thorax/" in row.text
    shot("04-rules-list")

    # 3. Test the stored rule against the received study.
    row.find_element(By.LINK_TEXT, RULE).click()
    picker = Select(wait_for(driver, "#study-pick"))
    [option] = [o for o in picker.options if study_uid in o.text]
    assert "12 images" in option.text and "CT" in option.text, option.text
    picker.select_by_value(study_uid)
    submit(driver, "#test-rule")
    result = wait_for(driver, "#rule-test-result")
    assert study_uid in result.find_element(By.TAG_NAME, "h2").text
    assert "matches" in text_of(driver, "#test-verdict") and "1 job would be created" in text_of(driver, "#test-verdict")
    [job_row] = driver.find_elements(By.CSS_SELECTOR, "#test-jobs tbody tr")
    assert SEG_PIPELINE in job_row.text and DESTINATION in job_row.text and "(default)" in job_row.text
    series_row = driver.find_element(By.CSS_SELECTOR, f"#test-series tr[data-series='{jobs_series(driver)}']")
    assert series_row.find_element(By.CSS_SELECTOR, "[id$='-status']").text == "selected"
    holds = [c.get_attribute("data-holds") for c in series_row.find_elements(By.CSS_SELECTOR, "td[data-holds]")]
    assert holds == ["true", "true", "false"], holds  # modality, description regex hold; thickness fails
    assert "fails" in series_row.find_elements(By.CSS_SELECTOR, "td[data-holds]")[2].text
    shot("05-rule-test-result")

    # 4. The study: listed, then its page with the timeline and the preview picture.
    driver.get(f"{base}/studies")
    link = wait_for(driver, f"table.studies a[href='/studies/{quote(study_uid, safe='')}']")
    listed = link.find_element(By.XPATH, "./ancestor::tr")
    # shown failed (its delivery is dead), with the stage named
    assert "failed" in listed.text and f"delivery {delivery_id} to" in listed.text, listed.text
    assert "12" in listed.text and "CT_SCANNER" in listed.text, listed.text
    shot("06-studies")
    link.click()
    wait_for(driver, "ul.timeline")
    timeline = text_of(driver, "ul.timeline")
    assert "Receiving" in timeline, timeline
    durations = [d.text for d in driver.find_elements(By.CSS_SELECTOR, "ul.timeline .dur") if d.text.strip()]
    assert len(durations) >= 3, f"timeline shows too few durations: {durations}"
    stages = text_of(driver, "ul.timeline")
    assert "inference" in stages and "model load" in stages, stages
    image = driver.find_element(By.CSS_SELECTOR, "img.preview")
    WebDriverWait(driver, 15).until(lambda d: d.execute_script("return arguments[0].complete", image))
    natural = driver.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight]", image)
    assert natural[0] > 0 and natural[1] > 0, f"the preview picture did not load: {natural}"
    delivery = _delivery(driver, delivery_id)
    assert "dead" in delivery.text and DELIVERY_ERROR in delivery.text and "2/2" in delivery.text, delivery.text
    shot("07-study-dead-delivery")

    # 5. Re-send the dead delivery; the page says so and the delivery is due again.
    submit(driver, f"form[action='/deliveries/{delivery_id}/retry'] button[type=submit]")
    assert f"Delivery {delivery_id} will be sent again now (it was dead)." in text_of(driver, "main .flash")
    state = _delivery(driver, delivery_id).find_element(By.CSS_SELECTOR, ".badge").text
    assert state in ("due now", "pending", "sending"), state  # due now until the node's sweep picks it up
    assert not driver.find_elements(By.CSS_SELECTOR, f"form[action='/deliveries/{delivery_id}/retry']")
    WebDriverWait(driver, 15, poll_frequency=0.5).until(
        lambda d: (d.refresh() or True) and _delivery(d, delivery_id).find_element(By.CSS_SELECTOR, ".badge").text
        == "pending")  # the node's sweep made it pending and queued it (no sender runs in this node)
    assert "0/2" in _delivery(driver, delivery_id).text  # fresh attempts
    assert not driver.find_elements(By.CSS_SELECTOR, f"form[action='/deliveries/{delivery_id}/retry']")
    shot("08-study-delivery-resent")

    driver.get(f"{base}/audit")
    wait_for(driver, "table.audit")
    actions = [a.text for a in driver.find_elements(By.CSS_SELECTOR, "table.audit > tbody > tr > td:nth-child(3)")]
    assert "delivery.retry" in actions and "rule.create" in actions, actions
    retry_row = driver.find_elements(By.CSS_SELECTOR, "table.audit > tbody > tr")[actions.index("delivery.retry")]
    assert "admin" in retry_row.text and str(delivery_id) in retry_row.text and DESTINATION in retry_row.text
    assert actions.index("delivery.retry") < actions.index("rule.create")  # newest first
    shot("09-audit-log")
    driver.get(f"{base}/audit?action=rule.")
    wait_for(driver, "table.audit")
    filtered = [a.text for a in driver.find_elements(By.CSS_SELECTOR, "table.audit > tbody > tr > td:nth-child(3)")]
    assert filtered == ["rule.create"], filtered

    # 6. The other main pages.
    driver.get(f"{base}/")
    wait_for(driver, "#dashboard-live")
    received = text_of(driver, "tr[data-window='hour'] [data-count='received']")
    assert received == "1", received
    shot("10-dashboard")

    driver.get(f"{base}/destinations")
    dest = wait_for(driver, f"#destinations-table tr[data-destination='{DESTINATION}']")
    assert "127.0.0.1" in dest.text and "PACS_MAIN" in dest.text, dest.text
    shot("11-destinations")

    driver.get(f"{base}/models")
    wait_for(driver, "h1")
    assert text_of(driver, "h1") == "Models"
    for pipeline in DEMO_PIPELINES:
        assert driver.find_elements(By.CSS_SELECTOR, f"[data-model='{pipeline}']"), f"model {pipeline} not listed"
    shot("12-models")


def jobs_series(driver: WebDriver) -> str:
    """The series UID the tested rule's job would run on (the jobs table's grey UID)."""
    text = text_of(driver, "#test-jobs tbody tr td:nth-child(2) .mono")
    assert re.fullmatch(r"[0-9.]+", text), text
    return text


def _delivery(driver: WebDriver, delivery_id: int) -> WebElement:
    """Delivery ``delivery_id``'s block on the study page: the study's only delivery to the test destination
    (the block carries no delivery id to select it by)."""
    blocks = [b for b in driver.find_elements(By.CSS_SELECTOR, "#jobs .delivery") if DESTINATION in b.text]
    assert len(blocks) == 1, f"expected delivery {delivery_id} as the one delivery to {DESTINATION}, found {len(blocks)}"
    return blocks[0]
