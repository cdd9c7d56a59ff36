"""The labeling page in a real headless Chromium (Debian's chromium + chromium-driver, driven
by Selenium): open it, rank by clicks and by keys, submit, the comparisons are in the database."""

from __future__ import annotations

import shutil

import pytest

from rlhf_ray.feedback.service import FeedbackServer

TOKEN = "page-t0ken"


@pytest.fixture
def browser(tmp_path):
    webdriver = pytest.importorskip("selenium.webdriver")
    driver_path = shutil.which("chromedriver")
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if not (driver_path and binary):
        pytest.skip("chromium and chromium-driver are not installed (.ci/run installs them)")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(flag)
    from selenium.webdriver.chrome.service import Service

    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    yield driver
    driver.quit()


def test_rank_and_submit_in_a_browser(browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    server = FeedbackServer(tmp_path / "labels.db", token=TOKEN)
    try:
        server.store.add_tasks([("rev abc=", ["abc", "cba", "cbb"]), ("rev de=", ["de", "ed"])], policy_version=5)
        browser.get(f"{server.url}/#token={TOKEN}")
        wait = WebDriverWait(browser, 20)
        wait.until(ec.text_to_be_present_in_element((By.ID, "prompt"), "rev abc="))
        assert browser.find_element(By.ID, "version").text == "5"
        buttons = browser.find_elements(By.CSS_SELECTOR, ".completion")
        assert [b.text.split(".", 1)[1].strip() for b in buttons] == ["abc", "cba", "cbb"]
        # clicks: best "cba", then "cbb", then "abc"
        for i in (1, 2, 0):
            browser.find_element(By.CSS_SELECTOR, f".completion[data-index='{i}']").click()
        browser.find_element(By.ID, "submit").click()
        wait.until(ec.text_to_be_present_in_element((By.ID, "prompt"), "rev de="))
        wait.until(ec.text_to_be_present_in_element((By.ID, "progress"), "1 comparisons stored"))
        # keys: 2 then 1, Enter submits
        body = browser.find_element(By.TAG_NAME, "body")
        body.send_keys("2")
        body.send_keys("1")
        body.send_keys(Keys.ENTER)
        wait.until(ec.text_to_be_present_in_element((By.ID, "progress"), "2 comparisons stored"))
        assert "no open tasks" in browser.find_element(By.ID, "prompt").text
        got = [(c.prompt, c.ranked, c.policy_version, c.labeler) for c in server.store.comparisons()]
        assert got == [("rev abc=", ["cba", "cbb", "abc"], 5, "web"), ("rev de=", ["ed", "de"], 5, "web")]
    finally:
        server.close()
