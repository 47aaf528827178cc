"""The data center: a storage folder of CSV files and what staff do with it.

Plain Python with no request and no ORM, so that views, commands and tasks share it. Every
change of a file is made so that a failure half-way leaves the file either where it was or
where it belongs: copies are written under a hidden temporary name, checked, and renamed into
place; an original is removed only after its copy is complete.
"""

import contextlib
import csv
import errno
import fcntl
import filecmp
import functools
import os
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime

import re2
from django.dispatch import Signal

# A cell may be as large as a file (Python's csv module stops at 128 KiB by default).
csv.field_size_limit(2**31 - 1)

SUBFOLDERS = ("deleted", "finished", "graduated", "logs", "unfinished")
ACTION_LOG = "datacenter.log"
#: The hidden folder of the storage root where jobs keep their outputs until distributed.
JOBS_FOLDER = ".jobs"
#: The folder of exported records, made by the first export.
EXPORTS_FOLDER = "exports"
# A rotated log backup such as "datacenter.log.3".
LOG_BACKUP_NAME = re.compile(r"^(?P<base>.+)\.(?P<number>\d+)$")

#: Sent after the storage moved, with the keyword arguments datacenter, old_path and new_path.
storage_moved = Signal()


class StorageError(ValueError):
    """A request on the storage that was refused; the message is meant for staff."""


def check_file_name(name: str) -> str:
    """Return `name` if it names an entry inside one folder; raise FileNotFoundError if not.

    Names come from URLs and forms, so anything that could leave its folder (``..``, slashes,
    absolute paths, NUL), hidden names and control characters are treated as missing files.
    """
    if (
        not name
        or name in {".", ".."}
        or name.startswith(".")
        or "/" in name
        or "\\" in name
        or any(ord(char) < 32 or ord(char) == 127 for char in name)
    ):
        raise FileNotFoundError(errno.ENOENT, "No such file", name)
    return name


def unique_name(folder: str, name: str) -> str:
    """`name`, or `STEM-N.EXT` with the smallest N that is not yet taken in `folder`."""
    stem, ext = os.path.splitext(name)
    candidate, number = name, 1
    while os.path.lexists(os.path.join(folder, candidate)):
        candidate, number = f"{stem}-{number}{ext}", number + 1
    return candidate


def place_new_file(temp_path: str, path: str) -> None:
    """Rename `temp_path` to `path`, raising FileExistsError rather than replacing a file."""
    try:
        os.link(temp_path, path)
    except FileExistsError:
        raise
    except OSError:
        # Filesystems without hard links: check, then rename.
        if os.path.lexists(path):
            raise FileExistsError(errno.EEXIST, "File exists", path) from None
        os.rename(temp_path, path)
        return
    os.unlink(temp_path)


def place_under_free_name(
    path: str, folder: str, name: str, place: Callable[[str, str], None] = place_new_file
) -> str:
    """Put `path` into `folder` as `name` or, when taken, as unique_name() finds; return the
    name. `place(path, target)` raises FileExistsError rather than replace a file."""
    while True:
        target = unique_name(folder, name)
        try:
            place(path, os.path.join(folder, target))
        except FileExistsError:
            continue  # another process took the name in the meantime
        return target


def lock_open_file(handle, path: str) -> bool:
    """Lock the open file `handle` for this process (raising BlockingIOError while another
    holds it) and return whether it is still the file at `path`, not replaced or moved
    meanwhile. The lock goes with the process, so a killed holder never blocks the file."""
    fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        return os.path.samestat(os.fstat(handle.fileno()), os.stat(path))
    except FileNotFoundError:
        return False


def fsync_file(path: str) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def move_file(source: str, dest: str) -> None:
    """Move a file over `dest`, across filesystems too, keeping its times."""
    try:
        os.replace(source, dest)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        temp_path = _copy_beside(source, dest)
        os.replace(temp_path, dest)
        os.unlink(source)


