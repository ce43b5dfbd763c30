"""Adding images to a stored dataset: from uploads, zips or server folders, checked before anything is stored.

Every entry point works in two phases. First each candidate file is copied into a staging folder under the
data directory, hashed and fully decoded (with the same check ``load_dataset`` applies, so an accepted image
is one training can read). Files that are not images or do not decode, and duplicates, are reported back in
the :class:`IngestReport`, never raised. Then the accepted files move into the dataset
(:meth:`Store.add_images`, in short transactions so that running jobs are never locked out). A whole upload is refused with :class:`RejectedUpload` (nothing stored) only when
it is unsafe or too large: a zip with absolute or ``..`` member paths, too many members or too many bytes.
"""
from __future__ import annotations

import hashlib
import io
import os
import re
import shutil
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Callable, Iterable, Sequence

from PIL import Image, ImageOps

from kdcore import data
from kdcore.store import DEFECT_NAME, DEFECT_NAME_RULE, GOOD, NewImage, Store

# Caps on one upload, checked from the zip's directory before anything is written; each can be raised with
# the environment variable of the same name prefixed by KDCORE_ (e.g. KDCORE_MAX_ZIP_BYTES).
MAX_ZIP_MEMBERS = 20_000
MAX_UPLOAD_FILES = 20_000  # files in one upload, zip members included
MAX_ZIP_BYTES = 4 * 1024**3  # total uncompressed size of one zip
# Images hardly compress (PNG and JPEG are compressed already); a member that unpacks to over 100 times its
# stored size is a bomb, not a picture. Tiny members are exempt: a 1 KB blank PNG legitimately shrinks well.
MAX_ZIP_RATIO = 100
_RATIO_EXEMPT_BYTES = 1024**2
THUMB_SIZE = 160
MAX_STEM_CHARS = 120
IMPORT_ROOTS_ENV = "KDCORE_IMPORT_ROOTS"
_COPY_CHUNK = 1024 * 1024
_MASK_SUFFIX = "_mask"


class RejectedUpload(ValueError):
    """The whole upload is refused and nothing was stored; the message says why."""


@dataclass(frozen=True)
class SourceFile:
    """One candidate file: the name the user knows it by, and how to read its bytes."""

    name: str
    open: Callable[[], BinaryIO]

    @property
    def stem(self) -> str:
        return PurePosixPath(self.name).stem

    @property
    def suffix(self) -> str:
        return PurePosixPath(self.name).suffix.lower()


@dataclass
class IngestReport:
    added: list[str] = field(default_factory=list)
    duplicates: list[tuple[str, str]] = field(default_factory=list)  # (name, the file it duplicates)
    problems: list[tuple[str, str]] = field(default_factory=list)  # (name, why it was not added)

    def merge(self, other: "IngestReport") -> None:
        self.added += other.added
        self.duplicates += other.duplicates
        self.problems += other.problems

    def renamed(self, prefix: str, replacement: str) -> "IngestReport":
        """The report with names under the folder ``prefix`` shown under ``replacement`` instead."""
        def rename(name: str) -> str:
            return replacement + name[len(prefix):] if name.startswith(prefix) else name
        return IngestReport([rename(n) for n in self.added], [(rename(n), d) for n, d in self.duplicates],
                            [(rename(n), r) for n, r in self.problems])

    def summary(self) -> str:
        parts = [f"{len(self.added)} image(s) added"]
        if self.duplicates:
            parts.append(f"{len(self.duplicates)} duplicate(s) skipped")
        if self.problems:
            parts.append(f"{len(self.problems)} file(s) not usable")
        return ", ".join(parts)


# ------------------------------------------------------------------------------------------- sources
def from_uploads(uploads: Iterable[tuple[str, bytes]]) -> list[SourceFile]:
    """Uploaded (name, bytes) pairs as source files; each zip is opened and replaced by its members.

    Raises RejectedUpload for an unsafe or oversized zip, before anything is read or stored.
    """
    files = []
    for name, content in uploads:
        if name.lower().endswith(".zip"):
            files += _zip_members(name, content)
        else:
            files.append(SourceFile(name, lambda content=content: io.BytesIO(content)))
    max_files = _cap("MAX_UPLOAD_FILES", MAX_UPLOAD_FILES)
    if len(files) > max_files:
        raise RejectedUpload(f"this upload holds {len(files)} files; at most {max_files} are accepted at once "
                             "(KDCORE_MAX_UPLOAD_FILES raises the cap; or import a server folder)")
    return files


