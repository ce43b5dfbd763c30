"""The review pages end to end: `streamlit run app.py` driven by Playwright with Debian's Chromium.

The app serves a copy of the data directory with two tiny trained models (the ``review_template`` fixture).
Compare shows two heatmaps and a threshold move flips a verdict; a threshold saved on the Thresholds page is
the one Inspect uses, down to the exported CSV. Screenshots go to test-artifacts/screenshots/ (6-… onwards:
test_e2e.py takes 1-5). Never run `playwright install`: the browser is /usr/bin/chromium.
"""
from __future__ import annotations

import csv
import os
import re
import shutil
import time

import pytest

from kdcore import qa_regions
from kdcore.store import Store
from test_e2e import (CHROMIUM, CHROMIUM_ARGS, open_from_sidebar, running_app, screenshot, sync_api, wait_idle,
                      wait_images_loaded)

pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"needs {CHROMIUM} (scripts/setup --browser)")


@pytest.fixture(scope="module")
def app(review_template, synthetic_root, tmp_path_factory):
    """The app on a free port over a copy of the template store; no worker (nothing is trained here)."""
    data_dir = shutil.copytree(review_template, tmp_path_factory.mktemp("review-e2e") / "data")
    env = {"KDCORE_WORKER_AUTOSTART": "0",
           "KDCORE_IMPORT_ROOTS": str(synthetic_root),  # the server folder Inspect reads below
           "OMP_NUM_THREADS": "1"}  # the tiny models run faster on one thread of a busy CPU
    with running_app(data_dir, env) as url:
        yield url, Store(data_dir)


@pytest.fixture(scope="module")
def page(app):
    url, _ = app
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        page = browser.new_page(viewport={"width": 1400, "height": 1800}, accept_downloads=True)
        page.set_default_timeout(60_000)
        # The home page first: until app.py has run once, a fresh server runs pages/*.py as legacy pages.
        page.goto(url)
        wait_idle(page)
        yield page
        browser.close()


def badges(page, verdict: str):
    return page.locator(".stMarkdownBadge", has_text=verdict)


def ordered_rows(rows: list[dict]) -> list[dict]:
    """CSV rows in the order Inspect shows them: highest score first."""
    return sorted(rows, key=lambda row: float(row["score"]), reverse=True)


def test_compare_two_models_and_move_a_threshold(page):
    open_from_sidebar(page, "Compare")
    sync_api.expect(page.get_by_test_id("stImage")).to_have_count(2)  # one heatmap per model
    sync_api.expect(badges(page, "OK")).to_have_count(2)  # the first test image is a good one
    wait_images_loaded(page)
    page.get_by_role("slider").nth(1).press("Home")  # the second model's threshold to its lowest
    wait_idle(page)
    sync_api.expect(badges(page, "NG")).to_have_count(1)
    sync_api.expect(badges(page, "OK")).to_have_count(1)
    screenshot(page, "6-compare-threshold-moved")

    page.get_by_role("button", name="Reset to saved").click()
    wait_idle(page)
    sync_api.expect(badges(page, "NG")).to_have_count(0)
    page.get_by_test_id("stSelectbox").filter(has_text="Test image").click()  # a defect, with its mask
    page.get_by_role("option", name="scratch_002.png").click()
    wait_idle(page)
    page.get_by_text("Zoomable detail view").click()
    wait_idle(page)
    page.locator("[data-testid=stPlotlyChart] .main-svg").first.wait_for()
    wait_images_loaded(page)
    page.set_viewport_size({"width": 1400, "height": 2300})  # the detail view too
    screenshot(page, "7-compare-defect-detail-view")
    page.set_viewport_size({"width": 1400, "height": 1800})

    page.get_by_text("A synthetic defect").click()  # what the models' synthetic AUROCs were measured on
    page.get_by_text("The synthetic-defect check's images").wait_for()
    sync_api.expect(page.get_by_test_id("stImage")).to_have_count(2)
    page.get_by_role("button", name="Next").click()
    wait_idle(page)
    wait_images_loaded(page)
    sync_api.expect(page).to_have_url(re.compile(r"synthetic=1"))  # the check's second image (a cut-paste)
    screenshot(page, "12-compare-synthetic-defect")