def _copy_beside(source: str, dest: str) -> str:
    """Copy `source` to a hidden temporary file next to `dest`, verified, and return its path."""
    handle, temp_path = tempfile.mkstemp(
        dir=os.path.dirname(dest), prefix=f".{os.path.basename(dest)}.", suffix=".part"
    )
    os.close(handle)
    try:
        shutil.copy2(source, temp_path)
        fsync_file(temp_path)
        if not filecmp.cmp(source, temp_path, shallow=False):
            raise OSError(errno.EIO, "the copy differs from the original", source)
    except BaseException:
        os.unlink(temp_path)
        raise
    return temp_path


def human_size(size: int) -> str:
    """``"13 bytes"``, ``"1.50 kb"``, ``"2.00 MB"``, ``"1.00 GB"``."""
    for power, unit in ((3, "GB"), (2, "MB"), (1, "kb")):
        if size >= 1024**power:
            return f"{size / 1024**power:.2f} {unit}"
    return f"{size} bytes"


@functools.lru_cache(maxsize=4096)
def _count_lines(path: str, size: int, mtime_ns: int) -> int:
    # Keyed by size and mtime as well as path, so a changed file is counted again.
    count, last = 0, b"\n"
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            count += chunk.count(b"\n")
            last = chunk[-1:]
    return count if last == b"\n" else count + 1


@functools.lru_cache(maxsize=4096)
def _count_rows(path: str, size: int, mtime_ns: int) -> int | None:
    try:
        with open(path, encoding="utf-8-sig", newline="") as handle:
            records = sum(1 for row in csv.reader(handle) if row)
    except (UnicodeDecodeError, csv.Error):
        return None
    return max(records - 1, 0)


class DataCenterFile:
    """A file in the data center, described by its name, size and date.

    Line and row counts are computed on first use and cached by path, size and mtime, so that
    listing a folder reads no file twice.
    """

    def __init__(self, path: str, folder_name: str = ""):
        self.path = str(path)
        self.name = os.path.basename(self.path)
        self.rel_path = os.path.join(folder_name, self.name)
        stat = os.stat(self.path)
        self.size = stat.st_size
        self._mtime_ns = stat.st_mtime_ns
        self.modified = datetime.fromtimestamp(stat.st_mtime, tz=UTC)

    def __repr__(self) -> str:
        return f"<DataCenterFile {self.rel_path}>"

    @property
    def lines(self) -> int:
        return _count_lines(self.path, self.size, self._mtime_ns)

    @property
    def rows(self) -> int | None:
        """Number of CSV records after the header, or None when the file is no readable CSV."""
        return _count_rows(self.path, self.size, self._mtime_ns)

    def get_size(self) -> str:
        return human_size(self.size)

    def get_date(self) -> str:
        # Local time: Django sets the process time zone from settings.TIME_ZONE.
        return self.modified.astimezone().strftime("%Y-%m-%d %H:%M:%S")


def _listed(entry: os.DirEntry, suffix: str) -> bool:
    """Whether a listing shows `entry`: a regular file (no link) ending in `suffix`, not
    hidden."""
    return (
        entry.name.endswith(suffix)
        and not entry.name.startswith(".")
        and entry.is_file(follow_symlinks=False)
    )


MAX_SEARCH_LENGTH = 500
_SEARCH_OPTIONS = re2.Options()
_SEARCH_OPTIONS.log_errors = False


def compile_search(query: str):
    """`query` compiled by RE2, which matches in time linear in the text whatever the
    expression, so that no search can hang a web process; ValueError in words for an
    expression that is too long or that RE2 does not support."""
    if not isinstance(query, str):
        raise ValueError("Invalid search expression: it must be text.")
    if len(query) > MAX_SEARCH_LENGTH:
        raise ValueError(
            f"The search expression is too long: at most {MAX_SEARCH_LENGTH} characters."
        )
    try:
        return re2.compile(query, _SEARCH_OPTIONS)
    except re2.error as exc:
        reason = exc.args[0].decode() if exc.args and isinstance(exc.args[0], bytes) else exc
        raise ValueError(
            f"Invalid search expression: {reason}. Back-references and look-around "
            "((?=...), (?!...), (?<=...)) are not supported."
        ) from None


