"""Review without a browser: image sources, cached scoring, thresholds, pictures, inspections, QA marks, CSV, store."""
from __future__ import annotations

import csv
import io

import numpy as np
import pytest
from PIL import Image

import kdcore
import synthetic
from kdcore import calibration, cli, heatmaps, image_refs, qa_regions, review, scoring, thresholds, verdicts
from kdcore.store import Store


def never_load(model):
    raise AssertionError(f"model {model.id} was run again on images it had scored")


def loader(store: Store):
    return lambda model: kdcore.load(store.model_file(model))


@pytest.fixture
def stpm(review_store):
    return next(model for model in review_store.list_models() if model.method == "stpm")


def test_each_image_is_scored_once_per_model_and_matches_the_engine(review_store, stpm):
    images = image_refs.dataset_images(review_store, stpm.dataset_id)
    progress = []
    scores = scoring.score_images(review_store, stpm, images + images[:2], loader(review_store),
                                 lambda done, total: progress.append((done, total)))
    assert progress[0] == (0, len(images)) and progress[-1] == (len(images), len(images))  # duplicates run once

    method = kdcore.load(review_store.model_file(stpm))
    maps, expected = method.predict(method.preprocess_paths([image.path for image in images]))
    np.testing.assert_allclose(scores[:len(images)], expected, rtol=1e-6)
    cached = scoring.load_map(review_store, stpm, images[3])
    np.testing.assert_allclose(cached, maps[3], rtol=1e-6)
    assert cached.max() == np.float32(scores[3])  # the verdict's score is the drawn map's maximum, exactly

    again = scoring.score_images(review_store, stpm, images[::-1], never_load)  # all cached: order kept
    np.testing.assert_array_equal(again, scores[:len(images)][::-1])


def test_threshold_modes_and_the_normalised_scale(stpm):
    holdout = np.asarray(stpm.calibration["scores"])
    labels, scores = np.array([0, 0, 1, 1]), np.array([1.0, 2.0, 3.0, 0.5])
    assert thresholds.choose_threshold(thresholds.SCORE, 4.5, holdout) == 4.5
    assert thresholds.choose_threshold(thresholds.PERCENTILE, 90, holdout) == calibration.threshold_from_percentile(holdout, 90)
    assert thresholds.choose_threshold(thresholds.MAX_FPR, 0.2, holdout) == calibration.threshold_from_max_fpr(holdout, 0.2)
    assert thresholds.choose_threshold(thresholds.F1, None, holdout, labels, scores) == \
        calibration.threshold_f1_optimal(labels, scores)
    with pytest.raises(ValueError, match="unknown threshold mode"):
        thresholds.choose_threshold("sigma", 3, holdout)

    saved = thresholds.saved_threshold(stpm)
    assert thresholds.to_normalized(saved, stpm) == 0.5
    span = stpm.calibration["max"] - stpm.calibration["min"]
    assert thresholds.to_normalized(saved + span, stpm) == pytest.approx(1.5)
    assert thresholds.from_normalized(thresholds.to_normalized(1.234, stpm), stpm) == pytest.approx(1.234)
    low, high, step = thresholds.threshold_range(stpm)
    assert low < stpm.calibration["min"] <= saved <= high and high > stpm.calibration["max"]
    assert step == pytest.approx(span / 100)  # 0.01 on the normalised scale
    assert (saved - low) / step == pytest.approx(round((saved - low) / step))  # the slider opens on the saved value
    assert thresholds.describe_threshold(stpm.threshold) == "percentile 99 of the hold-out normals"
    assert thresholds.describe_threshold({"mode": thresholds.MAX_FPR, "parameter": 0.01}) == \
        "at most 1.0% false positives on the hold-out normals"


