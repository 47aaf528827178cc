import os
import shutil
import tempfile
from datetime import datetime

import pytest

from datacenter import distribution, storage
from datacenter.processing import process_file
from datacenter.storage import (
    SUBFOLDERS,
    DataCenter,
    DataCenterFile,
    StorageError,
    storage_moved,
)

from .conftest import tree, write

# The seed scenario: Kofa's data center test document, step by step.


def test_a_new_data_center_creates_its_subfolders(tmp_path):
    datacenter = DataCenter(tmp_path / "store")

    assert sorted(os.listdir(datacenter.storage)) == list(SUBFOLDERS)
    assert datacenter.deleted_path == os.path.join(datacenter.storage, "deleted")
    assert datacenter.finished_path == os.path.join(datacenter.storage, "finished")
    assert datacenter.graduated_path == os.path.join(datacenter.storage, "graduated")
    assert datacenter.logs_path == os.path.join(datacenter.storage, "logs")
    assert datacenter.unfinished_path == os.path.join(datacenter.storage, "unfinished")


def test_pending_files_are_the_csv_files_in_the_root(datacenter):
    data = write(os.path.join(datacenter.storage, "data.csv"), "Blah\nbleh\nbliss")
    os.utime(data, (1_700_000_000, 1_700_000_000))
    write(os.path.join(datacenter.storage, "notes.txt"), "not a CSV")
    write(os.path.join(datacenter.storage, ".hidden.csv"), "a,b\n")
    write(os.path.join(datacenter.finished_path, "old.csv"), "a\n")

    [file] = datacenter.pending_files()

    assert isinstance(file, DataCenterFile)
    assert (file.name, file.rel_path, file.size, file.lines) == ("data.csv", "data.csv", 15, 3)
    assert file.path == os.path.join(datacenter.storage, "data.csv")
    assert file.get_size() == "15 bytes"
    local = datetime.fromtimestamp(1_700_000_000)  # in the process's time zone, as listed
    assert file.get_date() == local.strftime("%Y-%m-%d %H:%M:%S")
    assert file.modified.tzinfo is not None


def test_pending_files_sorted_by_name_or_newest_first(datacenter):
    for name, mtime in (("b.csv", 1_000_000), ("a.csv", 2_000_000), ("c.csv", 3_000_000)):
        path = write(os.path.join(datacenter.storage, name), "x\n")
        os.utime(path, (mtime, mtime))

    assert [f.name for f in datacenter.pending_files()] == ["a.csv", "b.csv", "c.csv"]
    assert [f.name for f in datacenter.pending_files(sort="date")] == ["c.csv", "a.csv", "b.csv"]
    with pytest.raises(ValueError):
        datacenter.pending_files(sort="size")


@pytest.mark.parametrize(
    ("size", "text"),
    [(13, "13 bytes"), (1536, "1.50 kb"), (2 * 1024**2, "2.00 MB"), (1024**3, "1.00 GB")],
)
def test_human_readable_sizes(datacenter, size, text):
    path = os.path.join(datacenter.storage, "sized.csv")
    with open(path, "wb") as handle:
        handle.truncate(size)

    assert DataCenterFile(path).get_size() == text


def test_line_count_follows_changes_of_the_file(datacenter):
    path = write(os.path.join(datacenter.storage, "grow.csv"), "a\n1\n")
    assert DataCenterFile(path).lines == 2
    write(path, "a\n1\n2\n3\n")
    assert DataCenterFile(path).lines == 4


def test_rows_counts_csv_records_after_the_header(datacenter):
    path = write(os.path.join(datacenter.storage, "rows.csv"), 'a,b\n1,"two\nlines"\n3,4\n\n')
    assert DataCenterFile(path).rows == 2
    broken = write(os.path.join(datacenter.storage, "latin.csv"), b"a\n\xe9\n")
    assert DataCenterFile(broken).rows is None


