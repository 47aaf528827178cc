"""Spreadsheets in and out: time and peak memory against django-import-export.

Fills a fresh SQLite database of its own with USERS accounts (each in one group), then, each
tool as a process of its own, whole command against whole command:

- export: ours ``manage.py export_records users --format xlsx`` (xlsxwriter, constant memory);
  django-import-export's ``ModelResource.export().xlsx`` (tablib, openpyxl);
- upload and dry run of that workbook: ours ``save_upload`` (python-calamine, in a child
  process) and ``process_file(..., dry_run=True)`` in update mode; django-import-export's
  ``Dataset().load(..., format="xlsx")`` and ``import_data(..., dry_run=True)``.

Peak memory is the largest resident set of the command and of any process it waited for (the
child that reads our workbook included). Prints seconds and MiB of each and the ratios.

    .venv/bin/pip install -r requirements-bench.txt
    .venv/bin/python bench/spreadsheets.py [USERS]   (default 100000)
"""

import os
import sys
import time

from export_users import COLUMNS, IMPORT_EXPORT, ROOT, WORK, fill, measured

OUR_IMPORT = """
import sys
import django
django.setup()
from datacenter.models import current_datacenter
from datacenter.processing import process_file
from datacenter.uploads import save_upload
from django.contrib.auth.models import User

datacenter = current_datacenter()
with open(sys.argv[1], "rb") as handle:
    stored = save_upload(datacenter, handle, "users.xlsx")
result = process_file(datacenter, stored.name, "users", "update", dry_run=True,
                      user=User(is_superuser=True))
assert result.total == int(sys.argv[2]) and result.failed == 0, result.errors[:3]
"""

# The resource of bench/export_users.py, matched by username as update mode matches.
RESOURCE = IMPORT_EXPORT.split("with open")[0].replace(
    "export_order = fields", 'export_order = fields\n        import_id_fields = ["username"]'
)

THEIR_IMPORT = (
    RESOURCE
    + """
import tablib

with open(sys.argv[1], "rb") as handle:
    dataset = tablib.Dataset().load(handle.read(), format="xlsx")
result = UserResource().import_data(dataset, dry_run=True)
assert not result.has_errors() and len(dataset) == int(sys.argv[2])
"""
)

THEIR_EXPORT = RESOURCE + (
    'with open(sys.argv[1], "wb") as handle:\n    handle.write(UserResource().export().xlsx)\n'
)


def main() -> None:
    users = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    print(f"{time.strftime('%Y-%m-%d')}, {users} user accounts as .xlsx, SQLite at {WORK}")
    database = os.path.join(WORK, "bench.sqlite3")
    fill(database, users)
    ours, theirs = os.path.join(WORK, "ours.xlsx"), os.path.join(WORK, "theirs.xlsx")
    columns = COLUMNS
    figures = {
        ("export", "ours"): measured(
            [*manage("export_records", "users", "--format", "xlsx", "--output", ours)], database
        ),
        ("export", "django-import-export"): measured(
            [sys.executable, "-c", THEIR_EXPORT.format(columns=columns), theirs], database
        ),
        ("upload and dry run", "ours"): measured(
            [sys.executable, "-c", OUR_IMPORT, ours, str(users)], database
        ),
        ("upload and dry run", "django-import-export"): measured(
            [sys.executable, "-c", THEIR_IMPORT.format(columns=columns), theirs, str(users)],
            database,
        ),
    }
    for (task, tool), (seconds, rss) in figures.items():
        print(f"  {task:<19} {tool:<21} {seconds:8.2f} s  peak RSS {rss:7.1f} MiB")
    for task in ("export", "upload and dry run"):
        our_seconds, our_rss = figures[task, "ours"]
        their_seconds, their_rss = figures[task, "django-import-export"]
        print(
            f"  {task}: ours {their_seconds / our_seconds:.1f}x faster, with "
            f"{our_rss / their_rss:.2f} of the memory of django-import-export"
        )
    os.unlink(database)


def manage(*arguments: str) -> list[str]:
    return [sys.executable, os.path.join(ROOT, "manage.py"), *arguments]


if __name__ == "__main__":
    main()
