"""Take the docs' MLflow UI pictures in headless Chromium (a maintainer's tool, not run by CI).

Run the tutorial's study first (`nws main --n-nets 24 --campaign tutorial` in an empty
directory), then, from that directory, with the Debian packages `chromium` and Playwright's
Python driver (`pip install playwright`; no browser download: it drives /usr/bin/chromium):

    mlflow ui --backend-store-uri sqlite:///mlflow.db --port 5055 &
    python /path/to/nws/tools/screenshots.py --url http://127.0.0.1:5055 --out /path/to/nws/docs

It writes ui-experiment.png (the experiment on its training runs, the meta run expanded),
ui-datasets.png (the net runs and the dataset each trained on), ui-models.png (the logged
meta-classifiers with their scores) and ui-registry.png (the registered models and their
champion aliases).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

# Chromium on a machine without a network: no background connections, no first-run dialogs.
CHROMIUM_FLAGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip


def _settle(seconds: float = 3.0) -> None:
    """The UI renders after its requests return; a picture taken at once shows spinners."""
    time.sleep(seconds)


def _close_assistant(page: Any) -> None:
    """MLflow 3.17's UI opens its chat panel on a new browser's first page: close it."""
    close = page.locator("button[aria-label='Close']")
    if close.count() and close.first.is_visible():
        close.first.click()
        _settle(1)


def _expand(page: Any, run_name: str) -> None:
    row = page.locator("div[role='row'], tr").filter(has_text=run_name).first
    row.locator("button").first.click(timeout=10_000)
    _settle(1.5)


def take(url: str, out: Path, experiment_id: str, campaign: str) -> list[Path]:
    from playwright.sync_api import sync_playwright

    runs = f"{url}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
    made = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 820})
        page.goto(runs)
        page.wait_for_selector(f"text=nws-main-{campaign}", timeout=60_000)
        _settle()
        _close_assistant(page)
        _expand(page, f"nws-main-{campaign}")
        _expand(page, f"meta-{campaign}")
        made.append(out / "ui-experiment.png")
        page.screenshot(path=made[-1])
        search = page.locator("input[placeholder*='metrics']").first
        search.fill("tags.`nws.role` = 'net'")
        search.press("Enter")
        _settle(4)
        made.append(out / "ui-datasets.png")
        page.screenshot(path=made[-1])
        page.set_viewport_size({"width": 1900, "height": 820})  # the scores are the last columns
        page.goto(f"{url}/#/experiments/{experiment_id}/models?workflowType=machine_learning")
        _settle(6)
        _close_assistant(page)
        made.append(out / "ui-models.png")
        page.screenshot(path=made[-1])
        page.set_viewport_size({"width": 1400, "height": 820})
        page.goto(f"{url}/#/models?workflowType=machine_learning")
        _settle(5)
        _close_assistant(page)
        made.append(out / "ui-registry.png")
        page.screenshot(path=made[-1])
        browser.close()
    return made


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:5055")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "docs")
    parser.add_argument("--experiment-id", default="1", help="the experiment nws (1 in a new store)")
    parser.add_argument("--campaign", default="tutorial")
    args = parser.parse_args()
    for path in take(args.url, args.out, args.experiment_id, args.campaign):
        print(path)


if __name__ == "__main__":
    main()
