"""The OBS dock page in a real headless browser (Debian's ``chromium`` through its
``chromedriver`` and selenium) against a running daemon with a token: the page loads with
the token in its URL, a click on a preset button changes the daemon's preset, the bypass
toggle changes the on-air mode, and the sparkline and thumbnail update. A screenshot of the
dock is kept as an artifact (``$BF_ARTIFACTS`` or the test's temp folder).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest
from conftest import require_tool
from daemon_harness import running, wait_for, write_config

pytestmark = pytest.mark.slow

TOKEN = "dock-test-token"


@pytest.fixture(scope="module")
def browser():
    require_tool("chromium")
    driver_path = require_tool("chromedriver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(flag)
    options.add_argument("--window-size=360,640")
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def test_the_dock_switches_presets_toggles_bypass_and_updates_its_thumbnail(
    browser: Any, model_cache: str, tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By

    config = write_config(
        tmp_path,
        source="testsrc",
        sinks=["bf-record"],
        size=(64, 64),
        fps=15,
        start="warm",
        cache_dir=model_cache,
        api={"port": 0, "token": TOKEN, "status_hz": 5, "preview_fps": 10},
    )
    with running(config) as (daemon, _bridge, lines):
        status = daemon.controller.status
        wait_for("the first output", lambda: status()["health"]["ready"], 60)
        browser.get(f"http://127.0.0.1:{daemon.api.port}/?token={TOKEN}")

        def button(name: str) -> Any:
            return browser.find_element(By.CSS_SELECTOR, f'#presets button[data-preset="{name}"]')

        wait_for(
            "the preset buttons",
            lambda: browser.find_elements(By.CSS_SELECTOR, "#presets button"),
            15,
        )
        wait_for("warm highlighted", lambda: "active" in button("warm").get_attribute("class"), 15)
        button("cool").click()
        wait_for("the daemon on cool", lambda: status()["preset"] == "cool", 15)
        wait_for("cool highlighted", lambda: "active" in button("cool").get_attribute("class"), 15)
        assert "active" not in button("warm").get_attribute("class")

        banner = browser.find_element(By.ID, "banner")
        wait_for("styled banner", lambda: banner.get_attribute("data-mode") == "styled", 15)
        browser.find_element(By.ID, "bypass").click()
        wait_for("mode bypass", lambda: status()["mode"] == "bypass", 15)
        wait_for("bypass banner", lambda: banner.get_attribute("data-mode") == "bypass", 15)
        assert "on" in browser.find_element(By.ID, "bypass").get_attribute("class")

        spark = browser.find_element(By.ID, "spark")
        preview = browser.find_element(By.ID, "preview")
        points = int(spark.get_attribute("data-points") or 0)
        shown = int(preview.get_attribute("data-count") or 0)
        wait_for(
            "more sparkline points",
            lambda: int(spark.get_attribute("data-points")) > points + 3,
            15,
        )
        wait_for(
            "a newer thumbnail", lambda: int(preview.get_attribute("data-count") or 0) > shown, 15
        )
        width = browser.execute_script("return arguments[0].naturalWidth", preview)
        assert width == 64  # the 64x64 output, under preview_width

        assert sum("api (127.0.0.1): preset 'cool'" in line for line in lines.lines) == 1
        assert any("api (127.0.0.1): bypass on" in line for line in lines.lines)
        folder = Path(os.environ.get("BF_ARTIFACTS") or tmp_path)
        folder.mkdir(parents=True, exist_ok=True)
        assert browser.save_screenshot(str(folder / "dock.png"))