class FolderIndex:
    """The names and modification times of the files of one folder that a listing shows,
    in both orders, read once per change of the folder.

    Adding, removing or renaming an entry changes the folder's own modification time, so the
    index of a folder holds as long as that time does; every change the data center makes to
    a file (appending included) is a rename. An index read within RACY_SECONDS of the
    folder's last change is not kept: a second change in the same clock tick would leave the
    folder's time as it was.
    """

    RACY_SECONDS = 2
    _cache: dict[tuple[str, str], "FolderIndex"] = {}
    _CACHE_SIZE = 32

    def __init__(self, folder: str, suffix: str, version: tuple[int, int, int]):
        self.version = version
        self.mtimes: dict[str, int] = {}
        with os.scandir(folder) as entries:
            for entry in entries:
                if _listed(entry, suffix):
                    with contextlib.suppress(FileNotFoundError):
                        self.mtimes[entry.name] = entry.stat(follow_symlinks=False).st_mtime_ns

    @functools.cached_property
    def by_name(self) -> list[str]:
        return sorted(self.mtimes)

    @functools.cached_property
    def by_date(self) -> list[str]:
        """Newest first; files of the same time by name, descending."""
        return sorted(self.mtimes, key=lambda name: (self.mtimes[name], name), reverse=True)

    @classmethod
    def of(cls, folder: str, suffix: str) -> "FolderIndex":
        stat = os.stat(folder)
        version = (stat.st_dev, stat.st_ino, stat.st_mtime_ns)
        key = (folder, suffix)
        index = cls._cache.get(key)
        if index is not None and index.version == version:
            return index
        index = cls(folder, suffix, version)
        if time.time_ns() - stat.st_mtime_ns > cls.RACY_SECONDS * 1_000_000_000:
            cls._cache.pop(key, None)
            if len(cls._cache) >= cls._CACHE_SIZE:
                del cls._cache[next(iter(cls._cache))]
            cls._cache[key] = index
        return index


class FileListing(Sequence):
    """The files of a folder in a given order, as a sequence that stats and wraps only the
    items asked for: a page of 25 costs 25 files, not the whole folder."""

    def __init__(self, folder: str, folder_name: str, suffix: str, sort: str):
        if sort not in ("name", "date"):
            raise ValueError(f"Unknown sort order: {sort!r}")
        self.folder, self.folder_name = folder, folder_name
        index = FolderIndex.of(folder, suffix)
        self.names = index.by_name if sort == "name" else index.by_date

    @classmethod
    def empty(cls, folder_name: str) -> "FileListing":
        """A listing of nothing, for a folder that cannot be shown."""
        listing = cls.__new__(cls)
        listing.folder, listing.folder_name, listing.names = "", folder_name, []
        return listing

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, item):
        if isinstance(item, slice):
            return [file for name in self.names[item] if (file := self._file(name))]
        file = self._file(self.names[item])
        if file is None:
            raise IndexError(item)
        return file

    def _file(self, name: str) -> DataCenterFile | None:
        """The file `name`, or None when it went since the folder was read."""
        try:
            return DataCenterFile(os.path.join(self.folder, name), self.folder_name)
        except FileNotFoundError:
            return None


