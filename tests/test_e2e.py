"""End to end in a real browser: `streamlit run app.py` driven by Playwright with Debian's Chromium.

One user journey: create a dataset, upload a zip of normal images, train a tiny STPM to done (in the worker the
app starts), find the model on the Models page. Screenshots of every page go to test-artifacts/screenshots/.
Never run `playwright install`: the browser is /usr/bin/chromium (scripts/setup --browser).
"""
from __future__ import annotations

import contextlib
import io
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import zipfile
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
from PIL import Image

import synthetic
from kdcore import data
from kdcore.store import Store

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
ROOT = Path(__file__).resolve().parents[1]
SCREENSHOTS = ROOT / "test-artifacts" / "screenshots"
TRAINING_TIMEOUT_MS = 240_000

sync_api = pytest.importorskip("playwright.sync_api")
pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"needs {CHROMIUM} (scripts/setup --browser)")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_health(url: str, process: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"streamlit exited with status {process.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"streamlit did not answer at {url} within {timeout:.0f} s")


@contextlib.contextmanager
def running_app(data_dir: Path, env: dict[str, str]) -> Iterator[str]:
    """`streamlit run app.py` on a free port over ``data_dir`` (its log in ``data_dir/streamlit.log``) with
    ``env`` added to the environment; yields its URL once it answers, stops it afterwards."""
    url = f"http://127.0.0.1:{free_port()}"
    with open(Path(data_dir) / "streamlit.log", "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "streamlit", "run", "app.py", "--server.port", url.rsplit(":", 1)[1],
             "--server.address", "127.0.0.1", "--server.headless", "true"],
            cwd=ROOT, env={**os.environ, "KDCORE_DATA_DIR": str(data_dir), **env}, stdout=log,
            stderr=subprocess.STDOUT)
        try:
            wait_for_health(url, process)
            yield url
        finally:
            process.terminate()
            process.wait(timeout=30)


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    """The app on a free port with an empty data directory; stops it and the worker it started afterwards."""
    data_dir = tmp_path_factory.mktemp("e2e-data")
    store = Store(data_dir)
    try:
        with running_app(data_dir, {}) as url:
            yield url, store
    finally:
        worker_pid = store.worker_pid()
        if worker_pid and worker_pid > 0:
            os.kill(worker_pid, signal.SIGTERM)


@pytest.fixture(scope="module")
def page(app):
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        page = browser.new_page(viewport={"width": 1400, "height": 1600})
        page.set_default_timeout(60_000)
        yield page
        browser.close()


def wait_idle(page) -> None:
    """Until the script run has finished (the selector Streamlit's own browser tests use)."""
    page.locator("[data-testid='stApp'][data-test-script-state='notRunning']").wait_for()


def open_from_sidebar(page, title: str) -> None:
    page.get_by_test_id("stSidebarNav").get_by_text(title, exact=True).click()
    page.get_by_role("heading", name=title, exact=True).wait_for()
    wait_idle(page)


def open_expander(page, label: str, attempts: int = 3) -> None:
    """Open the expander titled ``label`` and keep it open: a rerun that lands just after the click (the job
    panel's last poll, under CPU load) can render it closed again, so click until it stays open."""
    details = page.get_by_test_id("stExpander").filter(has_text=label).first.locator("details")
    for _ in range(attempts):
        if details.get_attribute("open") is None:
            details.locator("summary").click()
        wait_idle(page)
        page.wait_for_timeout(500)  # a rerun already on its way starts within this
        wait_idle(page)
        if details.get_attribute("open") is not None:
            return
    raise AssertionError(f"the expander {label!r} does not stay open")


def wait_images_loaded(page) -> None:
    page.wait_for_function("() => [...document.querySelectorAll('[data-testid=stImage] img')]"
                           ".every(img => img.complete && img.naturalWidth > 0)")


def upload(page, label: str, files) -> None:
    """Give ``files`` to the file uploader labelled ``label`` (by label, not position: tabs render hidden ones)."""
    uploader = page.get_by_test_id("stFileUploader").filter(has_text=label)
    uploader.get_by_test_id("stFileUploaderDropzoneInput").set_input_files(files)


def screenshot(page, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=SCREENSHOTS / f"{name}.png", full_page=True)


def normal_images_zip(path: Path, n: int = 12) -> Path:
    rng = np.random.default_rng(0)
    with zipfile.ZipFile(path, "w") as archive:
        for i in range(n):
            buffer = io.BytesIO()
            Image.fromarray(np.uint8(synthetic.texture(rng, 64) * 255)).save(buffer, "PNG")
            archive.writestr(f"good/part_{i:02d}.png", buffer.getvalue())
    return path


