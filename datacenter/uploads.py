"""Storing an uploaded CSV file in the data center, validated and atomically.

The upload is streamed to a hidden temporary file in the storage root and renamed to its
final name only once it passed every check, so that a half-written or invalid file is never
listed as pending and nothing that exists is ever overwritten.
"""

import codecs
import csv
import os
import re
import tempfile
import unicodedata

from django.conf import settings

from .storage import DataCenter, DataCenterFile, fsync_file, human_size, place_new_file

MAX_NAME_LENGTH = 100
CHUNK_SIZE = 64 * 1024
UTF8_BOM = codecs.BOM_UTF8
UNSAFE_CHARACTERS = re.compile(r"[^A-Za-z0-9_.-]+")


class UploadError(ValueError):
    """An upload that was refused; the message is meant for staff."""


def safe_filename(filename: str) -> str:
    """The name under which an upload called `filename` is stored.

    Folder parts are dropped, accents are removed, every other character outside letters,
    digits and ``_ . -`` becomes ``_``, the extension is written ``.csv`` and the name is cut
    to MAX_NAME_LENGTH characters. Raises UploadError for a name that is not a CSV file name.
    """
    name = re.split(r"[/\\]", filename or "")[-1]
    stem, ext = os.path.splitext(name)
    if ext.lower() != ".csv":
        raise UploadError(
            f"Only CSV files can be uploaded: the file name {filename!r} does not end in '.csv'."
        )
    stem = unicodedata.normalize("NFKD", stem).encode("ascii", "ignore").decode("ascii")
    stem = UNSAFE_CHARACTERS.sub("_", stem).strip("._-")
    if not stem:
        raise UploadError(f"The file name {filename!r} has no usable characters before '.csv'.")
    return stem[: MAX_NAME_LENGTH - len(".csv")] + ".csv"


def save_upload(
    datacenter: DataCenter, fileobj, filename: str, *, user=None, max_size: int | None = None
) -> DataCenterFile:
    """Store the CSV file `fileobj` (binary) under a safe form of `filename` in the root.

    Raises UploadError, leaving no file behind, when the name is taken in the root,
    ``finished/`` or ``unfinished/``, the file is larger than `max_size` bytes, is not UTF-8,
    or is not a well-formed CSV file with a proper header. Records who uploaded it.
    """
    if max_size is None:
        max_size = settings.DATACENTER_MAX_UPLOAD_SIZE
    name = safe_filename(filename)
    _check_name_is_free(datacenter, name)

    handle, temp_path = tempfile.mkstemp(dir=datacenter.storage, prefix=".upload-", suffix=".part")
    try:
        with os.fdopen(handle, "wb") as temp_file:
            _copy_utf8(fileobj, temp_file, max_size)
        _check_csv(temp_path)
        os.chmod(temp_path, 0o644)
        fsync_file(temp_path)
        _check_name_is_free(datacenter, name)
        try:
            place_new_file(temp_path, os.path.join(datacenter.storage, name))
        except FileExistsError:
            raise UploadError(_name_taken(name, "the pending files")) from None
    finally:
        if os.path.exists(temp_path):
            os.unlink(temp_path)

    if user is not None:
        from .models import Upload

        Upload.objects.update_or_create(name=name, defaults={"uploaded_by": user})
    datacenter.log_action(user, "upload", name)
    return datacenter.get_file(name)


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


def _copy_utf8(fileobj, target, max_size: int) -> None:
    """Copy `fileobj` to `target` without a leading BOM, checking its size and its UTF-8."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    size = 0
    line = 1
    first = True
    for chunk in _chunks(fileobj):
        size += len(chunk)
        if size > max_size:
            raise UploadError(
                f"The file is larger than the limit of {human_size(max_size)}. "
                "Split it into smaller files."
            )
        if first:
            chunk = chunk.removeprefix(UTF8_BOM)
            first = False
        try:
            text = decoder.decode(chunk)
        except UnicodeDecodeError:
            raise UploadError(_not_utf8(line + _newlines_before_error(chunk))) from None
        line += text.count("\n")
        target.write(chunk)
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise UploadError(_not_utf8(line)) from None
    if size == 0:
        raise UploadError("The file is empty.")


def _newlines_before_error(chunk: bytes) -> int:
    # The decoder raises for the whole chunk: count the lines before the bad byte.
    try:
        chunk.decode("utf-8")
    except UnicodeDecodeError as exc:
        return chunk[: exc.start].count(b"\n")
    return 0


def _not_utf8(line: int) -> str:
    return (
        f"The file is not UTF-8 text (line {line} has a character in another encoding). "
        "Save it as 'CSV UTF-8' and upload it again."
    )


def _check_csv(path: str) -> None:
    with open(path, encoding="utf-8", newline="") as handle:
        reader = csv.reader(handle, strict=True)
        header = None
        line = 1  # where the record being read starts
        while True:
            try:
                row = next(reader)
            except StopIteration:
                break
            except csv.Error as exc:
                problem = str(exc).replace("unexpected end of data", "a quote is never closed")
                raise UploadError(
                    f"The file is not a well-formed CSV file: line {line}: {problem}."
                ) from None
            if header is None:
                header = _check_header(row)
            elif row and len(row) != len(header):
                raise UploadError(
                    f"Line {line} has {len(row)} fields, but the header has {len(header)} columns."
                )
            line = reader.line_num + 1
        if header is None:
            _check_header(None)


def _check_header(header: list[str] | None) -> list[str]:
    if not header or not any(column.strip() for column in header):
        raise UploadError("The file has no header row: its first line must name the columns.")
    names = [column.strip() for column in header]
    if "" in names:
        raise UploadError(f"Column {names.index('') + 1} of the header row has no name.")
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise UploadError(
            f"The header row names these columns more than once: {', '.join(duplicates)}."
        )
    return header
