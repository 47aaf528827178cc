"""Exports of records: the records of a processor as CSV in exactly its columns, so that an
exported file, edited and uploaded, processes in update mode (the round trip).

Records are read a page at a time by primary key, so that memory stays flat whatever their
number. An export is written to a hidden file and renamed to its name only when complete, in
the storage's exports/ folder (or a file of the caller's); exports there are removed after
DATACENTER_EXPORT_DAYS days.
"""

import contextlib
import csv
import os
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta

from django.conf import settings
from django.db import models
from django.utils import timezone

from . import workbooks
from .files import remove_stale_parts
from .formulas import neutralised
from .processing import ModelProcessor, ProcessingError, get_processor, processors
from .storage import (
    DATA_FOLDERS,
    EXPORTS_FOLDER,
    DataCenter,
    DataCenterFile,
    fsync_file,
    place_under_free_name,
)

PAGE_SIZE = 2000
PART_SUFFIX = ".part"


class ExportError(ValueError):
    """An export that cannot be made; the message is meant for staff."""


def exportable() -> list[ModelProcessor]:
    """The registered processors whose records can be exported."""
    return [p for p in processors().values() if isinstance(p, ModelProcessor)]


def export_permission(processor: ModelProcessor) -> str:
    meta = processor.model._meta
    return f"{meta.app_label}.view_{meta.model_name}"


def may_view_records(user, processor_name: str) -> bool:
    """Whether `user` may see the values of the records of the processor `processor_name`
    (as a dry run shows them): the permission to view its model."""
    try:
        processor = get_processor(processor_name)
    except ProcessingError:
        return False
    return isinstance(processor, ModelProcessor) and user.has_perm(export_permission(processor))


def check_export(processor: ModelProcessor | str, user) -> ModelProcessor:
    """The processor `processor` acting for `user` (None: a program, with every right), if
    `user` may export its records; raise ExportError if not."""
    if isinstance(processor, str):
        try:
            processor = get_processor(processor)
        except ProcessingError as exc:
            raise ExportError(str(exc)) from None
    if not isinstance(processor, ModelProcessor):
        raise ExportError(f"{processor.title} cannot export its records.")
    if user is not None:
        needed = ["datacenter.export_records", export_permission(processor)]
        missing = [permission for permission in needed if not user.has_perm(permission)]
        if missing:
            raise ExportError(
                f"You may not export {processor.title}: that needs the permission "
                f"{' and '.join(missing)}."
            )
    return processor.for_user(user)


def holds_secrets(processor: ModelProcessor) -> bool:
    """Whether an export of `processor` for its user holds secret values (password hashes)."""
    return bool(set(processor.secret_fields) - processor.hidden_on_export())


def may_download(user, *, made_by_id: int | None, secrets: bool) -> bool:
    """Whether `user` may download an export: its maker and superusers may; one that holds
    secrets reaches superusers only."""
    if user.is_superuser:
        return True
    return made_by_id is not None and made_by_id == user.pk and not secrets


def record_count(processor: ModelProcessor) -> int:
    return processor.model._default_manager.count()


def rows(processor: ModelProcessor, neutralise: bool = True) -> Iterator[list[str]]:
    """The records of `processor`'s model as rows of its columns, by primary key.

    Values are written as update mode reads them: yes/no as 1/0, many-to-many fields as the
    names of their objects joined by the separator, a value a spreadsheet would take for a
    formula behind a ``'`` (see neutralised; not with `neutralise` off, for the cells of a
    workbook, which are never formulas); the columns the processor hides from its user are
    empty, which update mode reads as "leave as it is".
    """
    shown = neutralised if neutralise else str
    meta = processor.model._meta
    fields = {name: meta.get_field(name) for name in processor.columns}
    plain = [name for name, field in fields.items() if not field.many_to_many]
    hidden = processor.hidden_on_export()
    manager = processor.model._default_manager
    last_pk = None
    while True:
        page = manager.order_by("pk")
        if last_pk is not None:
            page = page.filter(pk__gt=last_pk)
        records = list(
            page.values_list("pk", *(fields[name].attname for name in plain))[:PAGE_SIZE]
        )
        if not records:
            return
        related = processor.related_names(record[0] for record in records)
        for pk, *values in records:
            cells = dict(zip(plain, values, strict=True))
            row = []
            for name in processor.columns:
                if name in hidden:
                    row.append("")
                elif name in related:
                    row.append(shown(processor.separator.join(sorted(related[name].get(pk, [])))))
                else:
                    row.append(shown(_cell(cells[name])))
            yield row
        last_pk = records[-1][0]


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "1" if value else "0"
    return str(value)


def _counted(records: Iterator[list[str]], progress: Callable[[int], None] | None):
    """`records` as they are, telling `progress(records)` after each page and at the end."""
    count = 0
    for count, row in enumerate(records, start=1):
        yield row
        if progress and count % PAGE_SIZE == 0:
            progress(count)
    if progress:
        progress(count)


