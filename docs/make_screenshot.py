"""Take docs/demo-page.png: the demo page in headless Chromium, its camera fed the test photos.

    .venv/bin/python docs/make_screenshot.py [--store model_store] [--model cnn10] [--out PATH]

Serves `--store` (default: ./model_store when it holds a model, else untrained models
built on the fly like the tests' store, whose labels mean nothing) on a local uvicorn,
opens the page, starts the camera and saves the page once frames come back. Needs the
dev extra (selenium) and Debian's `chromium` and `chromium-driver`.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.browser.harness import start_chromium, wait_for_answers  # noqa: E402
from tests.conftest import build_store, live_server  # noqa: E402
from tests.media import write_y4m  # noqa: E402


def has_models(store: Path) -> bool:
    return any(store.glob("*/[1-9]*/model.onnx"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", type=Path, default=ROOT / "model_store")
    parser.add_argument("--model", default="", help="model to select (default: the server's)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "demo-page.png")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        store = args.store
        if not has_models(store):
            print(f"{store} holds no model: using untrained test models")  # noqa: T201
            store = build_store(work / "store")
        camera = work / "camera.y4m"
        write_y4m(camera, fps=10, repeat=10)
        with live_server(store) as url:
            driver = start_chromium(camera, work / "profile", window=(1000, 960))
            try:
                driver.get(f"{url}/")
                if args.model:
                    from selenium.webdriver.support.ui import Select, WebDriverWait

                    WebDriverWait(driver, 20).until(
                        lambda d: args.model in d.find_element("id", "model").text
                    )
                    Select(driver.find_element("id", "model")).select_by_value(args.model)
                driver.find_element("id", "start").click()
                wait_for_answers(driver, answered=8)
                args.out.parent.mkdir(parents=True, exist_ok=True)
                driver.save_screenshot(str(args.out))
            finally:
                driver.quit()
    print(f"wrote {args.out}")  # noqa: T201


if __name__ == "__main__":
    main()
