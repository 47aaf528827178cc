"""Reading a pending file for processing: its header checked for a processor, its records
(a file that is no UTF-8 CSV refused in words, with the line where it stops being one), its
rows in batches, and the keys seen so far, which a row may not repeat."""

import codecs
import csv
from collections import Counter
from collections.abc import Iterable, Iterator

from .formulas import restored
from .processors import Processor

#: The last column of a pending file: why each row failed.
ERROR_COLUMN = "--ERRORS--"


class ProcessingError(ValueError):
    """A file that cannot be processed; the message is meant for staff."""


def check_header(processor: Processor, header: list[str], mode: str) -> list[str]:
    """What is wrong with the header row of a file for `processor` in `mode`, in words."""
    columns = [column.strip() for column in header if column.strip() != ERROR_COLUMN]
    problems = []
    duplicates = sorted(column for column, count in Counter(columns).items() if count > 1)
    if duplicates:
        problems.append(f"These columns appear more than once: {some_of(duplicates)}.")
    present = set(columns)
    missing = [column for column in processor.required_columns(mode) if column not in present]
    if missing:
        problems.append(f"These columns are required in {mode} mode: {', '.join(missing)}.")
    known = set(processor.columns)
    unknown = [column for column in columns if column not in known]
    if unknown:
        problems.append(
            f"These columns are unknown to {processor.title}: {some_of(unknown)}. "
            f"Known columns are {', '.join(processor.columns)}."
        )
    return problems


def counted(number: int, thing: str) -> str:
    """``1 column``, ``2 columns``."""
    return f"{number} {thing}{'' if number == 1 else 's'}"


def some_of(names: list[str], shown: int = 10) -> str:
    """The first `shown` of `names`, comma-separated, and how many more there are: a header
    may have a million columns, a message should not."""
    listed = ", ".join(names[:shown])
    return f"{listed} and {len(names) - shown} more" if len(names) > shown else listed


def checked_header(handle, filename, processor, mode, *, whole: bool) -> list[str]:
    """The header row of the open file, checked for `processor` in `mode`; with `whole`,
    every record is read too, so that a file that is no readable CSV fails before any row
    is applied. The file is left at its start."""
    handle.seek(0)
    reader = csv.reader(handle)
    records = read_records(reader, filename, handle)
    header = next(records, None) or []
    problems = check_header(processor, header, mode) if header else ["The file is empty."]
    if problems:
        raise ProcessingError(" ".join(problems))
    if whole:
        for _ in records:
            pass
    handle.seek(0)
    return header


def read_records(reader, filename: str, handle) -> Iterator[list[str]]:
    """The records of `reader` over the text file `handle`; a file that is no UTF-8 CSV
    raises ProcessingError."""
    try:
        yield from reader
    except UnicodeDecodeError:
        line = _undecodable_line(handle.buffer)
        raise ProcessingError(
            f"{filename} is not a readable UTF-8 CSV file: line {line} holds bytes that are "
            "not UTF-8 text. Save it as UTF-8 (CSV UTF-8 in Excel) and upload it again. "
            "Nothing was changed."
        ) from None
    except csv.Error as exc:
        raise ProcessingError(
            f"{filename} is not a readable CSV file (line {reader.line_num}): {exc}. "
            "Nothing was changed."
        ) from None


def _undecodable_line(raw) -> int:
    """The line of the binary file `raw` where it stops being UTF-8: the text layer decodes
    ahead of the CSV reader, so neither knows it."""
    raw.seek(0)
    decoder = codecs.getincrementaldecoder("utf-8")()
    line = 1
    while chunk := raw.read(1024 * 1024):
        carried = len(decoder.getstate()[0])  # the start of a character cut by the last read
        try:
            decoder.decode(chunk)
        except UnicodeDecodeError as exc:
            return line + chunk.count(b"\n", 0, max(exc.start - carried, 0))
        line += chunk.count(b"\n")
    return line


class Keys:
    """The keys of the rows seen so far: a record appears once in a file, and a row that
    repeats a key fails, in whichever batch it comes."""

    def __init__(self, processor: Processor, header: list[str]):
        columns = [column.strip() for column in header]
        self.width = len(columns)
        self.names = ", ".join(processor.key_columns)
        self.indexes = [columns.index(name) for name in processor.key_columns]
        self.seen = set()

    def repeated(self, values: list[str]) -> str:
        """Why the row `values` fails as a repetition ("" when it does not)."""
        if not self.indexes or len(values) != self.width:
            return ""
        key = ", ".join(restored(values[index].strip()) for index in self.indexes)
        if not key.strip(", "):
            return ""
        if key in self.seen:
            return f"{self.names} {key!r} appears more than once in the file."
        self.seen.add(key)
        return ""

    def skip(self, records, reader, line: int) -> None:
        """Read on to `line` of the file, noting the keys of the rows passed."""
        while reader.line_num < line:
            values = next(records, None)
            if values is None:
                return
            if values:
                self.repeated(values)


def batches(records, reader, size: int) -> Iterable[list[tuple[int, list[str]]]]:
    """(line where the row starts, values) of the non-empty rows, `size` at a time."""
    batch = []
    line = reader.line_num + 1
    for values in records:
        if values:
            batch.append((line, values))
        line = reader.line_num + 1
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch
