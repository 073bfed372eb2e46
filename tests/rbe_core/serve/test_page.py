"""The page at ``/`` in a real headless Chromium (Debian's chromium + chromedriver, driven by
selenium): it lists the model, draws the compression chart, and streams a chat reply."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1]))
sys.path.insert(0, str(Path(__file__).parent))
from _serve_helpers import KEY, Server  # noqa: E402

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install 'rbe[dev]')")
BROWSER = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
#: CI sets it: a missing browser fails there instead of skipping
REQUIRE_ENV = "RBE_REQUIRE_BROWSER"


@pytest.fixture
def browser():
    from selenium.webdriver.chrome.service import Service

    if not (BROWSER and DRIVER):
        why = "no headless Chromium here (apt-get install chromium chromium-driver)"
        pytest.fail(why) if os.environ.get(REQUIRE_ENV) else pytest.skip(why)

    opts = webdriver.ChromeOptions()
    opts.binary_location = BROWSER
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage"):
        opts.add_argument(flag)
    profile = tempfile.mkdtemp(prefix="rbe-chromium-")
    opts.add_argument(f"--user-data-dir={profile}")
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def test_page_streams_a_reply_and_draws_the_chart(models, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    _, llama, _ = models
    srv = Server(str(llama), "--api-key", KEY)
    try:
        browser.get(f"http://127.0.0.1:{srv.port}/")
        key = browser.find_element(By.ID, "key")
        key.send_keys(KEY)
        browser.execute_script("arguments[0].dispatchEvent(new Event('change'))", key)
        wait = WebDriverWait(browser, 60)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#model option"))
        assert browser.find_element(By.CSS_SELECTOR, "#model option").get_attribute("value") == "tiny"
        wait.until(lambda d: int(d.find_element(By.ID, "chart").get_attribute("data-drawn") or 0) > 0)
        facts = browser.find_element(By.ID, "facts").text
        assert "bits/weight" in facts and "smaller" in facts and "int8" in facts
        for sent in range(1, 4):  # the page samples at temperature 1: the tiny model may end a reply at once
            browser.find_element(By.ID, "prompt").send_keys("the of and")
            browser.find_element(By.ID, "send").click()
            wait.until(lambda d, n=sent: len(d.find_elements(By.CSS_SELECTOR, ".msg.assistant")) == n
                       and d.find_element(By.ID, "send").is_enabled())
            if browser.find_elements(By.CSS_SELECTOR, ".msg.assistant")[-1].text.strip():
                break
        assert browser.find_elements(By.CSS_SELECTOR, ".msg.assistant")[-1].text.strip()
        assert "tokens/s" in browser.find_element(By.ID, "stats").text
        assert not browser.find_elements(By.CSS_SELECTOR, ".msg.error")
    finally:
        srv.stop()
