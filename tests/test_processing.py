import csv
import fcntl
import os
from pathlib import Path

import pytest
from django.contrib.auth.hashers import make_password
from django.contrib.auth.models import Group, Permission, User

from datacenter.processing import (
    ERROR_COLUMN,
    FileBusy,
    ProcessingError,
    Processor,
    RowError,
    UserProcessor,
    get_processor,
    process_file,
)
from datacenter.storage import DataCenter

from .conftest import tree, write

pytestmark = pytest.mark.django_db


def pending(datacenter, name, text):
    return write(os.path.join(datacenter.storage, name), text)


def read_rows(path):
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.reader(handle))


@pytest.fixture
def editors(db):
    return Group.objects.create(name="editors")


@pytest.fixture
def ann(db):
    return User.objects.create(username="ann", email="ann@example.org", first_name="Ann")


PEOPLE = (
    "username,email,first_name,groups\n"
    "bob,bob@example.org,Bob,editors\n"
    "ann,ann@example.org,Ann,\n"  # exists already
    "cem,not-an-email,Cem,\n"
    "dee,dee@example.org,Dee,editors;nobody\n"
)


def test_a_file_with_good_and_bad_rows_then_its_fixed_pending_file(datacenter, ann, editors):
    pending(datacenter, "people.csv", PEOPLE)

    result = process_file(datacenter, "people.csv", "users", "create")

    assert (result.total, result.succeeded, result.failed) == (4, 1, 3)
    assert [line for line, _ in result.errors] == [3, 4, 5]
    assert result.finished_file == os.path.join(
        datacenter.finished_path, "people.create.finished.csv"
    )
    assert result.pending_file == os.path.join(datacenter.storage, "people.create.pending.csv")
    assert read_rows(result.finished_file) == [
        ["username", "email", "first_name", "groups"],
        ["bob", "bob@example.org", "Bob", "editors"],
    ]
    failed = read_rows(result.pending_file)
    assert failed[0] == ["username", "email", "first_name", "groups", ERROR_COLUMN]
    assert [row[0] for row in failed[1:]] == ["ann", "cem", "dee"]
    assert failed[1][4] == "username 'ann' exists already."
    assert failed[2][4] == "email: Enter a valid email address."
    assert failed[3][4] == "groups: unknown nobody."
    assert os.listdir(datacenter.unfinished_path) == ["people.csv"]
    assert list(User.objects.get(username="bob").groups.all()) == [editors]

    # Staff fix the pending file (the error column may stay) and process it again.
    fixed = (
        f"username,email,first_name,groups,{ERROR_COLUMN}\n"
        "cem,cem@example.org,Cem,,old error\n"
        "dee,dee@example.org,Dee,editors,old error\n"
    )
    pending(datacenter, "people.create.pending.csv", fixed)
    result = process_file(datacenter, "people.create.pending.csv", "users", "create")

    assert (result.total, result.succeeded, result.failed, result.pending_file) == (2, 2, 0, None)
    assert sorted(os.listdir(datacenter.finished_path)) == [
        "people.create.finished.csv",
        "people.csv",
    ]
    assert [f.name for f in datacenter.pending_files()] == []
    assert os.listdir(datacenter.unfinished_path) == []
    assert [row[0] for row in read_rows(result.finished_file)] == ["username", "bob", "cem", "dee"]
    assert sorted(User.objects.values_list("username", flat=True)) == ["ann", "bob", "cem", "dee"]


def test_processing_is_logged_with_the_user(datacenter, clerk):
    pending(datacenter, "one.csv", "username\nzed\n")
    clerk.user_permissions.add(Permission.objects.get(codename="add_user"))
    clerk = User.objects.get(pk=clerk.pk)

    process_file(datacenter, "one.csv", "users", "create", user=clerk)

    [line] = datacenter.query_log("datacenter.log", "processed")
    assert " - INFO - clerk - processed: one.csv, create mode, 1 lines " in line
    assert line.rstrip().endswith(" s") and "(1 successful / 0 failed)" in line


