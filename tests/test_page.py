"""The status page in a real headless Chromium (selenium): rendered text, no PHI, refreshes itself."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

from conftest import storescu, wait_for
from http_node import make_http_node  # noqa: F401 (a fixture)
from studies import PHI, make_study

pytestmark = pytest.mark.dcmtk
CHROMIUM, DRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
SCREENSHOT = "/tmp/telenode-status-page.png"


@pytest.fixture
def browser():
    webdriver = pytest.importorskip("selenium.webdriver")
    if not (os.access(CHROMIUM, os.X_OK) and os.access(DRIVER, os.X_OK)):
        pytest.skip("chromium and chromium-driver are not installed (apt-get install chromium chromium-driver)")
    profile = tempfile.mkdtemp(prefix="telenode-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1280,900",
                 f"--user-data-dir={profile}"):
        options.add_argument(flag)
    from selenium.webdriver.chrome.service import Service

    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def test_status_page_shows_destinations_studies_and_quarantine_without_phi(browser, make_http_node,
                                                                           make_storescp, tmp_path):
    from selenium.webdriver.common.by import By

    remote = make_storescp().start()
    node = make_http_node([(remote.ae_title, remote.port), ("DOWN", 1)], extra="page_refresh_seconds = 1").start()
    study = make_study(tmp_path / "s", instances=3, series=1)
    assert storescu(node.port, study.files).returncode == 0
    held = make_study(tmp_path / "held", instances=1, series=1, phi={"AccessionNumber": "ACCHELD01"})
    import pydicom

    ds = pydicom.dcmread(held.files[0])
    ds.BurnedInAnnotation = "YES"
    ds.save_as(held.files[0])
    assert storescu(node.port, held.files).returncode == 0
    assert wait_for(lambda: len(remote.files()) == 3, 30)
    accession = pydicom.dcmread(remote.files()[0]).AccessionNumber

    def rendered() -> str:
        browser.get(f"{node.url}/")
        return browser.find_element(By.TAG_NAME, "body").text

    assert wait_for(lambda: "remote0: delivered" in rendered(), 30), rendered()
    text = rendered()
    assert "telenode TELENODE" in browser.title
    assert "Destinations" in text and "Recent studies" in text and "Quarantine (1)" in text
    assert accession in text and "remote1: pending" in text
    assert "burned_in" in text
    lines = {line.split(" ")[0]: line for line in text.splitlines()}
    name, state, pending, sending = lines["remote1"].split()[:4]  # down: its three wait, or are being tried
    assert state in ("active", "error") and int(pending) + int(sending) == 3, lines["remote1"]
    for value in study.identifying_strings + held.identifying_strings:
        assert value.lower() not in text.lower(), value
    assert PHI["PatientName"] not in browser.page_source
    refresh = browser.find_element(By.CSS_SELECTOR, 'meta[http-equiv="refresh"]').get_attribute("content")
    assert int(refresh) == 1
    assert not browser.find_elements(By.TAG_NAME, "script")
    browser.save_screenshot(SCREENSHOT)
    # It reloads itself: the generation time changes without the test navigating.
    from selenium.common.exceptions import WebDriverException

    def generated() -> str:
        try:
            return browser.find_element(By.CSS_SELECTOR, "p.muted").text
        except WebDriverException:  # caught in the middle of a reload
            return ""

    first = generated()
    assert wait_for(lambda: generated() not in ("", first), 15, 0.2)
