"""The Compare, Thresholds and Inspect pages through Streamlit's AppTest, on two tiny trained models."""
from __future__ import annotations

import numpy as np
import pytest

import kdcore
from kdcore import image_refs, ingest, review, scoring, thresholds
from test_app import by_label, open_page, texts
from test_review import loader, new_parts
from test_store import png


@pytest.fixture
def models(review_store):
    """{"stpm": model, "rd": model} of the copied template store."""
    return {model.method: model for model in review_store.list_models()}


def verdicts(at) -> list[str]:
    """The OK/NG badges shown, in page order."""
    return ["NG" if ":red-badge[" in m.value else "OK" for m in at.markdown if "-badge[" in m.value]


def fail_if_a_model_runs(*args, **kwargs):
    raise AssertionError("a model ran again")


def test_compare_shows_a_column_per_model_and_a_threshold_only_recolours(review_store, models, monkeypatch):
    at = open_page("pages/compare.py")
    assert by_label(at.selectbox, "Test image").value == 0  # the first test image: a good one
    assert len(at.image) == 2 and len(at.slider) == 2
    assert verdicts(at) == ["OK", "OK"]
    stpm = models["stpm"]
    score = review_store.cached_scores(stpm.id, [image_refs.dataset_images(review_store, stpm.dataset_id)[0].sha256])
    (score,) = score.values()

    def positions():
        return [thresholds.to_normalized(at.slider(key=f"compare_threshold_{m.id}").value, m) for m in models.values()]

    with monkeypatch.context() as patch:
        patch.setattr(scoring, "_run_model", fail_if_a_model_runs)
        at.slider(key=f"compare_threshold_{stpm.id}").set_value(score - 0.01).run()
        assert not at.exception
        assert verdicts(at) == ["OK", "NG"]  # columns: rd (#2, newest) then stpm
        assert len(at.image) == 2

        at.toggle(key="compare_sync").set_value(True).run()  # syncing aligns all on the first column (rd: 0.5)
        assert positions() == pytest.approx([0.5, 0.5])
        at.slider(key=f"compare_threshold_{stpm.id}").set_value(thresholds.from_normalized(0.7, stpm)).run()
        assert positions() == pytest.approx([0.7, 0.7])  # moving one moves the other on its own scale
        at.toggle(key="compare_detail_on").set_value(True).run()
        (figure,) = at.get("plotly_chart")
        assert '"matches":"x"' in figure.proto.spec.replace(" ", "")  # zooming one picture zooms all

    by_label(at.button, "Next").click().run()
    assert by_label(at.selectbox, "Test image").value == 1 and not at.exception
    assert (at.query_params["image"], at.query_params["sync"]) == ("1", "1")

    # A reload (a new session on the same URL) keeps the image, the models and the sync switch.
    by_label(at.multiselect, "Models (two to five)").set_value([stpm.id]).run()
    reloaded = open_page()
    for name in ("dataset", "image", "models", "sync"):
        reloaded.query_params[name] = at.query_params[name]
    reloaded.switch_page("pages/compare.py").run()
    assert by_label(reloaded.selectbox, "Test image").value == 1
    assert by_label(reloaded.multiselect, "Models (two to five)").value == [stpm.id]
    assert reloaded.toggle(key="compare_sync").value is True


def test_compare_opens_on_the_dataset_of_the_linked_model(review_store, models):
    other = review_store.create_dataset("a first product")  # listed before the models' dataset ("synthetic")
    ingest.add_test_images(review_store, other.id, "good", ingest.from_uploads([("a.png", png(1))]))
    assert review_store.list_datasets()[0].id == other.id
    at = open_page()
    at.query_params["model"] = str(models["rd"].id)
    at.switch_page("pages/compare.py").run()
    assert by_label(at.selectbox, "Dataset").value == models["rd"].dataset_id


def test_compare_an_uploaded_image(review_store, synthetic_root):
    at = open_page("pages/compare.py")
    at.radio[0].set_value("An uploaded image").run()
    image = synthetic_root / "test" / "scratch" / "scratch_000.png"
    at.file_uploader(key="compare_upload").set_value([("part.png", image.read_bytes(), "image/png")]).run()
    assert not at.exception and len(at.image) == 2


