"""Delayed labels of a production batch: reading and parsing ``labels.csv``, never trusting it.

``landing/production/<batch_id>/labels.csv`` (header ``file,label``, ``file`` relative to the
batch folder) may arrive any time after the batch, cover part of it, and be replaced later. Its
deliverer writes it atomically (elsewhere, then a rename into the batch folder). Whatever it
holds, parsing never raises and never labels a file outside the batch: the whole file is
rejected with one reason, or each data row ends accepted or rejected with its reason, so
``len(accepted) + len(rejected) == rows``.

Rules, in the order they are applied:

Whole file (nothing from it is applied; ``LabelsParse.reason``), checked in this order:
    ``too_large``       more than ``max_bytes`` bytes (:data:`MAX_LABELS_BYTES`).
    ``empty_file``      no bytes, or only a BOM and whitespace; or no header at all.
    ``not_utf8``        a UTF-16/UTF-32 byte-order mark (checked first), or, once the line
                        end below is there, bytes that are not UTF-8.
    ``truncated``       the last byte is not a line end (``\n``; a lone ``\r`` counts): the
                        file is still being written, or was cut. Every row must end with one,
                        the last included; the writer's atomic rename is what guarantees a
                        file cut exactly at a line end is never seen.
    ``nul_byte``        a NUL byte anywhere (binary content, or a pre-allocated file).
    ``malformed_csv``   the CSV cannot be read (an unterminated quote, a field over the csv
                        module's size limit); ``detail`` says where.
    ``bad_header``      the first non-blank row is not ``file,label`` (compared after
                        trimming whitespace and ignoring case; a UTF-8 BOM is dropped first).
    ``too_many_rows``   more than ``max_rows`` data rows (:data:`MAX_LABEL_ROWS`).

Reading: UTF-8 with or without a BOM; ``\\n``, ``\\r\\n`` or ``\\r`` line ends; RFC 4180 quoted
fields (a comma or line end inside quotes is data). Blank lines are ignored and not rows
(``blank_lines`` counts them). Whitespace around a value is trimmed; a ``file`` that names a
batch file only with its surrounding whitespace kept (`` a.png``) still matches it exactly.

Per row (``LabelRow.reason``; checked in this order):
    ``too_few_columns``       fewer than two fields.
    ``too_many_columns``      more than two fields (a trailing comma included).
    ``empty_file_name``       ``file`` is empty.
    ``absolute_path``         ``file`` starts with ``/`` or ``\\`` or a drive (``C:``).
    ``path_escapes_batch``    ``file`` holds a ``..`` segment (``/`` or ``\\`` separated).
    ``bad_path``              ``file`` is not a plain relative name otherwise (``./a.png``,
                              ``a//b``, a backslash, a control character).
    ``unknown_file``          ``file`` is not one of ``batch_files`` (the batch's accepted
                              entries; subfolders, control files and rejected entries are not).
    ``ambiguous_file``        ``file`` matches no entry exactly, and several after Unicode NFC
                              normalisation.
    ``empty_label``           ``label`` is empty.
    ``bad_label``             ``label`` holds a control character, ``/`` or ``\\``, or is over
                              255 characters.
    ``conflicting_duplicate`` the same file (after matching) appears with different labels:
                              every row for it is rejected (rows already rejected for their
                              label above do not take part).
    ``duplicate``             an identical repeat of an earlier row: the first one counts, the
                              repeat is recorded with this reason.
    ``label_not_in_model``    only when ``label_set`` is given: a well-formed label the model
                              does not know; recorded (``quarantined``), never dropped.

Names match the way the landing listing names files: the listing keeps names as they are on
disk (only label folders are NFC-normalised), so ``file`` is matched exactly first, then by
its NFC form against the NFC forms of the batch files, and must resolve to exactly one entry.
Labels are NFC-normalised, as label folder names are.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import stat
import unicodedata
from collections import Counter
from dataclasses import dataclass, replace

from cvops_dagster.ingestion.landing import (
    LABELS_FILE,
    REJECT_EMPTY_FILE,
    REJECT_ESCAPES,
    REJECT_NOT_REGULAR,
    REJECT_SYMLINK,
    REJECT_UNREADABLE,
    LandingZone,
    safe_relative_parts,
)

logger = logging.getLogger(__name__)

#: Largest ``labels.csv`` read: 64 MiB is over a million rows of ordinary file names.
MAX_LABELS_BYTES = 64 * 1024 * 1024
#: Most data rows parsed from one ``labels.csv``.
MAX_LABEL_ROWS = 1_000_000
#: Longest label kept.
MAX_LABEL_CHARS = 255
#: Longest name or label kept in a rejection record (the rest is cut, marked with an ellipsis).
_RECORD_CHARS = 512

HEADER = ("file", "label")

# Whole-file rejection reasons (stable strings, as for the landing listing).
LABELS_EMPTY = REJECT_EMPTY_FILE  # "empty_file"
LABELS_TOO_LARGE = "too_large"
LABELS_NOT_UTF8 = "not_utf8"
LABELS_TRUNCATED = "truncated"
LABELS_NUL = "nul_byte"
LABELS_MALFORMED = "malformed_csv"
LABELS_BAD_HEADER = "bad_header"
LABELS_TOO_MANY_ROWS = "too_many_rows"
# Why the file itself could not be read (load_delayed_labels): the landing listing's reasons.
LABELS_SYMLINK = REJECT_SYMLINK
LABELS_NOT_REGULAR = REJECT_NOT_REGULAR
LABELS_UNREADABLE = REJECT_UNREADABLE

# Row rejection reasons.
ROW_TOO_FEW_COLUMNS = "too_few_columns"
ROW_TOO_MANY_COLUMNS = "too_many_columns"
ROW_EMPTY_FILE_NAME = "empty_file_name"
ROW_ABSOLUTE = "absolute_path"
ROW_ESCAPES = REJECT_ESCAPES  # "path_escapes_batch"
ROW_BAD_PATH = "bad_path"
ROW_UNKNOWN_FILE = "unknown_file"
ROW_AMBIGUOUS_FILE = "ambiguous_file"
ROW_EMPTY_LABEL = "empty_label"
ROW_BAD_LABEL = "bad_label"
ROW_CONFLICT = "conflicting_duplicate"
ROW_DUPLICATE = "duplicate"
ROW_NOT_IN_MODEL = "label_not_in_model"

_UTF16_32_BOMS = (b"\xff\xfe", b"\xfe\xff", b"\x00\x00\xfe\xff")


@dataclass(frozen=True)
class LabelRow:
    """One data row of ``labels.csv``.

    Attributes:
        line: the line number (1-based, the header is line 1) on which the row ends.
        file: accepted: the batch entry's path exactly as listed; rejected: the name as
            written (trimmed, clipped), never to be used as a path.
        label: the label (trimmed, NFC), or the raw field when rejected for it.
        reason: ``None`` when accepted, else why the row was not.
    """

    line: int
    file: str
    label: str
    reason: str | None = None

    @property
    def accepted(self) -> bool:
        return self.reason is None


@dataclass(frozen=True)
class LabelsParse:
    """What one ``labels.csv`` says, row by row, or why it was rejected as a whole.

    Attributes:
        accepted: rows that label a batch file, one per file.
        rejected: rows not applied, each with its reason (``label_not_in_model`` rows are the
            quarantine: recorded with their file and label).
        reason: a whole-file rejection reason, ``None`` when the file was read.
        detail: what a whole-file rejection saw (a line number, the header found).
        rows: data rows read; ``len(accepted) + len(rejected) == rows`` (0 when rejected whole).
        blank_lines: blank lines skipped (not rows).
        fingerprint: the labels file's stamp when read by :func:`load_delayed_labels`.
    """

    accepted: tuple[LabelRow, ...] = ()
    rejected: tuple[LabelRow, ...] = ()
    reason: str | None = None
    detail: str = ""
    rows: int = 0
    blank_lines: int = 0
    fingerprint: str | None = None

    @property
    def ok(self) -> bool:
        """The file was read (its rows may still be rejected one by one)."""
        return self.reason is None

    @property
    def labels(self) -> dict[str, str]:
        """Batch file path -> label, for the accepted rows."""
        return {row.file: row.label for row in self.accepted}

    @property
    def quarantined(self) -> tuple[LabelRow, ...]:
        """Rows whose label the model does not know."""
        return tuple(row for row in self.rejected if row.reason == ROW_NOT_IN_MODEL)

    def reason_counts(self) -> dict[str, int]:
        """Rejected rows per reason (sorted); a whole-file rejection counts as itself, once."""
        counts = Counter(str(row.reason) for row in self.rejected)
        if self.reason is not None:
            counts[self.reason] += 1
        return dict(sorted(counts.items()))

    def summary(self) -> dict[str, object]:
        return {
            "status": "read" if self.ok else "rejected",
            "reason": self.reason,
            "detail": self.detail,
            "rows": self.rows,
            "accepted": len(self.accepted),
            "rejected": len(self.rejected),
            "quarantined": len(self.quarantined),
            "blank_lines": self.blank_lines,
            "rejected_reasons": self.reason_counts(),
            "fingerprint": self.fingerprint,
        }


def _reject_file(reason: str, detail: str = "") -> LabelsParse:
    return LabelsParse(reason=reason, detail=detail)


def _clip(text: str) -> str:
    return text if len(text) <= _RECORD_CHARS else text[: _RECORD_CHARS - 1] + "\u2026"


def _has_control(text: str) -> bool:
    return any(unicodedata.category(ch) == "Cc" for ch in text)


def _path_reason(name: str) -> str | None:
    """Why ``name`` cannot name a file of the batch by its form alone, or ``None``."""
    if name.startswith(("/", "\\")) or (len(name) >= 2 and name[1] == ":" and name[0].isalpha()):
        return ROW_ABSOLUTE
    if ".." in name.replace("\\", "/").split("/"):
        return ROW_ESCAPES
    if safe_relative_parts(name) is None or _has_control(name):
        return ROW_BAD_PATH
    return None


def _label_reason(label: str) -> str | None:
    if not label:
        return ROW_EMPTY_LABEL
    if len(label) > MAX_LABEL_CHARS or _has_control(label) or "/" in label or "\\" in label:
        return ROW_BAD_LABEL
    return None


class _Matcher:
    """Resolves a ``file`` value to exactly one batch file, or says why it cannot."""

    def __init__(self, batch_files: set[str]) -> None:
        self.files = batch_files
        self.by_nfc: dict[str, list[str]] = {}
        for name in batch_files:
            self.by_nfc.setdefault(unicodedata.normalize("NFC", name), []).append(name)

    def match(self, raw: str, trimmed: str) -> tuple[str | None, str | None]:
        for candidate in (raw, trimmed):
            if candidate in self.files:
                return candidate, None
        found = self.by_nfc.get(unicodedata.normalize("NFC", trimmed), [])
        if len(found) == 1:
            return found[0], None
        return None, ROW_AMBIGUOUS_FILE if found else ROW_UNKNOWN_FILE


def parse_delayed_labels(
    data: bytes,
    batch_files: set[str],
    label_set: set[str] | None,
    *,
    max_bytes: int = MAX_LABELS_BYTES,
    max_rows: int = MAX_LABEL_ROWS,
) -> LabelsParse:
    """Parse a production batch's ``labels.csv``; never raises on bad input.

    Args:
        data: the file's bytes.
        batch_files: the paths of the batch's accepted entries, as the landing listing gives
            them (``BatchEntry.path``): no accepted row ever names anything else.
        label_set: the model's labels; ``None`` accepts any well-formed label.
        max_bytes: a larger file is rejected whole (``too_large``).
        max_rows: a file with more data rows is rejected whole (``too_many_rows``).

    Returns:
        The accepted and rejected rows, or a whole-file rejection; the module docstring lists
        every rule and reason.
    """
    if len(data) > max_bytes:
        return _reject_file(LABELS_TOO_LARGE, f"{len(data)} bytes, at most {max_bytes}")
    if data.strip(b" \t\r\n") in (b"", b"\xef\xbb\xbf"):
        return _reject_file(LABELS_EMPTY)
    if data.startswith(_UTF16_32_BOMS):
        return _reject_file(LABELS_NOT_UTF8, "UTF-16/32 byte-order mark")
    if not data.endswith((b"\n", b"\r")):
        return _reject_file(LABELS_TRUNCATED, "the last line has no line end")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        return _reject_file(LABELS_NOT_UTF8, f"byte {exc.start}")
    if "\x00" in text:
        return _reject_file(LABELS_NUL, f"byte {data.index(0)}")
    text = text.removeprefix("\ufeff")
    try:
        body, blank = _read_records(text, max_rows)
    except _WholeFile as exc:
        return _reject_file(exc.reason, exc.detail)
    rows = _judge_rows(body, _Matcher(set(batch_files)), label_set)
    accepted = tuple(r for r in rows if r.accepted)
    rejected = tuple(r for r in rows if not r.accepted)
    return LabelsParse(accepted=accepted, rejected=rejected, rows=len(body), blank_lines=blank)


class _WholeFile(Exception):
    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(reason)
        self.reason, self.detail = reason, detail


def _read_records(text: str, max_rows: int) -> tuple[list[tuple[int, list[str]]], int]:
    """The data records after a valid header (with their line numbers), and the blank lines
    skipped; raises :class:`_WholeFile` for a whole-file rejection."""
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    header: list[str] | None = None
    body: list[tuple[int, list[str]]] = []
    blank = 0
    try:
        for record in reader:
            if not record or (len(record) == 1 and not record[0].strip()):
                blank += 1
                continue
            if header is None:
                header = record
                found = tuple(field.strip().lower() for field in record)
                if found != HEADER:
                    raise _WholeFile(LABELS_BAD_HEADER, _clip(",".join(record)))
                continue
            if len(body) >= max_rows:
                raise _WholeFile(LABELS_TOO_MANY_ROWS, f"more than {max_rows} rows")
            body.append((reader.line_num, record))
    except csv.Error as exc:
        raise _WholeFile(LABELS_MALFORMED, f"line {reader.line_num}: {exc}") from None
    if header is None:
        raise _WholeFile(LABELS_EMPTY)
    return body, blank


def _judge_rows(
    body: list[tuple[int, list[str]]], matcher: _Matcher, label_set: set[str] | None
) -> list[LabelRow]:
    """Every data row with its outcome, in file order."""
    judged: list[LabelRow] = []
    # Rows that passed every per-row check, by the batch file they name.
    by_file: dict[str, list[int]] = {}
    for line, record in body:
        raw_file = record[0]
        file = raw_file.strip()
        label = unicodedata.normalize("NFC", record[1].strip()) if len(record) > 1 else ""
        reason: str | None = None
        if len(record) < 2:
            reason = ROW_TOO_FEW_COLUMNS
        elif len(record) > 2:
            reason = ROW_TOO_MANY_COLUMNS
        elif not file:
            reason = ROW_EMPTY_FILE_NAME
        else:
            reason = _path_reason(file)
            if reason is None:
                matched, reason = matcher.match(raw_file, file)
                if matched is not None:
                    file = matched
            if reason is None:
                reason = _label_reason(label)
        if reason is None:
            by_file.setdefault(file, []).append(len(judged))
            judged.append(LabelRow(line, file, label))
        else:
            judged.append(LabelRow(line, _clip(file), _clip(label), reason))
    known = None if label_set is None else {unicodedata.normalize("NFC", x) for x in label_set}
    for indexes in by_file.values():
        labels = {judged[i].label for i in indexes}
        if len(labels) > 1:
            for i in indexes:
                judged[i] = replace(judged[i], reason=ROW_CONFLICT)
            continue
        first, *repeats = indexes
        for i in repeats:
            judged[i] = replace(judged[i], reason=ROW_DUPLICATE)
        if known is not None and judged[first].label not in known:
            judged[first] = replace(judged[first], reason=ROW_NOT_IN_MODEL)
    return judged


class LabelsFileError(OSError):
    """``labels.csv`` exists but is not read: a symlink, not a regular file, too large, or
    unreadable. ``reason`` is the stable rejection string."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def read_delayed_labels(landing: LandingZone, batch_id: str, max_bytes: int = MAX_LABELS_BYTES) -> bytes | None:
    """The bytes of a production batch's ``labels.csv``, or ``None`` when there is none.

    Never follows a symlink and never blocks on a FIFO (local), never reads more than
    ``max_bytes + 1`` bytes. A folder named ``labels.csv`` is no labels file (``None``).

    Raises:
        LabelsFileError: it is a symlink, not a regular file, larger than ``max_bytes``, or
            unreadable; ``reason`` says which.
    """
    path = landing.labels_path(batch_id)
    if landing.is_local:
        return _read_local(path, max_bytes)
    try:
        info = landing.fs.info(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise LabelsFileError(LABELS_UNREADABLE, f"{path}: {exc}") from exc
    if info.get("type") == "directory":
        return None
    if int(info.get("size") or 0) > max_bytes:
        raise LabelsFileError(LABELS_TOO_LARGE, f"{path}: {info.get('size')} bytes, at most {max_bytes}")
    try:
        with landing.fs.open(path, "rb") as f:
            data = f.read(max_bytes + 1)
    except FileNotFoundError:
        return None  # deleted between the look and the read
    except OSError as exc:
        raise LabelsFileError(LABELS_UNREADABLE, f"{path}: {exc}") from exc
    if len(data) > max_bytes:  # replaced by a larger one meanwhile
        raise LabelsFileError(LABELS_TOO_LARGE, f"{path}: over {max_bytes} bytes")
    return data


def _read_local(path: str, max_bytes: int) -> bytes | None:
    try:
        st = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise LabelsFileError(LABELS_UNREADABLE, f"{path}: {exc}") from exc
    if stat.S_ISLNK(st.st_mode):
        raise LabelsFileError(LABELS_SYMLINK, f"{path} is a symlink")
    if stat.S_ISDIR(st.st_mode):
        return None
    # The batch folder itself must not lead elsewhere (swapped for a symlink after listing).
    batch = os.path.dirname(path)
    real = os.path.realpath(batch)
    if os.path.islink(batch) or os.path.commonpath([real, os.path.realpath(path)]) != real:
        raise LabelsFileError(LABELS_SYMLINK, f"{path} resolves outside its batch folder")
    # O_NOFOLLOW: replaced by a symlink since the stat; O_NONBLOCK: a FIFO never blocks us.
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if os.path.islink(path):
            raise LabelsFileError(LABELS_SYMLINK, f"{path} is a symlink") from exc
        raise LabelsFileError(LABELS_UNREADABLE, f"{path}: {exc}") from exc
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise LabelsFileError(LABELS_NOT_REGULAR, f"{path} is not a regular file")
        if st.st_size > max_bytes:
            raise LabelsFileError(LABELS_TOO_LARGE, f"{path}: {st.st_size} bytes, at most {max_bytes}")
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise LabelsFileError(LABELS_TOO_LARGE, f"{path}: over {max_bytes} bytes")
    return data


def load_delayed_labels(
    landing: LandingZone,
    batch_id: str,
    batch_files: set[str],
    label_set: set[str] | None,
    *,
    max_bytes: int = MAX_LABELS_BYTES,
    max_rows: int = MAX_LABEL_ROWS,
) -> LabelsParse | None:
    """Read and parse a production batch's ``labels.csv``; ``None`` when it has none.

    Never raises for what the file holds or is: a file that cannot be read becomes a
    whole-file rejection (``symlink``, ``not_a_regular_file``, ``too_large``, ``unreadable``).
    The result carries the labels fingerprint taken *before* the read, so a file replaced
    meanwhile is seen as changed again by whoever compares fingerprints.
    """
    fingerprint = landing.labels_fingerprint(batch_id)
    try:
        data = read_delayed_labels(landing, batch_id, max_bytes)
    except LabelsFileError as exc:
        logger.warning("labels of production batch %s not read: %s", batch_id, exc)
        return replace(_reject_file(exc.reason, str(exc)), fingerprint=fingerprint)
    if data is None:
        return None
    parsed = parse_delayed_labels(data, batch_files, label_set, max_bytes=max_bytes, max_rows=max_rows)
    if not parsed.ok:
        logger.warning("labels of production batch %s rejected: %s %s", batch_id, parsed.reason, parsed.detail)
    return replace(parsed, fingerprint=fingerprint)


__all__ = [
    "HEADER",
    "LABELS_FILE",
    "MAX_LABELS_BYTES",
    "MAX_LABEL_ROWS",
    "LabelRow",
    "LabelsFileError",
    "LabelsParse",
    "load_delayed_labels",
    "parse_delayed_labels",
    "read_delayed_labels",
]
