"""The app's store and ingestion, without a browser: datasets, uploads, zips, server folders, duplicates."""
from __future__ import annotations

import io
import os
import zipfile

import numpy as np
import pytest
from PIL import Image

from kdcore import data, ingest
from kdcore.store import GOOD, Store, StoreError


def png(seed: int, size: int = 32) -> bytes:
    """A small distinct PNG (distinct seeds give distinct bytes, so distinct hashes)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def zip_of(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, content in members.items():
            archive.writestr(name, content)
    return buffer.getvalue()


def snapshot(store: Store) -> tuple:
    """Everything a failed upload must leave alone: the image rows and the files of every dataset."""
    files = sorted(str(p.relative_to(store.root)) for p in (store.root / "datasets").rglob("*"))
    rows = [(d.id, [(i.path, i.sha256) for i in store.list_images(d.id)]) for d in store.list_datasets()]
    return files, rows


@pytest.fixture
def store(tmp_path):
    return Store(tmp_path / "data")


@pytest.fixture
def dataset(store):
    return store.create_dataset("bottle cap")


def test_datasets_are_named_uniquely_and_deleted_with_their_files(store):
    first = store.create_dataset("  bottle   cap ")
    assert first.name == "bottle cap"
    with pytest.raises(StoreError, match="already exists"):
        store.create_dataset("bottle cap")
    with pytest.raises(StoreError, match="name"):
        store.create_dataset("   ")
    ingest.add_normal_images(store, first.id, ingest.from_uploads([("a.png", png(1))]))
    assert store.dataset_dir(first.id).is_dir()

    store.delete_dataset(first.id)
    assert store.list_datasets() == []
    assert not store.dataset_dir(first.id).exists()
    # A second Store on the same directory (another browser, the worker) sees the same state.
    assert Store(store.root).list_datasets() == []


def test_uploads_and_zips_add_images_skip_duplicates_and_list_unusable_files(store, dataset):
    uploads = [
        ("a.png", png(1)), ("b.png", png(2)),
        ("more.zip", zip_of({
            "photos/c.png": png(3), "photos/a_again.png": png(1),  # same bytes as a.png
            "readme.txt": b"not an image", "broken.png": b"\x89PNG not really",
            "__MACOSX/photos/._c.png": b"resource fork", "photos/": b"",
        })),
    ]
    report = ingest.add_normal_images(store, dataset.id, ingest.from_uploads(uploads))

    assert sorted(report.added) == ["a.png", "b.png", "more.zip/photos/c.png"]
    assert report.duplicates == [("more.zip/photos/a_again.png", "a.png")]
    assert sorted(name for name, _ in report.problems) == ["more.zip/broken.png", "more.zip/readme.txt"]
    assert store.dataset_counts(dataset.id) == {("train", GOOD): 3}
    image = store.list_images(dataset.id)[0]
    assert (image.width, image.height, image.bytes) == (32, 32, len(png(1)))
    assert (store.dataset_dir(dataset.id) / image.thumb_path).is_file()

    # Uploading the same files again adds nothing.
    again = ingest.add_normal_images(store, dataset.id, ingest.from_uploads([("a.png", png(1))]))
    assert again.added == [] and again.duplicates == [("a.png", "train/good/a.png")]
    # The stored folder is what the engine trains on.
    loaded = data.load_dataset(store.dataset_dir(dataset.id))
    assert len(loaded.train) + len(loaded.holdout) == 3 and loaded.skipped == []


def test_same_name_different_content_keeps_both(store, dataset):
    ingest.add_normal_images(store, dataset.id, ingest.from_uploads([("x.png", png(1))]))
    ingest.add_normal_images(store, dataset.id, ingest.from_uploads([("x.jpg", png(2))]))  # a PNG named .jpg
    paths = sorted(i.path for i in store.list_images(dataset.id))
    assert paths[0] == "train/good/x.png" and paths[1].startswith("train/good/x_") and len(set(paths)) == 2


@pytest.mark.parametrize("members, limits, reason", [
    ({"../escape.png": png(9)}, {}, "unsafe path"),
    ({"/abs/escape.png": png(9)}, {}, "unsafe path"),
    ({"ok/../../escape.png": png(9)}, {}, "unsafe path"),
    ({f"{i}.png": png(i) for i in range(3)}, {"MAX_ZIP_MEMBERS": 2}, "entries"),
    ({"big.png": png(9, size=64)}, {"MAX_ZIP_BYTES": 1000}, "unpacks to"),
    ({f"{i}.png": png(i) for i in range(3)}, {"MAX_UPLOAD_FILES": 3}, "at most 3 are accepted at once"),
])
def test_a_rejected_zip_changes_nothing(store, dataset, monkeypatch, members, limits, reason):
    ingest.add_normal_images(store, dataset.id, ingest.from_uploads([("kept.png", png(1))]))
    before = snapshot(store)
    for name, value in limits.items():
        monkeypatch.setattr(ingest, name, value)
    uploads = [("fine.png", png(2)), ("bad.zip", zip_of(members))]
    with pytest.raises(ingest.RejectedUpload, match=reason):
        ingest.add_normal_images(store, dataset.id, ingest.from_uploads(uploads))
    assert snapshot(store) == before


def test_a_zip_bomb_is_refused_from_its_directory(store, dataset, monkeypatch):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("bomb.png", bytes(64 * 1024**2))  # 64 MiB of zeros in about 64 KB
    before = snapshot(store)
    with pytest.raises(ingest.RejectedUpload, match="no image compresses like that"):
        ingest.add_normal_images(store, dataset.id, ingest.from_uploads([("bomb.zip", buffer.getvalue())]))
    assert snapshot(store) == before and not any((store.root / "tmp").iterdir())
    monkeypatch.setenv("KDCORE_MAX_ZIP_RATIO", "100000")  # a user who knows better raises the cap
    report = ingest.add_normal_images(store, dataset.id, ingest.from_uploads([("bomb.zip", buffer.getvalue())]))
    assert report.added == [] and "not a readable image" in report.problems[0][1]


def test_an_image_over_the_pixel_cap_is_refused_before_decoding(store, dataset, monkeypatch):
    buffer = io.BytesIO()
    Image.new("1", (9000, 8000)).save(buffer, "PNG")  # 72 MP in a few KB
    report = ingest.add_normal_images(store, dataset.id, ingest.from_uploads([("huge.png", buffer.getvalue()),
                                                                               ("fine.png", png(3))]))
    assert report.added == ["fine.png"]
    (name, reason), = report.problems
    assert name == "huge.png" and "9000x8000" in reason and "at most 64 MP" in reason
    monkeypatch.setenv("KDCORE_MAX_IMAGE_PIXELS", "1000")
    (store.root / "small.png").write_bytes(png(4))
    with pytest.raises(data.DataError, match="KDCORE_MAX_IMAGE_PIXELS"):
        data.read_image(store.root / "small.png", 32)


def test_a_file_that_is_not_a_zip_is_rejected(store, dataset):
    with pytest.raises(ingest.RejectedUpload, match="not a readable zip"):
        ingest.from_uploads([("photos.zip", b"PK but not really")])


def test_import_of_an_mvtec_folder_keeps_splits_and_masks(store, dataset, synthetic_root):
    report = ingest.import_folder(store, dataset.id, synthetic_root)
    assert report.problems == [] and len(report.added) == 40 + 8 + 16
    counts = store.dataset_counts(dataset.id)
    assert counts == {("train", GOOD): 40, ("test", GOOD): 8, ("test", "scratch"): 8, ("test", "spot"): 8}
    loaded = data.load_dataset(store.dataset_dir(dataset.id))
    assert loaded.has_masks and sum(s.label for s in loaded.test) == 16
    assert all(s.mask_path is not None for s in loaded.test if s.label)

    again = ingest.import_folder(store, dataset.id, synthetic_root)
    assert again.added == [] and len(again.duplicates) == 64


def test_defect_images_of_a_dataset_all_have_masks_or_none_has(store, dataset):
    mask = png(50)
    first = ingest.add_test_images(store, dataset.id, "scratch", ingest.from_uploads([("s1.png", png(1))]),
                                   ingest.from_uploads([("s1_mask.png", mask), ("orphan_mask.png", png(51))]))
    assert first.added == ["s1.png"] and first.problems == [("orphan_mask.png", "no image with a matching name")]
    second = ingest.add_test_images(store, dataset.id, "dent", ingest.from_uploads([("d1.png", png(2))]))
    assert second.added == [] and "needs one" in second.problems[0][1]
    wrong_size = ingest.add_test_images(store, dataset.id, "dent", ingest.from_uploads([("d2.png", png(3))]),
                                        ingest.from_uploads([("d2.png", png(4, size=16))]))
    assert wrong_size.added == [] and "16x16" in wrong_size.problems[0][1]
    with pytest.raises(ingest.RejectedUpload, match="defect type"):
        ingest.add_test_images(store, dataset.id, "../x", ingest.from_uploads([("d3.png", png(5))]))

    ingest.add_normal_images(store, dataset.id, ingest.from_uploads([("n1.png", png(6)), ("n2.png", png(7))]))
    loaded = data.load_dataset(store.dataset_dir(dataset.id))
    assert [s.mask_path.name for s in loaded.test] == ["s1_mask.png"]


def test_bad_names_are_judged_one_file_at_a_time(store, dataset, tmp_path):
    long_name = "x" * 300 + ".png"  # over the 255 bytes a file system takes
    report = ingest.add_normal_images(store, dataset.id, ingest.from_uploads([(long_name, png(5)), ("ok.png", png(6))]))
    assert sorted(report.added) == sorted([long_name, "ok.png"]) and report.problems == []
    assert all(len(image.path.split("/")[-1]) < 255 for image in store.list_images(dataset.id))

    folder = tmp_path / "server"
    folder.mkdir()
    (folder / "fine.png").write_bytes(png(7))
    (folder / os.fsdecode(b"caf\xe9.png")).write_bytes(png(8))  # Latin-1 bytes, not UTF-8
    report = ingest.add_normal_images(store, dataset.id, ingest.from_folder(folder))
    assert len(report.added) == 2 and any("\ufffd" in name for name in report.added)


def test_an_mvtec_import_with_a_bad_defect_folder_keeps_the_rest(store, dataset, tmp_path):
    root = tmp_path / "mvtec"
    for folder, seed in (("train/good", 10), ("test/good", 11), ("test/bad name!", 12), ("test/zdent", 13)):
        (root / folder).mkdir(parents=True)
        (root / folder / "a.png").write_bytes(png(seed))
    report = ingest.import_folder(store, dataset.id, root)
    assert len(report.added) == 3
    (name, reason), = report.problems
    assert name.endswith("bad name!/") and "not a usable defect type name" in reason
    assert ("test", "zdent") in store.dataset_counts(dataset.id)  # the folder after the bad one went in


def test_a_database_that_does_not_belong_to_its_directory_is_refused(store, dataset, tmp_path):
    ingest.add_normal_images(store, dataset.id, ingest.from_uploads([("a.png", png(40))]))
    database = store.root / "kdcore.sqlite3"
    before = snapshot(store)
    saved = database.read_bytes()
    for wal in store.root.glob("kdcore.sqlite3-*"):
        wal.unlink()
    database.write_bytes(b"")  # emptied: a new store here would reuse dataset id 1 and its images
    with pytest.raises(StoreError, match="empty or was replaced"):
        Store(store.root)
    assert database.read_bytes() == b""  # refused before anything was written to it
    database.write_bytes(b"garbage, not a database" * 100)
    with pytest.raises(StoreError, match="cannot be used"):
        Store(store.root)
    other = Store(tmp_path / "other")  # another store's database
    database.write_bytes((other.root / "kdcore.sqlite3").read_bytes())
    with pytest.raises(StoreError, match="belongs to another kdcore store"):
        Store(store.root)
    database.write_bytes(saved)
    assert snapshot(Store(store.root)) == before  # its own database back: all there, nothing reused

    (store.root / "kdcore-store-id").unlink()
    (store.root / "kdcore.sqlite3").unlink()
    with pytest.raises(StoreError, match="already holds datasets or models"):  # a pre-identity store emptied
        Store(store.root)


def test_a_newer_database_layout_is_refused(store):
    import sqlite3

    with sqlite3.connect(store.root / "kdcore.sqlite3") as conn:
        conn.execute("PRAGMA user_version = 99")
    with pytest.raises(StoreError, match="newer than this kdcore"):
        Store(store.root)


def test_a_database_of_an_older_kdcore_is_migrated_in_place(tmp_path):
    import sqlite3

    from kdcore.store import database

    # The layout before versions were kept: no export jobs, no executor/node, no identity.
    old_schema = (database._SCHEMA.replace("'evaluate', 'export'", "'evaluate'")
                  .replace("    finished_at REAL,\n    executor TEXT,               -- what ran it: 'local' (the worker's own "
                           "process)\n    node TEXT                    -- the machine it ran on\n", "    finished_at REAL\n"))
    assert "executor" not in old_schema
    root = tmp_path / "old"
    (root / "datasets" / "1" / "train" / "good").mkdir(parents=True)
    with sqlite3.connect(root / "kdcore.sqlite3") as conn:
        conn.executescript(old_schema)
        conn.execute("INSERT INTO datasets (name, created_at) VALUES ('cap', 1)")
        conn.execute("INSERT INTO jobs (kind, status, dataset_id, dataset_name, method, params, created_at) "
                     "VALUES ('train', 'done', 1, 'cap', 'rd', '{}', 1)")
        conn.execute("INSERT INTO job_points (job_id, step, epoch, elapsed_seconds) VALUES (1, 1, 1, 0.5)")
    store = Store(root)
    (job,) = store.list_jobs()
    assert (job.kind, job.status, job.executor) == ("train", "done", None)
    assert len(store.job_points(job.id)) == 1
    assert store.enqueue_job("export", "rd", {}, 1).kind == "export"
    assert (root / "kdcore-store-id").read_text().strip() == store.id
    with sqlite3.connect(root / "kdcore.sqlite3") as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == database.SCHEMA_VERSION
        assert conn.execute("PRAGMA foreign_key_check").fetchall() == []


def test_marks_and_deletions_record_who(store, dataset):
    import sqlite3

    store.set_qa_label("ab" * 32, 1, by="qa@plant.example")
    with sqlite3.connect(store.root / "kdcore.sqlite3") as conn:
        assert conn.execute("SELECT marked_by FROM qa_labels").fetchone() == ("qa@plant.example",)
    store.delete_dataset(dataset.id, by="lead@plant.example")
    (entry,) = store.audit_entries()
    assert (entry["who"], entry["action"]) == ("lead@plant.example", "delete dataset")
    assert dataset.name in entry["detail"]


def test_masks_uploaded_among_images_are_paired_or_refused_never_taken_as_images(store, dataset):
    mixed = ingest.from_uploads([("s1.png", png(60)), ("s1_mask.png", png(61)), ("s2.png", png(62)),
                                 ("s2_mask.png", png(63)), ("lost_mask.png", png(64))])
    report = ingest.add_test_images(store, dataset.id, "scratch", mixed)
    assert sorted(report.added) == ["s1.png", "s2.png"]
    assert [name for name, _ in report.problems] == ["lost_mask.png"]
    records = [image for image in store.list_images(dataset.id) if image.defect == "scratch"]
    assert len(records) == 2 and all(image.mask_path for image in records)

    normal = ingest.add_normal_images(store, dataset.id, ingest.from_uploads([("n.png", png(65)),
                                                                              ("n_mask.png", png(66))]))
    assert normal.added == ["n.png"]
    (name, reason), = normal.problems
    assert name == "n_mask.png" and "looks like a mask" in reason


def test_an_unreadable_upload_is_named_by_its_own_name_not_a_temp_path(store, dataset):
    report = ingest.add_normal_images(store, dataset.id, ingest.from_uploads([("broken.png", b"\x89PNG not really")]))
    (name, reason), = report.problems
    assert name == "broken.png" and "not a readable image" in reason
    assert str(store.root) not in reason and "tmp" not in reason


def test_single_images_are_moved_relabelled_and_deleted_in_place(store, dataset, synthetic_root):
    ingest.import_folder(store, dataset.id, synthetic_root)
    by_place = lambda split, defect: [i for i in store.list_images(dataset.id, split) if i.defect == defect]
    scratch, spot = by_place("test", "scratch"), by_place("test", "spot")
    normal = by_place("train", GOOD)

    # A missed defect's image relabelled to another type: its mask follows it.
    assert store.move_images(dataset.id, [scratch[0].id], "test", "spot", by="qa") == 1
    moved = next(i for i in store.list_images(dataset.id) if i.id == scratch[0].id)
    assert moved.path.startswith("test/spot/") and moved.mask_path.startswith("ground_truth/spot/")
    assert not (store.dataset_dir(dataset.id) / scratch[0].path).exists()

    # A defect image moved to the normals loses its mask (nobody's any more); a normal image can go to test/good.
    store.move_images(dataset.id, [spot[0].id], "train", GOOD)
    store.move_images(dataset.id, [normal[0].id], "test", GOOD)
    assert not (store.dataset_dir(dataset.id) / spot[0].mask_path).exists()
    # Masked dataset: an image without a mask cannot become a defect image; a bad name is refused.
    with pytest.raises(StoreError, match="all have masks or none"):
        store.move_images(dataset.id, [normal[1].id], "test", "scratch")
    with pytest.raises(StoreError, match="defect type name"):
        store.move_images(dataset.id, [scratch[1].id], "test", "../escape")
    with pytest.raises(StoreError, match="only be moved there as 'good'"):
        store.move_images(dataset.id, [scratch[1].id], "train", "scratch")

    assert store.delete_images(dataset.id, [scratch[1].id, normal[2].id], by="qa") == 2
    for gone in (scratch[1].path, scratch[1].mask_path, scratch[1].thumb_path, normal[2].path):
        assert not (store.dataset_dir(dataset.id) / gone).exists()
    with pytest.raises(StoreError, match="no longer in this dataset"):
        store.delete_images(dataset.id, [scratch[1].id])

    # Rows and files agree: the folder loads with every image where its row says.
    counts = store.dataset_counts(dataset.id)
    assert counts == {("train", GOOD): 40 - 1 + 1 - 1, ("test", GOOD): 8 + 1, ("test", "scratch"): 6,
                      ("test", "spot"): 8 + 1 - 1}
    loaded = data.load_dataset(store.dataset_dir(dataset.id))
    assert len(loaded.train) + len(loaded.holdout) == 39 and len(loaded.test) == 9 + 6 + 8
    assert all(s.mask_path is not None for s in loaded.test if s.label)
    assert [e["action"] for e in store.audit_entries()][:2] == ["delete images", "move images"]


def test_images_of_a_dataset_in_use_by_a_job_stay_put(store, dataset, synthetic_root):
    ingest.import_folder(store, dataset.id, synthetic_root)
    image = store.list_images(dataset.id, "train")[0]
    store.enqueue_job("train", "stpm", {}, dataset.id)
    with pytest.raises(StoreError, match="job"):
        store.move_images(dataset.id, [image.id], "test", GOOD)
    with pytest.raises(StoreError, match="job"):
        store.delete_images(dataset.id, [image.id])
    assert (store.dataset_dir(dataset.id) / image.path).exists()
    assert store.list_images(dataset.id, "train")[0] == image


def test_a_move_that_cannot_touch_a_file_moves_nothing(store, dataset, synthetic_root):
    ingest.import_folder(store, dataset.id, synthetic_root)
    scratch = [i for i in store.list_images(dataset.id, "test") if i.defect == "scratch"][:2]
    (store.dataset_dir(dataset.id) / scratch[1].mask_path).unlink()  # damaged by hand
    before = snapshot(store)
    with pytest.raises(StoreError, match="nothing was moved"):
        store.move_images(dataset.id, [i.id for i in scratch], "test", "spot")
    assert snapshot(store) == before