def test_compare_shows_the_synthetic_defects_with_their_masks(review_store, models):
    at = open_page("pages/compare.py")
    at.radio(key="compare_source").set_value("A synthetic defect").run()
    assert not at.exception and len(at.image) == 2
    listed = by_label(at.selectbox, "Test image")
    labels = listed.options  # as shown: "1/4 · synthetic texture · 000-texture.png"
    assert labels and all(" · synthetic " in label for label in labels)
    assert "made at 64 px from the hold-out normals" in texts(at.caption)
    assert listed.value == 0
    by_label(at.button, "Next").click().run()
    assert not at.exception and by_label(at.selectbox, "Test image").value == 1


def test_thresholds_page_sets_f1_optimal_and_saves_it_on_the_model(review_store, models):
    stpm = models["stpm"]
    at = open_page()
    at.query_params["model"] = str(stpm.id)
    at.switch_page("pages/thresholds.py").run()
    assert "percentile 99 of the hold-out normals" in texts(at.markdown)
    assert {p.proto.id.split("-")[-1] for p in at.get("plotly_chart")} >= {"histogram", "confusion", "roc", "pr"}
    assert "normal images only" not in texts(at.warning)  # defects are labelled
    assert "cannot be checked here" in texts(at.warning)  # percentile 99 on the template's few hold-out images

    by_label(at.radio, "Choose the threshold by").set_value(thresholds.F1).run()
    labelled = scoring.labelled_set(review_store, stpm, lambda model: pytest.fail("scores were cached"))
    best = thresholds.choose_threshold(thresholds.F1, None, labelled.holdout, labelled.labels, labelled.scores)
    assert by_label(at.metric, "Threshold").value == f"{best:.4g}"
    by_label(at.button, "Save threshold").click().run()
    assert "f1-optimal on the labelled test images" in texts(at.success)
    saved = review_store.get_model(stpm.id).threshold
    assert (saved["mode"], saved["value"]) == (thresholds.F1, best)
    assert kdcore.load(review_store.model_file(stpm)).threshold == saved
    assert by_label(at.button, "Save threshold").disabled  # nothing new to save


def test_thresholds_gallery_enlarges_a_mistake(review_store, models):
    at = open_page()
    at.query_params["model"] = str(models["stpm"].id)
    at.switch_page("pages/thresholds.py").run()
    by_label(at.radio, "Choose the threshold by").set_value(thresholds.SCORE).run()
    by_label(at.number_input, "Threshold (raw score)").set_value(0.0).run()  # every image NG: all good ones FP
    assert "False positives (good, judged NG): 8" in [tab.label for tab in at.tabs]
    enlarge = [button for button in at.button if button.label == "Enlarge"]
    assert len(enlarge) == 8
    n_charts = len(at.get("plotly_chart"))
    enlarge[0].click().run()
    assert not at.exception
    assert len(at.get("plotly_chart")) == n_charts + 1  # the original beside the heatmap, zoomable
    assert "64×64 px" in texts(at.caption) and "white: above the threshold" in texts(at.caption)


def test_thresholds_page_says_plainly_when_no_defects_are_labelled(review_store, models):
    review_store.delete_dataset(models["rd"].dataset_id)  # the models stay, with their hold-out scores only
    at = open_page()
    at.query_params["model"] = str(models["rd"].id)
    at.switch_page("pages/thresholds.py").run()
    warning = texts(at.warning)
    assert "normal images only" in warning and "optimistic" in warning
    assert [option for option in by_label(at.radio, "Choose the threshold by").options if "F1" in option] == []