def fake_results(datacenter, source_name, successful):
    """A processed source in the root and a temporary folder with the result files; a
    pending file only when some rows failed."""
    temp_dir = tempfile.mkdtemp()
    source = write(os.path.join(datacenter.storage, source_name), "blah")
    finished = write(os.path.join(temp_dir, "finished.csv"), "blah")
    pending = None if successful else write(os.path.join(temp_dir, "pending.csv"), "blah")
    return temp_dir, source, finished, pending


def listing(datacenter):
    return (
        sorted(os.listdir(datacenter.storage)),
        sorted(os.listdir(datacenter.finished_path)),
        sorted(os.listdir(datacenter.unfinished_path)),
    )


ROOT = ["deleted", "finished", "graduated", "logs", "unfinished"]
ROOT_WITH_PENDING = sorted([*ROOT, "mysource.create.pending.csv"])
COMPLETE = (ROOT, ["mysource.create.finished.csv", "mysource.csv"], [])
WAITING = (ROOT_WITH_PENDING, ["mysource.create.finished.csv"], ["mysource.csv"])


def test_seed_successful_source_goes_to_finished(datacenter):
    temp_dir, source, finished, pending = fake_results(datacenter, "mysource.csv", True)

    datacenter.dist_processed_files(True, source, finished, pending, mode="create")

    assert listing(datacenter) == COMPLETE
    assert not os.path.exists(temp_dir)


def test_seed_failed_source_waits_in_unfinished_until_pending_file_works(datacenter):
    temp_dir, source, finished, pending = fake_results(datacenter, "mysource.csv", False)
    datacenter.dist_processed_files(False, source, finished, pending, mode="create")
    assert listing(datacenter) == WAITING
    assert not os.path.exists(temp_dir)

    temp_dir, source, finished, pending = fake_results(
        datacenter, "mysource.create.pending.csv", True
    )
    datacenter.dist_processed_files(True, source, finished, pending, mode="create")

    assert listing(datacenter) == COMPLETE


def test_seed_several_failed_runs_in_a_row_then_success(datacenter):
    temp_dir, source, finished, pending = fake_results(datacenter, "mysource.csv", False)
    datacenter.dist_processed_files(False, source, finished, pending, mode="create")
    for _ in range(2):
        _, source, finished, pending = fake_results(
            datacenter, "mysource.create.pending.csv", False
        )
        datacenter.dist_processed_files(False, source, finished, pending, mode="create")
        assert listing(datacenter) == WAITING

    _, source, finished, pending = fake_results(datacenter, "mysource.create.pending.csv", True)
    datacenter.dist_processed_files(True, source, finished, pending, mode="create")

    assert listing(datacenter) == COMPLETE
    [finished_file] = datacenter.finished_files()
    assert finished_file.name == "mysource.create.finished.csv"


def test_finished_rows_of_later_runs_are_appended_by_column_name(datacenter):
    temp_dir = tempfile.mkdtemp()
    source = write(os.path.join(datacenter.storage, "people.csv"), "id,name\n1,a\n2,b\n")
    finished = write(os.path.join(temp_dir, "finished.csv"), "id,name\r\n1,a\r\n")
    pending = write(os.path.join(temp_dir, "pending.csv"), "id,name,--ERRORS--\r\n2,b,bad\r\n")
    datacenter.dist_processed_files(False, source, finished, pending, mode="update")

    temp_dir = tempfile.mkdtemp()
    source = os.path.join(datacenter.storage, "people.update.pending.csv")
    finished = write(os.path.join(temp_dir, "finished.csv"), "id,name,extra\r\n2,b,x\r\n")
    datacenter.dist_processed_files(True, source, finished, None, mode="update")

    with open(os.path.join(datacenter.finished_path, "people.update.finished.csv")) as handle:
        assert handle.read().splitlines() == ["id,name,extra", "1,a,", "2,b,x"]
    assert listing(datacenter) == (ROOT, ["people.csv", "people.update.finished.csv"], [])