class DataCenter:
    """A storage folder with the subfolders of SUBFOLDERS."""

    def __init__(self, path: str):
        self.storage = os.path.abspath(os.path.expanduser(str(path)))
        self._create_subfolders()

    def __repr__(self) -> str:
        return f"<DataCenter {self.storage}>"

    def _create_subfolders(self) -> None:
        for name in SUBFOLDERS:
            os.makedirs(os.path.join(self.storage, name), exist_ok=True)

    @property
    def deleted_path(self) -> str:
        return os.path.join(self.storage, "deleted")

    @property
    def finished_path(self) -> str:
        return os.path.join(self.storage, "finished")

    @property
    def graduated_path(self) -> str:
        return os.path.join(self.storage, "graduated")

    @property
    def logs_path(self) -> str:
        return os.path.join(self.storage, "logs")

    @property
    def unfinished_path(self) -> str:
        return os.path.join(self.storage, "unfinished")

    def free_space(self) -> int:
        return shutil.disk_usage(self.storage).free

    def real_folder(self, folder: str = "") -> str:
        """The real path of the storage root ('') or of one of its subfolders.

        Raises FileNotFoundError when the subfolder is a symbolic link (or lies under one):
        nothing is ever read through a link out of the storage.
        """
        root = os.path.realpath(self.storage)
        if not folder:
            return root
        real = os.path.realpath(os.path.join(self.storage, folder))
        if folder not in (*SUBFOLDERS, EXPORTS_FOLDER) or real != os.path.join(root, folder):
            raise FileNotFoundError(errno.ENOENT, "No such folder", folder)
        return real

    # Listing and reading files

    def _files(self, folder: str, folder_name: str, pattern: str) -> list[DataCenterFile]:
        result = []
        with os.scandir(folder) as entries:
            for entry in entries:
                if _listed(entry, pattern):
                    result.append(DataCenterFile(entry.path, folder_name))
        return result

    def pending_files(self, sort: str = "name") -> list[DataCenterFile]:
        """The CSV files in the storage root, by name or newest first."""
        return list(self.pending_listing(sort))

    def finished_files(self) -> list[DataCenterFile]:
        """The ``*.finished.csv`` files in ``finished/``, newest first."""
        return list(self.finished_listing())

    def pending_listing(self, sort: str = "name") -> "FileListing":
        """pending_files() as a sequence that reads only the files a page shows."""
        return FileListing(self.real_folder(), "", ".csv", sort)

    def finished_listing(self) -> "FileListing":
        """finished_files() as a sequence that reads only the files a page shows."""
        try:
            folder = self.real_folder("finished")
        except FileNotFoundError:
            return FileListing.empty("finished")
        return FileListing(folder, "finished", ".finished.csv", "date")

    def get_file(self, name: str, folder: str = "") -> DataCenterFile:
        """The regular file `name` in the root or in one subfolder; FileNotFoundError if none."""
        check_file_name(name)
        path = os.path.join(self.real_folder(folder), name)
        if os.path.islink(path) or not os.path.isfile(path):
            raise FileNotFoundError(errno.ENOENT, "No such file", name)
        return DataCenterFile(path, folder)

    def delete_file(self, name: str) -> str:
        """Move the pending file `name` to ``deleted/`` and return its name there.

        A file of the same name already in ``deleted/`` is kept: the newcomer gets a free name.
        """
        file = self.get_file(name)
        return self._into_deleted(file.path, name, place_new_file)

    def replace_file(self, name: str, new_path: str) -> str:
        """Put the complete file `new_path` (in the storage root) in place of the pending file
        `name` in one step, keeping the old version in ``deleted/``; return its name there.

        Raises StorageError while the file is being processed: the old version is in use.
        """
        file = self.get_file(name)
        with open(file.path, "rb") as handle:
            try:
                current = lock_open_file(handle, file.path)
            except BlockingIOError:
                raise StorageError(
                    f"{name} is being processed right now; nothing was changed. Try again "
                    "when that run has ended."
                ) from None
            if not current:
                raise StorageError(f"{name} was changed meanwhile; nothing was changed.")
            kept = self._into_deleted(file.path, name, os.link)
            os.replace(new_path, file.path)
        return kept

    def _into_deleted(self, path: str, name: str, place: Callable[[str, str], None]) -> str:
        return place_under_free_name(path, self.deleted_path, name, place)

    # The action log

    def log_action(self, user, action: str, detail: str, level: str = "INFO") -> None:
        """Append ``TIME - LEVEL - USER - ACTION: DETAIL`` to ``logs/datacenter.log``.

        One short append per line, so that several processes can share the file.
        """
        now = datetime.now().astimezone()
        username = user.get_username() if hasattr(user, "get_username") else (user or "system")
        detail = detail.replace("\r", "\\r").replace("\n", "\\n")
        line = (
            f"{now:%Y-%m-%d %H:%M:%S},{now.microsecond // 1000:03d} - {level} - "
            f"{username} - {action}: {detail}\n"
        )
        with open(os.path.join(self.logs_path, ACTION_LOG), "a", encoding="utf-8") as handle:
            handle.write(line)

    def log_files(self) -> list[DataCenterFile]:
        """The log files in ``logs/`` by name, without rotated backups."""
        try:
            files = self._files(self.real_folder("logs"), "logs", "")
        except FileNotFoundError:
            return []
        return sorted(
            (file for file in files if not LOG_BACKUP_NAME.match(file.name)),
            key=lambda file: file.name,
        )

    def _log_and_backups(self, basename: str) -> list[str]:
        """`basename` and its rotated backups, oldest (highest number) first."""
        backups = []
        with os.scandir(self.real_folder("logs")) as entries:
            for entry in entries:
                match = LOG_BACKUP_NAME.match(entry.name)
                if match and match["base"] == basename:
                    backups.append((int(match["number"]), entry.name))
        return [name for _, name in sorted(backups, reverse=True)] + [basename]

    def query_log(
        self, basename: str, query: str, limit: int = 0, start: int = 0
    ) -> Iterator[str]:
        """The lines of log `basename` and its backups that match the regular expression
        `query`, oldest first; skip the first `start` matches, return at most `limit` (0: all).

        Raises ValueError at once for an invalid expression or log name.
        """
        pattern = compile_search(query)
        try:
            check_file_name(basename)
            folder = self.real_folder("logs")
        except FileNotFoundError:
            raise ValueError(f"Invalid log file name: {basename!r}") from None
        return self._matching_lines(folder, self._log_and_backups(basename), pattern, limit, start)

    def _matching_lines(self, folder, names, pattern, limit, start) -> Iterator[str]:
        found = 0
        for name in names:
            path = os.path.join(folder, name)
            if os.path.islink(path) or not os.path.isfile(path):
                continue  # a link could lead anywhere: backups are the site's own files
            with open(path, encoding="utf-8", errors="replace") as handle:
                for line in handle:
                    if not pattern.search(line):
                        continue
                    found += 1
                    if found <= start:
                        continue
                    yield line
                    if limit and found - start >= limit:
                        return

    # Relocating the storage

    def check_new_storage_path(self, path: str) -> str:
        """Validate and create the folder `path` for relocation; return it, real and absolute.
        The current storage passes as it is."""
        expanded = os.path.expandvars(os.path.expanduser(str(path).strip()))
        if not expanded:
            raise StorageError("Please give the path of the new storage folder.")
        if "\x00" in expanded:
            raise StorageError("The path contains a NUL character.")
        if not os.path.isabs(expanded):
            raise StorageError(
                f"The path must be absolute, that is start with '/': {path!r} does not."
            )
        new = os.path.realpath(expanded)
        current = os.path.realpath(self.storage)
        if new == current:
            return new
        if new.startswith(current + os.sep):
            raise StorageError(
                f"{new} lies inside the current storage folder {current}; "
                "choose a folder outside it."
            )
        if os.path.lexists(new) and not os.path.isdir(new):
            raise StorageError(f"{new} exists and is not a folder.")
        try:
            os.makedirs(new, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"The folder {new} cannot be created: {exc.strerror}.") from None
        try:
            with tempfile.TemporaryFile(dir=new):
                pass
        except OSError as exc:
            raise StorageError(f"The folder {new} is not writable: {exc.strerror}.") from None
        return new

    def relocate(
        self,
        path: str,
        move: bool = False,
        overwrite: bool = False,
        progress: Callable[[int, int], None] | None = None,
    ) -> dict[str, str]:
        """Make `path` the storage, moving the old contents over with `move`.

        Returns what could not be moved, as a mapping of the name (relative to the storage) to
        the reason; those items stay in the old storage. Raises StorageError for a path that
        cannot be used, and then nothing changes. `progress(files, total)` is called as files
        are moved. A move that was cut off is finished by moving again to the same path: a
        file already copied there, byte for byte the same, is then only removed here. The
        outputs of jobs (JOBS_FOLDER) stay where they are.
        """
        new = self.check_new_storage_path(path)
        old = self.storage
        if new == os.path.realpath(old):
            # The seed's way to re-create a storage whose folders were removed.
            self._create_subfolders()
            return {}
        not_moved: dict[str, str] = {}
        if move:
            total = _count_files(old)
            moved = 0

            def done(files: int) -> None:
                nonlocal moved
                moved += files
                if progress:
                    progress(moved, total)

            _move_tree(old, new, overwrite, not_moved, done=done)
        self.storage = new
        self._create_subfolders()
        storage_moved.send(sender=DataCenter, datacenter=self, old_path=old, new_path=new)
        return not_moved

    def set_storage_path(self, path: str, move: bool = False, overwrite: bool = False) -> list:
        """Relocate the storage to `path`; return the names that could not be moved."""
        return sorted(self.relocate(path, move=move, overwrite=overwrite))

    # Distributing the results of a batch run

    def dist_processed_files(
        self,
        successful: bool,
        source_path: str,
        finished_file: str,
        pending_file: str | None,
        mode: str = "create",
    ) -> tuple[str, str | None]:
        """Put the outputs of processing `source_path` in `mode` where they belong.

        The rows that worked (`finished_file`) are appended to ``finished/NAME.MODE.finished.csv``
        and the failed ones (`pending_file`, may be None) become ``NAME.MODE.pending.csv`` in the
        root. The source goes to ``finished/`` when everything worked and to ``unfinished/``
        otherwise; a processed ``NAME.MODE.pending.csv`` whose original waits in
        ``unfinished/`` completes (or keeps waiting for) that original. The folder holding the
        outputs is removed when it lies outside the storage. Returns the paths of the finished
        file and of the pending file (None when there is none).
        """
        plan = self.plan_distribution(successful, source_path, pending_file is not None, mode)
        plan.apply(finished_file, pending_file)
        output_dir = os.path.realpath(os.path.dirname(finished_file))
        storage = os.path.realpath(self.storage)
        if os.path.commonpath([storage, output_dir]) != storage:
            shutil.rmtree(output_dir, ignore_errors=True)
        return plan.finished_result, plan.pending_result

    def plan_distribution(
        self, successful: bool, source_path: str, has_pending: bool, mode: str
    ) -> "Distribution":
        """Where the outputs of processing `source_path` go (see dist_processed_files),
        decided from the storage as it is now, before anything moves."""
        basename = os.path.basename(source_path)
        pending_name = basename
        completes_original = False
        if basename.endswith(".pending.csv"):
            original = basename.rsplit(".", 3)[0] + ".csv"
            if os.path.isfile(os.path.join(self.unfinished_path, original)):
                basename = original
                completes_original = True
        stem, ext = os.path.splitext(basename)
        if not completes_original:
            pending_name = f"{stem}.{mode}.pending{ext}"
        finished_dest = os.path.join(self.finished_path, basename)
        unfinished_dest = os.path.join(self.unfinished_path, basename)
        plan = Distribution(
            source=source_path,
            finished_result=os.path.join(self.finished_path, f"{stem}.{mode}.finished{ext}"),
            pending_result=os.path.join(self.storage, pending_name) if has_pending else None,
            token=uuid.uuid4().hex,
        )
        if successful and not completes_original:
            plan.moves = [(source_path, finished_dest)]
        elif successful:
            plan.moves = [(unfinished_dest, finished_dest)]
            plan.remove_source = True
        elif not completes_original:
            plan.moves = [(source_path, unfinished_dest)]
        return plan


