"""Tests for kdcore.data: layouts, pairing, conversion, hold-out and error reporting.

Every test builds its own tiny images (16-32 px) under tmp_path, so the suite is
fast and needs no real data.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kdcore.data import (
    IMAGE_EXTENSIONS,
    AnomalyDataset,
    DataError,
    TestSample,
    content_box,
    load_dataset,
    read_image,
    read_images,
    read_mask,
    read_model_input,
    read_model_inputs,
)

# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def save_image(path: Path, size: tuple[int, int] = (24, 20), value: int = 128, mode: str = "RGB") -> Path:
    """Write a small image with a gradient (so JPEG/PNG encoders have real content)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    w, h = size
    gradient = (np.add.outer(np.arange(h), np.arange(w)) * 3 + value) % 256
    gray = Image.fromarray(gradient.astype(np.uint8))
    img = gray if mode == "L" else gray.convert(mode)
    img.save(path)
    return path


def save_mask(path: Path, size: tuple[int, int] = (24, 20), box: tuple[int, int, int, int] | None = (2, 2, 6, 6)) -> Path:
    """Write a 0/255 mask; ``box`` is (x0, y0, x1, y1) of the defect, None for empty."""
    path.parent.mkdir(parents=True, exist_ok=True)
    w, h = size
    mask = np.zeros((h, w), dtype=np.uint8)
    if box is not None:
        x0, y0, x1, y1 = box
        mask[y0:y1, x0:x1] = 255
    Image.fromarray(mask).save(path)
    return path