def test_a_saved_threshold_reaches_the_store_the_model_file_and_the_cli(review_store, stpm, tmp_path, capsys):
    method = kdcore.load(review_store.model_file(stpm))
    saved = scoring.save_threshold(review_store, stpm, method, 5.5, thresholds.SCORE, 5.5)
    assert saved["value"] == 5.5 and saved["mode"] == "score" and saved["date"]
    assert review_store.get_model(stpm.id).threshold == saved
    assert kdcore.load(review_store.model_file(stpm)).threshold == saved

    images = image_refs.dataset_images(review_store, stpm.dataset_id)
    out = tmp_path / "predict.csv"
    assert cli.main(["predict", str(review_store.model_file(stpm)), str(images[0].path.parent), "--csv", str(out),
                     "--quiet"]) == 0
    rows = list(csv.DictReader(out.open()))
    assert all(row["verdict"] == ("NG" if float(row["score"]) > 5.5 else "OK") for row in rows)
    assert "at threshold 5.5 (score)" in capsys.readouterr().err


def test_render_colours_around_the_threshold_and_outlines_prediction_and_truth():
    image = np.zeros((8, 8, 3), np.uint8)
    anomaly_map = np.zeros((4, 4), np.float32)
    anomaly_map[1:3, 1:3] = 10.0  # resized to 8×8: a hot square in the middle
    model = type("M", (), {"calibration": {"min": 0.0, "max": 10.0}})()
    truth = np.zeros((8, 8), bool)
    truth[0, :] = True
    picture = heatmaps.render(image, anomaly_map, 5.0, model, truth)
    assert picture.shape == (8, 8, 3)
    assert (picture[0] == heatmaps.GT_COLOR).all()  # the ground truth's outline
    assert (picture[(heatmaps.resize_map(anomaly_map, 8) > 5.0) & ~truth] == 255).any()  # the white outline
    assert (picture[7, 7] == np.round(0.45 * heatmaps.visualize.LUT[0])).all()  # far below: coldest colour