def test_new_accounts_get_an_unusable_password_or_a_hashed_one(datacenter):
    hashed = make_password("s3cret-pass")
    pending(datacenter, "p.csv", f"username,password\nnopass,\nhashed,{hashed}\nclear,s3cret\n")

    result = process_file(datacenter, "p.csv", "users", "create")

    assert not User.objects.get(username="nopass").has_usable_password()
    assert User.objects.get(username="hashed").check_password("s3cret-pass")
    assert not User.objects.filter(username="clear").exists()
    assert result.errors == [(4, result.errors[0][1])]
    assert "clear-text passwords are refused" in result.errors[0][1]


def test_update_changes_given_cells_and_leaves_empty_and_ignored_ones(datacenter, ann, editors):
    pending(
        datacenter,
        "u.csv",
        "username,email,first_name,last_name,is_staff,groups\n"
        "  ann  ,  new@example.org ,<IGNORE>,,yes,editors\n",
    )

    result = process_file(datacenter, "u.csv", "users", "update")

    assert result.failed == 0
    ann.refresh_from_db()
    assert (ann.email, ann.first_name, ann.last_name, ann.is_staff) == (
        "new@example.org",
        "Ann",
        "",
        True,
    )
    assert list(ann.groups.all()) == [editors]


def test_delete_marker_clears_values_and_groups(datacenter, ann, editors):
    ann.groups.add(editors)
    pending(datacenter, "u.csv", "username,first_name,groups\nann,<DELETE>,<DELETE>\n")

    process_file(datacenter, "u.csv", "users", "update")

    ann.refresh_from_db()
    assert ann.first_name == ""
    assert not ann.groups.exists()


def test_update_refuses_missing_accounts_and_bad_values(datacenter, ann):
    pending(datacenter, "u.csv", "username,is_active\nghost,1\nann,maybe\n")

    result = process_file(datacenter, "u.csv", "users", "update")

    assert [message for _, message in result.errors] == [
        "There is no record with username 'ghost'.",
        "is_active: 'maybe' is neither yes nor no (use 1 or 0).",
    ]
    assert User.objects.get(username="ann").is_active


def test_remove_deletes_accounts_but_a_superuser_only_for_a_superuser(datacenter, ann):
    User.objects.create_superuser("root", password="x")
    pending(datacenter, "r.csv", "username\nann\nroot\nghost\n")

    result = process_file(datacenter, "r.csv", "users", "remove")

    assert result.succeeded == 1
    assert [message for _, message in result.errors] == [
        "root is a superuser account: it is removed by a file only when a superuser processes it.",
        "There is no record with username 'ghost'.",
    ]
    assert list(User.objects.values_list("username", flat=True)) == ["root"]


@pytest.fixture
def user_clerk(db):
    """Staff who may process files and change users, but is no superuser."""
    clerk = User.objects.create_user("userclerk", password="x", is_staff=True)
    clerk.user_permissions.set(
        Permission.objects.filter(
            codename__in=["process_files", "change_user", "add_user", "delete_user"]
        )
    )
    return User.objects.get(pk=clerk.pk)


def test_a_clerk_cannot_take_over_or_lock_out_a_superuser(datacenter, user_clerk, ann):
    boss = User.objects.create_superuser("boss", password="old secret")
    takeover = make_password("clerk's choice")
    pending(
        datacenter,
        "u.csv",
        f"username,password,is_active\nboss,{takeover},1\nann,{takeover},0\n",
    )
    pending(datacenter, "lock.csv", "username,is_active\nboss,0\n")

    taken = process_file(datacenter, "u.csv", "users", "update", user=user_clerk)
    locked = process_file(datacenter, "lock.csv", "users", "update", user=user_clerk)

    assert (taken.succeeded, taken.failed, locked.failed) == (1, 1, 1)
    assert (
        "boss is a superuser account: it is changed by a file only when a superuser"
        in (taken.errors[0][1])
    )
    boss.refresh_from_db()
    assert boss.check_password("old secret") and boss.is_active
    assert User.objects.get(username="ann").password == takeover


def test_a_superuser_may_change_a_superuser_by_file(datacenter):
    boss = User.objects.create_superuser("boss", password="old secret")
    other = User.objects.create_superuser("other", password="x")
    pending(datacenter, "u.csv", "username,is_active\nother,0\n")

    result = process_file(datacenter, "u.csv", "users", "update", user=boss)

    assert (result.succeeded, result.failed) == (1, 0)
    other.refresh_from_db()
    assert not other.is_active


