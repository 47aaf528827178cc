"""Storing an uploaded CSV file in the data center, validated and atomically.

The upload is streamed to a hidden temporary file in the storage root and renamed to its
final name only once it passed every check, so that a half-written or invalid file is never
listed as pending and nothing that exists is ever overwritten.
"""

import codecs
import contextlib
import csv
import errno
import os
import re
import tempfile
import unicodedata
from collections import Counter
from dataclasses import dataclass

from django.conf import settings

from . import files, workbooks
from .emails import notify_upload
from .reading import counted, some_of
from .storage import (
    DataCenter,
    DataCenterFile,
    StorageError,
    fsync_file,
    human_size,
    place_new_file,
)

MAX_NAME_LENGTH = 100
CHUNK_SIZE = 64 * 1024
UTF8_BOM = codecs.BOM_UTF8
UNSAFE_CHARACTERS = re.compile(r"[^A-Za-z0-9_.-]+")
NO_HEADER = "The file has no header row: its first line must name the columns."
#: The names of the hidden partial files of uploads and of the row editor begin so.
UPLOAD_PREFIX, EDIT_PREFIX = ".upload-", ".edit-"
PART_PREFIXES = (UPLOAD_PREFIX, EDIT_PREFIX)


class UploadError(ValueError):
    """An upload that was refused; the message is meant for staff."""


def safe_filename(filename: str) -> str:
    """The name under which an upload called `filename` is stored.

    Folder parts are dropped, accents are removed, every other character outside letters,
    digits and ``_ . -`` becomes ``_``, the extension is written ``.csv`` (a workbook is stored
    as CSV) and the name is cut to MAX_NAME_LENGTH characters. Raises UploadError for a name
    that is neither a CSV file's nor a workbook's.
    """
    name = re.split(r"[/\\]", filename or "")[-1]
    stem, ext = os.path.splitext(name)
    if ext.lower() != ".csv" and not workbooks.is_workbook(name):
        raise UploadError(
            f"Only CSV files and workbooks can be uploaded: the file name {filename!r} ends "
            f"in none of .csv, {', '.join(workbooks.KINDS)}."
        )
    stem = unicodedata.normalize("NFKD", stem).encode("ascii", "ignore").decode("ascii")
    stem = UNSAFE_CHARACTERS.sub("_", stem).strip("._-")
    if not stem:
        raise UploadError(f"The file name {filename!r} has no usable characters before {ext!r}.")
    return stem[: MAX_NAME_LENGTH - len(".csv")] + ".csv"


def save_upload(
    datacenter: DataCenter, fileobj, filename: str, *, user=None, max_size: int | None = None
) -> DataCenterFile:
    """Store the CSV file `fileobj` (binary) under a safe form of `filename` in the root, in
    the one canonical form: UTF-8 without BOM, comma-separated.

    Files as spreadsheet programs save them are converted (see `read_spreadsheet_csv`), and
    of a workbook (``NAME.xlsx``, ``.xls``, ``.ods``) the first sheet is stored as
    ``NAME.csv`` (see `datacenter.workbooks`); the returned file's ``conversion`` says how
    ("" when stored as it came). Raises UploadError,
    leaving no file behind, when the name is taken in the root, ``finished/`` or
    ``unfinished/``, the file is larger than `max_size` bytes, is no well-formed CSV file with
    a proper header, or cannot be written (a full disk). Records who uploaded it and tells
    the import managers (a mail that cannot be sent is logged, never fails the upload).
    """
    name = safe_filename(filename)
    remove_stale_parts(datacenter)
    _check_name_is_free(datacenter, name)
    target = os.path.join(datacenter.storage, name)
    with _stored_canonical(datacenter, fileobj, filename, max_size) as (stored, conversion):
        _check_name_is_free(datacenter, name)

        def place() -> None:
            try:
                place_new_file(stored, target)
            except FileExistsError:
                raise UploadError(_name_taken(name, "the pending files")) from None

        _with_record(name, user, place, undo=lambda _: os.unlink(target))
    detail = f"{name} ({conversion})" if conversion else name
    datacenter.log_action(user, "upload", detail)
    file = datacenter.get_file(name)
    file.conversion = conversion
    _notified(datacenter, file, user, "uploaded")
    return file


