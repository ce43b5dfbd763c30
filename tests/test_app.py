"""Each page's logic through Streamlit's AppTest (in-process, no browser, no real worker: autostart is off)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from kdcore import ingest, worker
from kdcore.store import CANCELLED, EVALUATE, EXPORT, FAILED, QUEUED, TRAIN, Store
from test_store import png, zip_of

APP = Path(__file__).resolve().parents[1] / "app.py"


@pytest.fixture
def store(tmp_path, monkeypatch) -> Store:
    monkeypatch.setenv("KDCORE_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv(worker.AUTOSTART_ENV, "0")
    return Store(tmp_path / "data")


def open_page(page: str | None = None) -> AppTest:
    at = AppTest.from_file(str(APP), default_timeout=60).run()
    if page:
        at.switch_page(page).run()
    assert not at.exception, at.exception
    return at


def by_label(widgets, label: str):
    matches = [w for w in widgets if w.label == label]
    assert len(matches) == 1, f"{label!r} not unique among {[w.label for w in widgets]}"
    return matches[0]


def metric(at: AppTest, label: str) -> str:
    return by_label(at.metric, label).value


def texts(elements) -> str:
    return "\n".join(str(e.value) for e in elements)


def dataset_with_images(store: Store, n: int = 3, name: str = "cap"):
    dataset = store.create_dataset(name)
    ingest.add_normal_images(store, dataset.id, ingest.from_uploads([(f"{i}.png", png(i)) for i in range(n)]))
    return dataset


def fake_model(store: Store, dataset, pid: int = 1):
    """A registered model from a fake finished job (the pages never load the file itself)."""
    job = store.enqueue_job(TRAIN, "stpm", {"size": 64, "epochs": 1}, dataset.id)
    store.claim_next_job(pid)
    staged = store.make_tmp_dir("fake-") / "model.pt"
    staged.write_bytes(b"not really a model")
    calibration = {"n": 2, "min": 1.0, "max": 2.0, "mean": 1.5, "std": 0.5, "scores": [1.0, 2.0],
                   "quantiles": {"0.5": 1.5, "0.9": 1.9, "0.95": 1.95, "0.99": 1.99, "0.995": 1.995}}
    return store.register_model(job.id, staged, {
        "method": "stpm", "params": {"size": 64, "epochs": 1}, "teacher_weights": {"source": "x", "sha256": "y"},
        "training": {"seconds": 12.5, "epochs_run": 1}, "calibration": calibration,
        "threshold": {"value": 1.99, "mode": "percentile"}})


def test_home_says_what_the_tool_does_and_where_to_start(store):
    at = open_page()
    assert "Anomaly detection" in at.title[0].value
    links = [link.label for link in at.get("page_link")]
    assert links == ["Datasets", "Train", "Models", "Compare", "Thresholds", "Inspect"]
    assert metric(at, "Datasets") == "0" and metric(at, "Models") == "0"


def test_datasets_page_creates_a_dataset_and_adds_uploads(store):
    at = open_page("pages/datasets.py")
    assert "No datasets yet" in texts(at.info)
    by_label(at.text_input, "Name").input("bottle cap")
    by_label(at.button, "Create dataset").click().run()
    assert by_label(at.selectbox, "Dataset").value.name == "bottle cap"
    assert metric(at, "Normal training images") == "0"

    zipped = zip_of({"x/c.png": png(3), "x/notes.txt": b"hello", "x/a_copy.png": png(1)})
    at.file_uploader(key="normal_0").set_value([("a.png", png(1), "image/png"), ("b.png", png(2), "image/png"),
                                                ("set.zip", zipped, "application/zip")]).run()
    by_label(at.button, "Add normal images").click().run()

    assert "3 image(s) added, 1 duplicate(s) skipped, 1 file(s) not usable" in texts(at.warning)  # partial: not green
    assert "set.zip/x/notes.txt" in at.dataframe[0].value.to_string()
    assert metric(at, "Normal training images") == "3"
    assert len(at.image) == 3  # the gallery: one thumbnail each
    assert at.file_uploader(key="normal_1").value in (None, [])  # uploader cleared for the next files


def test_datasets_page_rejected_zip_adds_nothing(store):
    dataset = dataset_with_images(store, n=2)
    at = open_page("pages/datasets.py")
    bad = zip_of({"../../etc/evil.png": png(9)})
    at.file_uploader(key="normal_0").set_value([("ok.png", png(5), "image/png"),
                                                ("bad.zip", bad, "application/zip")]).run()
    by_label(at.button, "Add normal images").click().run()
    assert "Nothing was added" in texts(at.error) and "unsafe path" in texts(at.error)
    assert store.dataset_counts(dataset.id) == {("train", "good"): 2}


def test_datasets_page_imports_server_folders_only_from_the_inbox(store, tmp_path, monkeypatch):
    dataset = dataset_with_images(store, n=2)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.png").write_bytes(png(30))
    inbox = store.root / "inbox"
    (inbox / "line").mkdir(parents=True)
    (inbox / "line" / "part.png").write_bytes(png(31))
    (inbox / "line" / "link.png").symlink_to(outside / "secret.png")  # a link out of the inbox is not followed
    (inbox / "escape").symlink_to(outside)
    at = open_page("pages/datasets.py")
    for folder in ("/etc", str(outside), str(inbox / "escape")):
        by_label(at.text_input, "Folder path on the server").input(folder).run()
        by_label(at.button, "Import folder").click().run()
        assert "outside the server folders this app may read" in texts(at.error)
        assert store.dataset_counts(dataset.id) == {("train", "good"): 2}
    by_label(at.text_input, "Folder path on the server").input(str(inbox / "line")).run()
    by_label(at.button, "Import folder").click().run()
    assert store.dataset_counts(dataset.id) == {("train", "good"): 3}
    monkeypatch.setenv("KDCORE_IMPORT_ROOTS", str(outside))  # the administrator opens another folder
    at = open_page("pages/datasets.py")
    by_label(at.text_input, "Folder path on the server").input(str(outside)).run()
    by_label(at.button, "Import folder").click().run()
    assert store.dataset_counts(dataset.id) == {("train", "good"): 4}


def test_datasets_page_adds_labelled_test_images_with_masks(store):
    dataset = dataset_with_images(store, n=2)
    at = open_page("pages/datasets.py")
    by_label(at.text_input, "Defect type").input("scratch")
    at.file_uploader(key="test_0").set_value([("s1.png", png(7), "image/png")])
    at.file_uploader(key="masks_0").set_value([("s1_mask.png", png(8), "image/png")]).run()
    by_label(at.button, "Add test images").click().run()
    assert "1 image(s) added" in texts(at.success)
    assert metric(at, "Defect test images") == "1" and metric(at, "Defect masks") == "yes"
    assert store.list_images(dataset.id, "test")[0].mask_path == "ground_truth/scratch/s1_mask.png"


def test_datasets_page_asks_before_deleting(store):
    dataset_with_images(store)
    at = open_page("pages/datasets.py")
    by_label(at.button, "Delete this dataset…").click().run()
    assert "Delete dataset 'cap' and its 3 images?" in texts(at.warning)
    by_label(at.button, "No, keep it").click().run()
    assert len(store.list_datasets()) == 1
    by_label(at.button, "Delete this dataset…").click().run()
    by_label(at.button, "Yes, delete").click().run()
    assert store.list_datasets() == [] and "No datasets yet" in texts(at.info)


def test_train_page_queues_one_job_per_method_and_cancels(store):
    dataset = dataset_with_images(store)
    at = open_page("pages/train.py")
    by_label(at.multiselect, "Methods").set_value(["stpm", "rd"]).run()
    # Empty: the method's own per-device default, named in the placeholder.
    assert at.number_input(key="epochs_stpm").value is None
    by_label(at.select_slider, "Image size (pixels, square)").set_value(64)
    at.number_input(key="epochs_stpm").set_value(1)
    by_label(at.button, "Train").click().run()

    jobs = {job.method: job for job in store.list_jobs()}
    assert set(jobs) == {"stpm", "rd"} and all(job.status == QUEUED for job in jobs.values())
    assert jobs["stpm"].params == {"size": 64, "backbone": "tf_efficientnet_lite0", "weights": "default",
                                   "device": "auto", "seed": 0, "epochs": 1, "batch_size": 16}
    assert "epochs" not in jobs["rd"].params  # left empty: the worker's device decides
    assert jobs["stpm"].dataset_id == dataset.id
    assert "Queued 2 job(s)" in texts(at.success)
    assert "Waiting: place 1 in the queue" in texts(at.caption)
    at.run()  # a rerun, as the job panel makes when a job ends, keeps the confirmation
    assert "Queued 2 job(s): #1 stpm, #2 rd" in texts(at.success)

    # A reload (a new session) opens the form as it was used on this dataset.
    reloaded = open_page("pages/train.py")
    assert by_label(reloaded.multiselect, "Methods").value == ["stpm", "rd"]
    assert by_label(reloaded.select_slider, "Image size (pixels, square)").value == 64
    assert reloaded.number_input(key="epochs_stpm").value == 1 and reloaded.number_input(key="epochs_rd").value is None
    assert reloaded.query_params["dataset"] == str(dataset.id)

    at.button(key=f"cancel_{jobs['rd'].id}").click().run()
    assert store.get_job(jobs["rd"].id).status == CANCELLED
    at.button(key=f"rerun_{jobs['rd'].id}").click().run()  # a cancelled job runs again with the same settings
    again = store.list_jobs()[0]
    assert (again.kind, again.method, again.params, again.status) == ("train", "rd", jobs["rd"].params, QUEUED)


def test_train_page_sets_a_methods_options_and_refuses_bad_ones(store):
    dataset_with_images(store)
    at = open_page("pages/train.py")
    by_label(at.multiselect, "Methods").set_value(["rd"]).run()
    assert "segmentation head" in at.text_input(key="option_rd_segment_steps").help  # what it does, in the ⓘ
    at.text_input(key="option_rd_segment_steps").input("-1")
    by_label(at.button, "Train").click().run()
    assert "segment_steps must be a whole number" in texts(at.error) and store.list_jobs() == []

    at.text_input(key="option_rd_segment_steps").input("800")
    at.text_input(key="option_rd_map_strides").input("[16]")
    at.text_input(key="option_rd_lr_schedule").input("cosine")
    at.checkbox(key="option_rd_denoise").uncheck()
    by_label(at.button, "Train").click().run()
    params = store.list_jobs()[0].params
    assert (params["segment_steps"], params["map_strides"], params["lr_schedule"], params["denoise"]) == (
        800, [16], "cosine", False)
    assert "lr" not in params and "magnitude" not in params  # left empty: the method's default, also later

    reloaded = open_page("pages/train.py")
    assert reloaded.text_input(key="option_rd_segment_steps").value == "800"
    assert reloaded.text_input(key="option_rd_map_strides").value == "[16]"
    assert reloaded.text_input(key="option_rd_lr_schedule").value == "cosine"
    assert reloaded.checkbox(key="option_rd_denoise").value is False
    changed = "rd, changed from its defaults: denoise=false, map_strides=[16], lr_schedule=cosine, segment_steps=800"
    assert changed in texts(reloaded.caption)  # seen with the options closed


def test_train_page_preselects_the_dataset_it_was_linked_from(store):
    dataset_with_images(store, name="first")
    second = dataset_with_images(store, name="second")
    at = AppTest.from_file(str(APP), default_timeout=60)
    at.query_params["dataset"] = str(second.id)
    at.run().switch_page("pages/train.py").run()
    assert by_label(at.selectbox, "Dataset").value == second


def test_train_page_needs_an_existing_weights_file(store):
    dataset_with_images(store)
    at = open_page("pages/train.py")
    by_label(at.selectbox, "Teacher weights").set_value("file").run()
    by_label(at.text_input, "Weights file path").input("/no/such/file.pt").run()
    assert "weights file that exists" in texts(at.warning)
    assert by_label(at.button, "Train").disabled


def test_train_page_shows_a_running_job(store):
    dataset = dataset_with_images(store)
    job = store.enqueue_job(TRAIN, "stpm", {"size": 64, "epochs": 3}, dataset.id)
    # Stand in for a live worker: hold its lock and report like one.
    with store.hold_worker_lock(os.getpid()):
        store.claim_next_job(os.getpid())
        points = [{"step": s, "epoch": 1, "loss": 5.0 - s, "holdout_score": None, "elapsed_seconds": s}
                  for s in (1, 2)]
        store.report_progress(job.id, points, stage="training", progress=0.4, epoch=2, epochs=3, loss=3.0,
                              eta_seconds=75.0)
        store.job_log(job.id).write_text("epoch 1/3: loss 3\n")
        at = open_page("pages/train.py")
        progress = at.progress[0]
        assert progress.value == 40 and "epoch 2/3" in progress.text and "ETA 1 min 15 s" in progress.text
        assert len(at.get("plotly_chart")) == 1
        assert "epoch 1/3: loss 3" in texts(at.code)
        at.button(key=f"cancel_{job.id}").click().run()
        assert store.get_job(job.id).cancel_requested and "stopping" in at.progress[0].text


def test_app_start_fails_a_job_whose_worker_is_gone(store):
    dataset = dataset_with_images(store)
    job = store.enqueue_job(TRAIN, "stpm", {"size": 64}, dataset.id)
    store.claim_next_job(999_999)  # then the "worker" vanished without a word
    at = open_page("pages/train.py")
    failed = store.get_job(job.id)
    assert failed.status == FAILED and "pid 999999" in failed.message
    assert "stopped while the job was running" in texts(at.error)


def test_models_page_prepares_and_offers_the_bundle(store):
    import json
    import zipfile

    model = fake_model(store, dataset_with_images(store))
    at = open_page("pages/models.py")
    assert not at.get("download_button")
    by_label(at.button, "Prepare bundle").click().run()
    (export,) = store.list_jobs(EXPORT)
    assert export.model_id == model.id and export.status == QUEUED
    assert by_label(at.button, "Prepare bundle").disabled  # one export of a model at a time

    store.request_cancel(export.id)
    store.bundle_file(model).parent.mkdir(exist_ok=True)
    with zipfile.ZipFile(store.bundle_file(model), "w") as archive:  # what the export job writes
        archive.writestr("manifest.json", json.dumps({"threshold": {"value": 1.99, "mode": "percentile"}}))
    at = open_page("pages/models.py")
    assert [b.proto.label for b in at.get("download_button")] == ["Download bundle"]
    assert "This bundle holds" not in texts(at.warning)
    store.set_model_threshold(model.id, {"value": 2.5, "mode": "score"})
    at = open_page("pages/models.py")
    assert "holds threshold 1.99; the model's is now 2.5" in texts(at.warning)
    assert by_label(at.button, "Prepare the bundle again")


def test_models_page_lists_evaluates_and_deletes(store):
    dataset = dataset_with_images(store)
    model = fake_model(store, dataset)
    at = open_page("pages/models.py")
    row = at.dataframe[0].value.iloc[0]
    assert (row["method"], row["dataset"], row["size"], row["hold-out p99"]) == ("stpm", "cap", 64, 1.99)
    assert row["training time"] == "12 s" and "image AUROC" not in row  # no model evaluated yet
    assert "Only 2 hold-out image(s)" in texts(at.warning)
    assert not by_label(at.button, "Evaluate").disabled  # normal images only: synthetic defects are measured
    assert "synthetic defects made from the hold-out normals only" in texts(at.caption)

    ingest.add_test_images(store, dataset.id, "good", ingest.from_uploads([("g.png", png(20))]))
    ingest.add_test_images(store, dataset.id, "dent", ingest.from_uploads([("d.png", png(21))]))
    at = open_page("pages/models.py")
    assert "scores its 1 good and 1 defective test images" in texts(at.caption)
    by_label(at.button, "Evaluate").click().run()
    (evaluation,) = store.list_jobs(EVALUATE)
    assert evaluation.model_id == model.id and evaluation.status == QUEUED
    store.set_model_metrics(model.id, {"image_auroc": 0.75, "pixel_auroc": None, "aupro": None, "f1_max": 0.8,
                                       "aupr": 0.7, "n_images": 2, "n_defective": 1})
    at.run()
    assert at.dataframe[0].value.iloc[0]["image AUROC"] == "0.750"
    assert "pixel AUROC" not in at.dataframe[0].value.columns  # no model has it: no column of dashes

    by_label(at.button, "Delete this model…").click().run()
    by_label(at.button, "Yes, delete").click().run()
    assert "cancel it first" in texts(at.error)  # its evaluation is still queued
    store.request_cancel(evaluation.id)
    by_label(at.button, "Yes, delete").click().run()  # the question stays up, so trying again is one click
    assert store.list_models() == [] and not store.model_file(model).exists()
    assert "No trained models yet" in texts(at.info)


def test_models_page_recommends_a_model_on_the_best_evidence(store):
    dataset = dataset_with_images(store)
    first, second = fake_model(store, dataset), fake_model(store, dataset)
    store.set_model_metrics(first.id, {"synthetic_image_auroc": 0.9, "synthetic_pixel_auroc": 0.8})
    store.set_model_metrics(second.id, {"synthetic_image_auroc": 0.7, "synthetic_pixel_auroc": 0.95})
    unevaluated = fake_model(store, dataset)
    at = open_page("pages/models.py")
    assert f"use #{first.id} stpm" in texts(at.info) and "synthetic defects" in texts(at.info)
    table = at.dataframe[0].value.set_index("id")
    assert table.loc[first.id, "synthetic image AUROC"] == "0.900"
    assert table.loc[unevaluated.id, "synthetic image AUROC"] == "–" and "–: not measured" in texts(at.caption)
    assert "barely separates" not in texts(at.warning)  # 0.9 against 0.7: a clear lead
    store.set_model_metrics(second.id, {"synthetic_image_auroc": 0.89})
    at = open_page("pages/models.py")
    assert f"use #{first.id} stpm" in texts(at.info)
    assert f"barely separates #{first.id} and #{second.id}" in texts(at.warning)  # 0.01 apart: no ranking
    # Real labelled evidence outranks synthetic evidence.
    store.set_model_metrics(second.id, {"image_auroc": 0.8, "synthetic_image_auroc": 0.7})
    at = open_page("pages/models.py")
    assert f"use #{second.id} stpm" in texts(at.info) and "labelled test images" in texts(at.info)


def test_with_a_login_configured_nothing_shows_before_logging_in(store):
    dataset_with_images(store)
    at = AppTest.from_file(str(APP), default_timeout=60)
    at.secrets["auth"] = {"redirect_uri": "http://localhost:8501/oauth2callback", "cookie_secret": "x" * 32,
                          "client_id": "kdcore", "client_secret": "s",
                          "server_metadata_url": "https://login.example/.well-known/openid-configuration"}
    at.run()
    assert not at.exception
    assert [button.label for button in at.button] == ["Log in"]
    assert "cap" not in str(at.main)  # no dataset, page or data directory shown


def test_models_page_keeps_its_selection_when_a_model_is_added(store):
    dataset = dataset_with_images(store)
    first = fake_model(store, dataset)
    at = open_page("pages/models.py")
    assert at.query_params["model"] == [str(first.id)] or at.query_params["model"] == str(first.id)
    second = fake_model(store, dataset)  # a training job finishes meanwhile
    at.run()
    assert by_label(at.selectbox, "Model").value == first.id
    assert {second.id, first.id} == {int(v) for v in at.dataframe[0].value["id"]}