def test_a_key_twice_in_a_file_and_rows_of_the_wrong_width_fail(datacenter):
    pending(datacenter, "d.csv", "username,email\nann,a@example.org\nann,b@example.org\nx\n")

    result = process_file(datacenter, "d.csv", "users", "create")

    assert [message for _, message in result.errors] == [
        "username 'ann' appears more than once in the file.",
        "The row has 1 field, but the header has 2 columns.",
    ]
    assert User.objects.get().email == "a@example.org"


@pytest.mark.parametrize(
    ("header", "mode", "message"),
    [
        ("email\n", "create", "These columns are required in create mode: username."),
        ("username,shoe_size\n", "create", "unknown to User accounts: shoe_size"),
        ("username,email,email\n", "update", "appear more than once: email"),
        ("", "create", "The file is empty."),
    ],
)
def test_bad_headers_are_refused_and_nothing_changes(datacenter, header, mode, message):
    pending(datacenter, "h.csv", header + ("" if not header else "x,y,z\n"))
    before = tree(datacenter.storage)

    with pytest.raises(ProcessingError, match=message):
        process_file(datacenter, "h.csv", "users", mode)

    assert tree(datacenter.storage) == before
    assert not User.objects.exists()


def test_a_file_that_is_not_utf8_is_refused_and_nothing_changes(datacenter):
    pending(datacenter, "latin.csv", "username,first_name\nann,Ann\n")
    with open(os.path.join(datacenter.storage, "latin.csv"), "ab") as handle:
        handle.write("jürgen,Jürgen\n".encode("latin-1"))
    before = tree(datacenter.storage)

    with pytest.raises(
        ProcessingError, match="latin.csv is not a readable UTF-8 CSV file: line 3"
    ):
        process_file(datacenter, "latin.csv", "users", "create")

    assert tree(datacenter.storage) == before
    assert not User.objects.exists()


def test_a_pending_file_keeps_its_mode(datacenter):
    pending(datacenter, "a.update.pending.csv", "username\nann\n")

    with pytest.raises(ProcessingError, match="failed in update mode"):
        process_file(datacenter, "a.update.pending.csv", "users", "create")


def test_unknown_processor_and_mode_are_refused(datacenter):
    pending(datacenter, "a.csv", "username\nann\n")
    with pytest.raises(ProcessingError, match="no processor named 'pets'"):
        process_file(datacenter, "a.csv", "pets", "create")
    with pytest.raises(ProcessingError, match="Unknown mode 'merge'"):
        process_file(datacenter, "a.csv", "users", "merge")


def test_users_need_the_model_permission_of_the_mode(datacenter, clerk):
    pending(datacenter, "a.csv", "username\nann\n")

    with pytest.raises(ProcessingError, match="needs the permission auth.add_user"):
        process_file(datacenter, "a.csv", "users", "create", user=clerk)

    assert not User.objects.filter(username="ann").exists()


def test_dry_run_reports_failures_and_changes_nothing(datacenter, ann, editors):
    pending(datacenter, "people.csv", PEOPLE)
    before = tree(datacenter.storage)

    result = process_file(datacenter, "people.csv", "users", "create", dry_run=True)

    assert (result.total, result.succeeded, result.failed) == (4, 1, 3)
    assert (result.finished_file, result.pending_file) == (None, None)
    assert tree(datacenter.storage) == before
    assert list(User.objects.values_list("username", flat=True)) == ["ann"]


def test_a_file_being_processed_elsewhere_is_busy(datacenter):
    path = pending(datacenter, "people.csv", "username\nann\n")
    before = tree(datacenter.storage)

    with open(path) as other_run:
        fcntl.flock(other_run.fileno(), fcntl.LOCK_EX)
        with pytest.raises(FileBusy, match="being processed by somebody else"):
            process_file(datacenter, "people.csv", "users", "create")

    assert tree(datacenter.storage) == before
    assert not User.objects.exists()