def _zip_members(zip_name: str, content: bytes) -> list[SourceFile]:
    archive, infos = _open_checked_zip(zip_name, io.BytesIO(content))
    return [SourceFile(f"{zip_name}/{info.filename}", lambda info=info: archive.open(info)) for info in infos]


def _open_checked_zip(zip_name: str, file: BinaryIO) -> tuple[zipfile.ZipFile, list[zipfile.ZipInfo]]:
    """The zip and its file members (directories and system files left out), once it passed every check.

    Raises RejectedUpload for an unreadable, unsafe or oversized zip, judged from its directory alone.
    """
    try:
        archive = zipfile.ZipFile(file)
        infos = archive.infolist()
    except (zipfile.BadZipFile, OSError) as exc:
        raise RejectedUpload(f"{zip_name} is not a readable zip file ({exc})") from exc
    max_members, max_bytes, max_ratio = (_cap("MAX_ZIP_MEMBERS", MAX_ZIP_MEMBERS), _cap("MAX_ZIP_BYTES", MAX_ZIP_BYTES),
                                         _cap("MAX_ZIP_RATIO", MAX_ZIP_RATIO))
    if len(infos) > max_members:
        raise RejectedUpload(f"{zip_name} has {len(infos)} entries; at most {max_members} are accepted "
                             "(KDCORE_MAX_ZIP_MEMBERS raises the cap)")
    for info in infos:
        path = PurePosixPath(info.filename.replace("\\", "/"))
        if path.is_absolute() or ".." in path.parts or re.match(r"^[A-Za-z]:", info.filename):
            raise RejectedUpload(f"{zip_name} contains an unsafe path '{info.filename}' (absolute or with '..')")
    # Declared sizes can be forged, but zipfile stops reading a member at its declared size and then fails its
    # CRC check, so the declared total really bounds what is read.
    total = sum(info.file_size for info in infos)
    if total > max_bytes:
        raise RejectedUpload(f"{zip_name} unpacks to {total / 1024**3:.1f} GiB; at most {max_bytes / 1024**3:.1f} GiB "
                             "are accepted (KDCORE_MAX_ZIP_BYTES raises the cap)")
    for info in infos:
        if info.file_size > _RATIO_EXEMPT_BYTES and info.file_size > max_ratio * max(info.compress_size, 1):
            raise RejectedUpload(f"{zip_name}: '{info.filename}' unpacks to {info.file_size / 1024**2:.0f} MiB from "
                                 f"{info.compress_size / 1024:.0f} KiB (over {max_ratio}x); no image compresses like "
                                 "that, so the zip was refused (KDCORE_MAX_ZIP_RATIO raises the cap)")
    return archive, [info for info in infos if not info.is_dir() and not _is_system_file(info.filename)]


def _cap(name: str, default: int) -> int:
    value = os.environ.get(f"KDCORE_{name}", "")
    return int(value) if value.strip().isdigit() else default


def _is_system_file(name: str) -> bool:
    # macOS adds __MACOSX/._name copies to every zip; hidden files are ignored by load_dataset too.
    parts = PurePosixPath(name).parts
    return parts[0] == "__MACOSX" or any(part.startswith(".") for part in parts)


def from_folder(folder: str | Path, roots: Sequence[Path] | None = None, recursive: bool = False) -> list[SourceFile]:
    """The files directly inside a folder on the server (like load_dataset, sub-folders are not searched unless
    ``recursive``; hidden ones never).

    With ``roots`` (the web app: ``import_roots``) the folder must lie under one of them after symlinks are
    resolved, and files whose links lead outside them are left out.
    """
    folder = Path(folder).expanduser()
    if roots is not None:
        _require_within(folder, roots)
    if not folder.is_dir():
        raise RejectedUpload(f"not a folder on the server: {folder}")
    candidates = sorted(folder.rglob("*") if recursive else folder.iterdir())
    return [SourceFile(_printable(str(path)), lambda path=path: open(path, "rb"))
            for path in candidates if path.is_file() and not _is_system_file(path.relative_to(folder).as_posix())
            and (roots is None or _is_within(path.resolve(), roots))]


