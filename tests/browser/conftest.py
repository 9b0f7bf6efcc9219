"""Browser tests: real headless Chromium (Debian's chromium + chromedriver, driven by Selenium)
against the admin app served by a real running node. Nothing downloads a browser.

Screenshots of every step are saved under ``test-artifacts/screenshots/`` (or
``$DICOM_NODE_SCREENSHOTS``); the folder is printed so CI can keep it as an artifact.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.ui import WebDriverWait

from tests.conftest import REPO_ROOT

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


@pytest.fixture(scope="session")
def screenshot_dir() -> Path:
    folder = Path(os.environ.get("DICOM_NODE_SCREENSHOTS", REPO_ROOT / "test-artifacts" / "screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    print(f"\nbrowser screenshots: {folder}")
    return folder


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[WebDriver]:
    """A headless Chromium with a fresh profile, sized like a laptop screen."""
    for binary in (CHROMIUM, CHROMEDRIVER):
        assert shutil.which(binary), f"{binary} is missing: run tests/install-peers.sh (Debian chromium, chromium-driver)"
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--window-size=1440,900", f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # console errors (CSP violations) readable
    os.environ.setdefault("SE_OFFLINE", "true")  # never let Selenium Manager look for a browser online
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(driver: WebDriver, css: str, timeout: float = 10.0):  # type: ignore[no-untyped-def]
    """The first element matching ``css`` once it is visible."""
    return WebDriverWait(driver, timeout).until(expected_conditions.visibility_of_element_located((By.CSS_SELECTOR, css)))


def log_in(driver: WebDriver, base_url: str, username: str, password: str) -> None:
    driver.get(f"{base_url}/login")
    wait_for(driver, "input[name=username]").send_keys(username)
    driver.find_element(By.CSS_SELECTOR, "input[name=password]").send_keys(password)
    driver.find_element(By.CSS_SELECTOR, "form.login-card button[type=submit]").click()
    wait_for(driver, "header.topbar")
