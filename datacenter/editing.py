"""Correcting the failed rows of a pending file (``NAME.MODE.pending.csv``) in the browser.

The editor shows a page of rows at a time with their errors; saving writes the whole file
again with that page's corrections (or without the dropped rows) to a hidden file, which then
takes the old file's place in one rename while the old version is kept in ``deleted/``. The
version of the file the page was made from travels with the form, so that corrections are
never applied to a file that changed meanwhile (processed, replaced, edited by somebody else).
"""

import csv
import itertools
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass

from .files import StorageError, fsync_file
from .reading import ERROR_COLUMN
from .storage import DataCenter, DataCenterFile
from .uploads import EDIT_PREFIX


class EditError(ValueError):
    """Corrections that were not saved; the message is meant for staff."""


@dataclass
class FailedRow:
    number: int  # 1 for the first record after the header
    values: list[str]
    error: str
    columns: list[str]
    #: Where the record starts in the file, as the job's page counts (the header is line 1).
    line: int = 0

    @property
    def cells(self) -> list[tuple[str, str, bool]]:
        """(column, value, whether the error names it) for each value; values beyond the
        header are extra fields."""
        names = self.columns + ["extra field"] * (len(self.values) - len(self.columns))
        return [
            (name, value, f"{name}:" in self.error)
            for name, value in zip(names, self.values, strict=True)
        ]


@dataclass
class Saved:
    corrected: int
    dropped: int
    kept_as: str

    @property
    def message(self) -> str:
        return (
            f"Saved: {self.corrected} rows corrected, {self.dropped} dropped. The file is ready "
            f"to process; the old version was kept as deleted/{self.kept_as}."
        )


class FailedRows(Sequence):
    """The records of a pending file with their errors, read a slice at a time."""

    def __init__(self, file: DataCenterFile):
        self.file = file
        self.version = file_version(file.path)
        #: A file that is no UTF-8 CSV cannot be edited here (nor processed).
        self.readable = file.rows is not None
        self.header = []
        if self.readable:
            with open(file.path, encoding="utf-8-sig", newline="") as handle:
                self.header = next(csv.reader(handle), [])
        self.has_errors = bool(self.header) and self.header[-1] == ERROR_COLUMN
        self.columns = self.header[:-1] if self.has_errors else self.header
        self._length = file.rows or 0

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, item):
        if not isinstance(item, slice):
            return self[item : item + 1][0]
        start, stop, _ = item.indices(self._length)
        with open(self.file.path, encoding="utf-8-sig", newline="") as handle:
            records = _records(csv.reader(handle))
            return [
                self._row(number, record, line)
                for number, record, line in itertools.islice(records, start, stop)
            ]

    def _row(self, number: int, record: list[str], line: int = 0) -> FailedRow:
        error = record[-1] if self.has_errors and record else ""
        values = record[:-1] if self.has_errors else record
        values = values + [""] * (len(self.columns) - len(values))
        return FailedRow(number, values, error, self.columns, line)


def file_version(path: str) -> str:
    stat = os.stat(path)
    return f"{stat.st_ino}-{stat.st_size}-{stat.st_mtime_ns}"


def _records(reader):
    """(number, record, line where it starts) of the non-empty records after the header."""
    next(reader, None)
    line, number = reader.line_num + 1, 0
    for record in reader:
        if record:
            number += 1
            yield number, record, line
        line = reader.line_num + 1


def save_corrections(datacenter: DataCenter, file: DataCenterFile, data, *, user) -> Saved:
    """Apply the corrections of one editor page (`data`: the POSTed form) to `file`."""
    table = FailedRows(file)
    if not table.readable or data.get("version") != table.version:
        raise EditError(
            f"{file.name} was changed since you opened it (processed, replaced or edited by "
            "somebody else). Your corrections were not saved: open the file again."
        )
    try:
        numbers = {int(number) for number in data.get("rows", "").split(",") if number}
    except ValueError:
        raise EditError("The form is incomplete; open the file again.") from None
    dropped = {number for number in numbers if data.get(f"drop-{number}")}
    corrected = dropped_count = 0
    handle, temp_path = tempfile.mkstemp(
        dir=datacenter.storage, prefix=EDIT_PREFIX, suffix=".part"
    )
    try:
        with (
            os.fdopen(handle, "w", encoding="utf-8", newline="") as out,
            open(file.path, encoding="utf-8-sig", newline="") as source,
        ):
            reader, writer = csv.reader(source), csv.writer(out)
            writer.writerow(table.header)
            for number, record, _ in _records(reader):
                if number in dropped:
                    dropped_count += 1
                    continue
                if number in numbers:
                    row = table._row(number, record)
                    values = _cells(data, number, len(row.values))
                    if values != row.values:
                        corrected += 1
                        # The old reason no longer holds; processing tells the new one.
                        record = values + ([""] if table.has_errors else [])
                writer.writerow(record)
        os.chmod(temp_path, 0o644)
        fsync_file(temp_path)
        if file_version(file.path) != table.version:
            raise EditError(f"{file.name} was changed while saving; nothing was saved.")
        kept = datacenter.replace_file(file.name, temp_path)
    except StorageError as exc:
        raise EditError(str(exc)) from None
    except OSError as exc:
        raise EditError(
            f"The corrections could not be saved: {exc.strerror}. Nothing was changed."
        ) from None
    finally:
        if os.path.exists(temp_path):
            os.unlink(temp_path)
    datacenter.log_action(
        user,
        "edit",
        f"{file.name}: {corrected} rows corrected, {dropped_count} dropped; "
        f"old version deleted/{kept}",
    )
    return Saved(corrected, dropped_count, kept)


def _cells(data, number: int, count: int) -> list[str]:
    values = [data.get(f"cell-{number}-{index}") for index in range(count)]
    if any(value is None for value in values):
        raise EditError("The form is incomplete; open the file again.")
    return values