def write_csv(
    processor: ModelProcessor, handle, progress: Callable[[int], None] | None = None
) -> int:
    """Write the header and every record of `processor` to the text file `handle`; return
    the number of records. `progress(records)` is called after each page."""
    writer = csv.writer(handle)
    writer.writerow(processor.columns)
    count = 0
    for row in _counted(rows(processor), progress):
        writer.writerow(row)
        count += 1
    return count


def write_xlsx(processor: ModelProcessor, path: str, progress=None) -> int:
    """Write the header and every record of `processor` to the workbook `path`: the header
    styled as one, text columns as text (so that ``007`` stays ``007``), numbers as numbers;
    return the number of records."""
    meta = processor.model._meta
    text = [_is_text(meta.get_field(name)) for name in processor.columns]
    records = _counted(rows(processor, neutralise=False), progress)
    return workbooks.write_xlsx(path, processor.title, list(processor.columns), text, records)


def _is_text(field) -> bool:
    return field.many_to_many or isinstance(field, models.CharField | models.TextField)


#: The formats of an export: what a person calls it, and how its name ends.
FORMATS = {
    "csv": ("CSV", ".csv"),
    "excel-csv": ("CSV for Excel (UTF-8 with byte order mark)", "-excel.csv"),
    "xlsx": ("Excel workbook", ".xlsx"),
}


def check_format(file_format: str) -> str:
    if file_format not in FORMATS:
        raise ExportError(
            f"Unknown export format {file_format!r}: choose one of {', '.join(FORMATS)}."
        )
    return file_format


def write_file(processor: ModelProcessor, path: str, progress=None, file_format="csv") -> int:
    """Export to the file `path` (replaced when it exists) through a hidden temporary file
    beside it, so that `path` is never half-written; return the number of records."""
    folder, name = os.path.split(os.path.abspath(path))
    part_path = os.path.join(folder, f".{name}{PART_SUFFIX}")
    return _written(processor, part_path, progress, file_format, path)


def export_to_storage(
    datacenter: DataCenter,
    processor: ModelProcessor,
    *,
    part_name: str,
    progress=None,
    file_format: str = "csv",
) -> tuple[DataCenterFile, int]:
    """Export to a new file named after the processor and the time in the storage's
    exports/ folder, written as the hidden `part_name` first; return it and its records."""
    os.makedirs(os.path.join(datacenter.storage, EXPORTS_FOLDER), exist_ok=True)
    folder = datacenter.real_folder(EXPORTS_FOLDER)
    ending = FORMATS[check_format(file_format)][1]
    name = f"{processor.name}-{timezone.localtime():%Y%m%d-%H%M%S}{ending}"
    part_path = os.path.join(folder, part_name)
    count = _written(processor, part_path, progress, file_format)
    try:
        name = place_under_free_name(part_path, folder, name)
    except BaseException:
        remove_part(datacenter, part_name)
        raise
    return datacenter.get_file(name, EXPORTS_FOLDER), count


def _written(processor, part_path, progress, file_format, final_path=None) -> int:
    try:
        if file_format == "xlsx":
            count = write_xlsx(processor, part_path, progress)
        else:
            # Excel reads a CSV file as UTF-8 only behind a byte order mark.
            encoding = "utf-8-sig" if file_format == "excel-csv" else "utf-8"
            with open(part_path, "w", encoding=encoding, newline="") as handle:
                count = write_csv(processor, handle, progress)
        fsync_file(part_path)
        if final_path:
            os.replace(part_path, final_path)
    except BaseException:
        if os.path.exists(part_path):
            os.unlink(part_path)
        raise
    return count


def remove_part(datacenter: DataCenter, part_name: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(datacenter.real_folder(EXPORTS_FOLDER), part_name))


def export_files(datacenter: DataCenter) -> list[DataCenterFile]:
    """The exports in the storage, newest first."""
    files = [
        DataCenterFile(entry.path, EXPORTS_FOLDER)
        for entry in _entries(datacenter)
        if entry.is_file(follow_symlinks=False)
        and entry.name.endswith(DATA_FOLDERS[EXPORTS_FOLDER])
        and not entry.name.startswith(".")
    ]
    return sorted(files, key=lambda file: (file.modified, file.name), reverse=True)


def _entries(datacenter: DataCenter) -> list[os.DirEntry]:
    """The entries of the exports folder; none while it is missing (or a link)."""
    try:
        with os.scandir(datacenter.real_folder(EXPORTS_FOLDER)) as entries:
            return list(entries)
    except FileNotFoundError:
        return []


def expires(file: DataCenterFile) -> datetime:
    return file.modified + timedelta(days=settings.DATACENTER_EXPORT_DAYS)


def remove_expired(datacenter: DataCenter, now: datetime | None = None) -> list[str]:
    """Remove the exports older than DATACENTER_EXPORT_DAYS days, and partial ones that no
    process writes any more; return the names of the exports removed."""
    now = now or timezone.now()
    removed = []
    for file in export_files(datacenter):
        if expires(file) <= now:
            os.unlink(file.path)
            datacenter.log_action(None, "expire", file.rel_path)
            removed.append(file.name)
    with contextlib.suppress(FileNotFoundError):
        remove_stale_parts(datacenter.real_folder(EXPORTS_FOLDER), (".",), PART_SUFFIX)
    return removed