def save_truncated_jpeg(path: Path, size: tuple[int, int] = (32, 32)) -> Path:
    """A JPEG whose header is fine but whose data stops halfway (opens, fails to decode)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # Noise, so the entropy-coded data outweighs the ~600-byte header being kept.
    noise = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(noise).save(path, quality=95)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 3 // 4])
    return path


def make_mvtec(root: Path, n_train: int = 5, with_masks: bool = True) -> Path:
    """A small MVTec-style set with arbitrary, non-sorted-compatible names.

    crack: zz_1.png (mask box top-left) and aa_2.png (mask box bottom-right), so
    pairing by sorted position would swap the masks.
    """
    for i in range(n_train):
        save_image(root / "train" / "good" / f"n{i:02d}.png", value=i * 10)
    save_image(root / "test" / "good" / "g1.png")
    save_image(root / "test" / "good" / "g0.jpg")
    save_image(root / "test" / "crack" / "zz_1.png", value=1)
    save_image(root / "test" / "crack" / "aa_2.png", value=2)
    save_image(root / "test" / "hole" / "h.jpg", value=3)
    if with_masks:
        save_mask(root / "ground_truth" / "crack" / "zz_1_mask.png", box=(0, 0, 4, 4))
        save_mask(root / "ground_truth" / "crack" / "aa_2_mask.png", box=(20, 16, 24, 20))
        # Fallback name (<stem>.<ext>) and another image extension.
        save_mask(root / "ground_truth" / "hole" / "h.bmp")
    return root


# ---------------------------------------------------------------------------
# MVTec layout
# ---------------------------------------------------------------------------


def test_mvtec_round_trip(tmp_path: Path) -> None:
    root = make_mvtec(tmp_path / "set")
    ds = load_dataset(root)

    assert isinstance(ds, AnomalyDataset)
    assert ds.root == root
    assert len(ds.train) + len(ds.holdout) == 5
    assert len(ds.holdout) == 1  # max(1, round(0.1 * 5))
    assert ds.has_masks is True
    assert ds.skipped == []

    by_name = {s.path.name: s for s in ds.test}
    assert sorted(by_name) == ["aa_2.png", "g0.jpg", "g1.png", "h.jpg", "zz_1.png"]
    assert [s.path for s in ds.test] == sorted(s.path for s in ds.test)
    assert by_name["g0.jpg"] == TestSample(root / "test/good/g0.jpg", "good", None)
    assert by_name["g0.jpg"].label == 0
    assert by_name["zz_1.png"].label == 1
    assert by_name["zz_1.png"].defect == "crack"
    assert by_name["zz_1.png"].mask_path == root / "ground_truth/crack/zz_1_mask.png"
    assert by_name["aa_2.png"].mask_path == root / "ground_truth/crack/aa_2_mask.png"
    assert by_name["h.jpg"].mask_path == root / "ground_truth/hole/h.bmp"

    # The pairing is by stem: zz_1's defect really is top-left, aa_2's bottom-right.
    zz = read_mask(by_name["zz_1.png"].mask_path, 24)
    aa = read_mask(by_name["aa_2.png"].mask_path, 24)
    assert zz[0, 0] and not zz[-1, -1]
    assert aa[-1, -1] and not aa[0, 0]

    summary = ds.summary()
    assert "4 train" in summary and "1 holdout" in summary and "5 test" in summary
    assert "crack 2" in summary and "hole 1" in summary and "0 skipped" in summary


def test_image_level_only_set(tmp_path: Path) -> None:
    root = make_mvtec(tmp_path / "set", with_masks=False)
    ds = load_dataset(root)
    assert ds.has_masks is False
    assert all(s.mask_path is None for s in ds.test)
    assert [s.label for s in ds.test] == [1, 1, 0, 0, 1]  # aa_2, zz_1, g0, g1, h (sorted by path)
    assert "image-level" in ds.summary()


def test_empty_mask_still_defective(tmp_path: Path) -> None:
    root = make_mvtec(tmp_path / "set")
    save_mask(root / "ground_truth" / "crack" / "zz_1_mask.png", box=None)
    ds = load_dataset(root)
    sample = next(s for s in ds.test if s.path.name == "zz_1.png")
    assert sample.label == 1
    assert not read_mask(sample.mask_path, 16).any()


def test_mvtec_without_test_folder_has_empty_test(tmp_path: Path) -> None:
    for i in range(3):
        save_image(tmp_path / "train" / "good" / f"{i}.png")
    ds = load_dataset(tmp_path)
    assert ds.test == [] and len(ds.train) + len(ds.holdout) == 3


def test_extra_folders_and_files_ignored(tmp_path: Path) -> None:
    root = make_mvtec(tmp_path / "set")
    (root / "license.txt").write_text("CC BY-NC-SA")
    save_image(root / "loose.png")  # images beside the MVTec folders are not training data
    save_image(root / "foo" / "x.png")
    (root / "train" / "good" / "notes.txt").write_text("not an image")
    (root / "test" / "crack" / "readme.md").write_text("not an image")
    save_image(root / "test" / "stray.png")  # not inside a defect folder
    save_image(root / "train" / "good" / "nested" / "deep.png")
    # Hidden files (macOS resource forks look like images but are not) and hidden folders.
    (root / "train" / "good" / "._n00.png").write_bytes(b"\x00\x05\x16\x07 not a png")
    (root / "test" / ".ipynb_checkpoints").mkdir()
    save_image(root / "test" / ".ipynb_checkpoints" / "c.png")

    ds = load_dataset(root)
    assert len(ds.train) + len(ds.holdout) == 5
    assert len(ds.test) == 5
    assert {s.defect for s in ds.test} == {"good", "crack", "hole"}
    assert ds.skipped == []


# ---------------------------------------------------------------------------
# Plain folder
# ---------------------------------------------------------------------------


def test_plain_folder(tmp_path: Path) -> None:
    for i, ext in enumerate([".png", ".jpg", ".JPG", ".bmp", ".tif", ".webp"]):
        save_image(tmp_path / f"img{i}{ext}")
    (tmp_path / "notes.txt").write_text("ignored")
    (tmp_path / ".hidden.png").write_bytes(b"garbage")
    save_image(tmp_path / "sub" / "nested.png")  # non-recursive: ignored

    ds = load_dataset(str(tmp_path))  # str accepted as well as Path
    assert ds.test == [] and ds.has_masks is False and ds.skipped == []
    names = sorted(p.name for p in ds.train + ds.holdout)
    assert names == sorted(f"img{i}{ext}" for i, ext in enumerate([".png", ".jpg", ".JPG", ".bmp", ".tif", ".webp"]))
    assert ds.train == sorted(ds.train) and ds.holdout == sorted(ds.holdout)
    assert "no test split" in ds.summary()


def test_image_extensions_are_lower_case_suffixes() -> None:
    assert {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"} <= IMAGE_EXTENSIONS
    assert all(e.startswith(".") and e == e.lower() for e in IMAGE_EXTENSIONS)


# ---------------------------------------------------------------------------
# Hold-out
# ---------------------------------------------------------------------------


def _plain(tmp_path: Path, n: int) -> Path:
    for i in range(n):
        save_image(tmp_path / f"img_{i:03d}.png", size=(16, 16), value=i)
    return tmp_path


def test_holdout_deterministic_disjoint_and_sized(tmp_path: Path) -> None:
    root = _plain(tmp_path, 30)
    a = load_dataset(root, holdout_fraction=0.2, seed=3)
    b = load_dataset(root, holdout_fraction=0.2, seed=3)
    assert a.holdout == b.holdout and a.train == b.train
    assert len(a.holdout) == 6
    assert not set(a.holdout) & set(a.train)
    assert sorted(a.holdout + a.train) == sorted(root.glob("*.png"))
    # Not simply the first files in name order, and the seed matters.
    assert a.holdout != sorted(root.glob("*.png"))[:6]
    assert load_dataset(root, holdout_fraction=0.2, seed=4).holdout != a.holdout


def test_holdout_at_least_one(tmp_path: Path) -> None:
    ds = load_dataset(_plain(tmp_path, 2), holdout_fraction=0.01)
    assert len(ds.holdout) == 1 and len(ds.train) == 1


def test_holdout_stable_when_adding_an_image(tmp_path: Path) -> None:
    root = _plain(tmp_path, 40)
    before = load_dataset(root, holdout_fraction=0.1)
    save_image(root / "img_new.png", size=(16, 16))
    after = load_dataset(root, holdout_fraction=0.1)
    assert len(after.holdout) == len(before.holdout) == 4
    # At most one old member can be pushed out (by the newcomer); nothing reshuffles.
    assert len(set(before.holdout) & set(after.holdout)) >= len(before.holdout) - 1
    assert set(after.holdout) <= set(before.holdout) | {root / "img_new.png"}


def test_holdout_uses_name_relative_to_train_dir(tmp_path: Path) -> None:
    # The same file names give the same split wherever the set lives.
    a = load_dataset(_plain(tmp_path / "a", 20), holdout_fraction=0.2)
    b = load_dataset(_plain(tmp_path / "elsewhere" / "b", 20), holdout_fraction=0.2)
    assert [p.name for p in a.holdout] == [p.name for p in b.holdout]


@pytest.mark.parametrize("fraction", [0.0, -0.1, 0.51, 1.0, math.nan, True])
def test_holdout_fraction_validated(tmp_path: Path, fraction: float) -> None:
    with pytest.raises(ValueError, match="holdout_fraction"):
        load_dataset(_plain(tmp_path, 4), holdout_fraction=fraction)


def test_holdout_fraction_half_accepted(tmp_path: Path) -> None:
    ds = load_dataset(_plain(tmp_path, 3), holdout_fraction=0.5)
    assert len(ds.train) >= 1 and len(ds.holdout) >= 1


def test_needs_two_normal_images(tmp_path: Path) -> None:
    save_image(tmp_path / "train" / "good" / "only.png")
    with pytest.raises(DataError, match="at least 2") as err:
        load_dataset(tmp_path)
    assert str(tmp_path / "train" / "good") in str(err.value)


# ---------------------------------------------------------------------------
# Reading pixels
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["L", "1", "P", "RGBA", "LA", "I;16", "CMYK"])
def test_any_mode_becomes_rgb_uint8(tmp_path: Path, mode: str) -> None:
    ext = ".jpg" if mode == "CMYK" else ".png"
    if mode == "I;16":
        path = tmp_path / "deep.png"
        Image.fromarray(np.full((20, 24), 65535, dtype=np.uint16)).save(path)
    else:
        path = save_image(tmp_path / f"img{ext}", mode=mode)
    arr = read_image(path, 16)
    assert arr.shape == (16, 16, 3) and arr.dtype == np.uint8
    if mode == "I;16":
        assert (arr == 255).all()  # 16-bit full scale maps to 8-bit full scale


def test_16bit_is_scaled_not_clipped(tmp_path: Path) -> None:
    path = tmp_path / "deep.png"
    Image.fromarray(np.full((16, 16), 257 * 100, dtype=np.uint16)).save(path)
    assert (read_image(path, 16) == 100).all()


def test_grayscale_replicated_to_three_channels(tmp_path: Path) -> None:
    path = save_image(tmp_path / "g.png", size=(16, 16), mode="L")
    arr = read_image(path, 16)
    assert arr.shape == (16, 16, 3)
    assert (arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all()
    assert (arr[..., 0] == np.asarray(Image.open(path))).all()  # same size: untouched


def test_different_sizes_resized_to_one_square(tmp_path: Path) -> None:
    paths = [
        save_image(tmp_path / "a.png", size=(32, 16)),
        save_image(tmp_path / "b.jpg", size=(17, 29)),
        save_image(tmp_path / "c.bmp", size=(16, 16), mode="L"),
    ]
    batch = read_images(paths, 20)
    assert batch.shape == (3, 20, 20, 3) and batch.dtype == np.uint8
    assert read_images([], 20).shape == (0, 20, 20, 3)
    # Bilinear (with Pillow's antialias) exactly.
    expected = np.asarray(Image.open(paths[0]).convert("RGB").resize((20, 20), Image.Resampling.BILINEAR))
    assert (batch[0] == expected).all()


def test_mask_nearest_and_binarised(tmp_path: Path) -> None:
    values = np.zeros((32, 32), dtype=np.uint8)
    values[0:8, 0:8] = 1  # any non-zero value is defect, not only 255
    values[16:32, 16:32] = 255
    path = tmp_path / "m.png"
    Image.fromarray(values).save(path)

    mask = read_mask(path, 16)
    assert mask.dtype == np.bool_ and mask.shape == (16, 16)
    expected = np.asarray(Image.fromarray(values > 0).convert("L").resize((16, 16), Image.Resampling.NEAREST)) > 0
    assert (mask == expected).all()
    assert mask[:4, :4].all() and mask[8:, 8:].all() and mask.sum() == 16 + 64


def test_rgb_mask_any_channel_counts(tmp_path: Path) -> None:
    rgb = np.zeros((16, 16, 3), dtype=np.uint8)
    rgb[0, 0, 2] = 1  # a faint blue pixel would vanish in an L conversion
    path = tmp_path / "m.png"
    Image.fromarray(rgb).save(path)
    assert read_mask(path, 16).sum() == 1


def test_exif_orientation_applied_to_image_and_size_check(tmp_path: Path) -> None:
    # A phone photo stored 24x20 but tagged "rotate 90": shown (and annotated) as 20x24.
    root = make_mvtec(tmp_path / "set")
    path = root / "test" / "hole" / "h.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.open(save_image(path, size=(24, 20))).save(path, exif=exif)
    save_mask(root / "ground_truth" / "hole" / "h.bmp", size=(20, 24))
    ds = load_dataset(root)
    assert any(s.path == path for s in ds.test)
    upright = read_image(path, 24)
    stored = np.asarray(Image.open(path).convert("RGB").resize((24, 24), Image.Resampling.BILINEAR))
    assert not (upright == stored).all()


def test_read_errors_name_the_path(tmp_path: Path) -> None:
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(DataError, match="bad.png"):
        read_image(bad, 16)
    with pytest.raises(DataError, match="missing.png"):
        read_mask(tmp_path / "missing.png", 16)
    with pytest.raises(ValueError, match="size"):
        read_image(save_image(tmp_path / "ok.png"), 0)


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------


def test_missing_root(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(DataError, match="not found") as err:
        load_dataset(missing)
    assert str(missing) in str(err.value)


def test_root_is_a_file(tmp_path: Path) -> None:
    path = save_image(tmp_path / "a.png")
    with pytest.raises(DataError, match="not a folder") as err:
        load_dataset(path)
    assert str(path) in str(err.value)


def test_train_without_good_is_an_error(tmp_path: Path) -> None:
    save_image(tmp_path / "train" / "a.png")
    save_image(tmp_path / "b.png")
    save_image(tmp_path / "c.png")
    with pytest.raises(DataError) as err:
        load_dataset(tmp_path)
    assert str(tmp_path / "train" / "good") in str(err.value)


def test_no_images_plain_folder(tmp_path: Path) -> None:
    (tmp_path / "readme.txt").write_text("no images here")
    with pytest.raises(DataError, match="no usable images") as err:
        load_dataset(tmp_path)
    assert str(tmp_path) in str(err.value)


def test_no_images_in_train_good(tmp_path: Path) -> None:
    (tmp_path / "train" / "good").mkdir(parents=True)
    with pytest.raises(DataError, match="no usable images") as err:
        load_dataset(tmp_path)
    assert str(tmp_path / "train" / "good") in str(err.value)


def test_test_folder_without_train_hints_at_layout(tmp_path: Path) -> None:
    save_image(tmp_path / "test" / "good" / "a.png")
    with pytest.raises(DataError) as err:
        load_dataset(tmp_path)
    assert str(tmp_path / "train" / "good") in str(err.value)


def test_missing_mask(tmp_path: Path) -> None:
    root = make_mvtec(tmp_path / "set")
    (root / "ground_truth" / "crack" / "aa_2_mask.png").unlink()
    with pytest.raises(DataError, match="no mask") as err:
        load_dataset(root)
    message = str(err.value)
    assert str(root / "test" / "crack" / "aa_2.png") in message
    assert str(root / "ground_truth" / "crack" / "aa_2_mask.png") in message


def test_missing_mask_folder(tmp_path: Path) -> None:
    root = make_mvtec(tmp_path / "set")
    save_image(root / "test" / "scratch" / "s.png")
    with pytest.raises(DataError) as err:
        load_dataset(root)
    assert str(root / "ground_truth" / "scratch" / "s_mask.png") in str(err.value)


def test_mask_size_mismatch(tmp_path: Path) -> None:
    root = make_mvtec(tmp_path / "set")
    save_mask(root / "ground_truth" / "crack" / "zz_1_mask.png", size=(30, 20))
    with pytest.raises(DataError, match="size") as err:
        load_dataset(root)
    message = str(err.value)
    assert str(root / "ground_truth" / "crack" / "zz_1_mask.png") in message
    assert str(root / "test" / "crack" / "zz_1.png") in message
    assert "30x20" in message and "24x20" in message


# ---------------------------------------------------------------------------
# Corrupt files
# ---------------------------------------------------------------------------


def test_corrupt_files_skipped_and_reported(tmp_path: Path) -> None:
    root = make_mvtec(tmp_path / "set")
    truncated = save_truncated_jpeg(root / "train" / "good" / "trunc.jpg")
    garbage = root / "test" / "crack" / "garbage.png"
    garbage.write_bytes(b"\x89PNG\r\n\x1a\n but then nothing sensible")
    save_mask(root / "ground_truth" / "crack" / "garbage_mask.png")
    save_image(root / "test" / "hole" / "badmask.png")
    (root / "ground_truth" / "hole" / "badmask_mask.png").write_bytes(b"broken")

    with Image.open(truncated) as img:
        assert img.size == (32, 32)  # the header alone looks fine: only decoding finds it

    ds = load_dataset(root)
    skipped = dict(ds.skipped)
    assert set(skipped) == {truncated, garbage, root / "test" / "hole" / "badmask.png"}
    assert "truncated" in skipped[truncated].lower() or "OSError" in skipped[truncated]
    assert "badmask_mask.png" in skipped[root / "test" / "hole" / "badmask.png"]
    assert ds.skipped == sorted(ds.skipped)
    assert truncated not in ds.train + ds.holdout
    assert len(ds.train) + len(ds.holdout) == 5 and len(ds.test) == 5
    assert "3 skipped" in ds.summary()


def test_all_corrupt_is_an_error(tmp_path: Path) -> None:
    for i in range(3):
        save_truncated_jpeg(tmp_path / f"{i}.jpg")
    with pytest.raises(DataError, match="no usable images") as err:
        load_dataset(tmp_path)
    assert str(tmp_path) in str(err.value) and "3 unreadable" in str(err.value)


# ---------------------------------------------------------------------------
# Model-input geometry
# ---------------------------------------------------------------------------


def test_letterbox_keeps_the_aspect_ratio_and_repeats_the_edges(tmp_path):
    # A 40x20 picture: left half black, right half white.
    array = np.zeros((20, 40), np.uint8)
    array[:, 20:] = 255
    path = tmp_path / "wide.png"
    Image.fromarray(array).save(path)
    square, box = read_model_input(path, 32, "letterbox")
    assert box == (8, 0, 16, 32) == content_box(40, 20, 32, "letterbox")
    assert square.shape == (32, 32, 3)
    # The margins above and below repeat the picture's first and last rows, so there is no new edge.
    assert (square[:8] == square[8]).all() and (square[24:] == square[23]).all()
    assert square[16, 2].max() == 0 and square[16, 29].min() == 255
    stretched, full = read_model_input(path, 32, "stretch")
    assert full == (0, 0, 32, 32) and (stretched == read_image(path, 32)).all()
    images, boxes = read_model_inputs([path, path], 32, "letterbox")
    assert images.shape == (2, 32, 32, 3) and boxes.tolist() == [[8, 0, 16, 32]] * 2


def test_content_box_of_tall_square_and_extreme_pictures():
    assert content_box(10, 40, 64, "letterbox") == (0, 24, 64, 16)
    assert content_box(50, 50, 64, "letterbox") == (0, 0, 64, 64)
    assert content_box(1000, 1, 64, "letterbox") == (31, 0, 1, 64)  # never an empty box
    with pytest.raises(ValueError, match="resize must be one of"):
        content_box(10, 10, 64, "crop")