@dataclass
class Distribution:
    """The steps that put the outputs of one batch run in place. A run cut off half-way is
    finished by applying its plan again: each step is skipped once its input is gone, and
    appending the finished rows goes through a merged file of the plan's own name, so that
    no row is appended twice. The outputs must lie on the storage's filesystem for that."""

    source: str
    finished_result: str
    pending_result: str | None
    token: str
    #: (from, to) renames of the source or of the original it completes.
    moves: list[tuple[str, str]] = field(default_factory=list)
    remove_source: bool = False

    def apply(self, finished_file: str, pending_file: str | None) -> None:
        self._append(finished_file, self.finished_result)
        if pending_file is not None and os.path.exists(pending_file):
            move_file(pending_file, self.pending_result)
        for source, dest in self.moves:
            if os.path.exists(source):
                move_file(source, dest)
        if self.remove_source and os.path.exists(self.source):
            os.unlink(self.source)

    def _append(self, rows: str, dest: str) -> None:
        merged = os.path.join(os.path.dirname(dest), f".{os.path.basename(dest)}.{self.token}")
        if os.path.exists(rows):
            if not os.path.exists(dest):
                move_file(rows, dest)
                return
            _merge_csv(dest, rows, merged)
            os.unlink(rows)
        if os.path.exists(merged):
            os.replace(merged, dest)

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Distribution":
        return cls(**{**data, "moves": [tuple(move) for move in data["moves"]]})