def test_an_ng_verdict_always_shows_its_outline_even_shrunk():
    model = type("M", (), {"calibration": {"min": 0.0, "max": 3.0}})()
    anomaly_map = np.full((64, 64), 1.0, np.float32)
    anomaly_map[37, 21] = 2.154  # one map pixel just above the threshold: the image is NG
    picture = heatmaps.render(np.zeros((16, 16, 3), np.uint8), anomaly_map, 2.153, model)
    white = np.argwhere((picture == 255).all(-1))
    assert white.tolist() == [[37 // 4, 21 // 4]]  # the display pixel the map pixel falls in
    assert not (heatmaps.render(np.zeros((16, 16, 3), np.uint8), anomaly_map, 2.2, model) == 255).all(-1).any()


def test_full_size_view_keeps_the_originals_shape_with_map_and_truth_on_it(review_store, stpm, tmp_path,
                                                                           monkeypatch):
    rng = np.random.default_rng(0)
    path, mask_path = tmp_path / "wide.png", tmp_path / "wide_mask.png"
    Image.fromarray(rng.integers(0, 256, (90, 300), dtype=np.uint8)).save(path)  # 300 wide, 90 high
    truth = np.zeros((90, 300), np.uint8)
    truth[30:60, 200:260] = 255
    Image.fromarray(truth).save(mask_path)
    image = image_refs.ImageRef(image_refs.file_sha256(path), path.name, path, defect="dent", mask_path=mask_path)
    scoring.score_images(review_store, stpm, [image], loader(review_store))
    original, overlay = heatmaps.full_size_pictures(review_store, stpm, image, threshold=-1e9)  # all above it
    assert original.shape == overlay.shape == (90, 300, 3)
    assert (original[..., 0] == np.asarray(Image.open(path))).all()  # the file's own pixels, not resized
    magenta = (overlay == heatmaps.GT_COLOR).all(-1)
    rows, cols = np.nonzero(magenta)
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (30, 59, 200, 259)  # the truth's outline, in place

    monkeypatch.setattr(heatmaps, "FULL_VIEW_MAX_SIDE", 150)  # a huge original is sent at a bounded size
    assert heatmaps.full_size_pictures(review_store, stpm, image, 0.0)[0].shape == (45, 150, 3)


def new_parts(folder, n: int = 6):
    """A folder of normal images no dataset holds yet, as from a production line, plus a file that is no image."""
    synthetic.make_dataset(folder, n_train=n, n_test_good=0, n_test_defect=0, seed=7)
    (folder / "train" / "good" / "notes.txt").write_text("not an image")
    return folder / "train" / "good"


def test_an_inspection_ranks_marks_exports_and_feeds_false_positives_back(review_store, stpm, tmp_path):
    folder = new_parts(tmp_path / "line")
    images, problems = image_refs.folder_images(folder)
    assert len(images) == 6 and [name for name, _ in problems] == ["notes.txt"]
    inspection = review_store.get_inspection(
        review.run_inspection(review_store, stpm, images, str(folder), loader(review_store)))
    assert (inspection.n_images, inspection.source, inspection.threshold) == (6, str(folder), stpm.threshold)
    rows = review.inspection_rows(review_store, inspection)
    assert [row.score for row in rows] == sorted((row.score for row in rows), reverse=True)
    assert all(row.verdict == verdicts.verdict(row.score, stpm.threshold["value"]) for row in rows)

    # The top image is called NG whatever it is: QA says wrong (a false positive) and right (a true positive).
    review_store.set_model_threshold(stpm.id, {**stpm.threshold, "value": rows[1].score})
    inspection = review_store.get_inspection(
        review.run_inspection(review_store, review_store.get_model(stpm.id), images, str(folder), never_load))
    top, second, third = review.inspection_rows(review_store, inspection)[:3]
    assert (top.verdict, second.verdict) == (verdicts.NG, verdicts.OK)
    review.set_qa_mark(review_store, top, "wrong")
    review.set_qa_mark(review_store, second, "wrong")
    review.set_qa_mark(review_store, third, "correct")
    rows = review.inspection_rows(review_store, inspection)
    assert [(row.qa_mark, row.outcome) for row in rows[:4]] == [("wrong", "FP"), ("wrong", "FN"),
                                                                ("correct", "TN"), (None, None)]
    assert review_store.qa_labels([top.image.sha256, second.image.sha256]) == {top.image.sha256: 0,
                                                                               second.image.sha256: 1}
    review.set_qa_mark(review_store, rows[2], None)
    assert review.inspection_rows(review_store, inspection)[2].qa_mark is None
    # A comment belongs to the image (any model, any inspection); a blank one removes it.
    review_store.set_qa_comment(top.image.sha256, "  glare on the rim, not a dent ", by="qa1")
    review_store.set_qa_comment(rows[3].image.sha256, "to check")
    review_store.set_qa_comment(rows[3].image.sha256, "   ")
    rows = review.inspection_rows(review_store, inspection)
    assert [row.qa_comment for row in rows[:4]] == ["glare on the rim, not a dent", None, None, None]

    table = list(csv.DictReader(io.StringIO(review.rows_csv(rows, inspection, stpm).decode())))
    assert list(table[0]) == review.CSV_COLUMNS and len(table) == 6
    assert (table[0]["image"], table[0]["verdict"], table[0]["qa_mark"], table[0]["qa_outcome"],
            table[0]["qa_comment"]) == (top.image.name, "NG", "wrong", "FP", "glare on the rim, not a dent")
    assert float(table[0]["threshold"]) == pytest.approx(rows[1].score)

    before = review_store.dataset_counts(stpm.dataset_id)[("train", "good")]
    report = review.add_to_normal_images(review_store, stpm.dataset_id, review.false_positives(rows))
    assert report.added == [top.image.name]
    assert review_store.dataset_counts(stpm.dataset_id)[("train", "good")] == before + 1
    assert review.add_to_normal_images(review_store, stpm.dataset_id, [top.image]).duplicates

    # The missed defect goes to the test images; a dataset whose defect images have masks needs one with it.
    assert review.false_negatives(rows) == [second.image]
    assert review_store.defect_mask_state(stpm.dataset_id)  # the synthetic set has masks
    report = review.add_to_test_images(review_store, stpm.dataset_id, "missed", review.false_negatives(rows))
    assert report.added == [] and "mask" in report.problems[0][1]
    unmasked = review_store.create_dataset("no masks")
    report = review.add_to_test_images(review_store, unmasked.id, "missed", review.false_negatives(rows))
    assert report.added == [second.image.name]
    assert review_store.dataset_counts(unmasked.id) == {("test", "missed"): 1}

    # With a region QA marked on it, the missed defect goes in with that region as its mask.
    width, height = Image.open(second.image.path).size
    region = qa_regions.region_from_cells([(10.0, 12.0), (14.0, 12.0)], 4.0, width, height)
    assert region.sum() == 4 * 8 and region[10:14, 8:16].all()
    qa_regions.save_region(review_store, second.image.sha256, region)
    report = review.add_to_test_images(review_store, stpm.dataset_id, "missed", [second.image])
    assert report.added == [second.image.name] and not report.problems
    (record,) = [r for r in review_store.list_images(stpm.dataset_id, "test") if r.defect == "missed"]
    saved = np.asarray(Image.open(review_store.dataset_dir(stpm.dataset_id) / record.mask_path)) > 0
    assert np.array_equal(saved, region)
    qa_regions.save_region(review_store, second.image.sha256, np.zeros((1, 1), dtype=bool))  # cleared
    assert qa_regions.load_region(review_store, second.image.sha256) is None


def test_uploads_are_kept_by_content_and_unreadable_files_are_listed(review_store, synthetic_root):
    png = (synthetic_root / "test" / "good" / "good_000.png").read_bytes()
    images, problems = image_refs.upload_images(review_store, [("a.png", png), ("same.png", png),
                                                           ("broken.png", b"not a png"), ("notes.txt", b"x")])
    assert [image.name for image in images] == ["a.png", "same.png"]
    assert images[0].sha256 == images[1].sha256 and images[0].path.read_bytes() == png
    assert [name for name, _ in problems] == ["broken.png", "notes.txt"]
    assert not any(path.name.startswith(".") for path in images[0].path.parent.iterdir())  # no temp files left


def test_synthetic_defects_are_made_once_with_masks_and_again_when_the_holdout_changes(review_store, stpm):
    from kdcore import data
    from kdcore.synthetic_check import holdout_defects

    dataset_id = stpm.dataset_id
    images = image_refs.synthetic_images(review_store, dataset_id, 64, "letterbox")
    holdout = data.load_dataset(review_store.dataset_dir(dataset_id)).holdout
    _, _, _, masks, kinds = holdout_defects(data.load_dataset(review_store.dataset_dir(dataset_id)), 64, "letterbox")
    assert [image.defect for image in images] == [f"synthetic {kind}" for kind in kinds]
    assert len(images) == len(holdout) and {image.label for image in images} == {image_refs.DEFECTIVE}
    for image, mask in zip(images, masks):  # square synthetic pictures: the files are the check's own pixels
        saved = np.asarray(Image.open(image.mask_path)) > 0
        assert saved.any() and np.array_equal(saved, mask.numpy())
    assert image_refs.synthetic_images(review_store, dataset_id, 64, "letterbox") == images  # made once, kept
    folder = images[0].path.parent
    holdout[0].write_bytes(holdout[1].read_bytes())  # the dataset changed: the images are made again
    again = image_refs.synthetic_images(review_store, dataset_id, 64, "letterbox")
    assert again[0].path.parent != folder and again[0].sha256 != images[0].sha256


def test_labelled_set_and_operating_points(review_store, stpm):
    labelled = scoring.labelled_set(review_store, stpm, loader(review_store))
    assert (labelled.n_good, labelled.n_defective, len(labelled.holdout)) == (8, 16, stpm.calibration["n"])
    point = thresholds.operating_point(labelled.labels, labelled.scores, thresholds.saved_threshold(stpm))
    assert point.tp + point.fn == 16 and point.fp + point.tn == 8
    assert point.fpr == point.fp / 8 and point.recall == point.tp / 16
    lines = thresholds.curves(labelled.labels, labelled.scores)
    assert lines["fpr"][0] == 0 and lines["tpr"][-1] == 1 and len(lines["precision"]) == len(lines["recall"])
    assert thresholds.OperatingPoint(1.0, tp=0, fp=0, tn=3, fn=0).precision is None


def test_deleting_a_model_drops_its_cached_maps_and_scores(review_store, stpm):
    images = image_refs.dataset_images(review_store, stpm.dataset_id)[:2]
    scoring.score_images(review_store, stpm, images, loader(review_store))
    assert review_store.map_file(stpm.id, images[0].sha256).exists()
    review_store.delete_model(stpm.id)
    assert not review_store.map_file(stpm.id, images[0].sha256).parent.exists()
    assert review_store.cached_scores(stpm.id, [image.sha256 for image in images]) == {}
