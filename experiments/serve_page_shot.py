"""The README's picture of the chat page: ``fusionlm serve`` on a checkpoint, two questions about a
picture of the synthetic world asked through the page in headless chromium, then a screenshot.

    python experiments/serve_page_shot.py --checkpoint runs/demo/run --out docs/serve_page.png

Needs Debian's ``chromium`` and ``chromium-driver`` and selenium (the test extra).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from serve_live import Server, chromium  # noqa: E402
from fusionlm.data.world import World  # noqa: E402
from fusionlm.serve.state import ServeSettings  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--out", default="docs/serve_page.png")
    parser.add_argument("--index", type=int, default=3, help="which test picture of the world")
    parser.add_argument("--name", default="demo", help="the model id the page shows")
    args = parser.parse_args()
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    scene = World(image_size=64, seed=0).sample("color", "test", args.index).images[0]
    picture = Path(tempfile.mkdtemp()) / "scene.png"
    scene.save(picture)
    live = Server(ServeSettings(checkpoint=args.checkpoint, model_name=args.name))
    browser = chromium(1000, 720)
    try:
        browser.get(live.url + "/")
        for k, question in enumerate(["Which colour does the shape have?", "What shape is it?"]):
            if k == 0:
                browser.find_element(By.CSS_SELECTOR, "#attach").send_keys(str(picture))
            browser.find_element(By.CSS_SELECTOR, "#prompt").send_keys(question)
            browser.find_element(By.CSS_SELECTOR, "#send").click()
            WebDriverWait(browser, 30).until(
                lambda d: len(d.find_elements(By.CSS_SELECTOR, '.assistant[data-done="1"]')) == k + 1)
        browser.save_screenshot(args.out)
        answers = [e.text for e in browser.find_elements(By.CSS_SELECTOR, ".assistant .text")]
        print(f"wrote {args.out}; answers: {answers}")
    finally:
        browser.quit()
        live.stop()


if __name__ == "__main__":
    main()
