"""Processors: each knows one kind of record, its columns, its key and how to create, update
or remove one record from a row of a file. `datacenter.processing` runs files through them.
"""

import copy
from dataclasses import dataclass, field

from django.core.exceptions import ValidationError
from django.db import DatabaseError, connections, models, router, transaction

#: A cell holding this marker leaves the value as it is (the same as an empty cell).
IGNORE_MARKER = "<IGNORE>"
#: A cell holding this marker clears the value in update mode.
DELETE_MARKER = "<DELETE>"
TRUE_WORDS = {"1", "true", "yes", "y", "on"}
FALSE_WORDS = {"0", "false", "no", "n", "off"}


class RowError(ValueError):
    """One row that cannot be applied; the message is written to its ``--ERRORS--`` cell."""


@dataclass
class Change:
    """What one row would do: create, update, remove, or leave its record unchanged."""

    line: int
    action: str
    key: str
    #: (field, old value, new value) for each value the row changes, as text.
    fields: list[tuple[str, str, str]] = field(default_factory=list)


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

    def plan_batch(self, rows: list[dict[str, str]], mode: str, changes: dict | None = None):
        """What write_batch() is to write of `rows`, found by reading only, so that it runs
        outside the transaction that writes (which then holds the database briefly). A
        processor that cannot tell before writing plans the rows themselves.

        Given a dict `changes`, plan_batch() or write_batch() describes what each row that
        works does, as a Change (without its line) by index in `rows`.
        """
        return rows

    def write_batch(self, plan, mode: str, changes: dict | None = None) -> dict[int, str]:
        """Write what plan_batch() planned, each row in its own savepoint; return the errors
        by index in the rows."""
        errors = {}
        for index, row in enumerate(plan):
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

    #: Whether check_change() is to be called (subclasses: for the processor's user).
    checks_changes = False

    def check_change(self, instance: models.Model, before: dict | None, changed, many) -> None:
        """Hook for subclasses, called where `checks_changes`: raise RowError for a row whose
        changes the processor's user may not make. `before`: the record's values before the
        row (None for a new one), `changed`: the attnames the row assigned, `many`: the
        related ids it sets, by field.
        """

    def plan_batch(self, rows, mode, changes=None):
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
                before = shown_values(existing.get(row[self.key])) if changes is not None else None
                planned.append((index, *self._plan(row, mode, existing, related, seen)))
            except RowError as exc:
                errors[index] = str(exc)
            else:
                if changes is not None:
                    changes[index] = self._change(
                        row, mode, before, planned[-1], labels, old_related
                    )
        return errors, planned

    def write_batch(self, plan, mode, changes=None):
        """Write the planned rows in one bulk write; when the database refuses it (a record
        changed since it was planned, say), row by row, each in its own savepoint."""
        errors, planned = plan
        errors = dict(errors)
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
        after = shown_values(instance)
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
        refused = None
        if instance is not None:
            try:
                self.check_existing(instance, mode)
            except RowError as exc:
                if mode != "update":
                    raise
                # A row that changes nothing (a record as exported) may pass.
                refused = exc
        if mode == "remove":
            return instance, [], {}
        # The values before the row, read only where a check compares them (a hot path).
        before = shown_values(instance) if refused or self.checks_changes else None
        if instance is None:
            instance = self.model(**{self.key: key})
        changed, many = self._assign(instance, row, related)
        if refused and self._changes_record(instance, before, changed, many):
            raise refused
        if self.checks_changes:
            self.check_change(instance, before, changed, many)
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
        after = shown_values(instance)
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
            pairs = [(i, many[name]) for _, i, _, many in planned if name in many]
            self._write_related(name, pairs, created=mode == "create")

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

    def _write_related(self, name, pairs, created: bool) -> None:
        field = self.model._meta.get_field(name)
        through = field.remote_field.through
        source, target = f"{field.m2m_field_name()}_id", f"{field.m2m_reverse_field_name()}_id"
        if not created:
            # New records have no related objects to replace; asking costs a search of the
            # whole table where the database's statistics lag behind a table grown fast.
            through.objects.filter(**{f"{source}__in": [i.pk for i, _ in pairs]}).delete()
        through.objects.bulk_create(
            through(**{source: instance.pk, target: pk}) for instance, pks in pairs for pk in pks
        )


def shown_values(instance) -> dict[str, str] | None:
    """The values of the concrete fields of `instance` as shown to staff, by attname."""
    if instance is None:
        return None
    return {
        field.attname: shown(getattr(instance, field.attname))
        for field in instance._meta.concrete_fields
    }


def shown(value) -> str:
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