def read_csv_preview(path: str, max_rows: int = 10) -> tuple[list[str], list[list[str]]]:
    """The header and the first `max_rows` records of a CSV file, for display."""
    with open(path, encoding="utf-8-sig", errors="replace", newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader, [])
        rows = []
        for row in reader:
            if len(rows) >= max_rows:
                break
            rows.append(row)
    return header, rows


def _append_csv(source: str, dest: str) -> None:
    """Append the records of CSV file `source` to CSV file `dest` and remove `source`."""
    if not os.path.exists(dest):
        move_file(source, dest)
        return
    handle, temp_path = tempfile.mkstemp(
        dir=os.path.dirname(dest), prefix=f".{os.path.basename(dest)}.", suffix=".part"
    )
    os.close(handle)
    try:
        _merge_csv(dest, source, temp_path)
        os.replace(temp_path, dest)
    except BaseException:
        if os.path.exists(temp_path):
            os.unlink(temp_path)
        raise
    os.unlink(source)


def _merge_csv(old_path: str, new_path: str, merged_path: str) -> None:
    """Write the records of CSV files `old_path` then `new_path` to `merged_path`, durably,
    with the mode of `old_path`. Columns are matched by name; a column only one of the files
    has is left empty in the other's records."""
    with (
        open(old_path, encoding="utf-8", newline="") as old,
        open(new_path, encoding="utf-8", newline="") as new,
        open(merged_path, "w", encoding="utf-8", newline="") as merged,
    ):
        old_reader, new_reader = csv.DictReader(old), csv.DictReader(new)
        old_fields = old_reader.fieldnames or []
        fields = old_fields + [f for f in new_reader.fieldnames or [] if f not in old_fields]
        writer = csv.DictWriter(merged, fields)
        writer.writeheader()
        writer.writerows(old_reader)
        writer.writerows(new_reader)
        merged.flush()
        os.fsync(merged.fileno())
    shutil.copymode(old_path, merged_path)


