"""Batch processing: applying a pending CSV file row by row through a processor.

`process_file` runs a pending file through a processor (see `datacenter.processors`) in
batches, each with one lookup and committed in a transaction of its own together with the
position reached (so that a run whose process died resumes there); a row that fails is
rolled back to its own savepoint and written, with its error, to the new pending file, while
the good rows are kept. After the last batch the result files are distributed. Reading the
file (its header, records, batches and repeated keys) is `datacenter.reading`'s.
"""

import csv
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

from django.conf import settings
from django.db import transaction
from django.utils.module_loading import import_string

from .accounts import UserProcessor  # noqa: F401 (re-exported: DESIGN.md names it here)
from .files import lock_open_file, sha256_of
from .formulas import restored
from .processors import (  # noqa: F401 (re-exported, as UserProcessor)
    DELETE_MARKER,
    IGNORE_MARKER,
    Change,
    ModelProcessor,
    Processor,
    RowError,
)
from .reading import (
    ERROR_COLUMN,
    Keys,
    ProcessingError,
    batches,
    checked_header,
    counted,
    read_records,
)
from .storage import DataCenter, DataCenterFile, Distribution

MODES = ("create", "update", "remove")
PENDING_NAME = re.compile(r"\.(?P<mode>create|update|remove)\.pending\.csv$")


class FileBusy(ProcessingError):
    """Somebody else is processing the file right now."""


class FileChanged(ProcessingError):
    """The file of a run to resume is no longer the file it began."""


#: How many changes of a dry run are kept to be shown (all are counted).
CHANGES_KEPT = 5000
#: How many failed rows a position keeps, to be shown (all are in the pending file).
ERRORS_KEPT = 1000


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


@dataclass
class Position:
    """Where a run stands after its last committed batch: what `resume` needs to go on.

    `line` counts the lines of the file read so far, the header's included; the lengths are
    those of the output files in bytes; `errors` and `pending_lines` keep the first
    ERRORS_KEPT failed rows.
    """

    line: int = 1
    total: int = 0
    succeeded: int = 0
    failed: int = 0
    finished_length: int = 0
    pending_length: int = 0
    next_pending_line: int = 2
    errors: list = field(default_factory=list)
    pending_lines: list = field(default_factory=list)
    #: The file's SHA-256: a run resumes only on the very file it began.
    sha256: str = ""

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Position":
        return cls(**data)