def test_create_upload_train_and_find_the_model(app, page, tmp_path):
    url, store = app
    page.goto(url)
    page.get_by_text("Where to start").wait_for()
    wait_idle(page)
    screenshot(page, "1-home")

    open_from_sidebar(page, "Datasets")
    page.get_by_label("Name").fill("bottle cap")
    page.get_by_role("button", name="Create dataset").click()
    page.get_by_text("Add normal images").first.wait_for()
    upload(page, "Images of good parts", normal_images_zip(tmp_path / "good.zip"))
    add = page.get_by_role("button", name="Add normal images")
    sync_api.expect(add).to_be_enabled()  # the upload has reached the server and the page has rerun
    add.click()
    page.get_by_text("12 image(s) added").wait_for()
    wait_idle(page)
    sync_api.expect(page.get_by_test_id("stImage")).to_have_count(12)  # the gallery
    wait_images_loaded(page)
    assert store.dataset_counts(store.list_datasets()[0].id) == {("train", "good"): 12}
    screenshot(page, "2-datasets")

    page.get_by_text("Train a model on this dataset").click()
    page.get_by_role("heading", name="Train", exact=True).wait_for()
    wait_idle(page)
    page.get_by_role("slider").first.press("Home")  # image size: the smallest, 64 px
    wait_idle(page)
    page.get_by_role("spinbutton", name="Epochs").fill("1")
    page.get_by_role("spinbutton", name="Epochs").press("Enter")
    wait_idle(page)
    page.get_by_text("stpm options").click()  # any other parameter of the method, as --set gives it
    page.get_by_label("lr", exact=True).fill("0.002")
    page.get_by_label("lr", exact=True).press("Enter")
    wait_idle(page)
    page.get_by_text("stpm, changed from its defaults: lr=0.002").wait_for()
    screenshot(page, "3-train-options")
    started = time.monotonic()
    page.get_by_role("button", name="Train", exact=True).click()
    page.get_by_text("Queued 1 job(s)").wait_for()
    (job,) = store.list_jobs()
    assert (job.method, job.params["size"], job.params["epochs"], job.params["lr"]) == ("stpm", 64, 1, 0.002)
    # The polling page shows the job's progress while it runs, unless it ran faster than one poll: wait for
    # whichever comes first, so a fast training costs no timeout.
    progress, done = page.get_by_test_id("stProgress").first, page.get_by_text("model 1 saved").first
    progress.or_(done).wait_for(timeout=TRAINING_TIMEOUT_MS)
    if progress.is_visible():
        screenshot(page, "3-train-running")
    done.wait_for(timeout=TRAINING_TIMEOUT_MS)
    seconds = time.monotonic() - started
    wait_idle(page)
    open_expander(page, "Loss curve and log")  # to see the chart in the screenshot
    page.locator("[data-testid=stPlotlyChart] .main-svg").first.wait_for()
    page.wait_for_timeout(1000)  # the expander's opening animation
    screenshot(page, "4-train-done")
    print(f"\ntiny training, click to finished model: {seconds:.1f} s")
    (SCREENSHOTS.parent / "e2e-timing.txt").write_text(f"click to finished model: {seconds:.1f} s\n")

    open_from_sidebar(page, "Models")
    page.get_by_test_id("stDataFrame").wait_for()
    screenshot(page, "5-models")
    assert store.list_models()[0].method == "stpm"
    page.get_by_text("models/1.pt").wait_for()  # the selected model's file (the table itself is a canvas)


def test_repair_a_dataset_one_image_at_a_time(app, page, tmp_path):
    url, store = app
    dataset = store.list_datasets()[0]
    before = store.dataset_counts(dataset.id)
    page.goto(f"{url}/datasets?dataset={dataset.id}")
    page.get_by_role("tab", name="Add labelled test images").click()
    sync_api.expect(page.get_by_role("tab", selected=True)).to_have_text("Add labelled test images")
    wait_idle(page)  # the tab's rerun (on_change) is over before the upload starts another
    add = page.get_by_role("button", name="Add test images")
    sync_api.expect(add).to_be_visible()
    good = tmp_path / "good_test.png"
    Image.fromarray(np.full((64, 64), 128, np.uint8)).save(good)
    upload(page, "Test images, or zips of them", good)
    sync_api.expect(add).to_be_enabled()
    add.click()
    page.get_by_text("1 image(s) added").wait_for()
    wait_idle(page)
    # The rerun after an upload keeps the user on the tab they used.
    sync_api.expect(page.get_by_role("tab", selected=True)).to_have_text("Add labelled test images")

    page.get_by_test_id("stCheckbox").first.click()  # the first normal training image
    wait_idle(page)
    page.get_by_text("1 selected", exact=True).wait_for()
    page.get_by_test_id("stSelectbox").filter(has_text="Move to").click()
    page.get_by_role("option", name="Good test images").click()
    page.get_by_role("button", name="Move", exact=True).click()
    page.get_by_text("1 image(s) moved to Good test images").wait_for()
    wait_idle(page)
    counts = store.dataset_counts(dataset.id)
    assert counts[("train", "good")] == before[("train", "good")] - 1
    assert counts[("test", "good")] == before.get(("test", "good"), 0) + 2

    page.get_by_test_id("stCheckbox").first.click()
    wait_idle(page)
    page.get_by_role("button", name="Delete 1 selected image(s)…").click()
    page.get_by_role("button", name="Yes, delete").click()
    page.get_by_text("1 image(s) deleted").wait_for()
    wait_idle(page)
    screenshot(page, "6-dataset-repaired")
    assert store.dataset_counts(dataset.id)[("train", "good")] == before[("train", "good")] - 2
    assert len(data.load_dataset(store.dataset_dir(dataset.id)).test) == 2
