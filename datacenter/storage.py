"""The data center: a storage folder of CSV files and what staff do with it.

Plain Python with no request and no ORM, so that views, commands and tasks share it. Every
change of a file is made so that a failure half-way leaves the file either where it was or
where it belongs: copies are written under a hidden temporary name, checked, and renamed into
place; an original is removed only after its copy is complete.
"""

import errno
import fcntl
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime

from django.dispatch import Signal

# The pieces of the storage, re-exported: DESIGN.md names them as parts of this module.
from .distribution import Distribution  # noqa: F401
from .files import (  # noqa: F401
    StorageError,
    check_file_name,
    fsync_file,
    human_size,
    lock_open_file,
    move_file,
    place_new_file,
    place_under_free_name,
    unique_name,
)
from .listings import DataCenterFile, FileListing, read_csv_preview  # noqa: F401
from .logsearch import compile_search, log_and_backups, matching_lines
from .relocation import count_files, move_tree, tree_size

SUBFOLDERS = ("deleted", "finished", "graduated", "logs", "unfinished")
ACTION_LOG = "datacenter.log"
#: The hidden folder of the storage root where jobs keep their outputs until distributed.
JOBS_FOLDER = ".jobs"
#: The folder of exported records, made by the first export.
EXPORTS_FOLDER = "exports"
#: The folders whose files the site shows, each with the endings of the names it shows; any
#: other file lying in them is not the data center's and is never listed, served, replaced
#: or deleted.
DATA_FOLDERS = {
    "": ".csv",
    "finished": ".csv",
    "unfinished": ".csv",
    "deleted": ".csv",
    EXPORTS_FOLDER: (".csv", ".xlsx"),
}
LOG_SUFFIX = ".log"
RELOCATING = "The storage is being relocated; nothing was changed. Try again when that has ended."

#: Sent after the storage moved, with the keyword arguments datacenter, old_path and new_path.
storage_moved = Signal()


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

    def contents_size(self) -> tuple[int, int]:
        """(files, bytes) that relocating with "move" would move."""
        return tree_size(self.storage, skip=JOBS_FOLDER)

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

    def pending_files(self, sort: str = "name") -> list[DataCenterFile]:
        """The CSV files in the storage root, by name or newest first."""
        return list(self.pending_listing(sort))

    def finished_files(self) -> list[DataCenterFile]:
        """The ``*.finished.csv`` files in ``finished/``, newest first."""
        return list(self.finished_listing())

    def pending_listing(self, sort: str = "name") -> "FileListing":
        """pending_files() as a sequence that reads only the files a page shows."""
        return FileListing(self.real_folder(), "", ".csv", sort)

    def finished_listing(self, suffix: str = ".finished.csv") -> "FileListing":
        """finished_files() as a sequence that reads only the files a page shows; with
        `suffix` ``.csv``, the originals moved to ``finished/`` too."""
        try:
            folder = self.real_folder("finished")
        except FileNotFoundError:
            return FileListing.empty("finished")
        return FileListing(folder, "finished", suffix, "date")

    def get_file(self, name: str, folder: str = "") -> DataCenterFile:
        """The data center file `name` in the root or in one subfolder of DATA_FOLDERS;
        FileNotFoundError for any other name, a link, or a file of another kind."""
        check_file_name(name)
        if folder not in DATA_FOLDERS or not name.endswith(DATA_FOLDERS[folder]):
            raise FileNotFoundError(errno.ENOENT, "No such file", name)
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
        """The log files (``*.log``) in ``logs/`` by name, without rotated backups."""
        try:
            folder = self.real_folder("logs")
        except FileNotFoundError:
            return []
        with os.scandir(folder) as entries:
            names = [entry.name for entry in entries if _is_log(entry)]
        return [DataCenterFile(os.path.join(folder, name), "logs") for name in sorted(names)]

    def query_log(
        self,
        basename: str,
        query: str,
        limit: int = 0,
        start: int = 0,
        *,
        newest_first: bool = False,
        ignore_case: bool = False,
    ) -> Iterator[str]:
        """The lines of log `basename` and its backups that match the regular expression
        `query`, oldest first (or the newest first); skip the first `start` matches, return
        at most `limit` (0: all).

        Raises ValueError at once for an invalid expression or log name.
        """
        pattern = compile_search(query, ignore_case)
        try:
            check_file_name(basename)
            folder = self.real_folder("logs")
        except FileNotFoundError:
            raise ValueError(f"Invalid log file name: {basename!r}") from None
        if not basename.endswith(LOG_SUFFIX):
            raise ValueError(f"Invalid log file name: {basename!r}")
        names = log_and_backups(folder, basename)
        return matching_lines(folder, names, pattern, limit, start, newest_first)

    # Relocating the storage

    def check_new_storage_path(self, path: str, literal: bool = False) -> str:
        """Validate and create the folder `path` for relocation; return it, real and absolute.
        The current storage passes as it is. `~` and `$VARIABLES` are expanded unless
        `literal`."""
        path = str(path).strip()
        expanded = path if literal else os.path.expandvars(os.path.expanduser(path))
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
        literal: bool = False,
    ) -> dict[str, str]:
        """Make `path` the storage, moving the old contents over with `move`.

        Returns what could not be moved, as a mapping of the name (relative to the storage) to
        the reason; those items stay in the old storage. Raises StorageError for a path that
        cannot be used, and then nothing changes. `progress(files, total)` is called as files
        are moved. A move that was cut off is finished by moving again to the same path: a
        file already copied there, byte for byte the same, is then only removed here. The
        outputs of jobs (JOBS_FOLDER) stay where they are. `literal` as for
        check_new_storage_path.
        """
        new = self.check_new_storage_path(path, literal)
        old = self.storage
        if new == os.path.realpath(old):
            # The seed's way to re-create a storage whose folders were removed.
            self._create_subfolders()
            return {}
        not_moved: dict[str, str] = {}
        if move:
            total = count_files(old, skip=JOBS_FOLDER)
            moved = 0

            def done(files: int) -> None:
                nonlocal moved
                moved += files
                if progress:
                    progress(moved, total)

            move_tree(old, new, overwrite, not_moved, skip=JOBS_FOLDER, done=done)
        self.storage = new
        self._create_subfolders()
        storage_moved.send(sender=DataCenter, datacenter=self, old_path=old, new_path=new)
        return not_moved

    @contextmanager
    def held(self, *, exclusive: bool = False) -> Iterator[None]:
        """Hold the storage against relocation: shared while a file is written into it,
        exclusively while it is relocated. A shared hold is refused at once while a
        relocation holds the storage (StorageError); an exclusive one waits for the writes
        under way. The lock is on the storage folder itself, which a relocation empties but
        never moves, so it leaves no file behind.
        """
        handle = os.open(self.storage, os.O_RDONLY | os.O_DIRECTORY)
        try:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                raise StorageError(RELOCATING) from None
            yield
        finally:
            os.close(handle)

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


def _is_log(entry: os.DirEntry) -> bool:
    """Whether `entry` is a log of the site: a regular ``*.log`` file, no backup, no link."""
    return (
        entry.name.endswith(LOG_SUFFIX)
        and not entry.name.startswith(".")
        and entry.is_file(follow_symlinks=False)
    )
