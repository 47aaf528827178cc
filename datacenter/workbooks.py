"""Workbooks (``.xlsx``, ``.xls``, ``.ods``) turned into CSV, and records written as ``.xlsx``.

A workbook's first sheet is read with python-calamine (Rust's calamine), which reads all three
formats. Calamine loads a sheet whole, as a dense range from its first to its last cell, so a
workbook of a few kilobytes can ask for gigabytes (one cell in A1 and one in XFD1048576). A
web process must not pay for that: `convert_in_child` reads the workbook in a child process
whose memory and CPU time are capped, and whose memory is given back when it ends. Its cells
come out as a person sees them: dates ``YYYY-MM-DD`` (a date-time with its time), whole
numbers without ``.0``, text as typed (leading zeros kept; a text that a spreadsheet would run
as a formula behind one ``'``, see `datacenter.formulas`), booleans ``1``/``0``, formulas as
their cached values. Rows that are empty throughout are left out.

Run as ``python -m datacenter.workbooks WORKBOOK ENDING CSV MAX_CELLS``, it is that child: it
needs no Django.
"""

import csv
import datetime
import json
import os
import resource
import subprocess
import sys
import tempfile
from dataclasses import dataclass

from .formulas import neutralised

#: What each workbook ending is, in words.
KINDS = {
    ".xlsx": "Excel workbook",
    ".xls": "Excel 97-2003 workbook",
    ".ods": "OpenDocument spreadsheet",
}
#: The child's limits: address space (bytes), CPU seconds, and the clock (seconds).
MEMORY_LIMIT = 2 * 1024**3
CPU_SECONDS = 120
WALL_SECONDS = 300
#: The most cells (rows times columns, empty ones included) a sheet may span.
MAX_CELLS = 5_000_000
#: Exit status of the child for a workbook it refused, with the reason on standard error.
REFUSED = 3


class WorkbookError(ValueError):
    """A workbook that cannot be read; the message is meant for staff."""


@dataclass
class Sheet:
    """What was read: the sheet's name and how many sheets the workbook has."""

    name: str
    sheets: int

    def describe(self, kind: str) -> str:
        others = f" (the first of {self.sheets} sheets)" if self.sheets > 1 else ""
        return f"converted from {kind}, sheet '{self.name}'{others}"


def is_workbook(filename: str) -> bool:
    return os.path.splitext(filename)[1].lower() in KINDS


def kind_of(filename: str) -> str:
    return KINDS[os.path.splitext(filename)[1].lower()]


def convert_in_child(
    workbook: str, target: str, *, ending: str, max_cells: int = MAX_CELLS
) -> Sheet:
    """Write the first sheet of `workbook`, a workbook of the kind its name would end in
    with `ending` (``.xlsx``, ...), to the CSV file `target` in a capped child process;
    raise WorkbookError in words when it cannot be read or is too large."""
    command = [sys.executable, "-m", "datacenter.workbooks", workbook, ending, target]
    command.append(str(max_cells))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        child = subprocess.run(
            command,
            cwd=root,
            env={**os.environ, "RUST_BACKTRACE": "0"},
            capture_output=True,
            text=True,
            timeout=WALL_SECONDS,
        )
    except subprocess.TimeoutExpired:
        raise WorkbookError(_too_large(max_cells)) from None
    if child.returncode == REFUSED:
        raise WorkbookError(child.stderr.strip())
    if child.returncode != 0:
        # Killed at a limit (memory, CPU time) or died: in any case too much to read.
        raise WorkbookError(_too_large(max_cells))
    return Sheet(**json.loads(child.stdout))


def _too_large(max_cells: int) -> str:
    return (
        f"The workbook is too large to read here: its first sheet must span at most "
        f"{max_cells:,} cells. Delete empty rows and columns at its end, or save it as CSV."
    )