def test_finished_files_are_newest_first_and_only_finished_csv(datacenter):
    for name, mtime in (("a.create.finished.csv", 1), ("b.update.finished.csv", 2)):
        path = write(os.path.join(datacenter.finished_path, name), "x\n")
        os.utime(path, (mtime, mtime))
    write(os.path.join(datacenter.finished_path, "a.csv"), "x\n")

    assert [f.rel_path for f in datacenter.finished_files()] == [
        "finished/b.update.finished.csv",
        "finished/a.create.finished.csv",
    ]


# Getting and deleting single files


@pytest.mark.parametrize(
    "name", ["..", "../storage", "/etc/passwd", "a/b.csv", "a\\b.csv", "x\x00.csv", ".hidden.csv"]
)
def test_names_that_would_leave_the_folder_are_not_found(datacenter, name):
    write(os.path.join(datacenter.storage, ".hidden.csv"), "a\n")
    with pytest.raises(FileNotFoundError):
        datacenter.get_file(name)


def test_unknown_folder_and_folders_are_not_files(datacenter):
    with pytest.raises(FileNotFoundError):
        datacenter.get_file("finished")
    with pytest.raises(FileNotFoundError):
        datacenter.get_file("x.csv", folder="..")


def test_delete_moves_to_deleted_and_keeps_earlier_deleted_files(datacenter):
    write(os.path.join(datacenter.storage, "a.csv"), "first")
    assert datacenter.delete_file("a.csv") == "a.csv"
    write(os.path.join(datacenter.storage, "a.csv"), "second")
    assert datacenter.delete_file("a.csv") == "a-1.csv"

    assert datacenter.pending_files() == []
    assert tree(datacenter.deleted_path) == {"a.csv": b"first", "a-1.csv": b"second"}


# The action log and searching logs


def test_log_action_writes_time_level_user_action_detail(datacenter):
    datacenter.log_action(None, "upload", "a.csv")
    datacenter.log_action("alice", "delete", "evil\nname")

    lines = list(datacenter.query_log("datacenter.log", "."))
    assert lines[0].split(" - ", 1)[1] == "INFO - system - upload: a.csv\n"
    assert lines[1].split(" - ", 1)[1] == "INFO - alice - delete: evil\\nname\n"
    assert datetime.strptime(lines[0][:19], "%Y-%m-%d %H:%M:%S")


@pytest.fixture
def rotated_logs(datacenter):
    for name in ("app.log", "app.log.1", "app.log.2", "app.log.10", "other.log", "app2.log"):
        write(os.path.join(datacenter.logs_path, name), f"Message 1 {name}\nMessage 2 {name}\n")
    return datacenter


def test_query_log_searches_backups_oldest_first(rotated_logs):
    found = list(rotated_logs.query_log("app.log", "Message 1"))

    assert found == [
        "Message 1 app.log.10\n",
        "Message 1 app.log.2\n",
        "Message 1 app.log.1\n",
        "Message 1 app.log\n",
    ]


def test_query_log_start_and_limit_page_through_matches(rotated_logs):
    everything = list(rotated_logs.query_log("app.log", "Message"))

    assert len(everything) == 8
    assert list(rotated_logs.query_log("app.log", "Message", limit=3)) == everything[:3]
    assert list(rotated_logs.query_log("app.log", "Message", start=3, limit=3)) == everything[3:6]
    assert list(rotated_logs.query_log("app.log", "Message", start=6, limit=3)) == everything[6:]


def test_query_log_reads_newest_first_across_backups_on_request(rotated_logs):
    oldest_first = list(rotated_logs.query_log("app.log", "Message"))

    newest_first = list(rotated_logs.query_log("app.log", "Message", newest_first=True))

    assert newest_first == oldest_first[::-1]
    assert (
        list(rotated_logs.query_log("app.log", "Message", newest_first=True, start=2, limit=3))
        == (oldest_first[::-1][2:5])
    )


def test_query_log_reads_backwards_across_chunks(datacenter):
    lines = [f"line {number:06d} {'x' * 50}\n" for number in range(5000)]  # about 300 KB
    with open(os.path.join(datacenter.logs_path, "big.log"), "w") as handle:
        handle.writelines(lines)

    assert list(datacenter.query_log("big.log", "line", newest_first=True)) == lines[::-1]


