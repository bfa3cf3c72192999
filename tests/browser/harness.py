"""Headless Chromium with a fake camera playing a file, driven by Selenium.

Uses the system's `chromium` and `chromedriver` (Debian: `chromium chromium-driver`);
Selenium's own driver download is never used, so it works offline.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "chrome")


def find_chromium() -> tuple[str, str] | None:
    """(browser, chromedriver) paths, or None when either is missing."""
    browser = next((path for name in BROWSERS if (path := shutil.which(name))), None)
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


def start_chromium(camera_file: Path, profile: Path, window: tuple[int, int] = (1000, 900)) -> Any:
    """A headless Chromium whose camera plays `camera_file` (Y4M or MJPEG) in a loop."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    found = find_chromium()
    if found is None:
        raise RuntimeError("chromium and chromedriver are needed")
    browser, driver = found
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
        "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-video-capture={camera_file}",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--no-first-run", "--no-default-browser-check", "--mute-audio",
        f"--user-data-dir={profile}", f"--window-size={window[0]},{window[1]}",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(options=options, service=Service(executable_path=driver))


def page_state(driver: Any) -> dict[str, str]:
    """The demo page's #status data-* attributes (answered, dropped, errors, faces, ...)."""
    script = "return Object.assign({}, document.getElementById('status').dataset);"
    return driver.execute_script(script)


def wait_for_answers(driver: Any, answered: int = 3, timeout: float = 60.0) -> dict[str, str]:
    """Wait until `answered` frames came back and at least one box was drawn."""
    from selenium.webdriver.support.ui import WebDriverWait

    def ready(d: Any) -> dict[str, str] | bool:
        state = page_state(d)
        if int(state["answered"]) >= answered and int(state["boxesDrawn"]) > 0:
            return state
        return False

    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.2).until(ready)
    except Exception as error:
        message = driver.find_element("id", "message").text
        raise AssertionError(f"page state {page_state(driver)}, message {message!r}") from error


def console_errors(driver: Any) -> list[str]:
    return [entry["message"] for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]