def convert(workbook: str, target: str, max_cells: int = MAX_CELLS) -> Sheet:
    """Write the first visible sheet of `workbook` to the CSV file `target` (UTF-8, comma,
    ``\\n``); raise WorkbookError in words for a workbook that cannot be read."""
    import python_calamine

    try:
        book = python_calamine.CalamineWorkbook.from_path(workbook)
        sheets = [
            s for s in book.sheets_metadata if s.typ == python_calamine.SheetTypeEnum.WorkSheet
        ]
        shown = python_calamine.SheetVisibleEnum.Visible
        visible = [s for s in sheets if s.visible == shown] or sheets
        if not visible:
            raise WorkbookError("The workbook has no worksheet.")
        sheet = book.get_sheet_by_name(visible[0].name)
    except python_calamine.PasswordError:
        raise WorkbookError(
            "The workbook is protected by a password. Save it without the password (or "
            "as CSV) and upload it again."
        ) from None
    except python_calamine.CalamineError as exc:
        raise WorkbookError(
            f"The workbook cannot be read: it is damaged or no workbook ({_reason(exc)})."
        ) from None
    if sheet.height * sheet.width > max_cells:
        raise WorkbookError(_too_large(max_cells))
    with open(target, "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        for row in sheet.iter_rows():
            cells = [cell_text(value) for value in row]
            if any(cells):
                writer.writerow(cells)
    return Sheet(name=sheet.name, sheets=len(sheets))


def _reason(exc: Exception) -> str:
    text = str(exc).strip().rstrip(".") or type(exc).__name__
    return text[:200]


def cell_text(value) -> str:
    """A cell as a person sees it in the sheet."""
    if isinstance(value, str):
        return neutralised(value)
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, float):
        if value.is_integer() and abs(value) < 1e15:
            return str(int(value))
        return format(value, ".15g")  # the digits a spreadsheet shows
    if isinstance(value, datetime.datetime):
        if value.time() == datetime.time():
            return value.date().isoformat()
        return value.isoformat(sep=" ", timespec="seconds")
    if isinstance(value, datetime.date | datetime.time):
        return value.isoformat()
    if value is None:
        return ""
    return str(value)


def write_xlsx(path: str, title: str, header: list[str], text: list[bool], records) -> int:
    """Write `header` and the rows `records` (lists of text) to the workbook `path`, one
    sheet called `title`, in constant memory (a row at a time); return the number of rows.
    Columns whose `text` is true are text columns and hold text cells; in the others, a
    whole number is written as a number. A cell is never taken for a formula or a link."""
    import xlsxwriter

    options = {
        "constant_memory": True,
        "strings_to_numbers": False,
        "strings_to_formulas": False,
        "strings_to_urls": False,
    }
    book = xlsxwriter.Workbook(path, options)
    try:
        sheet = book.add_worksheet(title[:31])
        bold = book.add_format({"bold": True, "bottom": 1})
        as_text = book.add_format({"num_format": "@"})
        for column, is_text in enumerate(text):
            sheet.set_column(column, column, 18, as_text if is_text else None)
        sheet.write_row(0, 0, header, bold)
        sheet.freeze_panes(1, 0)
        count = 0
        for count, row in enumerate(records, start=1):
            for column, value in enumerate(row):
                if not value:
                    continue
                if not text[column] and _whole_number(value):
                    sheet.write_number(count, column, int(value))
                else:
                    sheet.write_string(count, column, value, as_text if text[column] else None)
        sheet.autofilter(0, 0, count, len(header) - 1)
    finally:
        book.close()
    return count


def _whole_number(value: str) -> bool:
    """Whether `value` is a whole number as a spreadsheet writes it (no leading zero, which a
    number would lose)."""
    digits = value.removeprefix("-")
    if value == "0":
        return True
    return digits.isascii() and digits.isdigit() and len(digits) < 16 and digits[0] != "0"


def _child(argv: list[str]) -> int:
    workbook, ending, target, max_cells = argv[0], argv[1], argv[2], int(argv[3])
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
    resource.setrlimit(resource.RLIMIT_CPU, (CPU_SECONDS, CPU_SECONDS))
    try:
        # Calamine tells the formats apart by the name's ending (an encrypted workbook has
        # no other sign of being one): the file is read under a name that has it.
        with tempfile.TemporaryDirectory() as folder:
            named = os.path.join(folder, f"workbook{ending}")
            os.symlink(os.path.abspath(workbook), named)
            sheet = convert(named, target, max_cells)
    except WorkbookError as exc:
        print(exc, file=sys.stderr)
        return REFUSED
    print(json.dumps({"name": sheet.name, "sheets": sheet.sheets}))
    return 0


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1:]))
