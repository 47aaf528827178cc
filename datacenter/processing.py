"""Batch processing: applying a pending CSV file row by row, and the processors that do it.

A processor knows one kind of record: its columns, its key and how to create, update or remove
one record from a row. `process_file` runs a pending file through a processor inside one
database transaction, in batches with one lookup per batch; a row that fails is rolled back to
its own savepoint and written, with its error, to the new pending file, while the good rows
are kept. Only after the transaction committed are the result files distributed.
"""

import copy
import csv
import os
import re
import secrets
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.hashers import UNUSABLE_PASSWORD_PREFIX, identify_hasher
from django.core.exceptions import ValidationError
from django.db import DatabaseError, connections, models, router, transaction
from django.utils.module_loading import import_string

from .storage import DataCenter, DataCenterFile, Distribution, lock_open_file

MODES = ("create", "update", "remove")
ERROR_COLUMN = "--ERRORS--"
#: A cell holding this marker leaves the value as it is (the same as an empty cell).
IGNORE_MARKER = "<IGNORE>"
#: A cell holding this marker clears the value in update mode.
DELETE_MARKER = "<DELETE>"
PENDING_NAME = re.compile(r"\.(?P<mode>create|update|remove)\.pending\.csv$")
TRUE_WORDS = {"1", "true", "yes", "y", "on"}
FALSE_WORDS = {"0", "false", "no", "n", "off"}


class ProcessingError(ValueError):
    """A file that cannot be processed; the message is meant for staff."""


class FileBusy(ProcessingError):
    """Somebody else is processing the file right now."""


class RowError(ValueError):
    """One row that cannot be applied; the message is written to its ``--ERRORS--`` cell."""


#: How many changes of a dry run are kept to be shown (all are counted).
CHANGES_KEPT = 5000


@dataclass
class Change:
    """What one row would do: create, update, remove, or leave its record unchanged."""

    line: int
    action: str
    key: str
    #: (field, old value, new value) for each value the row changes, as text.
    fields: list[tuple[str, str, str]] = field(default_factory=list)


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


class Processor:
    """Applies rows of one kind of record in a mode; subclasses set the class attributes."""

    name = ""
    title = ""
    #: Every column the processor understands.
    columns: tuple[str, ...] = ()
    #: The columns that identify a record.
    key_columns: tuple[str, ...] = ()
    #: Columns a create row must have besides the key.
    required_for_create: tuple[str, ...] = ()
    batch_size = 1000
    #: Who processes the file (None: a program, no person); see for_user().
    user = None

    def for_user(self, user) -> "Processor":
        """This processor acting for `user`, whose rights some rows depend on."""
        acting = copy.copy(self)
        acting.user = user
        return acting

    def permission(self, mode: str) -> str | None:
        """The permission a user needs to apply rows in `mode`, besides processing files."""
        return None

    def required_columns(self, mode: str) -> tuple[str, ...]:
        if mode == "create":
            return self.key_columns + self.required_for_create
        return self.key_columns

    def hidden_on_export(self) -> set[str]:
        """The columns whose values an export leaves empty for this processor's user."""
        return set()

    def apply_row(self, row: dict[str, str], mode: str) -> None:
        """Apply one row; raise RowError with a message for staff when it cannot be."""
        raise NotImplementedError

    def apply_batch(
        self, rows: list[dict[str, str]], mode: str, changes: dict | None = None
    ) -> dict[int, str]:
        """Apply `rows`, each in its own savepoint; return the errors by index in `rows`.

        Given a dict `changes`, also describe what each row that works does, as a Change
        (without its line) by index in `rows`.
        """
        errors = {}
        for index, row in enumerate(rows):
            try:
                with transaction.atomic():
                    self.apply_row(row, mode)
            except RowError as exc:
                errors[index] = str(exc)
            else:
                if changes is not None:
                    key = ", ".join(row.get(column, "") for column in self.key_columns)
                    changes[index] = Change(0, mode, key)
        return errors


