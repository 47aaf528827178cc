"""Batch processing: applying a pending CSV file row by row through a processor.

`process_file` runs a pending file through a processor (see `datacenter.processors`) inside
one database transaction, in batches with one lookup per batch; a row that fails is rolled
back to its own savepoint and written, with its error, to the new pending file, while the
good rows are kept. Only after the transaction committed are the result files distributed.
"""

import csv
import os
import re
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from django.conf import settings
from django.db import transaction
from django.utils.module_loading import import_string

from .files import lock_open_file, sha256_of
from .formulas import restored

# The processors, re-exported: DESIGN.md names them as parts of this module.
from .processors import (  # noqa: F401
    DELETE_MARKER,
    IGNORE_MARKER,
    Change,
    ModelProcessor,
    Processor,
    RowError,
    UserProcessor,
)
from .storage import DataCenter, DataCenterFile, Distribution

MODES = ("create", "update", "remove")
ERROR_COLUMN = "--ERRORS--"
PENDING_NAME = re.compile(r"\.(?P<mode>create|update|remove)\.pending\.csv$")


class ProcessingError(ValueError):
    """A file that cannot be processed; the message is meant for staff."""


class FileBusy(ProcessingError):
    """Somebody else is processing the file right now."""


#: How many changes of a dry run are kept to be shown (all are counted).
CHANGES_KEPT = 5000


@dataclass
class ProcessResult:
    total: int = 0
    succeeded: int = 0
    failed: int = 0
    finished_file: str | None = None
    pending_file: str | None = None
    #: (line of the row in the file, message) for each failed row.
    errors: list[tuple[int, str]] = field(default_factory=list)
    seconds: float = 0.0
    #: Of a dry run: the first CHANGES_KEPT changes, and how many rows do what.
    changes: list[Change] = field(default_factory=list)
    change_counts: dict[str, int] = field(default_factory=dict)
    #: The SHA-256 of the file as it was processed (or checked by a dry run).
    sha256: str = ""
    #: Of a run: the line where each failed row of `errors` starts in the pending file, as
    #: the row editor shows it.
    pending_lines: list[int] = field(default_factory=list)
    next_pending_line: int = 2


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


def mode_of_pending_file(filename: str) -> str | None:
    """The mode a ``NAME.MODE.pending.csv`` file must be processed in, if it is one."""
    match = PENDING_NAME.search(filename)
    return match["mode"] if match else None


# Registered processors


def processors() -> dict[str, Processor]:
    """The processors of settings.DATACENTER_PROCESSORS, by name."""
    registered = {}
    for path in settings.DATACENTER_PROCESSORS:
        processor = import_string(path)()
        registered[processor.name] = processor
    return registered


def get_processor(name: str) -> Processor:
    try:
        return processors()[name]
    except KeyError:
        raise ProcessingError(f"There is no processor named {name!r}.") from None


# Processing a file


