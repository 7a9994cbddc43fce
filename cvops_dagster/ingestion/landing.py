"""The landing zone: where image batches arrive, as folders or S3 prefixes.

A labelled batch is ``<root>/<batch_id>/<label>/<file>`` and is complete once ``_READY`` exists
in it. Production (unlabelled) batches live under ``<root>/production/<batch_id>/<file>``: image
files at the top of the batch folder, no label folders, the same ``_READY`` rule; their
``labels.csv`` (delayed labels, see :mod:`cvops_dagster.ingestion.labels`) is a control file,
never an image. Listing a batch never follows symlinks and never trusts a name: every entry is
classified as accepted or rejected with a reason, so the caller can account for every file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import stat
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any


from cvops_dagster.core.storage import open_filesystem, split_protocol

logger = logging.getLogger(__name__)

READY_MARKER = "_READY"
PRODUCTION_DIR = "production"
#: Delayed labels of a production batch, at the top of its folder (header ``file,label``).
LABELS_FILE = "labels.csv"
#: Names at the top of a batch folder that steer the pipeline and are never images: left out
#: of the entries (and so of the batch fingerprint), never rejected as images. A folder under
#: such a name is not a control file: its files are listed (and rejected) like any other.
CONTROL_FILES = frozenset({READY_MARKER})
PRODUCTION_CONTROL_FILES = frozenset({READY_MARKER, LABELS_FILE})

# Rejection reasons, stable strings that show in manifests, metadata and `cvops status`.
REJECT_SYMLINK = "symlink"
REJECT_NOT_REGULAR = "not_a_regular_file"
REJECT_ESCAPES = "path_escapes_batch"
REJECT_EMPTY_FILE = "empty_file"
REJECT_HIDDEN = "hidden"
REJECT_EMPTY_LABEL = "empty_label_folder"
REJECT_NO_LABEL = "not_in_label_folder"
REJECT_UNREADABLE = "unreadable"
REJECT_BAD_NAME = "undecodable_name"
#: A production batch holds image files at its top only: anything in a subfolder is rejected.
REJECT_IN_SUBFOLDER = "in_subfolder"


@dataclass(frozen=True)
class BatchEntry:
    """One thing found in a batch folder: a candidate file, or a rejected entry with its reason."""

    path: str
    label: str | None
    size: int | None
    reason: str | None = None
    #: Modification stamp (local mtime in ns, or the object's ETag): part of the batch
    #: fingerprint, so a file replaced by one of the same size still counts as a change.
    stamp: str | None = None

    @property
    def accepted(self) -> bool:
        return self.reason is None


def safe_relative_parts(rel: str) -> list[str] | None:
    """Split a batch-relative name into parts, or ``None`` if it could leave the batch folder.

    Object stores allow keys such as ``a/../../x`` and Windows-made archives carry ``..\\x``;
    neither may address anything outside the batch.
    """
    if not rel or rel.startswith(("/", "\\")) or "\\" in rel or "\x00" in rel:
        return None
    parts = rel.split("/")
    if any(p in ("", ".", "..") for p in parts):
        return None
    return parts


def _is_valid_text(name: str) -> bool:
    """False for names holding undecodable bytes (surrogate escapes): they cannot be stored."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _empty_folder(rel: str, production: bool = False) -> BatchEntry:
    if not _is_valid_text(rel):
        return BatchEntry(printable_name(rel) + "/", None, None, REJECT_BAD_NAME)
    label = None if production else rel.split("/")[0]
    if any(p.startswith(".") for p in rel.split("/")):
        reason = REJECT_HIDDEN
    else:
        reason = REJECT_IN_SUBFOLDER if production else REJECT_EMPTY_LABEL
    return BatchEntry(rel + "/", label, None, reason)