def replace_upload(
    datacenter: DataCenter,
    fileobj,
    name: str,
    *,
    user=None,
    max_size: int | None = None,
    filename: str | None = None,
) -> tuple[DataCenterFile, str]:
    """Store the CSV file or workbook `fileobj` (called `filename`: by default its own
    name, else `name`) as save_upload does, in place of the pending file `name` (in one
    step, never missing), and return it with the name of the old version, which is kept in
    ``deleted/``. Raises UploadError as save_upload does, and while `name` is being
    processed, leaving everything as it was."""
    datacenter.get_file(name)
    filename = filename or getattr(fileobj, "name", None) or name
    safe_filename(filename)
    remove_stale_parts(datacenter)
    with _stored_canonical(datacenter, fileobj, filename, max_size) as (stored, conversion):

        def place() -> str:
            try:
                return datacenter.replace_file(name, stored)
            except StorageError as exc:
                raise UploadError(str(exc)) from None

        def undo(kept: str) -> None:
            # The old version goes back in place; the new one is discarded.
            os.replace(
                os.path.join(datacenter.deleted_path, kept), os.path.join(datacenter.storage, name)
            )

        kept = _with_record(name, user, place, undo)
    detail = f" ({conversion})" if conversion else ""
    datacenter.log_action(user, "replace", f"{name}{detail}; old version deleted/{kept}")
    file = datacenter.get_file(name)
    file.conversion = conversion
    _notified(datacenter, file, user, "replaced")
    return file, kept


#: What a person is told when the database could not record a file in time.
BUSY = "The site is busy; nothing was stored. Try again in a moment."


def _with_record(name: str, user, place, undo):
    """Call `place()`, which puts the file `name` in place, in one step with the record of
    who uploaded it: if the record cannot be written, `undo(what place returned)` takes the
    file away again and UploadError says so. A program's upload (no user) has no record."""
    if user is None:
        return place()
    from django.db import DatabaseError, transaction

    from .models import Upload

    placed, result = False, None
    try:
        # The transaction begins by taking the database's write lock (SQLite: IMMEDIATE),
        # so a busy database mostly fails here, before the file is placed.
        with transaction.atomic():
            Upload.objects.update_or_create(name=name, defaults={"uploaded_by": user})
            result, placed = place(), True
    except DatabaseError:
        if placed:
            undo(result)
        raise UploadError(BUSY) from None
    return result


def _notified(datacenter: DataCenter, file: DataCenterFile, user, action: str) -> None:
    """Tell the import managers of an upload by a person (a mail that cannot be sent is
    logged, never fails the upload)."""
    if user is not None:
        notify_upload(datacenter, file, user, action)


@contextlib.contextmanager
def _stored_canonical(datacenter: DataCenter, fileobj, filename: str, max_size: int | None):
    """Yield (path, what was converted) of the upload `filename` written durably in
    canonical form to a hidden file in the storage root, which the caller moves into place;
    remove what is left after. A workbook's first sheet becomes the CSV file."""
    if max_size is None:
        max_size = settings.DATACENTER_MAX_UPLOAD_SIZE
    temp_paths = []
    try:
        with _storage_errors():
            raw_path = _temp_file(datacenter, temp_paths)
            raw = open(raw_path, "wb")  # noqa: SIM115 (closed below, its errors are ours)
        try:
            _copy(fileobj, raw, max_size)
        finally:
            with _storage_errors():
                raw.close()
        conversions = []
        if workbooks.is_workbook(filename):
            raw_path = _sheet_as_csv(datacenter, raw_path, filename, temp_paths, conversions)
        form = read_spreadsheet_csv(raw_path)
        with _storage_errors():
            if form.conversion:
                stored = _temp_file(datacenter, temp_paths)
                form.write_canonical(raw_path, stored)
                conversions.append(form.conversion)
            else:
                stored = raw_path
            os.chmod(stored, 0o644)
            fsync_file(stored)
        with _storage_errors():
            yield stored, ", ".join(conversions)
    finally:
        for path in temp_paths:
            if os.path.exists(path):
                os.unlink(path)