def _count_files(folder: str) -> int:
    """The files (and links) below `folder` that a move of the storage would handle."""
    count = 0
    for parent, dirs, files in os.walk(folder):
        if parent == folder and JOBS_FOLDER in dirs:
            dirs.remove(JOBS_FOLDER)
        count += len(files) + sum(os.path.islink(os.path.join(parent, d)) for d in dirs)
    return count


def _move_tree(source_dir, dest_dir, overwrite, not_moved, prefix="", done=lambda files: None):
    """Move the entries of `source_dir` into `dest_dir`, merging folders of the same name.

    Each entry is copied, checked against its original and only then removed at the old
    place. What cannot be moved stays and is recorded in `not_moved` with the reason.
    `done(files)` is told how many files were handled after each entry.
    """
    with os.scandir(source_dir) as scan:
        entries = sorted(scan, key=lambda entry: entry.name)
    _remove_stale_copies(dest_dir, {entry.name for entry in entries})
    for entry in entries:
        name = prefix + entry.name
        if name == JOBS_FOLDER:
            continue
        dest = os.path.join(dest_dir, entry.name)
        source_is_dir = entry.is_dir(follow_symlinks=False)
        dest_exists = os.path.lexists(dest)
        dest_is_dir = os.path.isdir(dest) and not os.path.islink(dest)
        merged = source_is_dir and dest_is_dir  # its files are told one by one
        files = 0 if merged else _count_files(entry.path) if source_is_dir else 1
        try:
            if merged:
                _move_tree(entry.path, dest, overwrite, not_moved, name + "/", done)
                if not os.listdir(entry.path):
                    os.rmdir(entry.path)
            elif dest_exists and _same_file(entry, dest):
                os.unlink(entry.path)  # copied by a move that was cut off before this step
            elif dest_exists and not overwrite:
                not_moved[name] = "already exists in the new storage (overwrite is off)"
            elif dest_exists and (source_is_dir or dest_is_dir):
                not_moved[name] = "exists in the new storage as a different kind of entry"
            elif source_is_dir:
                _move_folder(entry.path, dest)
            else:
                _move_entry(entry.path, dest)
        except OSError as exc:
            not_moved[name] = exc.strerror or str(exc)
        done(files)