def import_roots(store: Store) -> list[Path]:
    """The server folders the web app may read: ``KDCORE_IMPORT_ROOTS`` (paths separated by ``os.pathsep``),
    by default ``<data dir>/inbox`` (created). The command line, run by a local user, is not restricted."""
    value = os.environ.get(IMPORT_ROOTS_ENV, "")
    if value.strip():
        return [Path(part).expanduser().resolve() for part in value.split(os.pathsep) if part.strip()]
    inbox = store.root / "inbox"
    inbox.mkdir(exist_ok=True)
    return [inbox.resolve()]


def _is_within(resolved: Path, roots: Sequence[Path]) -> bool:
    return any(resolved.is_relative_to(root) for root in roots)


def _require_within(folder: Path, roots: Sequence[Path]) -> None:
    if not _is_within(folder.resolve(), roots):
        raise RejectedUpload(f"{folder} is outside the server folders this app may read "
                             f"({', '.join(str(root) for root in roots)}): copy the images under one of them, or "
                             f"have the administrator add the folder to {IMPORT_ROOTS_ENV}")


def _printable(name: str) -> str:
    """A file name as text the database and pages can hold: bytes that are not UTF-8 become U+FFFD."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


# ------------------------------------------------------------------------------------------- adding
def add_normal_images(store: Store, dataset_id: int, files: Sequence[SourceFile]) -> IngestReport:
    """Add normal (defect-free) training images; files named like masks (``<stem>_mask.*``) are refused."""
    images, report = _without_masks(files, "masks belong to defect test images, not to normal images")
    return _merge(report, _ingest(store, dataset_id, [(file, None) for file in images], split="train",
                                  defect=GOOD))


def _without_masks(files: Sequence[SourceFile], reason: str) -> tuple[list[SourceFile], IngestReport]:
    """The files that are not masks, and a report naming the masks (``<stem>_mask.*``) left out."""
    report = IngestReport()
    kept = []
    for file in files:
        if file.stem.endswith(_MASK_SUFFIX):
            report.problems.append((file.name, f"looks like a mask ('{_MASK_SUFFIX}' name): {reason}"))
        else:
            kept.append(file)
    return kept, report


def add_test_images(store: Store, dataset_id: int, defect: str, images: Sequence[SourceFile],
                    masks: Sequence[SourceFile] = ()) -> IngestReport:
    """Add labelled test images of one defect type (``"good"`` for normal test images), with optional masks.

    A mask belongs to the image with the same stem, or with the stem plus ``_mask`` (MVTec naming). Within a
    dataset the defect images either all have masks or none has, because ``load_dataset`` asks for a mask
    for every defect image as soon as the dataset has any; mismatching files are reported, not added.
    """
    defect = defect.strip()
    if not DEFECT_NAME.match(defect):
        raise RejectedUpload(f"'{defect}' is not a usable defect type name: {DEFECT_NAME_RULE}")
    report = IngestReport()
    if defect == GOOD:
        report.problems += [(mask.name, "masks are only used for defect images") for mask in masks]
        images, not_images = _without_masks(images, "masks are only used for defect images")
        report.merge(not_images)
        return _merge(report, _ingest(store, dataset_id, [(image, None) for image in images], "test", GOOD))

    # Masks uploaded together with their images (MVTec naming) are paired with them, never taken as images.
    stems = {image.stem for image in images}
    masks = list(masks) + [image for image in images if image.stem.endswith(_MASK_SUFFIX)
                           and image.stem[:-len(_MASK_SUFFIX)] in stems]
    images = [image for image in images if image not in masks]
    images, stray = _without_masks(images, "no image with a matching name in this upload")
    report.merge(stray)
    masks_by_stem = {}
    for mask in masks:
        stem = mask.stem[:-len(_MASK_SUFFIX)] if mask.stem.endswith(_MASK_SUFFIX) else mask.stem
        masks_by_stem[stem] = mask
    pairs = [(image, masks_by_stem.pop(image.stem, None)) for image in images]
    report.problems += [(mask.name, "no image with a matching name") for mask in masks_by_stem.values()]

    with_masks = store.defect_mask_state(dataset_id)
    if with_masks is None:  # the first defect images of this dataset decide
        with_masks = any(mask is not None for _, mask in pairs)
    usable = []
    for image, mask in pairs:
        if with_masks and mask is None:
            report.problems.append((image.name, "no mask: this dataset's defect images have masks, so each needs one"))
        elif not with_masks and mask is not None:
            report.problems.append((image.name, "has a mask, but this dataset's defect images have none; "
                                                "add it to a dataset with masks or upload it without"))
        else:
            usable.append((image, mask))
    return _merge(report, _ingest(store, dataset_id, usable, "test", defect))


def import_folder(store: Store, dataset_id: int, folder: str | Path, roots: Sequence[Path] | None = None) -> IngestReport:
    """Import a server folder: MVTec AD layout (train/good, test/<defect>, ground_truth) or plain normal images.
    ``roots`` restricts what may be read, as for ``from_folder``."""
    folder = Path(folder).expanduser()
    if roots is not None:
        _require_within(folder, roots)
    if not (folder / "train").is_dir():
        return add_normal_images(store, dataset_id, from_folder(folder, roots))
    report = add_normal_images(store, dataset_id, from_folder(folder / "train" / GOOD, roots))
    for defect_dir in sorted(p for p in (folder / "test").glob("*") if p.is_dir() and not p.name.startswith(".")):
        mask_dir = folder / "ground_truth" / defect_dir.name
        try:
            masks = from_folder(mask_dir, roots) if mask_dir.is_dir() else []
            report.merge(add_test_images(store, dataset_id, defect_dir.name, from_folder(defect_dir, roots), masks))
        except RejectedUpload as exc:  # one unusable folder must not hide what the others add
            report.problems.append((f"{_printable(str(defect_dir))}/", str(exc)))
    return report


def import_zip(store: Store, dataset_id: int, zip_path: str | Path) -> IngestReport:
    """Import a zip of what ``import_folder`` takes (an MVTec-layout folder or plain normal images), also when
    everything sits in one top folder inside the zip. Checked as an upload is, then unpacked under ``tmp/``."""
    zip_path = Path(zip_path).expanduser()
    if not zip_path.is_file():
        raise RejectedUpload(f"no such zip file: {zip_path}")
    staging = store.make_tmp_dir("unzip-")
    try:
        with open(zip_path, "rb") as fh:
            archive, infos = _open_checked_zip(zip_path.name, fh)
            unpacked = staging / "unpacked"
            for info in infos:  # member paths were checked: no absolute paths, no '..'
                target = unpacked / PurePosixPath(info.filename.replace("\\", "/"))
                target.parent.mkdir(parents=True, exist_ok=True)
                with archive.open(info) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst, _COPY_CHUNK)
        root = unpacked
        while root.is_dir() and len(entries := list(root.iterdir())) == 1 and entries[0].is_dir() \
                and not (root / "train").is_dir():
            root = entries[0]
        if not root.is_dir():
            raise RejectedUpload(f"{zip_path.name} holds no files")
        report = import_folder(store, dataset_id, root)
    except (zipfile.BadZipFile, OSError) as exc:
        raise RejectedUpload(f"{zip_path.name} cannot be unpacked ({exc})") from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return report.renamed(str(unpacked), zip_path.name)


def _merge(first: IngestReport, second: IngestReport) -> IngestReport:
    first.merge(second)
    return first


# ------------------------------------------------------------------------------------------- staging
def _ingest(store: Store, dataset_id: int, pairs: list[tuple[SourceFile, SourceFile | None]],
            split: str, defect: str) -> IngestReport:
    report = IngestReport()
    staging = store.make_tmp_dir("ingest-")
    try:
        staged: dict[str, NewImage] = {}  # by sha256: a file uploaded twice in one go counts once
        for index, (image, mask) in enumerate(pairs):
            try:
                new = _stage(staging, index, image, mask, split, defect)
            except _NotUsable as exc:
                report.problems.append((exc.name, exc.reason))
                continue
            if new.sha256 in staged:
                report.duplicates.append((image.name, staged[new.sha256].source_name))
            else:
                staged[new.sha256] = new
        stored = store.find_images_by_hash(dataset_id, list(staged))
        for sha, path in stored.items():
            report.duplicates.append((staged.pop(sha).source_name, path))
        added = {record.sha256 for record in store.add_images(dataset_id, list(staged.values()))} if staged else set()
        for sha, image in staged.items():
            if sha in added:
                report.added.append(image.source_name)
            else:
                report.duplicates.append((image.source_name, "an image another upload added at the same moment"))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return report


class _NotUsable(Exception):
    def __init__(self, name: str, reason: str):
        super().__init__(f"{name}: {reason}")
        self.name, self.reason = name, reason


def _stage(staging: Path, index: int, image: SourceFile, mask: SourceFile | None,
           split: str, defect: str) -> NewImage:
    """Copy, hash and decode one image (and its mask) into ``staging``; raises _NotUsable with the reason."""
    staged, sha, size = _copy(image, staging / f"{index}{image.suffix}")
    width, height = _decode(image.name, staged)
    staged_mask = None
    if mask is not None:
        try:
            staged_mask = _copy(mask, staging / f"{index}_mask{mask.suffix}")[0]
            mask_size = _decode(mask.name, staged_mask)
        except _NotUsable as exc:
            raise _NotUsable(image.name, f"its mask {exc.reason}") from exc
        if mask_size != (width, height):
            raise _NotUsable(image.name, f"its mask {mask.name} is {mask_size[0]}x{mask_size[1]}, "
                                         f"the image {width}x{height}")
    thumb = staging / f"{index}_thumb.jpg"
    _write_thumbnail(staged, thumb)
    return NewImage(staged=staged, staged_thumb=thumb, staged_mask=staged_mask, split=split, defect=defect,
                    name=_safe_file_name(image.name), mask_suffix=mask.suffix if mask else None, sha256=sha,
                    bytes=size, width=width, height=height, source_name=image.name)


def _copy(source: SourceFile, target: Path) -> tuple[Path, str, int]:
    if source.suffix not in data.IMAGE_EXTENSIONS:
        raise _NotUsable(source.name, f"not an image file type ({source.suffix or 'no extension'})")
    digest, size = hashlib.sha256(), 0
    try:
        with source.open() as src, open(target, "wb") as dst:
            while chunk := src.read(_COPY_CHUNK):
                digest.update(chunk)
                dst.write(chunk)
                size += len(chunk)
    except (OSError, zipfile.BadZipFile) as exc:  # BadZipFile: a corrupt member (CRC mismatch)
        raise _NotUsable(source.name, f"cannot be read: {exc}") from exc
    return target, digest.hexdigest(), size


def _decode(name: str, path: Path) -> tuple[int, int]:
    # data.probe_image is the exact check load_dataset applies (a full decode), so whatever passes here trains.
    try:
        return data.probe_image(path)
    except data.UnreadableImage as exc:
        # The decoder names the staged copy (a path under tmp/ the user never saw): keep its words, not the path.
        detail = str(exc).replace(f"'{path}'", "the file").replace(str(path), "the file")
        raise _NotUsable(name, f"not a readable image: {detail}") from exc


def _write_thumbnail(image_path: Path, thumb_path: Path) -> None:
    with Image.open(image_path) as img:
        # 16-bit and float images need scaling, not clipping, to 8 bits: reuse the reader's conversion.
        small = data.to_8bit(ImageOps.exif_transpose(img)).convert("RGB")
    small.thumbnail((THUMB_SIZE, THUMB_SIZE))
    small.save(thumb_path, "JPEG", quality=85)


def _safe_file_name(name: str) -> str:
    """The base name with anything but letters, digits, '-', '_' and '.' replaced; never hidden or empty."""
    path = PurePosixPath(name.replace("\\", "/"))
    # File systems take 255 bytes; room is left for the suffix a name clash adds (``_unique_path``).
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", path.stem)[:MAX_STEM_CHARS].strip("._") or "image"
    suffix = path.suffix.lower() if re.fullmatch(r"\.[a-z0-9]{1,8}", path.suffix.lower()) else ""
    return f"{stem}{suffix}"