def _sheet_as_csv(datacenter, workbook: str, filename: str, temp_paths, conversions) -> str:
    """The path of the first sheet of `workbook` written as CSV beside it."""
    with _storage_errors():
        target = _temp_file(datacenter, temp_paths)
    try:
        ending = os.path.splitext(filename)[1].lower()
        sheet = workbooks.convert_in_child(workbook, target, ending=ending)
    except workbooks.WorkbookError as exc:
        raise UploadError(f"{exc} Nothing was stored.") from None
    conversions.append(sheet.describe(workbooks.kind_of(filename)))
    return target


def remove_stale_parts(datacenter: DataCenter) -> list[str]:
    """Remove the partial files of uploads and edits in the storage root whose process was
    killed; return their names."""
    return files.remove_stale_parts(datacenter.storage, PART_PREFIXES)


def _temp_file(datacenter: DataCenter, temp_paths: list[str]) -> str:
    handle, path = tempfile.mkstemp(dir=datacenter.storage, prefix=UPLOAD_PREFIX, suffix=".part")
    os.close(handle)
    temp_paths.append(path)
    return path


@contextlib.contextmanager
def _storage_errors():
    """A failure to write the storage as an UploadError in words."""
    try:
        yield
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            reason = "the storage is full"
        elif exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            reason = "the storage folder may not be written"
        else:
            reason = "the storage could not be written"
        raise UploadError(
            f"The file could not be stored: {reason} ({exc.strerror}). Nothing was stored; "
            "please tell the administrators."
        ) from None


def _name_taken(name: str, where: str) -> str:
    return (
        f"A file named {name!r} already exists in {where}. Nothing was changed: rename your "
        "file, or delete the existing one first."
    )


def _check_name_is_free(datacenter: DataCenter, name: str) -> None:
    for folder, where in (
        (datacenter.storage, "the pending files"),
        (datacenter.finished_path, "the finished files"),
        (datacenter.unfinished_path, "the unfinished files"),
    ):
        if os.path.lexists(os.path.join(folder, name)):
            raise UploadError(_name_taken(name, where))


def _chunks(fileobj):
    if hasattr(fileobj, "chunks"):
        yield from fileobj.chunks(CHUNK_SIZE)
        return
    while chunk := fileobj.read(CHUNK_SIZE):
        yield chunk


def _copy(fileobj, target, max_size: int) -> None:
    """Copy the upload to `target`; an error of reading it stays what it is, an error of
    writing becomes an UploadError."""
    size = 0
    for chunk in _chunks(fileobj):
        size += len(chunk)
        if size > max_size:
            raise UploadError(
                f"The file is larger than the limit of {human_size(max_size)}. "
                "Split it into smaller files."
            )
        with _storage_errors():
            target.write(chunk)
    if size == 0:
        raise UploadError("The file is empty.")


# Reading CSV files as spreadsheet programs save them

SEPARATORS = {",": "comma", ";": "semicolon", "\t": "tab"}


def _cp1252_or_latin1(error: UnicodeDecodeError) -> tuple[str, int]:
    # Windows-1252 leaves five bytes undefined; Latin-1 gives them their code points.
    return error.object[error.start : error.end].decode("latin-1"), error.end


codecs.register_error("datacenter-latin-1", _cp1252_or_latin1)