def check_header(processor: Processor, header: list[str], mode: str) -> list[str]:
    """What is wrong with the header row of a file for `processor` in `mode`, in words."""
    columns = [column.strip() for column in header if column.strip() != ERROR_COLUMN]
    problems = []
    duplicates = sorted({column for column in columns if columns.count(column) > 1})
    if duplicates:
        problems.append(f"These columns appear more than once: {', '.join(duplicates)}.")
    missing = [column for column in processor.required_columns(mode) if column not in columns]
    if missing:
        problems.append(f"These columns are required in {mode} mode: {', '.join(missing)}.")
    unknown = [column for column in columns if column not in processor.columns]
    if unknown:
        problems.append(
            f"These columns are unknown to {processor.title}: {', '.join(unknown)}. "
            f"Known columns are {', '.join(processor.columns)}."
        )
    return problems


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
    """
    processor, source = _allowed(datacenter, filename, processor, mode, user)
    started = time.monotonic()
    with open(source.path, encoding="utf-8-sig", newline="") as handle, _claimed(handle, source):
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
    datacenter: DataCenter, filename: str, processor: Processor | str, mode: str, user=None
) -> DataCenterFile:
    """Return the file, or raise ProcessingError (FileNotFoundError for a missing file) for
    what would stop process_file at once: a mode, a processor, a permission or a header row
    that does not fit, so that a request is refused before it is queued."""
    processor, source = _allowed(datacenter, filename, processor, mode, user)
    with open(source.path, encoding="utf-8-sig", newline="") as handle:
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
            rows = [{columns[i]: values[i].strip() for i in keep} for values in well_formed]
            changes = {} if describe else None
            errors = processor.apply_batch(rows, mode, changes) if rows else {}
            good, index = [], 0
            for line, values in batch:
                if len(values) != len(columns):
                    message = (
                        f"The row has {len(values)} fields, but the header has "
                        f"{len(columns)} columns."
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
        pending.writerow([*cells, message])


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


# Processors for Django models


class ModelProcessor(Processor):
    """A processor for a Django model, declared by its key field and the fields it takes.

    Each batch costs one query to find the existing records, one per many-to-many field to
    find the related objects, and one bulk write; when the database refuses the bulk write,
    the batch is written again row by row, each in its own savepoint, to find the bad rows.
    Empty cells and IGNORE_MARKER leave a value as it is (or at its default on create);
    DELETE_MARKER clears it. Many-to-many fields name their objects by the field given in
    `related_by`, several separated by `separator`.
    """

    model: type[models.Model]
    key = ""
    fields: tuple[str, ...] = ()
    related_by: dict[str, str] = {}
    separator = ";"

    def __init__(self):
        self.columns = (self.key, *self.fields)
        self.key_columns = (self.key,)

    def permission(self, mode: str) -> str:
        action = {"create": "add", "update": "change", "remove": "delete"}[mode]
        return f"{self.model._meta.app_label}.{action}_{self.model._meta.model_name}"

    def prepare(self, instance: models.Model, row: dict[str, str], mode: str) -> None:
        """Hook for subclasses: complete `instance` before it is validated."""

    def check_existing(self, instance: models.Model, mode: str) -> None:
        """Hook for subclasses: raise RowError for a record that the row may not update or
        remove."""

    def apply_batch(self, rows, mode, changes=None):
        existing = self.model._default_manager.in_bulk(
            {row[self.key] for row in rows if row[self.key]}, field_name=self.key
        )
        related = self._related_objects(rows)
        if changes is not None:
            old_related = self.related_names(instance.pk for instance in existing.values())
            labels = {
                name: {pk: label for label, pk in ids.items()} for name, ids in related.items()
            }
        errors, planned, seen = {}, [], set()
        for index, row in enumerate(rows):
            try:
                before = _values(existing.get(row[self.key])) if changes is not None else None
                planned.append((index, *self._plan(row, mode, existing, related, seen)))
            except RowError as exc:
                errors[index] = str(exc)
            else:
                if changes is not None:
                    changes[index] = self._change(
                        row, mode, before, planned[-1], labels, old_related
                    )
        try:
            with transaction.atomic():
                self._write(planned, mode)
        except DatabaseError:
            for plan in planned:
                try:
                    with transaction.atomic():
                        self._write([plan], mode)
                except DatabaseError as exc:
                    errors[plan[0]] = f"The database refused the row: {exc}"
        return errors

    #: Fields whose values a dry run does not show, only that they change.
    secret_fields: tuple[str, ...] = ()

    def _change(self, row, mode, before, plan, labels, old_related) -> Change:
        """What a planned row does to its record, field by field."""
        _, instance, changed, many = plan
        key = row[self.key]
        if mode == "remove":
            return Change(0, "remove", key)
        after = _values(instance)
        fields = []
        for attname in changed:
            old, new = (before or {}).get(attname, ""), after[attname]
            if before is None or old != new:
                name = self.model._meta.get_field(attname).name
                if name in self.secret_fields:
                    old, new = ("(set)" if old else ""), "(new value)"
                fields.append((name, old, new))
        for name, ids in many.items():
            new = self.separator.join(sorted(labels[name][pk] for pk in ids))
            old = self.separator.join(sorted(old_related.get(name, {}).get(instance.pk, [])))
            if before is None and new or before is not None and old != new:
                fields.append((name, old, new))
        if mode == "create":
            return Change(0, "create", key, fields)
        return Change(0, "update" if fields else "unchanged", key, fields)

    def related_names(self, pks) -> dict[str, dict[int, list[str]]]:
        """The names of the related objects of the records `pks`, by field and record: one
        query per many-to-many field."""
        current = {}
        for name, attribute in self.related_by.items():
            field = self.model._meta.get_field(name)
            source = f"{field.m2m_field_name()}_id"
            pairs = field.remote_field.through.objects.filter(
                **{f"{source}__in": list(pks)}
            ).values_list(source, f"{field.m2m_reverse_field_name()}__{attribute}")
            current[name] = {}
            for pk, label in pairs:
                current[name].setdefault(pk, []).append(str(label))
        return current

    def _plan(self, row, mode, existing, related, seen):
        """Check one row and return the instance to write, its fields and many-to-many ids."""
        key = row[self.key]
        if not key:
            raise RowError(f"The key column {self.key} is empty.")
        if key in seen:
            raise RowError(f"{self.key} {key!r} appears more than once in the file.")
        seen.add(key)
        instance = existing.get(key)
        if mode == "create" and instance is not None:
            raise RowError(f"{self.key} {key!r} exists already.")
        if mode != "create" and instance is None:
            raise RowError(f"There is no record with {self.key} {key!r}.")
        refused, before = None, None
        if instance is not None:
            try:
                self.check_existing(instance, mode)
            except RowError as exc:
                if mode != "update":
                    raise
                # A row that changes nothing (a record as exported) may pass.
                refused, before = exc, _values(instance)
        if mode == "remove":
            return instance, [], {}
        if instance is None:
            instance = self.model(**{self.key: key})
        changed, many = self._assign(instance, row, related)
        if refused and self._changes_record(instance, before, changed, many):
            raise refused
        self.prepare(instance, row, mode)
        exclude = set(self.related_by)
        if mode == "update":
            # Only what the row changes is checked: old data is not the row's fault.
            exclude |= {f.name for f in self.model._meta.fields if f.attname not in changed}
        try:
            instance.full_clean(exclude=exclude, validate_unique=False, validate_constraints=False)
        except ValidationError as exc:
            raise RowError(_validation_message(exc)) from None
        return instance, changed, many

    def _changes_record(self, instance, before, changed, many) -> bool:
        """Whether assigning a row changed a value of the existing `instance`."""
        after = _values(instance)
        if any(before[attname] != after[attname] for attname in changed):
            return True
        for name, ids in many.items():
            field = self.model._meta.get_field(name)
            current = field.remote_field.through.objects.filter(
                **{f"{field.m2m_field_name()}_id": instance.pk}
            ).values_list(f"{field.m2m_reverse_field_name()}_id", flat=True)
            if sorted(current) != ids:
                return True
        return False

    def _assign(self, instance, row, related):
        changed, many = [], {}
        for name in self.fields:
            value = row.get(name, "")
            if value in ("", IGNORE_MARKER):
                continue
            field = self.model._meta.get_field(name)
            if field.many_to_many:
                many[name] = [] if value == DELETE_MARKER else self._ids(name, value, related)
            else:
                python = _empty(field) if value == DELETE_MARKER else _to_python(field, value)
                setattr(instance, field.attname, python)
                changed.append(field.attname)
        return changed, many

    def _related_objects(self, rows) -> dict[str, dict[str, int]]:
        related = {}
        for name, attribute in self.related_by.items():
            wanted = {
                part.strip()
                for row in rows
                for part in row.get(name, "").split(self.separator)
                if part.strip()
            }
            model = self.model._meta.get_field(name).related_model
            objects = model._default_manager.filter(**{f"{attribute}__in": wanted})
            related[name] = dict(objects.values_list(attribute, "pk"))
        return related

    def _ids(self, name, value, related) -> list[int]:
        names = [part.strip() for part in value.split(self.separator) if part.strip()]
        unknown = [part for part in names if part not in related[name]]
        if unknown:
            raise RowError(f"{name}: unknown {', '.join(unknown)}.")
        return sorted({related[name][part] for part in names})

    def _write(self, planned, mode) -> None:
        manager = self.model._default_manager
        instances = [instance for _, instance, _, _ in planned]
        if not instances:
            return
        if mode == "remove":
            manager.filter(pk__in=[instance.pk for instance in instances]).delete()
            return
        if mode == "create":
            for instance in instances:
                instance.pk = None  # a failed bulk write may have left ids behind
            manager.bulk_create(instances)
        else:
            changed = sorted({name for _, _, fields, _ in planned for name in fields})
            if changed:
                self._update(instances, changed)
        for name in self.related_by:
            self._write_related(
                name, [(i, many[name]) for _, i, _, many in planned if name in many]
            )

    def _update(self, instances, attnames) -> None:
        """UPDATE the columns `attnames` of `instances`: one statement run for each of them.

        QuerySet.bulk_update builds one CASE expression per value, which costs far more
        than the database's own work for batches of this size.
        """
        connection = connections[router.db_for_write(self.model)]
        meta = self.model._meta
        by_attname = {field.attname: field for field in meta.concrete_fields}
        fields = [by_attname[name] for name in attnames]
        quote = connection.ops.quote_name
        assignments = ", ".join(f"{quote(field.column)} = %s" for field in fields)
        sql = f"UPDATE {quote(meta.db_table)} SET {assignments} WHERE {quote(meta.pk.column)} = %s"
        params = [
            [
                field.get_db_prep_save(getattr(instance, field.attname), connection)
                for field in fields
            ]
            + [instance.pk]
            for instance in instances
        ]
        with connection.cursor() as cursor:
            cursor.executemany(sql, params)

    def _write_related(self, name, pairs) -> None:
        field = self.model._meta.get_field(name)
        through = field.remote_field.through
        source, target = f"{field.m2m_field_name()}_id", f"{field.m2m_reverse_field_name()}_id"
        through.objects.filter(**{f"{source}__in": [i.pk for i, _ in pairs]}).delete()
        through.objects.bulk_create(
            through(**{source: instance.pk, target: pk}) for instance, pks in pairs for pk in pks
        )


def _values(instance) -> dict[str, str] | None:
    """The values of the concrete fields of `instance` as shown to staff, by attname."""
    if instance is None:
        return None
    return {
        field.attname: _shown(getattr(instance, field.attname))
        for field in instance._meta.concrete_fields
    }


def _shown(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def _to_python(field, value: str):
    if isinstance(field, models.BooleanField):
        word = value.lower()
        if word in TRUE_WORDS | FALSE_WORDS:
            return word in TRUE_WORDS
        raise RowError(f"{field.name}: {value!r} is neither yes nor no (use 1 or 0).")
    try:
        return field.to_python(value)
    except ValidationError as exc:
        raise RowError(f"{field.name}: {' '.join(exc.messages)}") from None


def _empty(field):
    if field.null:
        return None
    if field.blank and isinstance(field, models.CharField | models.TextField):
        return ""
    raise RowError(f"{field.name} cannot be cleared: it needs a value.")


def _validation_message(exc: ValidationError) -> str:
    if hasattr(exc, "error_dict"):
        return " ".join(
            f"{name}: {' '.join(messages)}" for name, messages in exc.message_dict.items()
        )
    return " ".join(exc.messages)


class UserProcessor(ModelProcessor):
    """User accounts of django.contrib.auth, by username.

    New accounts get an unusable password unless the file gives a hashed one; clear-text
    passwords are refused. Only a superuser's file changes or removes a superuser account
    (a row that changes nothing, as in an export, passes), and only a superuser's export
    holds password hashes.
    """

    name = "users"
    title = "User accounts"
    key = "username"
    fields = ("email", "first_name", "last_name", "is_active", "is_staff", "groups", "password")
    related_by = {"groups": "name"}
    secret_fields = ("password",)

    def __init__(self):
        self.model = get_user_model()
        super().__init__()

    def prepare(self, instance, row, mode):
        password = row.get("password", "")
        # An unusable password, as Django stores an account without one, is kept as it is.
        if password not in ("", IGNORE_MARKER, DELETE_MARKER) and not password.startswith(
            UNUSABLE_PASSWORD_PREFIX
        ):
            try:
                identify_hasher(password)
            except ValueError:
                raise RowError(
                    "password: only hashed passwords are accepted (as Django stores them, "
                    "such as pbkdf2_sha256$...); clear-text passwords are refused."
                ) from None
        elif mode == "create":
            # What set_unusable_password() stores, without its slow random choice per character.
            instance.password = UNUSABLE_PASSWORD_PREFIX + secrets.token_hex(20)

    def hidden_on_export(self) -> set[str]:
        # Password hashes are as good as passwords against a slow attacker.
        if self.user is not None and not self.user.is_superuser:
            return {"password"}
        return set()

    def check_existing(self, instance, mode):
        # A clerk who may change users must not take over or lock out an administrator.
        if instance.is_superuser and not (self.user is not None and self.user.is_superuser):
            action = "removed" if mode == "remove" else "changed"
            raise RowError(
                f"{instance.get_username()} is a superuser account: it is {action} by a file "
                "only when a superuser processes it."
            )