def test_a_threshold_saved_on_thresholds_is_used_on_inspect_and_exported(app, page, synthetic_root, tmp_path):
    _, store = app
    open_from_sidebar(page, "Thresholds")
    page.get_by_text("F1-optimal on the labelled test images").click()
    wait_idle(page)
    page.get_by_role("button", name="Save threshold").click()
    page.get_by_text("Saved for #2 rd").wait_for()
    wait_idle(page)
    saved = store.get_model(2).threshold
    assert saved["mode"] == "f1"
    screenshot(page, "8-thresholds-saved")

    open_from_sidebar(page, "Inspect")
    page.get_by_text(f"{saved['value']:.4g} (f1-optimal on the labelled test images").wait_for()
    page.get_by_label("Folder path").fill(str(synthetic_root / "test" / "spot"))
    page.get_by_role("button", name="Inspect folder").click()
    page.get_by_role("button", name="Download CSV").wait_for()
    wait_idle(page)
    wait_images_loaded(page)
    screenshot(page, "9-inspect")

    with page.expect_download() as download:
        page.get_by_role("button", name="Download CSV").click()
    path = tmp_path / download.value.suggested_filename
    download.value.save_as(path)
    rows = list(csv.DictReader(path.open()))
    assert len(rows) == 8 and path.name == "inspection-1-rd.csv"
    assert all(float(row["threshold"]) == pytest.approx(saved["value"]) for row in rows)
    assert all(row["verdict"] == ("NG" if float(row["score"]) > saved["value"] else "OK") for row in rows)

    page.get_by_role("button", name="Full size").first.click()
    dialog = page.get_by_role("dialog")
    dialog.locator("[data-testid=stPlotlyChart] .main-svg").first.wait_for()
    sync_api.expect(dialog.get_by_text("64×64 px")).to_be_visible()
    page.wait_for_timeout(1000)  # the dialog's opening animation
    screenshot(page, "10-inspect-full-size")

    # QA marks a defect region: a box dragged over the original's top-left quarter becomes the image's mask.
    dialog.get_by_text("Mark the defect region").click()
    chart = dialog.locator("[data-testid=stPlotlyChart]").nth(1)
    drag_layer = chart.locator(".nsewdrag").first
    drag_layer.wait_for()
    wait_idle(page)
    box = drag_layer.bounding_box()
    page.mouse.move(box["x"] + 2, box["y"] + 2)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2, steps=8)
    page.mouse.up()
    dialog.get_by_text("Region saved").wait_for()
    wait_idle(page)
    screenshot(page, "10b-inspect-region-marked")
    first_shown = ordered_rows(rows)[0]
    region = qa_regions.load_region(store, first_shown["sha256"])
    assert region is not None and region.shape == (64, 64)
    assert region[:24, :24].mean() > 0.9 and not region[40:, 40:].any(), region.mean()
    page.keyboard.press("Escape")
    sync_api.expect(dialog).to_have_count(0)

    # Keyboard review: 1 = the verdict is correct, 2 = wrong; each saves and shows the next image.
    page.get_by_text("Review one by one, at the keyboard").click()
    page.get_by_text("1 of 8").wait_for()
    wait_idle(page)
    page.evaluate("document.activeElement.blur()")  # shortcuts are not taken while a widget has the focus
    ordered = ordered_rows(rows)
    first, second = ordered[0]["sha256"], ordered[1]["sha256"]
    steps = []
    for key, shown in (("1", "2 of 8"), ("2", "3 of 8"), ("b", "2 of 8")):
        started = time.monotonic()
        page.keyboard.press(key)
        page.get_by_text(shown).wait_for()  # polls at 0.1-1 s steps: the times are upper bounds
        steps.append(time.monotonic() - started)
    sync_api.expect(page.get_by_text("QA: wrong")).to_be_visible()
    wait_idle(page)
    screenshot(page, "11-inspect-keyboard")
    labels = store.qa_labels([first, second])
    # Both images are NG at this threshold (spots): "correct" says defective, "wrong" says normal.
    assert labels == {first: 1, second: 0}, labels
    print("\nkeyboard: key press to the next image shown (1, 2, b): " + ", ".join(f"{t:.2f} s" for t in steps))

    # The back button leaves Inspect in a few presses: marks and image steps are not history entries.
    presses = 0
    while "/inspect" in page.url and presses < 20:
        page.go_back()
        presses += 1
        wait_idle(page)
    print(f"back presses to leave Inspect: {presses}")
    assert "/inspect" not in page.url and presses <= 4, (presses, page.url)


def test_a_model_finished_meanwhile_appears_without_a_reload(app, page):
    _, store = app
    open_from_sidebar(page, "Compare")
    page.get_by_text("Models (two to five)").wait_for()
    wait_idle(page)
    # A training finishes while the page is open (as the worker records one: a job, then its model).
    first = store.get_model(1)
    job = store.enqueue_job("train", first.method, first.params, first.dataset_id)
    store.claim_next_job(os.getpid())
    staged = store.make_tmp_dir("e2e-") / "model.pt"
    shutil.copyfile(store.model_file(first), staged)
    new = store.register_model(job.id, staged, {key: getattr(first, key) for key in (
        "method", "params", "teacher_weights", "training", "calibration", "threshold")})
    page.get_by_test_id("stMultiSelect").click()
    sync_api.expect(page.get_by_role("option", name=f"#{new.id} {first.method}")).to_be_visible(timeout=20_000)
