"""The demo page at / in a real headless Chromium, its camera fed from a video of the test photos.

Skipped when Chromium, chromedriver or Selenium is missing, unless CI is set (CI
installs them: see .ci/run), where a missing browser is a failure.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.browser.harness import (
    console_errors,
    find_chromium,
    page_state,
    start_chromium,
    wait_for_answers,
)
from tests.conftest import live_server
from tests.media import write_y4m

IN_CI = bool(os.environ.get("CI"))

try:
    import selenium  # noqa: F401

    HAVE_SELENIUM = True
except ImportError:
    HAVE_SELENIUM = False

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not IN_CI and (find_chromium() is None or not HAVE_SELENIUM),
        reason="needs chromium, chromedriver and selenium "
        "(apt-get install chromium chromium-driver; pip install selenium)",
    ),
]


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    camera = tmp_path / "camera.y4m"
    write_y4m(camera, fps=10, repeat=10)
    driver = start_chromium(camera, tmp_path / "profile")
    try:
        yield driver
    finally:
        driver.quit()


def test_demo_page_streams_the_camera_and_draws_faces(model_store: Path, browser: Any) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    with live_server(model_store) as url:
        browser.get(f"{url}/")
        # The model selector is filled from GET /v1/models.
        WebDriverWait(browser, 20).until(
            lambda d: len(d.find_elements(By.CSS_SELECTOR, "#model option")) >= 3
        )
        models = Select(browser.find_element(By.ID, "model"))
        assert {"cnn10", "resnet"} <= {o.get_attribute("value") for o in models.options}
        models.select_by_value("cnn10")

        browser.find_element(By.ID, "start").click()
        state = wait_for_answers(browser, answered=3)
        assert state["state"] == "streaming"
        assert state["errors"] == "0"
        assert int(state["faces"]) >= 1 and state["label"]
        assert browser.find_element(By.ID, "latency").text.endswith("ms")
        assert browser.find_element(By.ID, "serving").text == "cnn10 v1"
        WebDriverWait(browser, 20).until(lambda d: d.find_element(By.ID, "fps").text != "–")

        # Switching the model mid-stream sends a set_model command.
        models.select_by_value("resnet")
        WebDriverWait(browser, 20).until(
            lambda d: d.find_element(By.ID, "serving").text == "resnet v1"
        )
        # The canvas shows the camera, not a blank frame.
        spread = browser.execute_script(
            "const c = document.getElementById('view');"
            "const p = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
            "let lo = 255, hi = 0; for (let i = 0; i < p.length; i += 401) {"
            "lo = Math.min(lo, p[i]); hi = Math.max(hi, p[i]); } return hi - lo;"
        )
        assert spread > 50

        browser.find_element(By.ID, "stop").click()
        assert page_state(browser)["state"] == "idle"
        assert console_errors(browser) == []
