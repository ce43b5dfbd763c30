"""The images a model is run on in review, identified by content: a stored dataset's, a server folder's, uploads,
and the synthetic-defect check's.

Images are identified by the sha256 of their bytes, so the same photo seen in a dataset, a server folder and an
upload is one image to every cache (``kdcore.scoring``) and QA label (``kdcore.review``).
"""
from __future__ import annotations

import hashlib
import os
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

from kdcore import data, ingest
from kdcore.store import GOOD, Store

NORMAL, DEFECTIVE = 0, 1


@dataclass(frozen=True)
class ImageRef:
    """One image to score: its content hash (the cache key), the name shown, and where its file is."""

    sha256: str
    name: str
    path: Path
    defect: str | None = None  # labelled images: "good" or the defect type; None when unknown
    mask_path: Path | None = None

    @property
    def label(self) -> int | None:
        return None if self.defect is None else NORMAL if self.defect == GOOD else DEFECTIVE


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest()


def dataset_images(store: Store, dataset_id: int, split: str = "test") -> list[ImageRef]:
    """A stored dataset's images of ``split``, labelled, with their mask when they have one."""
    folder = store.dataset_dir(dataset_id)
    return [ImageRef(record.sha256, Path(record.path).name, folder / record.path, record.defect,
                     folder / record.mask_path if record.mask_path else None)
            for record in store.list_images(dataset_id, split)]


def synthetic_images(store: Store, dataset_id: int, size: int, resize: str) -> list[ImageRef]:
    """The synthetic-defect check's images of a stored dataset (``kdcore.synthetic_check``), with their masks,
    labelled "synthetic <kind>": what the models' synthetic scores were measured on, to look at. Made once per
    dataset state, size and resize rule, and kept in the store; none when the dataset has no hold-out."""
    # Keyed by the normal images' names, sizes and dates, which a listing gives: loading the dataset decodes
    # every image, which only making the images needs (the hold-out is drawn from these files).
    normals = store.dataset_dir(dataset_id) / "train" / "good"
    files = sorted(normals.iterdir()) if normals.is_dir() else []
    state = hashlib.sha256(repr([(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]).encode())
    folder = store.root / "synthetic" / f"{dataset_id}-{size}-{resize}-{state.hexdigest()[:16]}"
    if not folder.is_dir():
        from kdcore.synthetic_check import write_synthetic_defects  # torch, only when the images are made

        dataset = data.load_dataset(store.dataset_dir(dataset_id))
        if not dataset.holdout:
            return []
        staging = store.make_tmp_dir("synthetic-")
        write_synthetic_defects(dataset, staging, size, resize)
        folder.parent.mkdir(exist_ok=True)
        try:
            os.replace(staging, folder)
        except OSError:  # another session made them meanwhile: theirs are the same
            shutil.rmtree(staging, ignore_errors=True)
    images = []
    for mask in sorted(folder.glob("*_mask.png")):
        path = mask.with_name(mask.name.removesuffix("_mask.png") + ".png")
        kind = path.stem.split("-", 1)[1]
        images.append(ImageRef(file_sha256(path), path.name, path, f"synthetic {kind}", mask))
    return images


def folder_images(folder: str | Path, roots: Sequence[Path] | None = None, recursive: bool = False
                  ) -> tuple[list[ImageRef], list[tuple[str, str]]]:
    """The readable images inside a server folder (directly, or at any depth when ``recursive``), and
    (file, reason) for the files skipped.

    Raises ``ingest.RejectedUpload`` when ``folder`` is not a folder, or lies outside ``roots`` when given.
    """
    images, problems = [], []
    for source in ingest.from_folder(folder, roots, recursive):
        path = Path(source.name)
        reason = _unusable(path)
        if reason:
            problems.append((path.name, reason))
        else:
            images.append(ImageRef(file_sha256(path), path.name, path))
    return images, problems


def describe_empty_folder(folder: str | Path, roots: Sequence[Path] | None, recursive: bool, n_skipped: int) -> str:
    """Why a folder gave nothing to inspect, in one line, e.g. that its images sit in subfolders."""
    if n_skipped:
        return f"No readable image in {folder}: all {n_skipped} file(s) were skipped (listed below)."
    if not recursive:
        deeper = len(ingest.from_folder(folder, roots, recursive=True))
        if deeper:
            return (f"No images directly in {folder}, but {deeper} file(s) in its subfolders: tick "
                    "'Include subfolders'.")
    return f"No images in {folder}" + (" or its subfolders." if recursive else ".")


def upload_images(store: Store, uploads: Iterable[tuple[str, bytes]]) -> tuple[list[ImageRef], list[tuple[str, str]]]:
    """Keep uploaded (name, bytes) images in the store (by content, so a reload or QA later still has them)."""
    images, problems = [], []
    for name, content in uploads:
        sha = hashlib.sha256(content).hexdigest()
        path = store.upload_file(sha, Path(name).suffix.lower())
        if not path.exists():
            write_atomically(path, lambda fh: fh.write(content))
        reason = _unusable(path)
        if reason:
            path.unlink(missing_ok=True)
            problems.append((name, reason))
        else:
            images.append(ImageRef(sha, name, path))
    return images, problems


def _unusable(path: Path) -> str | None:
    if path.suffix.lower() not in data.IMAGE_EXTENSIONS:
        return f"not an image file type ({path.suffix or 'no extension'})"
    try:
        data.probe_image(path)
    except data.UnreadableImage as exc:
        return f"not a readable image: {exc}"
    return None


def write_atomically(path: Path, write: Callable) -> None:
    """Write via a temporary file in the same folder and ``os.replace``: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            write(fh)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