def process_file(
    datacenter: DataCenter,
    filename: str,
    processor: Processor | str,
    mode: str,
    *,
    user=None,
    dry_run: bool = False,
    progress: Callable[[int], None] | None = None,
    output_dir: str | None = None,
    on_commit: Callable[[ProcessResult, Distribution], None] | None = None,
    expected_sha256: str = "",
) -> ProcessResult:
    """Process the pending file `filename` with `processor` in `mode` and distribute the
    results (see DataCenter.dist_processed_files).

    With `dry_run`, everything runs in a transaction that is rolled back and no file is
    written or moved: the result tells which rows would fail. Raises ProcessingError (FileBusy
    while somebody else processes the file) and FileNotFoundError for a missing file.

    `progress(rows)` is called after each batch. The outputs are written to `output_dir`
    (a new temporary folder by default), which is removed at the end unless the rows were
    committed and distributing them failed. `on_commit(result,
    plan)` is called inside the transaction of the rows, just before it commits, with the
    plan of the distribution, so that a caller can record in the same commit that the
    results are ready to distribute (and replay the plan if the process dies).

    With `expected_sha256` (that of a dry run), the file is processed only if it is still
    the one the dry run checked; ProcessingError if it changed.
    """
    processor, source = _allowed(datacenter, filename, processor, mode, user)
    started = time.monotonic()
    with open(source.path, encoding="utf-8-sig", newline="") as handle, _claimed(handle, source):
        # Under the lock, so that the file checked is the file processed.
        sha256 = _checked_sha256(handle, expected_sha256) if dry_run or expected_sha256 else ""
        reader = csv.reader(handle)
        records = _records(reader, filename)
        header = next(records, None) or []
        problems = check_header(processor, header, mode) if header else ["The file is empty."]
        if problems:
            raise ProcessingError(" ".join(problems))
        if dry_run:
            output_dir = None
        elif output_dir:
            os.makedirs(output_dir, exist_ok=True)
        else:
            output_dir = tempfile.mkdtemp(prefix="datacenter-")
        committed = distributed = False
        try:
            with transaction.atomic():
                result = _process_rows(
                    records, reader, header, processor, mode, output_dir, progress, dry_run
                )
                result.sha256 = sha256
                if dry_run:
                    transaction.set_rollback(True)
                else:
                    plan = datacenter.plan_distribution(
                        result.failed == 0, source.path, result.pending_file is not None, mode
                    )
                    if on_commit:
                        on_commit(result, plan)
            result.seconds = time.monotonic() - started
            if dry_run:
                return result
            committed = True
            plan.apply(result.finished_file, result.pending_file)
            distributed = True
            result.finished_file, result.pending_file = plan.finished_result, plan.pending_result
        finally:
            # Committed rows whose distribution failed keep their outputs, to finish it.
            if output_dir and os.path.isdir(output_dir) and distributed == committed:
                shutil.rmtree(output_dir)
    datacenter.log_action(
        user,
        "processed",
        f"{filename}, {mode} mode, {result.total} lines "
        f"({result.succeeded} successful / {result.failed} failed), {result.seconds:.3f} s",
    )
    return result


def check_processing(
    datacenter: DataCenter,
    filename: str,
    processor: Processor | str,
    mode: str,
    user=None,
    expected_sha256: str = "",
) -> DataCenterFile:
    """Return the file, or raise ProcessingError (FileNotFoundError for a missing file) for
    what would stop process_file at once: a mode, a processor, a permission or a header row
    that does not fit, or a file that changed after its dry run, so that a request is
    refused before it is queued."""
    processor, source = _allowed(datacenter, filename, processor, mode, user)
    with open(source.path, encoding="utf-8-sig", newline="") as handle:
        if expected_sha256:
            _checked_sha256(handle, expected_sha256)
        reader = csv.reader(handle)
        header = next(_records(reader, filename), None) or []
    problems = check_header(processor, header, mode) if header else ["The file is empty."]
    if problems:
        raise ProcessingError(" ".join(problems))
    return source


def _allowed(datacenter, filename, processor, mode, user):
    """The processor acting for `user` and the source file, if `user` may do this."""
    if isinstance(processor, str):
        processor = get_processor(processor)
    if mode not in MODES:
        raise ProcessingError(f"Unknown mode {mode!r}: choose one of {', '.join(MODES)}.")
    processor = processor.for_user(user)
    permission = processor.permission(mode)
    if user is not None and permission and not user.has_perm(permission):
        raise ProcessingError(
            f"You may not {mode} records with {processor.title}: that needs the permission "
            f"{permission}."
        )
    required_mode = mode_of_pending_file(filename)
    if required_mode and mode != required_mode:
        raise ProcessingError(f"{filename} holds rows that failed in {required_mode} mode.")
    return processor, datacenter.get_file(filename)