def test_inspect_runs_a_folder_with_the_saved_threshold_marks_exports_and_adds_false_positives(
        review_store, models, tmp_path):
    folder = new_parts(review_store.root / "inbox" / "line")  # the app reads server folders under its inbox
    images, _ = image_refs.folder_images(folder)
    scores = scoring.score_images(review_store, models["stpm"], images, loader(review_store))
    review_store.set_model_threshold(models["stpm"].id, {"value": float(np.median(scores)), "mode": "score",
                                                         "parameter": None, "date": "2026-11-23"})
    stpm = review_store.get_model(models["stpm"].id)
    at = open_page()
    at.query_params["model"] = str(stpm.id)
    at.switch_page("pages/inspect.py").run()
    by_label(at.text_input, "Folder path").input(str(folder))  # in a form: sent with the click
    by_label(at.button, "Inspect folder").click().run()
    assert not at.exception
    assert "1 file(s) skipped" in texts(at.warning)  # notes.txt
    (inspection,) = review_store.list_inspections(stpm.id)
    rows = review.inspection_rows(review_store, inspection)
    assert len(at.image) == len(rows) == 6

    assert [row.verdict for row in rows] == ["NG"] * 3 + ["OK"] * 3
    assert "raw score, set 2026-11-23" in texts(at.markdown)  # the saved threshold, named

    marks = [radio for radio in at.radio if radio.key and radio.key.startswith("qa_")]
    assert marks[0].key.endswith(rows[0].image.sha256)  # highest score first
    marks[0].set_value("wrong").run()  # QA: a good part called NG
    assert review_store.qa_labels([rows[0].image.sha256]) == {rows[0].image.sha256: image_refs.NORMAL}
    assert by_label(at.metric, "False positives").value == "1"
    assert [button.label for button in at.get("download_button")] == ["Download CSV"]  # its file: browser test
    at.text_input(key=f"comment_{inspection.id}_{rows[0].image.sha256}").input("glare, not a defect").run()
    assert review_store.qa_comments([rows[0].image.sha256]) == {rows[0].image.sha256: "glare, not a defect"}
    assert at.text_input(key=f"comment_{inspection.id}_{rows[0].image.sha256}").value == "glare, not a defect"

    before = review_store.dataset_counts(stpm.dataset_id)[("train", "good")]
    by_label(at.button, f"Add the 1 false positive(s) to the normal images of '{stpm.dataset_name}'").click().run()
    assert "1 image(s) added" in texts(at.success)
    assert review_store.dataset_counts(stpm.dataset_id)[("train", "good")] == before + 1

    marks = [radio for radio in at.radio if radio.key and radio.key.startswith("qa_")]
    marks[-1].set_value("wrong").run()  # QA: the lowest score, called OK, is a defect
    assert by_label(at.metric, "False negatives").value == "1"
    by_label(at.button, f"Add the 1 missed defect(s) to the test images of '{stpm.dataset_name}'").click().run()
    # The synthetic set's defect images have masks: the missed one is refused, saying it needs one.
    assert "0 image(s) added" in texts(at.warning) and "needs one" in texts(at.warning)
    assert ("test", "missed") not in review_store.dataset_counts(stpm.dataset_id)


def test_inspect_says_when_the_threshold_changed_since(review_store, models, tmp_path):
    stpm = models["stpm"]
    images, _ = image_refs.folder_images(new_parts(tmp_path / "line"))
    review.run_inspection(review_store, stpm, images, "line", loader(review_store))
    review_store.set_model_threshold(stpm.id, {"value": 0.0, "mode": "score", "parameter": 0.0, "date": "2026-01-02"})
    at = open_page()
    at.query_params["model"] = str(stpm.id)
    at.switch_page("pages/inspect.py").run()
    assert "the saved one is now 0 (raw score, set 2026-01-02)" in texts(at.info)
    by_label(at.button, "Inspect these images again with the saved threshold").click().run()
    newest = review_store.list_inspections(stpm.id)[0]
    assert newest.threshold["value"] == 0.0 and not at.info
    assert verdicts(at) == ["NG"] * 6


def test_a_damaged_model_file_is_one_readable_line(review_store, models):
    rd = models["rd"]
    review_store.model_file(rd).write_bytes(b"\x80\x04crafted or truncated")
    at = open_page()
    at.query_params["model"] = str(rd.id)
    at.switch_page("pages/thresholds.py").run()
    assert not at.exception
    error = texts(at.error)
    assert f"Model #{rd.id} (rd) cannot be loaded" in error and "weights_only" not in error


