"""Rows per second of processing user accounts, against django-import-export.

Creates ROWS user accounts from a CSV file with `datacenter.processing.process_file`, then
updates them all, and does the same with django-import-export on the same rows into the same
model, in a fresh SQLite database of its own. Prints rows/s of both and their ratio.

    .venv/bin/pip install -r requirements-bench.txt
    .venv/bin/python bench/process_users.py [ROWS]      (default 100000)
"""

import csv
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
WORK = tempfile.mkdtemp(prefix="bench-process-users-")
os.environ["DATABASE_URL"] = f"sqlite:///{WORK}/bench.sqlite3"
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "datacenter_site.settings")

import django  # noqa: E402

django.setup()

import tablib  # noqa: E402
from django.contrib.auth.models import Group, User  # noqa: E402
from django.core.management import call_command  # noqa: E402
from import_export import fields, resources, widgets  # noqa: E402

from datacenter.processing import process_file  # noqa: E402
from datacenter.storage import DataCenter  # noqa: E402

COLUMNS = ["username", "email", "first_name", "last_name", "is_active", "is_staff", "groups"]


class UserResource(resources.ModelResource):
    groups = fields.Field(
        attribute="groups",
        column_name="groups",
        widget=widgets.ManyToManyWidget(Group, field="name", separator=";"),
    )

    class Meta:
        model = User
        fields = COLUMNS
        import_id_fields = ["username"]


def rows(count: int, update: bool) -> list[list[str]]:
    tag = "new" if update else "old"
    return [
        [f"user{n:06d}", f"user{n}.{tag}@example.org", f"First{n}", tag, "1", "0", "staff"]
        for n in range(count)
    ]


def ours(datacenter: DataCenter, data: list[list[str]], mode: str) -> float:
    with open(os.path.join(datacenter.storage, f"users-{mode}.csv"), "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(COLUMNS)
        writer.writerows(data)
    started = time.perf_counter()
    result = process_file(datacenter, f"users-{mode}.csv", "users", mode)
    elapsed = time.perf_counter() - started
    assert result.succeeded == len(data), result.errors[:5]
    return elapsed


def theirs(data: list[list[str]]) -> float:
    dataset = tablib.Dataset(*data, headers=COLUMNS)
    started = time.perf_counter()
    result = UserResource().import_data(dataset, dry_run=False, use_transactions=True)
    elapsed = time.perf_counter() - started
    assert not result.has_errors() and not result.has_validation_errors()
    return elapsed


def main() -> None:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    call_command("migrate", verbosity=0)
    Group.objects.get_or_create(name="staff")
    datacenter = DataCenter(os.path.join(WORK, "storage"))
    print(f"{count} user rows, SQLite at {WORK}")
    for mode in ("create", "update"):
        data = rows(count, update=mode == "update")
        if mode == "create":
            User.objects.all().delete()
        mine = ours(datacenter, data, mode)
        assert User.objects.filter(last_name="new" if mode == "update" else "old").count() == count
        if mode == "create":
            User.objects.all().delete()
        else:
            User.objects.update(last_name="old", email="reset@example.org")
        reference = theirs(data)
        print(
            f"{mode:>6}: datacenter {count / mine:9.0f} rows/s ({mine:6.2f} s)   "
            f"django-import-export {count / reference:9.0f} rows/s ({reference:6.2f} s)   "
            f"ratio {reference / mine:5.1f}x"
        )


if __name__ == "__main__":
    main()