def test_query_log_refuses_invalid_expressions_and_names(rotated_logs):
    with pytest.raises(ValueError, match=r"not valid \(missing \): \(unclosed\)"):
        rotated_logs.query_log("app.log", "(unclosed")
    with pytest.raises(ValueError, match="Invalid log file name"):
        rotated_logs.query_log("../app.log", ".")


def test_log_files_exclude_backups(rotated_logs):
    assert [f.name for f in rotated_logs.log_files()] == ["app.log", "app2.log", "other.log"]


# Relocating the storage


def test_set_storage_path_without_move_leaves_the_old_files(datacenter, tmp_path):
    old = datacenter.storage
    write(os.path.join(old, "data.csv"), "a\n")
    new = str(tmp_path / "new")

    assert datacenter.set_storage_path(new) == []

    assert datacenter.storage == new
    assert sorted(os.listdir(new)) == list(SUBFOLDERS)
    assert os.path.exists(os.path.join(old, "data.csv"))


def test_set_storage_path_with_move_moves_everything(datacenter, tmp_path):
    old = datacenter.storage
    write(os.path.join(old, "data.csv"), "a\n")
    write(os.path.join(datacenter.finished_path, "x.create.finished.csv"), "x\n")
    os.symlink("data.csv", os.path.join(old, "link.csv"))
    before = tree(old)
    new = tmp_path / "new"
    new.mkdir()

    assert datacenter.set_storage_path(str(new), move=True) == []

    assert tree(new) == before
    assert os.readlink(new / "link.csv") == "data.csv"
    assert tree(old) == {}
    assert sorted(os.listdir(new)) == sorted([*SUBFOLDERS, "data.csv", "link.csv"])


def test_move_into_an_existing_storage_merges_and_reports_conflicts(datacenter, tmp_path):
    write(os.path.join(datacenter.storage, "same.csv"), "old")
    write(os.path.join(datacenter.storage, "mine.csv"), "mine")
    write(os.path.join(datacenter.finished_path, "f.csv"), "old f")
    target = DataCenter(tmp_path / "target")
    write(os.path.join(target.storage, "same.csv"), "new")
    write(os.path.join(target.finished_path, "f.csv"), "new f")
    old = datacenter.storage

    not_moved = datacenter.relocate(target.storage, move=True)

    assert sorted(not_moved) == ["finished/f.csv", "same.csv"]
    assert "already exists" in not_moved["same.csv"]
    assert tree(old) == {"same.csv": b"old", "finished/f.csv": b"old f"}
    assert tree(target.storage) == {
        "same.csv": b"new",
        "mine.csv": b"mine",
        "finished/f.csv": b"new f",
    }


def test_move_with_overwrite_replaces_files_of_the_same_name(datacenter, tmp_path):
    write(os.path.join(datacenter.storage, "same.csv"), "old")
    target = tmp_path / "target"
    target.mkdir()
    write(target / "same.csv", "new")

    assert datacenter.set_storage_path(str(target), move=True, overwrite=True) == []

    assert (target / "same.csv").read_bytes() == b"old"


def test_entries_that_cannot_be_moved_stay_and_are_reported(datacenter, tmp_path):
    old = datacenter.storage
    write(os.path.join(old, "good.csv"), "good")
    write(os.path.join(old, "clash.csv"), "clash")
    os.mkfifo(os.path.join(old, "pipe"))
    target = tmp_path / "target"
    (target / "clash.csv").mkdir(parents=True)

    not_moved = datacenter.relocate(str(target), move=True, overwrite=True)

    assert sorted(not_moved) == ["clash.csv", "pipe"]
    assert not_moved["clash.csv"] == "exists in the new storage as a different kind of entry"
    assert "named pipe" in not_moved["pipe"]
    assert tree(old) == {"clash.csv": b"clash"}
    assert os.path.exists(os.path.join(old, "pipe"))
    assert (target / "good.csv").read_bytes() == b"good"
    assert not [name for name in os.listdir(target) if name.startswith(".")]