class ProcessingStopped(ProcessingError):
    """Processing stopped half-way for a reason outside the file (the database, the disk):
    the rows up to `position` are committed, and their outputs are kept in the output folder
    to resume from there."""

    def __init__(self, message: str, position: Position):
        super().__init__(message)
        self.position = position


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
    checkpoint: Callable[[Position], None] | None = None,
    resume: Position | None = None,
) -> ProcessResult:
    """Process the pending file `filename` with `processor` in `mode` and distribute the
    results (see DataCenter.dist_processed_files).

    The rows are applied a batch at a time, each batch in a transaction of its own, so that
    no other writer waits long behind a large file. The whole file is read once before the
    first batch: a file that is no readable CSV changes nothing. A key that appears twice
    in the file fails the second time, wherever the batches end. With `dry_run`, each
    batch is rolled back and no file is written or moved: the result tells which rows would
    fail. Raises ProcessingError (FileBusy while somebody else processes the file) and
    FileNotFoundError for a missing file.

    `progress(rows)` is called after each batch. The outputs are written to `output_dir`
    (the caller's, kept; by default a temporary folder, removed unless it holds the outputs
    of committed rows that were not distributed). `checkpoint(position)` is called inside
    the transaction of each batch, after the batch's outputs are on disk, so that a caller
    records the position in the commit of the rows; `resume`, such a position with the same
    `output_dir`, goes on after it, the outputs cut back to the lengths it recorded. A
    failure (of the database, say, or the disk) after rows were committed raises
    ProcessingStopped.
    `on_commit(result, plan)` is called in a transaction after the last batch, with the plan
    of the distribution, so that a caller records that the results are ready to distribute
    (and replays the plan if the process dies).

    The SHA-256 of the file is computed under its lock (`result.sha256`). With
    `expected_sha256` (that of a dry run, or of the run resumed) the file is processed only
    if it is still that file: ProcessingError if it changed.
    """
    processor, source = _allowed(datacenter, filename, processor, mode, user)
    started = time.monotonic()
    with open(source.path, encoding="utf-8-sig", newline="") as handle, _claimed(handle, source):
        # Under the lock, so that the file checked is the file processed.
        if resume:
            expected_sha256 = resume.sha256
        sha256 = _checked_sha256(handle, expected_sha256, resumed=resume is not None)
        header = checked_header(handle, filename, processor, mode, whole=not dry_run)
        reader = csv.reader(handle)
        records = read_records(reader, filename, handle)
        next(records)
        keys = Keys(processor, header)
        if resume:
            keys.skip(records, reader, resume.line)
        own_folder = output_dir is None and not dry_run
        if own_folder:
            output_dir = tempfile.mkdtemp(prefix="datacenter-")
        elif dry_run:
            output_dir = None
        run = _Run(processor, mode, header, keys, output_dir, resume, sha256)
        distributed = False
        try:
            with run.outputs():
                for batch in batches(records, reader, processor.batch_size):
                    run.apply(batch, reader.line_num, checkpoint)
                    if progress:
                        progress(run.result.total)
            result = run.result
            result.sha256 = sha256
            result.seconds = time.monotonic() - started
            if dry_run:
                return result
            plan = datacenter.plan_distribution(
                result.failed == 0, source.path, result.pending_file is not None, mode
            )
            if on_commit:
                with transaction.atomic():
                    on_commit(result, plan)
            plan.apply(result.finished_file, result.pending_file)
            distributed = True
            result.finished_file, result.pending_file = plan.finished_result, plan.pending_result
        except Exception as exc:
            if not run.position.total or distributed or isinstance(exc, ProcessingError):
                raise
            raise ProcessingStopped(
                f"Processing {filename} stopped after line {run.position.line}: {exc}. The "
                f"rows up to there are applied; their outputs are kept in {output_dir}.",
                run.position,
            ) from exc
        finally:
            if own_folder and (distributed or not run.position.total):
                shutil.rmtree(output_dir, ignore_errors=True)
    resumed = f", resumed after line {resume.line}" if resume else ""
    datacenter.log_action(
        user,
        "processed",
        f"{filename}, {mode} mode, {result.total} lines "
        f"({result.succeeded} successful / {result.failed} failed), {result.seconds:.3f} s"
        f"{resumed}",
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
        checked_header(handle, filename, processor, mode, whole=False)
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


def _checked_sha256(handle, expected: str, resumed: bool = False) -> str:
    """The SHA-256 of the open file; ProcessingError when it is not `expected` (if given)."""
    sha256 = sha256_of(handle.fileno())
    if expected and sha256 != expected:
        if resumed:
            raise FileChanged(
                "The file changed while its processing was stopped, so the job cannot go on."
            )
        raise ProcessingError(
            "The file changed after its dry run; check it again. Nothing was processed."
        )
    return sha256


class _Run:
    """One run through a file: its outputs, its result and its committed position."""

    def __init__(self, processor, mode, header, keys, output_dir, resume, sha256: str):
        self.processor, self.mode, self.keys, self.output_dir = processor, mode, keys, output_dir
        self.columns = [column.strip() for column in header]
        self.keep = [index for index, column in enumerate(self.columns) if column != ERROR_COLUMN]
        self.output_columns = [header[index] for index in self.keep]
        # A resumed run's file was checked against the position's SHA-256.
        self.resume = resume
        self.position = resume or Position(sha256=sha256)
        p = self.position
        self.result = ProcessResult(
            total=p.total,
            succeeded=p.succeeded,
            failed=p.failed,
            errors=list(p.errors),
            pending_lines=list(p.pending_lines),
            next_pending_line=p.next_pending_line,
        )
        self.finished = self.pending = None

    @contextmanager
    def outputs(self) -> Iterator[None]:
        if self.output_dir is None:
            yield
            return
        os.makedirs(self.output_dir, exist_ok=True)
        paths = output_paths(self.output_dir)
        if self.resume:
            cut_back(self.output_dir, self.resume)
        mode = "a" if self.resume else "w"
        with (
            open(paths[0], mode, encoding="utf-8", newline="") as finished,
            open(paths[1], mode, encoding="utf-8", newline="") as pending,
        ):
            self.finished, self.pending = finished, pending
            if not self.resume:
                csv.writer(finished).writerow(self.output_columns)
                csv.writer(pending).writerow([*self.output_columns, ERROR_COLUMN])
            yield
        self.result.finished_file = paths[0]
        if self.result.failed:
            self.result.pending_file = paths[1]

    def apply(self, batch, line: int, checkpoint) -> None:
        """Apply the rows of `batch` (which ends at `line`) in one transaction, with their
        outputs and position; a dry run's transaction is rolled back."""
        result, columns, keep = self.result, self.columns, self.keep
        counts = (result.total, result.succeeded, result.failed, result.next_pending_line)
        errors_before = len(result.errors)
        failed, good, rows, positions = [], [], [], []
        for index, (_, values) in enumerate(batch):
            if len(values) != len(columns):
                failed.append(
                    (
                        index,
                        values,
                        f"The row has {counted(len(values), 'field')}, but the header has "
                        f"{counted(len(columns), 'column')}.",
                    )
                )
            elif repeated := self.keys.repeated(values):
                failed.append((index, [values[i] for i in keep], repeated))
            else:
                rows.append({columns[i]: restored(values[i].strip()) for i in keep})
                positions.append(index)
        dry_run = self.output_dir is None
        changes = {} if dry_run else None
        # Planning only reads: the transaction, and so the database's write lock, is held
        # for the writing alone.
        plan = self.processor.plan_batch(rows, self.mode, changes) if rows else None
        try:
            with transaction.atomic():
                errors = self.processor.write_batch(plan, self.mode, changes) if rows else {}
                for number, index in enumerate(positions):
                    values = [batch[index][1][i] for i in keep]
                    if number in errors:
                        failed.append((index, values, errors[number]))
                    else:
                        good.append(values)
                        if changes is not None:
                            change = changes.get(number) or Change(0, self.mode, "")
                            _count_change(result, change, batch[index][0])
                failed.sort(key=lambda failure: failure[0])
                pending = csv.writer(self.pending) if self.pending else None
                for index, cells, message in failed:
                    _fail(result, pending, cells, batch[index][0], message)
                result.succeeded += len(good)
                result.total += len(batch)
                if dry_run:
                    transaction.set_rollback(True)
                    return
                csv.writer(self.finished).writerows(good)
                position = self._position(line)
                if checkpoint:
                    checkpoint(position)
        except BaseException:
            result.total, result.succeeded, result.failed, result.next_pending_line = counts
            del result.errors[errors_before:]
            del result.pending_lines[errors_before:]
            raise
        self.position = position

    def _position(self, line: int) -> Position:
        """The position after the rows written, which are first made durable."""
        lengths = []
        for output in (self.finished, self.pending):
            output.flush()
            os.fdatasync(output.fileno())
            lengths.append(os.fstat(output.fileno()).st_size)
        result = self.result
        return Position(
            line=line,
            total=result.total,
            succeeded=result.succeeded,
            failed=result.failed,
            finished_length=lengths[0],
            pending_length=lengths[1],
            next_pending_line=result.next_pending_line,
            errors=result.errors[:ERRORS_KEPT],
            pending_lines=result.pending_lines[:ERRORS_KEPT],
            sha256=self.position.sha256,
        )


def output_paths(output_dir: str) -> list[str]:
    """The finished and the pending output file of a run."""
    return [os.path.join(output_dir, name) for name in ("finished.csv", "pending.csv")]


def cut_back(output_dir: str, position: Position) -> None:
    """Cut the outputs back to their lengths at `position`: what was written after the last
    commit belongs to rows that were rolled back."""
    finished, pending = output_paths(output_dir)
    os.truncate(finished, position.finished_length)
    os.truncate(pending, position.pending_length)


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