@contextmanager
def _claimed(handle, source) -> Iterator[None]:
    """Hold an exclusive lock on the open file for the whole run.

    A file that was replaced or moved meanwhile has been processed by somebody else.
    """
    try:
        same_file = lock_open_file(handle, source.path)
    except BlockingIOError:
        raise FileBusy(
            f"{source.name} is being processed by somebody else right now. "
            "Look at the pending and finished files when that run has ended."
        ) from None
    if not same_file:
        raise ProcessingError(f"{source.name} has been processed by somebody else meanwhile.")
    yield


def _checked_sha256(handle, expected: str) -> str:
    """The SHA-256 of the open file; ProcessingError when it is not `expected` (if given)."""
    sha256 = sha256_of(handle.fileno())
    if expected and sha256 != expected:
        raise ProcessingError(
            "The file changed after its dry run; check it again. Nothing was processed."
        )
    return sha256


def _records(reader, filename: str) -> Iterator[list[str]]:
    """The records of `reader`; a file that is no UTF-8 CSV raises ProcessingError."""
    try:
        yield from reader
    except (UnicodeDecodeError, csv.Error) as exc:
        raise ProcessingError(
            f"{filename} is not a readable UTF-8 CSV file (near line {reader.line_num}): "
            f"{exc}. Nothing was changed."
        ) from None


def _process_rows(records, reader, header, processor, mode, output_dir, progress, describe):
    result = ProcessResult()
    columns = [column.strip() for column in header]
    keep = [index for index, column in enumerate(columns) if column != ERROR_COLUMN]
    output_columns = [header[index] for index in keep]
    with _writers(output_dir, output_columns) as (finished, pending):
        for batch in _batches(records, reader, processor.batch_size):
            well_formed = [values for _, values in batch if len(values) == len(columns)]
            rows = [
                {columns[i]: restored(values[i].strip()) for i in keep} for values in well_formed
            ]
            changes = {} if describe else None
            errors = processor.apply_batch(rows, mode, changes) if rows else {}
            good, index = [], 0
            for line, values in batch:
                if len(values) != len(columns):
                    message = (
                        f"The row has {counted(len(values), 'field')}, but the header has "
                        f"{counted(len(columns), 'column')}."
                    )
                    _fail(result, pending, values, line, message)
                    continue
                if index in errors:
                    _fail(result, pending, [values[i] for i in keep], line, errors[index])
                else:
                    good.append([values[i] for i in keep])
                    if changes is not None:
                        _count_change(result, changes.get(index) or Change(0, mode, ""), line)
                index += 1
            result.succeeded += len(good)
            result.total += len(batch)
            if finished:
                finished.writerows(good)
            if progress:
                progress(result.total)
    if output_dir:
        result.finished_file = os.path.join(output_dir, "finished.csv")
        if result.failed:
            result.pending_file = os.path.join(output_dir, "pending.csv")
    return result


def _count_change(result: ProcessResult, change: Change, line: int) -> None:
    result.change_counts[change.action] = result.change_counts.get(change.action, 0) + 1
    if change.action != "unchanged" and len(result.changes) < CHANGES_KEPT:
        change.line = line
        result.changes.append(change)


def _fail(result, pending, cells, line, message) -> None:
    result.failed += 1
    result.errors.append((line, message))
    if pending:
        row = [*cells, message]
        result.pending_lines.append(result.next_pending_line)
        pending.writerow(row)
        # A cell may hold line breaks: the next record starts after them.
        result.next_pending_line += 1 + sum(cell.count("\n") for cell in row)


@contextmanager
def _writers(output_dir, columns):
    if output_dir is None:
        yield None, None
        return
    with (
        open(os.path.join(output_dir, "finished.csv"), "w", encoding="utf-8", newline="") as f,
        open(os.path.join(output_dir, "pending.csv"), "w", encoding="utf-8", newline="") as p,
    ):
        finished, pending = csv.writer(f), csv.writer(p)
        finished.writerow(columns)
        pending.writerow([*columns, ERROR_COLUMN])
        yield finished, pending


def _batches(records, reader, size: int) -> Iterable[list[tuple[int, list[str]]]]:
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
