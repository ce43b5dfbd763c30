"""Finding, checking and reading anomaly-detection image sets.

Two layouts are understood, detected automatically by :func:`load_dataset`:

* **MVTec AD**::

      root/train/good/*.png              normal images (the only training data)
      root/test/good/*.png               normal test images
      root/test/<defect>/*.png           defective test images, one folder per defect type
      root/ground_truth/<defect>/<stem>_mask.png   optional pixel masks

* **Plain folder**: normal images directly inside ``root`` (what the app's uploads
  produce). Only the top level is scanned: images in sub-folders are ignored. There
  is no test split.

Every image is fully decoded once while scanning, so truncated or corrupt files are
found up front and reported in :attr:`AnomalyDataset.skipped` instead of crashing a
training run hours later. Readers turn any Pillow-readable image into square RGB
``uint8`` arrays of one size, so neither colour mode nor resolution can tell a model
which split or class an image came from.

This module deliberately uses only numpy and Pillow (no torch), so the app and
tests can use it without loading a deep-learning stack.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Iterable, Union

import numpy as np
from PIL import Image

from kdcore.imaging import (RESIZE_MODES, DataError, _check_size, check_pixel_count,  # noqa: F401
                            content_box, open_upright, prepare_model_input, read_model_input, to_8bit)

__all__ = [
    "IMAGE_EXTENSIONS",
    "DataError",
    "TestSample",
    "AnomalyDataset",
    "load_dataset",
    "read_image",
    "read_images",
    "read_mask",
]

PathArg = Union[str, "PathLike[str]"]

#: Lower-case file suffixes treated as images. A fixed list of raster formats Pillow
#: decodes without extra tools (not e.g. .eps, which needs Ghostscript), so a folder
#: scans the same way on every machine.
IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {
        ".png",
        ".jpg", ".jpeg", ".jpe", ".jfif",
        ".bmp", ".dib",
        ".tif", ".tiff",
        ".webp",
        ".gif",
        ".ppm", ".pgm", ".pbm", ".pnm",
        ".tga",
    }
)

GOOD = "good"
_MASK_SUFFIX = "_mask"
_EXIF_ORIENTATION = 0x0112
# EXIF orientations 5-8 rotate by 90 degrees, so width and height swap.
_TRANSPOSING_ORIENTATIONS = frozenset({5, 6, 7, 8})


@dataclass(frozen=True)
class TestSample:
    """One test image, its defect type and (where the set has them) its mask."""

    # Stop pytest from trying to collect this class because its name starts with "Test".
    __test__ = False

    path: Path
    defect: str  # "good" for normal images, else the defect folder name
    mask_path: Path | None  # None for good images, and for every image of an image-level-only set

    @property
    def label(self) -> int:
        """0 for a normal image, 1 for a defective one (even if its mask is empty)."""
        return 0 if self.defect == GOOD else 1


@dataclass
class AnomalyDataset:
    """The files of a dataset, split and checked; pixels are read later on demand."""

    root: Path
    train: list[Path]  # normal images to train on (hold-out removed)
    holdout: list[Path]  # normal images never trained on: calibration + model selection
    test: list[TestSample]  # empty for a plain folder
    has_masks: bool  # True iff ground_truth/ exists (pixel metrics possible)
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # unreadable files and why

    def summary(self) -> str:
        """One human-readable line: counts per split, defect types, skipped count."""
        parts = [f"{self.root.name or self.root}: {len(self.train)} train", f"{len(self.holdout)} holdout"]
        if self.test:
            per_defect = Counter(s.defect for s in self.test if s.label == 1)
            n_good = len(self.test) - sum(per_defect.values())
            defects = ", ".join(f"{name} {n}" for name, n in sorted(per_defect.items()))
            detail = f"{n_good} good, {sum(per_defect.values())} defective"
            if defects:
                detail += f": {defects}"
            parts.append(f"{len(self.test)} test ({detail})")
            parts.append("pixel masks" if self.has_masks else "image-level labels only")
        else:
            parts.append("no test split")
        parts.append(f"{len(self.skipped)} skipped")
        return ", ".join(parts)


# ---------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------


def load_dataset(root: PathArg, holdout_fraction: float = 0.1, seed: int = 0) -> AnomalyDataset:
    """Scan ``root`` (MVTec AD layout or a plain folder of normal images).

    Every image (and mask) is fully decoded once; unreadable ones are skipped and
    listed in ``skipped``. A fraction of the normal training images is set aside as
    ``holdout`` (see :func:`_split_holdout`).

    Raises:
        ValueError: ``holdout_fraction`` outside (0, 0.5].
        DataError: the folder is missing or malformed, too few normal images are
            usable, or a defective image lacks its mask / has a mask of another size.
    """
    _check_fraction(holdout_fraction)
    root = Path(root).expanduser()
    if not root.exists():
        raise DataError(f"dataset folder not found: {root}")
    if not root.is_dir():
        raise DataError(f"dataset path is not a folder: {root}")

    skipped: list[tuple[Path, str]] = []
    if (root / "train").is_dir():
        train_dir, test, has_masks = _scan_mvtec(root, skipped)
    else:
        train_dir, test, has_masks = root, [], False
    normal = _usable_images(_list_images(train_dir), skipped)
    if not normal:
        raise DataError(_no_images_message(root, train_dir, skipped))

    train, holdout = _split_holdout(normal, train_dir, holdout_fraction, seed)
    return AnomalyDataset(
        root=root,
        train=train,
        holdout=holdout,
        test=test,
        has_masks=has_masks,
        skipped=sorted(skipped),
    )


def _check_fraction(holdout_fraction: float) -> None:
    # bool is an int subclass; True would silently mean "hold out everything".
    if isinstance(holdout_fraction, bool) or not isinstance(holdout_fraction, (int, float)):
        raise ValueError(f"holdout_fraction must be a number in (0, 0.5], got {holdout_fraction!r}")
    if not 0.0 < holdout_fraction <= 0.5:  # also rejects NaN
        raise ValueError(f"holdout_fraction must be in (0, 0.5], got {holdout_fraction!r}")


def _scan_mvtec(root: Path, skipped: list[tuple[Path, str]]) -> tuple[Path, list[TestSample], bool]:
    """Check the MVTec folders; return the train folder, usable test samples, has_masks."""
    train_dir = root / "train" / GOOD
    if not train_dir.is_dir():
        raise DataError(f"MVTec layout needs a folder of normal training images, missing: {train_dir}")
    mask_root = root / "ground_truth"
    has_masks = mask_root.is_dir()
    test: list[TestSample] = []
    for defect_dir in _list_subdirs(root / "test"):
        test.extend(_scan_test_folder(defect_dir, mask_root if has_masks else None, skipped))
    return train_dir, sorted(test, key=lambda s: s.path), has_masks


def _scan_test_folder(
    defect_dir: Path, mask_root: Path | None, skipped: list[tuple[Path, str]]
) -> list[TestSample]:
    """Usable samples of one ``test/<defect>/`` folder, each paired with its mask by stem."""
    defect = defect_dir.name
    needs_mask = mask_root is not None and defect != GOOD
    masks = _index_by_stem(mask_root / defect) if needs_mask else {}
    samples = []
    for path in _list_images(defect_dir):
        try:
            size = probe_image(path)
        except UnreadableImage as err:
            skipped.append((path, str(err)))
            continue
        mask_path = None
        if needs_mask:
            mask_path = _find_mask(path, mask_root / defect, masks)
            try:
                mask_size = probe_image(mask_path)
            except UnreadableImage as err:
                skipped.append((path, f"its mask {mask_path} is unreadable: {err}"))
                continue
            if mask_size != size:
                raise DataError(
                    f"mask size differs from its image: {mask_path} is {_wxh(mask_size)}, "
                    f"{path} is {_wxh(size)}"
                )
        samples.append(TestSample(path=path, defect=defect, mask_path=mask_path))
    return samples


def _index_by_stem(folder: Path) -> dict[str, list[Path]]:
    """Image files of ``folder`` keyed by stem (empty if the folder does not exist)."""
    index: dict[str, list[Path]] = {}
    for path in _list_images(folder):
        index.setdefault(path.stem, []).append(path)
    return index


def _find_mask(image: Path, mask_dir: Path, masks: dict[str, list[Path]]) -> Path:
    """The mask of ``image``: ``<stem>_mask.<ext>``, else ``<stem>.<ext>``, any image ext.

    Pairing by stem (never by sorted position) keeps arbitrary names correct.
    """
    for stem in (image.stem + _MASK_SUFFIX, image.stem):
        candidates = masks.get(stem, [])
        if len(candidates) > 1:
            names = ", ".join(str(c) for c in candidates)
            raise DataError(f"several masks for {image}: {names}; keep one")
        if candidates:
            return candidates[0]
    expected = mask_dir / f"{image.stem}{_MASK_SUFFIX}.png"
    raise DataError(
        f"defective test image {image} has no mask: expected {expected} "
        f"(any image extension; {image.stem}.<ext> is also accepted)"
    )


def _usable_images(paths: list[Path], skipped: list[tuple[Path, str]]) -> list[Path]:
    """The paths that decode; the others go to ``skipped`` with the reason."""
    usable = []
    for path in paths:
        try:
            probe_image(path)
        except UnreadableImage as err:
            skipped.append((path, str(err)))
        else:
            usable.append(path)
    return usable


def _no_images_message(root: Path, train_dir: Path, skipped: list[tuple[Path, str]]) -> str:
    bad = [(path, reason) for path, reason in skipped if path.parent == train_dir]
    message = f"no usable images in {train_dir}"
    if bad:
        message += f" ({len(bad)} unreadable, e.g. {bad[0][0]}: {bad[0][1]})"
    if train_dir == root and (root / "test").is_dir():
        # Looks like an MVTec set whose train/ folder is missing: say what is expected.
        message += f"; for the MVTec layout, normal images belong in {root / 'train' / GOOD}"
    return message


def _split_holdout(
    normal: list[Path], train_dir: Path, fraction: float, seed: int
) -> tuple[list[Path], list[Path]]:
    """Split normal images into (train, holdout), both sorted.

    Images are ranked by a hash of (seed, name relative to the train folder) and the
    first k = max(1, round(fraction * n)) are held out. Each image's rank does not
    depend on the other files, so adding images changes the holdout by at most the
    newcomers and the images at its edge (never a reshuffle), and the same files
    give the same split on any machine (unlike ``random`` or ``hash()``).
    """
    n = len(normal)
    if n < 2:
        raise DataError(
            f"need at least 2 usable normal training images (one to train on, one to hold out), "
            f"found {n} in {train_dir}"
        )
    # fraction <= 0.5 and n >= 2 give k <= n - 1: at least one image is left to train on.
    k = max(1, round(fraction * n))
    ranked = sorted(normal, key=lambda p: (_rank_key(p, train_dir, seed), p))
    held = set(ranked[:k])
    return [p for p in normal if p not in held], sorted(held)


def _rank_key(path: Path, train_dir: Path, seed: int) -> bytes:
    name = path.relative_to(train_dir).as_posix()
    return hashlib.sha256(f"{seed}\0{name}".encode("utf-8")).digest()


# ---------------------------------------------------------------------------
# Listing and probing files
# ---------------------------------------------------------------------------


def _is_hidden(path: Path) -> bool:
    # Covers .DS_Store, macOS "._name.png" resource forks and .ipynb_checkpoints.
    return path.name.startswith(".")


def _list_images(folder: Path) -> list[Path]:
    """Sorted image files directly inside ``folder`` (not recursive); [] if it is missing.

    Only the extension is checked here; whether the bytes decode is :func:`probe_image`'s
    job, so a broken link or unreadable file is reported rather than silently dropped.
    """
    if not folder.is_dir():
        return []
    return sorted(
        p
        for p in folder.iterdir()
        if not _is_hidden(p) and p.suffix.lower() in IMAGE_EXTENSIONS and not p.is_dir()
    )


def _list_subdirs(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and not _is_hidden(p))


class UnreadableImage(Exception):
    """A file that cannot be decoded; the message is the reason shown to the user."""


def probe_image(path: Path) -> tuple[int, int]:
    """Fully decode ``path`` once and return its displayed (width, height).

    A header read (``Image.open`` alone, or ``verify()``) misses truncated files,
    so the pixels are decoded. (This relies on Pillow's default
    ``ImageFile.LOAD_TRUNCATED_IMAGES = False``; code that flips that global makes
    truncated files look usable.) The size accounts for the EXIF orientation, the same
    way the readers rotate the image.
    """
    try:
        with Image.open(path) as img:
            check_pixel_count(img, "the image")
            img.load()
            size = img.size
            if img.getexif().get(_EXIF_ORIENTATION, 1) in _TRANSPOSING_ORIENTATIONS:
                size = (size[1], size[0])
            return size
    # Pillow signals bad data with many exception types (OSError, SyntaxError,
    # ValueError, struct.error, DecompressionBombError...); all mean "unusable".
    except DataError as err:
        raise UnreadableImage(str(err)) from err
    except Exception as err:  # noqa: BLE001
        raise UnreadableImage(f"{type(err).__name__}: {err}") from err


def _wxh(size: tuple[int, int]) -> str:
    return f"{size[0]}x{size[1]}"


# ---------------------------------------------------------------------------
# Reading pixels
# ---------------------------------------------------------------------------


def read_image(path: PathArg, size: int) -> np.ndarray:
    """Read any Pillow-readable image as ``uint8`` RGB of shape (size, size, 3).

    Grayscale is replicated to three channels, alpha is dropped, 16-bit data is
    scaled to 8 bits. The image is stretched to a square with bilinear filtering
    (antialiased when shrinking), so every image ends up identical in shape whatever
    its original resolution or aspect ratio. This is the *image frame* in which maps
    and masks are shown and evaluated, whatever geometry a model's input uses.
    """
    return read_model_input(path, size, "stretch")[0]


def prepare_image(img: Image.Image, size: int) -> np.ndarray:
    """An already opened image (any mode and size) as ``uint8`` RGB of shape (size, size, 3), as ``read_image``."""
    return prepare_model_input(img, size, "stretch")[0]


def read_images(paths: Iterable[PathArg], size: int) -> np.ndarray:
    """Read several images into one ``uint8`` array of shape (N, size, size, 3), as ``read_image``."""
    return read_model_inputs(paths, size, "stretch")[0]


def read_model_inputs(paths: Iterable[PathArg], size: int, resize: str) -> tuple[np.ndarray, np.ndarray]:
    """Several ``read_model_input``: images N×size×size×3 ``uint8`` and their boxes N×4."""
    size = _check_size(size)
    paths = list(paths)
    # Filled in place: stacking a list would briefly hold every image twice.
    out = np.empty((len(paths), size, size, 3), dtype=np.uint8)
    boxes = np.empty((len(paths), 4), dtype=np.int64)
    for i, path in enumerate(paths):
        out[i], boxes[i] = read_model_input(path, size, resize)
    return out, boxes


def read_mask(path: PathArg, size: int) -> np.ndarray:
    """Read a defect mask as ``bool`` of shape (size, size); any non-zero pixel is defect.

    Nearest-neighbour resizing keeps the mask binary (bilinear would blur its edges
    into values that a threshold then moves).
    """
    size = _check_size(size)
    return read_mask_at(path, size, size)


def read_mask_at(path: PathArg, width: int, height: int) -> np.ndarray:
    """``read_mask`` at any shape: ``bool`` (height, width)."""
    img = open_upright(path)
    try:
        binary = Image.fromarray(_mask_values(img) > 0).convert("L")
        return np.asarray(binary.resize((width, height), Image.Resampling.NEAREST)) > 0
    finally:
        img.close()


def _mask_values(img: Image.Image) -> np.ndarray:
    """Single-channel array whose non-zero pixels are the defect."""
    if img.mode in ("1", "L", "I", "F") or img.mode.startswith("I;16"):
        values = np.asarray(img)
    else:
        # Palette masks are mapped through their colours (index 0 need not be black);
        # colour masks count a pixel if any channel is set; alpha is ignored.
        values = np.asarray(img.convert("RGB")).max(axis=2)
    if values.dtype.kind == "f":
        values = np.nan_to_num(values)
    return values