def test_batches_use_a_fixed_number_of_queries(datacenter, editors, django_assert_max_num_queries):
    rows = "".join(f"user{n},user{n}@example.org,editors\n" for n in range(600))
    pending(datacenter, "many.csv", "username,email,groups\n" + rows)
    processor = UserProcessor()
    processor.batch_size = 300

    with django_assert_max_num_queries(20):
        result = process_file(datacenter, "many.csv", processor, "create")

    assert result.succeeded == 600
    assert editors.user_set.count() == 600


class ClashingProcessor(UserProcessor):
    """Produces a row that passes validation but that the database refuses."""

    def prepare(self, instance, row, mode):
        super().prepare(instance, row, mode)
        if instance.first_name == "clash":
            instance.username = "ann"


def test_a_row_the_database_refuses_fails_alone(datacenter, ann):
    pending(datacenter, "c.csv", "username,first_name\nbob,Bob\ncem,clash\ndee,Dee\n")

    result = process_file(datacenter, "c.csv", ClashingProcessor(), "create")

    assert result.succeeded == 2
    [(line, message)] = result.errors
    assert line == 3 and message.startswith("The database refused the row")
    assert sorted(User.objects.values_list("username", flat=True)) == ["ann", "bob", "dee"]


def test_get_processor_finds_the_registered_user_processor():
    assert isinstance(get_processor("users"), UserProcessor)


class GroupNames(Processor):
    """A processor of the simplest kind a site may plug in: it applies one row at a time."""

    name, title = "groups", "Groups"
    columns = key_columns = ("name",)

    def apply_row(self, row, mode):
        if not row["name"].isidentifier():
            raise RowError(f"name: {row['name']!r} is not one word.")
        if mode == "create":
            Group.objects.create(name=row["name"])
        elif not Group.objects.filter(name=row["name"]).delete()[0]:
            raise RowError(f"There is no group {row['name']!r}.")


def test_a_processor_that_applies_row_by_row_keeps_the_good_rows(datacenter, settings):
    settings.DATACENTER_PROCESSORS = ["tests.test_processing.GroupNames"]
    pending(datacenter, "groups.csv", "name\nstaff\nnot one word\nboard\n")

    def made():  # beside the groups the migrations create
        return set(
            Group.objects.filter(name__in=["staff", "board"]).values_list("name", flat=True)
        )

    tried = process_file(datacenter, "groups.csv", "groups", "create", dry_run=True)

    assert [(c.line, c.action, c.key) for c in tried.changes] == [
        (2, "create", "staff"),
        (4, "create", "board"),
    ]
    assert made() == set()  # a dry run rolls back

    done = process_file(datacenter, "groups.csv", "groups", "create")

    assert (done.succeeded, done.failed) == (2, 1)
    assert done.errors == [(3, "name: 'not one word' is not one word.")]
    assert made() == {"board", "staff"}
    pending(datacenter, "gone.csv", "name\nstaff\nnobody\n")
    removed = process_file(datacenter, "gone.csv", "groups", "remove")
    assert removed.errors == [(3, "There is no group 'nobody'.")]
    assert made() == {"board"}


def test_results_reach_a_finished_folder_on_another_filesystem(tmp_path, small_filesystem):
    datacenter = DataCenter(str(tmp_path / "storage"))
    small_filesystem("1m", at=Path(datacenter.finished_path))  # renames into it fail: EXDEV
    rows = "username,email\nann,a@x.org\nbob,b@x.org\n"
    pending(datacenter, "staff.csv", rows)

    result = process_file(datacenter, "staff.csv", "users", "create")

    assert (result.succeeded, result.failed) == (2, 0)
    assert sorted(os.listdir(datacenter.finished_path)) == [
        "staff.create.finished.csv",
        "staff.csv",
    ]
    with open(os.path.join(datacenter.finished_path, "staff.csv")) as handle:
        assert handle.read() == rows
    assert read_rows(os.path.join(datacenter.finished_path, "staff.create.finished.csv")) == [
        ["username", "email"],
        ["ann", "a@x.org"],
        ["bob", "b@x.org"],
    ]
    assert [f.name for f in datacenter.pending_files()] == []
    assert not [name for name in os.listdir(datacenter.storage) if name.startswith(".")]