def test_relocation_sends_storage_moved(datacenter, tmp_path):
    received = []

    def receiver(sender, datacenter, old_path, new_path, **kwargs):
        received.append((old_path, new_path))

    storage_moved.connect(receiver)
    try:
        old = datacenter.storage
        datacenter.set_storage_path(str(tmp_path / "new"))
    finally:
        storage_moved.disconnect(receiver)

    assert received == [(old, str(tmp_path / "new"))]


def refused(datacenter, path, message):
    before = tree(datacenter.storage)
    old = datacenter.storage
    with pytest.raises(StorageError, match=message):
        datacenter.set_storage_path(path, move=True)
    assert datacenter.storage == old
    assert tree(datacenter.storage) == before


def test_relative_path_is_refused(datacenter, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    refused(datacenter, "relative/store", "must be absolute")
    assert not (tmp_path / "relative").exists()


def test_setting_the_current_path_again_recreates_removed_folders(datacenter):
    # The seed document's step: the storage was removed, setting its path brings it back.
    moved = []
    storage_moved.connect(
        lambda **kwargs: moved.append(kwargs), weak=False, dispatch_uid="test-recreate"
    )
    try:
        shutil.rmtree(datacenter.storage)
        assert datacenter.set_storage_path(datacenter.storage) == []
        shutil.rmtree(datacenter.finished_path)
        write(os.path.join(datacenter.storage, "data.csv"), "a\n")
        assert datacenter.set_storage_path(datacenter.storage + "/", move=True) == []
    finally:
        storage_moved.disconnect(dispatch_uid="test-recreate")
    assert sorted(os.listdir(datacenter.storage)) == ["data.csv", *SUBFOLDERS]
    assert moved == []


def test_folders_inside_the_current_storage_are_refused(datacenter):
    write(os.path.join(datacenter.storage, "data.csv"), "a\n")
    refused(datacenter, os.path.join(datacenter.storage, "inner"), "inside the current storage")
    assert not os.path.exists(os.path.join(datacenter.storage, "inner"))


def test_path_that_cannot_be_created_is_refused(datacenter, tmp_path):
    blocker = write(tmp_path / "afile", "x")
    refused(datacenter, os.path.join(blocker, "store"), "cannot be created")
    refused(datacenter, blocker, "exists and is not a folder")
    assert (tmp_path / "afile").read_bytes() == b"x"


def test_path_that_is_not_writable_is_refused(datacenter):
    # /proc/self is a real folder that nobody, not even root, can create files in.
    refused(datacenter, "/proc/self", "is not writable")


def test_home_and_variables_are_expanded(datacenter, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("STORE_NAME", "expanded")

    datacenter.set_storage_path("~/$STORE_NAME")

    assert datacenter.storage == str(tmp_path / "expanded")


# Listings that cost a page, not a folder


def age(path, seconds_ago: float) -> None:
    """Set the modification time of `path` to `seconds_ago` before now."""
    when = datetime.now().timestamp() - seconds_ago
    os.utime(path, (when, when))


def many_pending(datacenter, count: int) -> list[str]:
    names = [f"file-{number:03d}.csv" for number in range(count)]
    for number, name in enumerate(names):
        age(write(os.path.join(datacenter.storage, name), "a\n1\n"), 1000 - number)
    age(datacenter.storage, 100)  # settled: the folder's index may be kept
    return names


def test_a_listing_wraps_only_the_files_asked_for(datacenter, monkeypatch):
    names = many_pending(datacenter, 60)
    wrapped = []
    original = DataCenterFile.__init__

    def counting(self, path, folder_name=""):
        wrapped.append(os.path.basename(path))
        original(self, path, folder_name)

    monkeypatch.setattr(DataCenterFile, "__init__", counting)

    listing = datacenter.pending_listing(sort="date")
    assert len(listing) == 60
    assert [file.name for file in listing[25:50]] == names[::-1][25:50]
    assert wrapped == names[::-1][25:50]


def test_a_kept_listing_shows_new_and_removed_files_at_once(datacenter):
    names = many_pending(datacenter, 30)
    assert [file.name for file in datacenter.pending_listing()[:3]] == names[:3]

    write(os.path.join(datacenter.storage, "a-new.csv"), "a\n1\n")
    os.unlink(os.path.join(datacenter.storage, names[0]))

    by_name = datacenter.pending_listing()
    assert len(by_name) == 30
    assert [file.name for file in by_name[:2]] == ["a-new.csv", names[1]]
    assert datacenter.pending_listing(sort="date")[0].name == "a-new.csv"


def test_changes_in_the_same_moment_as_the_reading_are_not_missed(datacenter):
    # The folder changes twice within its clock's resolution: its time may stay the same,
    # so an index read in between must not be kept.
    write(os.path.join(datacenter.storage, "first.csv"), "a\n1\n")
    settled = os.stat(datacenter.storage).st_mtime_ns
    assert [file.name for file in datacenter.pending_listing()] == ["first.csv"]
    write(os.path.join(datacenter.storage, "second.csv"), "a\n1\n")
    os.utime(datacenter.storage, ns=(settled, settled))

    assert [file.name for file in datacenter.pending_listing()] == ["first.csv", "second.csv"]


def test_a_file_that_goes_after_the_reading_is_left_out_of_the_page(datacenter):
    names = many_pending(datacenter, 5)
    listing = datacenter.pending_listing()
    os.unlink(os.path.join(datacenter.storage, names[1]))

    assert [file.name for file in listing[:5]] == [names[0], *names[2:]]


@pytest.mark.django_db
def test_the_finished_listing_follows_appends_newest_first(datacenter):
    finished = datacenter.finished_path
    for number, name in enumerate(["a.create.finished.csv", "b.create.finished.csv"]):
        age(write(os.path.join(finished, name), "username\nann\n"), 500 - number)
    age(finished, 100)
    assert [f.name for f in datacenter.finished_listing()] == [
        "b.create.finished.csv",
        "a.create.finished.csv",
    ]
    write(os.path.join(datacenter.storage, "a.csv"), "username\nzed\n")

    process_file(datacenter, "a.csv", "users", "create")  # appends to a.create.finished.csv

    assert datacenter.finished_listing()[0].name == "a.create.finished.csv"


# Distribution that a killed process leaves half-done


def outputs(tmp_path, finished_rows: str, pending_rows: str | None):
    folder = tmp_path / "outputs"
    folder.mkdir(exist_ok=True)
    finished = write(folder / "finished.csv", finished_rows)
    pending = write(folder / "pending.csv", pending_rows) if pending_rows else None
    return finished, pending


def test_a_distribution_cut_off_at_any_step_is_finished_by_applying_it_again(datacenter, tmp_path):
    write(os.path.join(datacenter.finished_path, "d.create.finished.csv"), "a\nold\n")
    source = write(os.path.join(datacenter.storage, "d.csv"), "a\nnew\nbad\n")
    plan = datacenter.plan_distribution(False, source, True, "create")
    finished, pending = outputs(tmp_path, "a\nnew\n", "a,--ERRORS--\nbad,no\n")
    merged = os.path.join(datacenter.finished_path, f".d.create.finished.csv.{plan.token}")
    # Cut off after the merged rows were written and their input removed.
    distribution._merge_csv(plan.finished_result, finished, merged)
    os.unlink(finished)

    plan.apply(finished, pending)
    plan.apply(finished, pending)  # and again: nothing happens twice

    assert tree(datacenter.storage) == {
        "finished/d.create.finished.csv": b"a\r\nold\r\nnew\r\n",
        "d.create.pending.csv": b"a,--ERRORS--\nbad,no\n",
        "unfinished/d.csv": b"a\nnew\nbad\n",
    }


def test_a_plan_survives_being_stored(datacenter):
    source = write(os.path.join(datacenter.storage, "e.csv"), "a\n1\n")
    plan = datacenter.plan_distribution(True, source, False, "update")

    assert storage.Distribution.from_dict(plan.as_dict()) == plan
    assert plan.moves == [(source, os.path.join(datacenter.finished_path, "e.csv"))]