def _remove_stale_copies(dest_dir: str, names: set[str]) -> None:
    """Remove the hidden partial copies (``.NAME.RANDOM.part``) of `names` in `dest_dir`
    that a move cut off by a killed process left behind."""
    with os.scandir(dest_dir) as scan:
        for entry in scan:
            if not (entry.name.startswith(".") and entry.name.endswith(".part")):
                continue
            if entry.name[1:-5].rpartition(".")[0] not in names:
                continue
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)


def _same_file(entry: os.DirEntry, dest: str) -> bool:
    return (
        entry.is_file(follow_symlinks=False)
        and os.path.isfile(dest)
        and not os.path.islink(dest)
        and filecmp.cmp(entry.path, dest, shallow=False)
    )


def _move_entry(source: str, dest: str) -> None:
    if os.path.islink(source):
        temp_path = os.path.join(
            os.path.dirname(dest), f".{os.path.basename(dest)}.moving-{os.getpid()}.part"
        )
        os.symlink(os.readlink(source), temp_path)
    else:
        temp_path = _copy_beside(source, dest)
    os.replace(temp_path, dest)
    os.unlink(source)


def _move_folder(source: str, dest: str) -> None:
    temp_path = tempfile.mkdtemp(
        dir=os.path.dirname(dest), prefix=f".{os.path.basename(dest)}.", suffix=".part"
    )
    os.rmdir(temp_path)
    try:
        shutil.copytree(source, temp_path, symlinks=True)
        _check_same_tree(source, temp_path)
        if os.path.lexists(dest):
            raise FileExistsError(errno.EEXIST, "File exists", dest)
        os.rename(temp_path, dest)
    except BaseException:
        shutil.rmtree(temp_path, ignore_errors=True)
        raise
    shutil.rmtree(source)


def _check_same_tree(original: str, copy: str) -> None:
    for folder, dirs, files in os.walk(original):
        relative = os.path.relpath(folder, original)
        for name in dirs + files:
            path = os.path.join(folder, name)
            copied = os.path.join(copy, relative, name)
            if os.path.islink(path) or os.path.isdir(path):
                same = os.path.lexists(copied)
            else:
                same = os.path.isfile(copied) and filecmp.cmp(path, copied, shallow=False)
            if not same:
                raise OSError(errno.EIO, "the copy differs from the original", path)