@dataclass
class SpreadsheetCsv:
    """How a CSV file is written: its encoding, separator and the columns to keep."""

    encoding: str
    separator: str
    #: Indexes of the columns kept: those with a name in the header or a value in a row.
    columns: list[int]
    width: int
    had_bom: bool

    @property
    def conversion(self) -> str:
        """What storing it canonically changes, in words; "" for nothing."""
        changes = []
        if self.encoding == "cp1252":
            changes.append("converted from Windows-1252")
        elif self.encoding == "utf-16":
            changes.append("converted from UTF-16")
        elif self.had_bom:
            changes.append("byte order mark removed")
        if self.separator != ",":
            changes.append(f"{SEPARATORS[self.separator]}-separated")
        dropped = self.width - len(self.columns)
        if dropped:
            changes.append(f"{dropped} empty column{'s' if dropped > 1 else ''} dropped")
        return ", ".join(changes)

    def open(self, path: str):
        errors = "datacenter-latin-1" if self.encoding == "cp1252" else "strict"
        return open(path, encoding=self.encoding, errors=errors, newline="")

    def write_canonical(self, source: str, target: str) -> None:
        """Write `source` to `target` as UTF-8 without BOM, comma-separated."""
        with self.open(source) as handle, open(target, "w", encoding="utf-8", newline="") as out:
            writer = csv.writer(out, lineterminator="\n")
            for row in csv.reader(handle, delimiter=self.separator, strict=True):
                writer.writerow([row[index] for index in self.columns if index < len(row)])


def read_spreadsheet_csv(path: str) -> SpreadsheetCsv:
    """How the CSV file `path` is written, checked: UTF-8 (BOM or not), UTF-16 with a BOM, or
    else Windows-1252; a comma, semicolon or tab, whichever gives every line the same number
    of fields (a comma when that is ambiguous). Raises UploadError for a file that is no
    well-formed CSV with a proper header."""
    with open(path, "rb") as handle:
        start = handle.read(4)
    if start.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        encoding = "utf-16"
    elif start.startswith(UTF8_BOM):
        encoding = "utf-8-sig"
    else:
        encoding = "utf-8" if _is_utf8(path) else "cp1252"
    comma = None
    for separator in SEPARATORS:
        form = _fields(path, encoding, separator)
        if separator == ",":
            comma = form
        if not isinstance(form, UploadError) and form.width > 1:
            break
    else:
        form = comma  # one column, or no separator fits: the comma's verdict stands
    if isinstance(form, UploadError):
        raise form
    return form


def _is_utf8(path: str) -> bool:
    decoder = codecs.getincrementaldecoder("utf-8")()
    with open(path, "rb") as handle:
        try:
            while chunk := handle.read(CHUNK_SIZE):
                decoder.decode(chunk)
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            return False
    return True


def _fields(path: str, encoding: str, separator: str) -> "SpreadsheetCsv | UploadError":
    """The file read with `separator`, or the UploadError that says why it does not fit."""
    form = SpreadsheetCsv(encoding, separator, [], 0, encoding == "utf-8-sig")
    with form.open(path) as handle:
        reader = csv.reader(handle, delimiter=separator, strict=True)
        header = None
        used: set[int] = set()
        line = 1  # where the record being read starts
        while True:
            try:
                row = next(reader)
            except StopIteration:
                break
            except csv.Error as exc:
                problem = str(exc).replace("unexpected end of data", "a quote is never closed")
                return UploadError(
                    f"The file is not a well-formed CSV file: line {line}: {problem}."
                )
            except UnicodeDecodeError:
                return UploadError("The file's text cannot be read: it is not valid UTF-16.")
            if header is None:
                header = row
                if not any(value.strip() for value in row):
                    return UploadError(NO_HEADER)
            elif row and len(row) != len(header):
                return UploadError(
                    f"Line {line} has {counted(len(row), 'field')}, but the header has "
                    f"{counted(len(header), 'column')}."
                )
            used.update(index for index, value in enumerate(row) if value.strip())
            line = reader.line_num + 1
    form.width = len(header or [])
    form.columns = sorted(index for index in used if index < form.width)
    try:
        _check_header(header, form.columns)
    except UploadError as exc:
        return exc
    return form


def _check_header(header: list[str] | None, columns: list[int]) -> None:
    """Refuse a header row without names, with a kept column without one, or with a name
    twice."""
    if not header or not any(column.strip() for column in header):
        raise UploadError(NO_HEADER)
    for index in columns:
        if not header[index].strip():
            raise UploadError(f"Column {index + 1} of the header row has no name.")
    names = [header[index].strip() for index in columns]
    duplicates = sorted(name for name, count in Counter(names).items() if count > 1)
    if duplicates:
        raise UploadError(
            f"The header row names these columns more than once: {some_of(duplicates)}."
        )