def printable_name(name: str) -> str:
    """A storable rendering of a name that may hold undecodable bytes."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def classify(
    rel: str, *, is_link: bool, is_regular: bool, size: int | None, production: bool = False
) -> BatchEntry:
    """Decide whether one entry of a batch is a candidate file, and why not if it is not.

    Args:
        rel: the entry's name relative to the batch folder, ``/``-separated, as listed.
        is_link: the entry is a symlink (never followed).
        is_regular: the entry is a regular file.
        size: its size in bytes.
        production: a production batch: files belong at the top of the batch folder (no
            label folders, so no label); anything in a subfolder is ``in_subfolder``.
    """
    label: str | None = None
    if not _is_valid_text(rel):
        return BatchEntry(printable_name(rel), None, size, REJECT_BAD_NAME)
    parts = safe_relative_parts(rel)
    if parts is None:
        return BatchEntry(rel, None, size, REJECT_ESCAPES)
    if len(parts) >= 2 and not production:
        label = unicodedata.normalize("NFC", parts[0])
    if is_link:
        return BatchEntry(rel, label, size, REJECT_SYMLINK)
    if not is_regular:
        return BatchEntry(rel, label, size, REJECT_NOT_REGULAR)
    if any(p.startswith(".") for p in parts):
        return BatchEntry(rel, label, size, REJECT_HIDDEN)
    if production and len(parts) >= 2:
        return BatchEntry(rel, None, size, REJECT_IN_SUBFOLDER)
    if len(parts) < 2 and not production:
        return BatchEntry(rel, None, size, REJECT_NO_LABEL)
    if not size:
        return BatchEntry(rel, label, size, REJECT_EMPTY_FILE)
    return BatchEntry(rel, label, size)


class LandingZone:
    """Read access to a landing zone root (local folder or ``s3://bucket/prefix``)."""

    def __init__(self, root: str, endpoint_url: str | None = None, storage_options: dict[str, Any] | None = None) -> None:
        self.root = root
        self.protocol, self._base = split_protocol(root)
        self.fs = open_filesystem(self.protocol, endpoint_url, **(storage_options or {}))

    @property
    def is_local(self) -> bool:
        return self.protocol == "file"

    def _batch_base(self, batch_id: str, production: bool = False) -> str:
        if safe_relative_parts(batch_id) is None or "/" in batch_id:
            raise ValueError(f"invalid batch id {batch_id!r}")
        if not production and batch_id == PRODUCTION_DIR:
            # The folder holding the production batches is never a labelled batch.
            raise ValueError(f"{PRODUCTION_DIR!r} holds production batches; it is not a labelled batch")
        return f"{self._base}/{PRODUCTION_DIR}/{batch_id}" if production else f"{self._base}/{batch_id}"

    def list_complete_batches(self, production: bool = False) -> list[str]:
        """Batch ids (sorted) whose folder holds ``_READY``; incomplete ones are left for later."""
        return sorted(self.ready_markers(production))

    def ready_markers(self, production: bool = False) -> dict[str, str]:
        """Complete batches and a stamp of their ``_READY`` marker (mtime and size, or ETag).

        One listing of the landing root and one look at each marker: cheap enough for every
        sensor tick, unlike fingerprinting every file of every batch. Whoever changes a batch
        after marking it ready rewrites ``_READY``, which changes its stamp.
        """
        base = f"{self._base}/{PRODUCTION_DIR}" if production else self._base
        if self.is_local and production and os.path.islink(base):
            logger.warning("ignoring symlinked production folder %s", base)
            return {}
        if not self.fs.exists(base):
            return {}
        markers: dict[str, str] = {}
        for info in self.fs.ls(base, detail=True):
            if info.get("type") != "directory":
                continue
            name = str(info["name"]).rstrip("/").rsplit("/", 1)[-1]
            if name.startswith(".") or (not production and name == PRODUCTION_DIR):
                continue
            if self.is_local and os.path.islink(f"{base}/{name}"):
                logger.warning("ignoring symlinked batch folder %s", name)
                continue
            if safe_relative_parts(name) is None or not _is_valid_text(name):
                # No batch id can address it (a backslash, undecodable bytes): a warning
                # here rather than an error in every sensor tick that would fingerprint it.
                logger.warning("ignoring batch folder with an unusable name %s", printable_name(name))
                continue
            stamp = self._marker_stamp(f"{base}/{name}/{READY_MARKER}")
            if stamp is not None:
                markers[name] = stamp
        return markers

    def _control_file_stat(self, path: str) -> tuple[bool, str, int | None] | None:
        """One look at a control file (``_READY``, ``labels.csv``): whether it is a folder, its
        change stamp (local ``mtime_ns``, else the object's ETag or LastModified; ``""`` when
        the store gives neither) and its size; ``None`` when it is absent or unreadable."""
        if self.is_local:
            try:
                st = os.stat(path, follow_symlinks=False)
            except OSError:
                return None
            return stat.S_ISDIR(st.st_mode), str(st.st_mtime_ns), st.st_size
        try:
            info = self.fs.info(path)
        except (FileNotFoundError, OSError):
            return None
        return info.get("type") == "directory", str(info.get("ETag") or info.get("LastModified") or ""), info.get("size")

    def _marker_stamp(self, path: str) -> str | None:
        found = self._control_file_stat(path)
        if found is None:
            return None
        _, stamp, size = found
        if self.is_local:
            return f"{stamp}:{size}"
        return stamp or str(size)

    def list_entries(self, batch_id: str, production: bool = False) -> list[BatchEntry]:
        """Every entry of a batch, classified and sorted by path.

        Control files at the top of the batch folder (``_READY``; for a production batch also
        ``labels.csv``) are not entries. In a production batch the accepted entries are the
        files at the top of the folder, with no label; anything in a subfolder is rejected
        (``in_subfolder``).
        """
        base = self._batch_base(batch_id, production)
        entries = self._walk_local(base, production) if self.is_local else self._walk_remote(base, production)
        return sorted(entries, key=lambda e: e.path)

    def _walk_local(self, base: str, production: bool = False) -> list[BatchEntry]:
        entries: list[BatchEntry] = []
        root = Path(base)
        control = PRODUCTION_CONTROL_FILES if production else CONTROL_FILES

        def walk(folder: Path, rel_prefix: str) -> int:
            found = 0
            try:
                listing = list(os.scandir(folder))
            except OSError as exc:
                logger.warning("cannot list %s: %s", folder, exc)
                entries.append(BatchEntry(printable_name(rel_prefix) or ".", None, None, REJECT_UNREADABLE))
                return 1
            for entry in listing:
                rel = f"{rel_prefix}{entry.name}"
                is_dir = entry.is_dir(follow_symlinks=False)
                if rel in control and not is_dir:
                    continue
                found += 1
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:  # vanished or unreadable between listing and stat
                    label = rel.split("/")[0] if "/" in rel and not production else None
                    entries.append(BatchEntry(printable_name(rel), label, None, REJECT_UNREADABLE))
                    continue
                if is_dir:
                    # Hidden and oddly named folders are walked too: classify() rejects
                    # each file inside with its reason, so every file is accounted for.
                    if walk(Path(entry.path), rel + "/") == 0:
                        entries.append(_empty_folder(rel, production))
                    continue
                entry_info = classify(
                    rel,
                    is_link=stat.S_ISLNK(st.st_mode),
                    is_regular=stat.S_ISREG(st.st_mode),
                    size=st.st_size,
                    production=production,
                )
                entries.append(dataclasses.replace(entry_info, stamp=str(st.st_mtime_ns)))
            return found

        walk(root, "")
        return entries

    def _walk_remote(self, base: str, production: bool = False) -> list[BatchEntry]:
        entries: list[BatchEntry] = []
        prefix = base.rstrip("/") + "/"
        control = PRODUCTION_CONTROL_FILES if production else CONTROL_FILES
        for path, info in sorted(self.fs.find(base, detail=True, withdirs=False).items()):
            path = str(path).split("://", 1)[-1]
            if not path.startswith(prefix):
                continue
            rel = path[len(prefix):]
            if rel in control:
                continue
            entry_info = classify(
                rel, is_link=False, is_regular=True, size=int(info.get("size") or 0), production=production
            )
            stamp = info.get("ETag") or info.get("LastModified")
            entries.append(dataclasses.replace(entry_info, stamp=str(stamp) if stamp else None))
        return entries

    def read_bytes(self, batch_id: str, rel: str, production: bool = False) -> bytes:
        """The bytes of an accepted entry; never follows a symlink on a local landing zone."""
        parts = safe_relative_parts(rel)
        if parts is None:
            raise ValueError(f"path escapes the batch folder: {rel!r}")
        path = f"{self._batch_base(batch_id, production)}/{rel}"
        if self.is_local:
            # O_NOFOLLOW guards the last component; the realpath check guards a folder swapped
            # for a symlink after the listing.
            base = os.path.realpath(self._batch_base(batch_id, production))
            if os.path.commonpath([base, os.path.realpath(path)]) != base:
                raise OSError(f"{rel!r} resolves outside the batch folder")
            flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0)
            fd = os.open(path, flags)
            with os.fdopen(fd, "rb") as f:
                return f.read()
        with self.fs.open(path, "rb") as f:
            return f.read()

    def fingerprint(self, batch_id: str, production: bool = False) -> str:
        """A short hash of a batch's file list and sizes: changes when files are added or replaced.

        Control files are not entries, so a production batch's fingerprint stays the same when
        only its ``labels.csv`` appears or changes (see :meth:`labels_fingerprint`).
        """
        return entries_fingerprint(self.list_entries(batch_id, production))

    def labels_path(self, batch_id: str) -> str:
        """Where a production batch's ``labels.csv`` is (a path, or a key without its protocol)."""
        return f"{self._batch_base(batch_id, production=True)}/{LABELS_FILE}"

    def labels_fingerprint(self, batch_id: str) -> str | None:
        """A stamp of a production batch's ``labels.csv`` (mtime and size, or ETag and size), or
        ``None`` when there is none (a folder of that name is no labels file).

        Cheap (one ``stat`` or HEAD) and separate from :meth:`fingerprint`: a sensor notices
        labels arriving or changing without the batch's images counting as changed. A symlink
        is stamped, never followed: reading it is refused with its reason.
        """
        found = self._control_file_stat(self.labels_path(batch_id))
        if found is None or found[0]:
            return None
        _, stamp, size = found
        return f"{stamp}:{size}"


def entries_fingerprint(entries: list[BatchEntry]) -> str:
    """A short hash of listed entries (paths, sizes, stamps, outcomes): a batch's fingerprint."""
    digest = hashlib.sha256()
    for entry in entries:
        digest.update(f"{entry.path}\0{entry.size}\0{entry.stamp}\0{entry.reason}\n".encode("utf-8", "backslashreplace"))
    return digest.hexdigest()[:16]
