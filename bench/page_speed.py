"""How fast the app answers in a real browser: each page's first view, Compare's "Next", Thresholds' model switch.

    python -m bench.page_speed [--size 256] [--methods stpm rd dskd] [--images 8] [--repeats 5] [--read-home 0]

Trains each method for one epoch on a small synthetic set (speed does not depend on how good the weights are)
into a temporary store, starts the app on it and drives headless Chromium (``/usr/bin/chromium``) with
Playwright, as a user would. Every figure runs from the user's action to the page's script having finished
and its pictures having loaded, in seconds:

- first view of each page, opened from the sidebar in a fresh browser session right after Home (or after
  ``--read-home`` seconds on it); the server has run once, but whatever a page imports first is in its figure;
- Compare "Next" onto an image no model has scored yet (all models run), then "Next" over images every model
  has scored (everything cached), median of ``--repeats``;
- Thresholds: switching to a model that has not scored the test set yet, then back and forth between models
  that have (median).

The issue's targets, on a quiet machine at 256 px with three models: a first view under 2 s, a cached
Compare "Next" under 0.5 s, one needing inference under 2 s, a Thresholds switch under 1 s. The browser, the
app and this script share the machine's cores: run it with nothing else busy.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the synthetic images and the browser helpers the tests use

from bench.compare_speed import trained_store  # noqa: E402
from kdcore import worker  # noqa: E402
from test_e2e import CHROMIUM, CHROMIUM_ARGS, running_app, sync_api, wait_idle, wait_images_loaded  # noqa: E402

PAGES = ["Datasets", "Train", "Models", "Compare", "Thresholds", "Inspect"]


def timed(page, action) -> float:
    """Seconds from ``action`` to the script run finished and every picture loaded."""
    start = time.perf_counter()
    action()
    page.wait_for_timeout(50)  # the run starts: before it, "notRunning" still holds from the last one
    wait_idle(page)
    wait_images_loaded(page)
    return time.perf_counter() - start


def first_views(page, url: str, read_home: float) -> dict[str, float]:
    page.goto(url)
    wait_idle(page)
    page.wait_for_timeout(read_home * 1000)
    views = {}
    for title in PAGES:
        def open_page(title=title):
            page.get_by_test_id("stSidebarNav").get_by_text(title, exact=True).click()
            page.get_by_role("heading", name=title, exact=True).wait_for()
        views[f"first view: {title}"] = timed(page, open_page)
    return views


def compare_next(page, n_images: int, repeats: int) -> dict[str, float]:
    page.get_by_test_id("stSidebarNav").get_by_text("Compare", exact=True).click()
    page.get_by_role("heading", name="Compare", exact=True).wait_for()
    wait_idle(page)
    next_button = page.get_by_role("button", name="Next")
    uncached = [timed(page, next_button.click) for _ in range(min(repeats, n_images - 1))]
    for _ in range(n_images):  # every image scored by every model
        timed(page, next_button.click)
    cached = [timed(page, next_button.click) for _ in range(repeats)]
    return {'Compare "Next", models run': statistics.median(uncached),
            'Compare "Next", cached': statistics.median(cached)}


def thresholds_switch(page, n_models: int, repeats: int) -> dict[str, float]:
    page.get_by_test_id("stSidebarNav").get_by_text("Thresholds", exact=True).click()
    page.get_by_role("heading", name="Thresholds", exact=True).wait_for()
    wait_idle(page)

    def switch(i: int) -> None:
        page.get_by_test_id("stSelectbox").filter(has_text="Model").click()
        page.get_by_role("option").nth(i % n_models).click()

    first = [timed(page, lambda i=i: switch(i)) for i in range(1, n_models)]  # models not yet scored
    warm = [timed(page, lambda i=i: switch(i)) for i in range(repeats)]
    return {"Thresholds switch, model not yet scored": statistics.median(first),
            "Thresholds switch, cached": statistics.median(warm)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["stpm", "rd", "dskd"])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--images", type=int, default=8, help="test images (half good, half defective)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--read-home", type=float, default=0.0,
                        help="seconds the user spends on Home before the first click (the server imports torch "
                             "and the methods meanwhile)")
    args = parser.parse_args()
    if not Path(CHROMIUM).exists():
        raise SystemExit(f"needs {CHROMIUM} (scripts/setup --browser)")
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        store = trained_store(Path(tmp), args.methods, args.size, n_test=args.images)
        print(f"trained {len(args.methods)} models at {args.size} px in {time.perf_counter() - started:.0f} s")
        with running_app(store.root, {worker.AUTOSTART_ENV: "0"}) as url:
            with sync_api.sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
                page = browser.new_page(viewport={"width": 1400, "height": 1600})
                page.set_default_timeout(300_000)
                page.goto(url)  # the server's first run of app.py, not counted
                wait_idle(page)
                page.close()
                page = browser.new_page(viewport={"width": 1400, "height": 1600})
                results = first_views(page, url, args.read_home)
                results.update(compare_next(page, args.images, args.repeats))
                results.update(thresholds_switch(page, len(args.methods), args.repeats))
                browser.close()
    for name, value in results.items():
        print(f"{name:<45} {value:7.2f} s")


if __name__ == "__main__":
    main()