def test_a_damaged_database_is_one_readable_line(review_store):
    database = review_store.root / "kdcore.sqlite3"
    for wal in review_store.root.glob("kdcore.sqlite3-*"):
        wal.unlink()
    database.write_bytes(b"not a database at all" * 50)
    at = open_page()
    assert not at.exception
    assert "The data directory cannot be opened" in texts(at.error) and "cannot be used" in texts(at.error)


def test_thresholds_page_warns_and_counts(review_store, models):
    stpm = models["stpm"]
    at = open_page()
    at.query_params["model"] = str(stpm.id)
    at.switch_page("pages/thresholds.py").run()
    by_label(at.radio, "Choose the threshold by").set_value(thresholds.SCORE).run()
    by_label(at.number_input, "Threshold (raw score)").set_value(-1e6).run()
    assert "Every image is NG at this threshold" in texts(at.warning)
    n_holdout = stpm.calibration["n"]
    assert f"{n_holdout} of {n_holdout}" in texts(at.caption)  # the count beside the 100 % rate


def test_inspect_says_what_a_folder_holds_recurses_and_never_duplicates(review_store, models):
    inbox = review_store.root / "inbox"
    nested = new_parts(inbox / "day" / "camera1")  # images only in a subfolder
    stpm = models["stpm"]
    at = open_page()
    at.query_params["model"] = str(stpm.id)
    at.switch_page("pages/inspect.py").run()
    by_label(at.text_input, "Folder path").input(str(inbox / "missing"))
    by_label(at.button, "Inspect folder").click().run()
    assert "not a folder on the server" in texts(at.error) and "skipped" not in texts(at.warning)
    by_label(at.text_input, "Folder path").input(str(inbox / "day"))
    by_label(at.button, "Inspect folder").click().run()
    assert "Include subfolders" in texts(at.error) and review_store.list_inspections(stpm.id) == []
    by_label(at.checkbox, "Include subfolders").check()
    by_label(at.button, "Inspect folder").click().run()
    by_label(at.button, "Inspect folder").click().run()  # the same again (Enter, then a click)
    (inspection,) = review_store.list_inspections(stpm.id)
    assert inspection.n_images == len(list(nested.glob("*.png")))


def test_models_page_queues_an_ensemble_that_the_worker_builds(review_store, models):
    from kdcore import worker

    stpm, rd = models["stpm"], models["rd"]
    at = open_page()
    at.query_params["model"] = str(stpm.id)
    at.switch_page("pages/models.py").run()
    at.multiselect(key=f"ensemble_with_{stpm.id}").set_value([rd.id]).run()
    at.button(key=f"ensemble_{stpm.id}").click().run()
    assert not at.exception and "an ensemble of #1 stpm, #2 rd" in texts(at.success)
    (job,) = review_store.list_jobs("train", limit=1)
    assert job.method == "ensemble" and job.params["size"] == stpm.params["size"]

    assert worker.run_worker(review_store.root, idle_exit_seconds=0) == 1
    assert review_store.get_job(job.id).status == "done", review_store.get_job(job.id).message
    ensemble = review_store.get_model(review_store.get_job(job.id).model_id)
    assert ensemble.method == "ensemble" and ensemble.dataset_id == stpm.dataset_id
    loaded = kdcore.load(review_store.model_file(ensemble))
    assert [spec["method"] for spec in loaded.config.member_specs] == ["stpm", "rd"]
    images, _ = image_refs.folder_images(new_parts(review_store.root / "inbox" / "ens"))
    assert len(scoring.score_images(review_store, ensemble, images, loader(review_store))) == len(images)


def test_compare_shows_each_models_evaluation(review_store, models):
    review_store.set_model_metrics(models["rd"].id, {"synthetic_image_auroc": 0.8771, "synthetic_pixel_auroc": 0.9})
    at = open_page("pages/compare.py")
    assert "synthetic defects: image AUROC 0.877, pixel 0.900" in texts(at.caption)
