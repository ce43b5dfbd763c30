"""Datasets and their images: the rows and the MVTec-layout folders they describe, kept in agreement."""
from __future__ import annotations

import os
import shutil
import sqlite3
import time
from pathlib import Path
from typing import Iterable, Sequence

from kdcore.store.database import _audit
from kdcore.store.records import (ACTIVE_STATUSES, DEFECT_NAME, DEFECT_NAME_RULE, GOOD, Dataset, ImageRecord, NewImage,
                                  StoreError, _record)

# Rows per transaction of an import: each holds the write lock for milliseconds, not for the whole import.
ROWS_PER_TRANSACTION = 200


class DatasetTables:
    """Datasets and their images: a part of ``kdcore.store.Store``, built on its ``Database``."""

    def dataset_dir(self, dataset_id: int) -> Path:
        return self.root / "datasets" / str(dataset_id)

    def create_dataset(self, name: str) -> Dataset:
        name = " ".join(name.split())
        if not name:
            raise StoreError("give the dataset a name, e.g. the product it shows")
        with self._connect() as conn:
            if conn.execute("SELECT 1 FROM datasets WHERE name = ?", (name,)).fetchone():
                raise StoreError(f"a dataset named '{name}' already exists")
            dataset_id = conn.execute("INSERT INTO datasets (name, created_at) VALUES (?, ?)",
                                      (name, time.time())).lastrowid
        # train/good exists from the start so that load_dataset always sees the MVTec layout.
        (self.dataset_dir(dataset_id) / "train" / GOOD).mkdir(parents=True, exist_ok=True)
        return self.get_dataset(dataset_id)

    def get_dataset(self, dataset_id: int) -> Dataset:
        rows = self._query("SELECT * FROM datasets WHERE id = ?", (dataset_id,))
        if not rows:
            raise StoreError(f"dataset {dataset_id} does not exist (deleted?)")
        return _record(Dataset, rows[0])

    def get_dataset_by_name(self, name: str) -> Dataset:
        rows = self._query("SELECT * FROM datasets WHERE name = ?", (" ".join(name.split()),))
        if not rows:
            known = ", ".join(f"'{d.name}'" for d in self.list_datasets()) or "none yet"
            raise StoreError(f"no dataset named '{name}' (datasets: {known})")
        return _record(Dataset, rows[0])

    def list_datasets(self) -> list[Dataset]:
        return [_record(Dataset, row) for row in self._query("SELECT * FROM datasets ORDER BY name")]

    def delete_dataset(self, dataset_id: int, by: str | None = None) -> None:
        """Remove a dataset, its images and files; models trained on it are kept (they are self-contained)."""
        dataset = self.get_dataset(dataset_id)
        with self._connect() as conn:
            self._require_no_active_jobs(conn, dataset_id)
            conn.execute("DELETE FROM datasets WHERE id = ?", (dataset_id,))
            _audit(conn, by, "delete dataset", f"#{dataset.id} '{dataset.name}'")
        # Files go after the rows: a crash in between leaves only an unreferenced folder, never a row without files.
        shutil.rmtree(self.dataset_dir(dataset_id), ignore_errors=True)

    def dataset_counts(self, dataset_id: int) -> dict[tuple[str, str], int]:
        """Number of images per (split, defect), e.g. {("train", "good"): 120, ("test", "scratch"): 8}."""
        rows = self._query("SELECT split, defect, COUNT(*) AS n FROM images WHERE dataset_id = ? "
                           "GROUP BY split, defect ORDER BY split DESC, defect", (dataset_id,))
        return {(row["split"], row["defect"]): row["n"] for row in rows}

    def list_images(self, dataset_id: int, split: str | None = None, limit: int = -1,
                    offset: int = 0) -> list[ImageRecord]:
        where, params = "dataset_id = ?", [dataset_id]
        if split is not None:
            where += " AND split = ?"
            params.append(split)
        rows = self._query(f"SELECT * FROM images WHERE {where} ORDER BY split DESC, defect, path "
                           "LIMIT ? OFFSET ?", (*params, limit, offset))
        return [_record(ImageRecord, row) for row in rows]

    def find_images_by_hash(self, dataset_id: int, hashes: list[str]) -> dict[str, str]:
        """sha256 → path (in the dataset) for those of ``hashes`` the dataset already holds."""
        rows = self._rows_in("SELECT sha256, path FROM images WHERE dataset_id = ? AND sha256 IN ({})",
                             (dataset_id,), hashes)
        return {row["sha256"]: row["path"] for row in rows}

    def _require_no_active_jobs(self, conn: sqlite3.Connection, dataset_id: int) -> None:
        busy = conn.execute("SELECT COUNT(*) FROM jobs WHERE dataset_id = ? AND status IN (?, ?)",
                            (dataset_id, *ACTIVE_STATUSES)).fetchone()[0]
        if busy:
            raise StoreError(f"{busy} job(s) still use this dataset: wait for them or cancel them first")

    def _dataset_images(self, dataset_id: int, image_ids: Sequence[int]) -> list[ImageRecord]:
        rows = self._rows_in("SELECT * FROM images WHERE dataset_id = ? AND id IN ({})", (dataset_id,),
                             list(image_ids))
        if len(rows) != len(set(image_ids)):
            raise StoreError("some of the chosen images are no longer in this dataset: reload the page")
        return [_record(ImageRecord, row) for row in rows]

    def delete_images(self, dataset_id: int, image_ids: Sequence[int], by: str | None = None) -> int:
        """Remove single images (with their masks and thumbnails) from a dataset; returns how many."""
        images = self._dataset_images(dataset_id, image_ids)
        with self._connect() as conn:
            self._require_no_active_jobs(conn, dataset_id)
            conn.executemany("DELETE FROM images WHERE id = ?", [(i.id,) for i in images])
            _audit(conn, by, "delete images", f"dataset #{dataset_id}: " + ", ".join(i.path for i in images))
        folder = self.dataset_dir(dataset_id)
        _unlink_all(folder / rel for i in images for rel in (i.path, i.mask_path, i.thumb_path) if rel)
        return len(images)

    def move_images(self, dataset_id: int, image_ids: Sequence[int], split: str, defect: str,
                    by: str | None = None) -> int:
        """Move images to another split or defect type (relabel); returns how many moved.

        Training images are always good. A mask follows its image to another defect type and is dropped when
        the image becomes good. An image without a mask cannot become a defect image of a dataset whose
        defect images have masks (``load_dataset`` needs one for each), and the reverse.
        """
        defect = defect.strip()
        if split not in ("train", "test"):
            raise StoreError(f"split must be 'train' or 'test', got {split!r}")
        if split == "train" and defect != GOOD:
            raise StoreError("training images are normal: they can only be moved there as 'good'")
        if not DEFECT_NAME.match(defect):
            raise StoreError(f"'{defect}' is not a usable defect type name: {DEFECT_NAME_RULE}")
        images = [i for i in self._dataset_images(dataset_id, image_ids) if (i.split, i.defect) != (split, defect)]
        if defect != GOOD:
            moving = {i.id for i in images}
            staying = self._query("SELECT id, mask_path IS NOT NULL AS masked FROM images WHERE dataset_id = ? "
                                  "AND split = 'test' AND defect != ?", (dataset_id, GOOD))
            masked = {bool(i.mask_path) for i in images} | {bool(r["masked"]) for r in staying if r["id"] not in moving}
            if len(masked) > 1:
                raise StoreError("this dataset's defect images must all have masks or none have: an image "
                                 "without a mask cannot join masked ones (add it again with its mask), nor the "
                                 "other way round")
        folder = self.dataset_dir(dataset_id)
        target_dir = folder / split / defect
        target_dir.mkdir(parents=True, exist_ok=True)
        taken = {Path(name).stem for name in os.listdir(target_dir)}
        moves: list[tuple[ImageRecord, Path, Path | None]] = []
        done: list[tuple[Path, Path]] = []
        try:
            for image in images:
                target = _unique_path(target_dir / Path(image.path).name, image.sha256, taken)
                taken.add(target.stem)
                os.replace(folder / image.path, target)
                done.append((target, folder / image.path))
                mask_target = None
                if image.mask_path and defect != GOOD:
                    mask_target = folder / "ground_truth" / defect / f"{target.stem}_mask{Path(image.mask_path).suffix}"
                    mask_target.parent.mkdir(parents=True, exist_ok=True)
                    os.replace(folder / image.mask_path, mask_target)
                    done.append((mask_target, folder / image.mask_path))
                moves.append((image, target, mask_target))
            with self._connect() as conn:
                self._require_no_active_jobs(conn, dataset_id)
                for image, target, mask_target in moves:
                    conn.execute("UPDATE images SET split = ?, defect = ?, path = ?, mask_path = ? WHERE id = ?",
                                 (split, defect, target.relative_to(folder).as_posix(),
                                  mask_target.relative_to(folder).as_posix() if mask_target else None, image.id))
                _audit(conn, by, "move images", f"dataset #{dataset_id} to {split}/{defect}: "
                       + ", ".join(i.path for i in images))
        except BaseException as exc:
            for moved, original in reversed(done):  # put the files back: rows and files must agree
                os.replace(moved, original)
            if isinstance(exc, OSError):
                raise StoreError(f"nothing was moved: {exc.strerror or exc} ({exc.filename})") from exc
            raise
        # Masks of images that became good are no longer anybody's.
        _unlink_all(folder / i.mask_path for i, _, mask_target in moves if i.mask_path and mask_target is None)
        return len(moves)

    def defect_mask_state(self, dataset_id: int) -> bool | None:
        """Whether the dataset's defect images have masks: True, False, or None while it has none."""
        rows = self._query("SELECT mask_path IS NOT NULL AS masked FROM images "
                           "WHERE dataset_id = ? AND split = 'test' AND defect != ? LIMIT 1", (dataset_id, GOOD))
        return bool(rows[0]["masked"]) if rows else None

    def add_images(self, dataset_id: int, images: list[NewImage]) -> list[ImageRecord]:
        """Move staged images into the dataset folder and record them; returns the records added.

        A large import must not stall the jobs that write progress meanwhile, so the files move before any
        transaction (names checked against one listing of each folder) and the rows go in by short
        transactions of ``ROWS_PER_TRANSACTION``. An image whose hash the dataset gained meanwhile (another
        upload at the same moment) is not recorded and its files are taken back out; so are the files of rows
        not recorded because of an error.
        """
        self.get_dataset(dataset_id)
        folder = self.dataset_dir(dataset_id)
        stems: dict[Path, set[str]] = {}
        placed: list[tuple[NewImage, str, str | None, str, list[Path]]] = []
        try:
            for image in images:
                placed.append(self._place(folder, image, stems))
        except BaseException:
            _unlink_all(path for *_, files in placed for path in files)
            raise
        ids: list[int] = []
        for start in range(0, len(placed), ROWS_PER_TRANSACTION):
            chunk = placed[start:start + ROWS_PER_TRANSACTION]
            try:
                with self._connect() as conn:
                    if not conn.execute("SELECT 1 FROM datasets WHERE id = ?", (dataset_id,)).fetchone():
                        raise StoreError(f"dataset {dataset_id} was deleted during the import")
                    now, refused = time.time(), []
                    for image, rel_image, rel_mask, rel_thumb, files in chunk:
                        cursor = conn.execute(
                            "INSERT OR IGNORE INTO images (dataset_id, split, defect, path, mask_path, thumb_path, "
                            "sha256, bytes, width, height, source_name, added_at) "
                            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                            (dataset_id, image.split, image.defect, rel_image, rel_mask, rel_thumb, image.sha256,
                             image.bytes, image.width, image.height, image.source_name, now))
                        if cursor.rowcount:
                            ids.append(cursor.lastrowid)
                        else:  # the thumbnail is named by hash: it is the other copy's too, so it stays
                            refused += files[:-1]
            except BaseException:
                _unlink_all(path for *_, files in placed[start:] for path in files)
                raise
            _unlink_all(refused)
        return [record for start in range(0, len(ids), 500) for record in
                (_record(ImageRecord, row) for row in self._query(
                    f"SELECT * FROM images WHERE id IN ({','.join('?' * len(ids[start:start + 500]))})",
                    tuple(ids[start:start + 500])))]

    @staticmethod
    def _place(folder: Path, image: NewImage,
               stems: dict[Path, set[str]]) -> tuple[NewImage, str, str | None, str, list[Path]]:
        """Move one staged image (then its mask, then its thumbnail) into ``folder``: the image, the relative paths
        of each and the files moved. ``stems`` caches each folder's file stems across calls."""
        sub = folder / image.split / image.defect
        sub.mkdir(parents=True, exist_ok=True)
        if sub not in stems:
            stems[sub] = {Path(name).stem for name in os.listdir(sub)}
        target = _unique_path(sub / image.name, image.sha256, stems[sub])
        os.replace(image.staged, target)
        stems[sub].add(target.stem)
        moved = [target]
        rel_mask = None
        if image.staged_mask is not None:
            # load_dataset pairs masks by stem: ground_truth/<defect>/<stem>_mask.<ext>
            mask = folder / "ground_truth" / image.defect / f"{target.stem}_mask{image.mask_suffix}"
            mask.parent.mkdir(parents=True, exist_ok=True)
            os.replace(image.staged_mask, mask)
            moved.append(mask)
            rel_mask = mask.relative_to(folder).as_posix()
        thumb = folder / "thumbs" / f"{image.sha256}.jpg"
        thumb.parent.mkdir(exist_ok=True)
        os.replace(image.staged_thumb, thumb)
        moved.append(thumb)
        return image, target.relative_to(folder).as_posix(), rel_mask, thumb.relative_to(folder).as_posix(), moved


def _unique_path(path: Path, sha256: str, taken_stems: set[str]) -> Path:
    """``path``, or ``<stem>_<hash prefix><suffix>`` when its folder has a file with that stem (``taken_stems``).

    Stems, not names, must be unique: load_dataset pairs images with masks by stem, so ``a.png`` and ``a.jpg``
    in one folder would share a mask.
    """
    if path.stem not in taken_stems:
        return path
    return path.with_name(f"{path.stem}_{sha256[:10]}{path.suffix}")


def _unlink_all(paths: Iterable[Path]) -> None:
    for path in paths:
        path.unlink(missing_ok=True)
