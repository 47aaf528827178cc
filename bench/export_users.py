"""Exporting user accounts: time and peak memory against django-import-export.

Fills a fresh SQLite database of its own with USERS accounts (each in one group), then
exports them all as CSV, each tool as a process of its own, whole command against whole
command:

- ours: ``manage.py export_records users --output FILE``, at USERS and at a tenth of it, to
  show that memory stays flat (the file is written a page of records at a time);
- django-import-export: ``ModelResource.export()`` of the same columns, written to a file.

Prints seconds, records/s and peak resident memory of each, and the ratios. The reference runs
at a tenth of USERS unless --full-reference is given (it holds the whole export in memory).

    .venv/bin/pip install -r requirements-bench.txt
    .venv/bin/python bench/export_users.py [USERS] [--full-reference]   (default 1000000)
"""

import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = tempfile.mkdtemp(prefix="bench-export-users-")
COLUMNS = ["username", "email", "first_name", "last_name", "is_active", "is_staff", "groups"]

IMPORT_EXPORT = """
import sys
import django
django.setup()
from django.contrib.auth.models import Group, User
from import_export import fields, resources, widgets

class UserResource(resources.ModelResource):
    groups = fields.Field(
        attribute="groups",
        column_name="groups",
        widget=widgets.ManyToManyWidget(Group, field="name", separator=";"),
    )

    class Meta:
        model = User
        fields = {columns!r} + ["password"]
        export_order = fields

with open(sys.argv[1], "w", encoding="utf-8", newline="") as handle:
    handle.write(UserResource().export().csv)
"""


def environment(database: str) -> dict:
    return {
        **os.environ,
        "DATABASE_URL": f"sqlite:///{database}",
        "DJANGO_SETTINGS_MODULE": "datacenter_site.settings",
        "DATACENTER_STORAGE_ROOT": os.path.join(WORK, "storage"),
        "DJANGO_LOG_LEVEL": "WARNING",
    }


def fill(database: str, count: int) -> None:
    """Migrate and insert `count` users straight into SQLite, each in one of two groups."""
    subprocess.run(
        [sys.executable, "manage.py", "migrate", "-v0"],
        cwd=ROOT,
        env=environment(database),
        check=True,
    )
    connection = sqlite3.connect(database)
    with connection:
        connection.execute("DELETE FROM auth_user_groups")
        connection.execute("DELETE FROM auth_user")
        connection.executemany(
            "INSERT OR IGNORE INTO auth_group (id, name) VALUES (?, ?)",
            [(1, "staff"), (2, "editors")],
        )
        connection.executemany(
            "INSERT INTO auth_user (id, password, is_superuser, username, first_name, "
            "last_name, email, is_staff, is_active, date_joined) "
            "VALUES (?, ?, 0, ?, ?, ?, ?, 0, 1, '2026-11-24 00:00:00')",
            (
                (n, f"!{n:040d}", f"user{n:07d}", f"First{n}", "Last", f"user{n}@example.org")
                for n in range(1, count + 1)
            ),
        )
        connection.executemany(
            "INSERT INTO auth_user_groups (user_id, group_id) VALUES (?, ?)",
            ((n, 1 + n % 2) for n in range(1, count + 1)),
        )
    connection.close()


def measured(command: list[str], database: str) -> tuple[float, float]:
    """Run `command`; return its seconds and its peak resident memory in MiB."""
    started = time.perf_counter()
    process = subprocess.Popen(
        command, cwd=ROOT, env=environment(database), stderr=subprocess.DEVNULL
    )
    _, status, usage = os.wait4(process.pid, 0)
    elapsed = time.perf_counter() - started
    assert os.waitstatus_to_exitcode(status) == 0, command
    return elapsed, usage.ru_maxrss / 1024


def records_in(path: str) -> int:
    with open(path, "rb") as handle:
        return sum(1 for _ in handle) - 1


def main() -> None:
    arguments = [argument for argument in sys.argv[1:] if not argument.startswith("--")]
    count = int(arguments[0]) if arguments else 1_000_000
    # django-import-export builds the whole export in memory at about 3,000 records/s; at a
    # million records that is minutes and gigabytes, so by default it runs at a tenth.
    full_reference = "--full-reference" in sys.argv
    print(f"{time.strftime('%Y-%m-%d')}, exporting user accounts, SQLite at {WORK}")
    figures = {}
    for users in (count // 10, count):
        database = os.path.join(WORK, f"bench-{users}.sqlite3")
        fill(database, users)
        output = os.path.join(WORK, f"ours-{users}.csv")
        command = [sys.executable, "manage.py", "export_records", "users", "--output", output]
        figures["ours", users] = measured(command, database)
        assert records_in(output) == users
        if users == count // 10 or full_reference:
            output = os.path.join(WORK, f"theirs-{users}.csv")
            script = IMPORT_EXPORT.format(columns=COLUMNS)
            figures["django-import-export", users] = measured(
                [sys.executable, "-c", script, output], database
            )
            assert records_in(output) == users
        os.unlink(database)
    for (name, users), (seconds, rss) in figures.items():
        print(
            f"  {name:<21} {users:>8} users {seconds:8.2f} s {users / seconds:9.0f} records/s"
            f"  peak RSS {rss:7.1f} MiB"
        )
    for users in (count // 10, count):
        if ("django-import-export", users) in figures:
            ours, ours_rss = figures["ours", users]
            theirs, theirs_rss = figures["django-import-export", users]
            print(
                f"  {users} users: ours {theirs / ours:.1f}x faster with "
                f"{theirs_rss / ours_rss:.1f}x less memory than django-import-export"
            )
    small, large = figures["ours", count // 10][1], figures["ours", count][1]
    print(f"  ours, peak RSS from {count // 10} to {count} users: x{large / small:.2f}")


if __name__ == "__main__":
    main()
