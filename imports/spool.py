"""The local spool of a CDS import: ``tmp/``, ``new/`` and ``cur/``, Maildir style.

A file is written in ``tmp/`` and moved to ``new/`` only when complete; whoever consumes it
moves it on to ``cur/``. Moves are renames inside one filesystem, so another process sees a file
either whole or not at all. Hidden names in ``tmp/`` belong to downloads in progress.
"""

import contextlib
import errno
import json
import os

from datacenter.storage import check_file_name, place_new_file

FOLDERS = ("tmp", "new", "cur")
PARTIAL_SUFFIX, JOURNAL_SUFFIX = ".part", ".journal"
Names = list[str]
Journeys = list[tuple[str, dict]]  # complete downloads in tmp/ with their journal


class FileStore:
    def __init__(self, path: str):
        self.path = os.path.abspath(str(path))

    def __repr__(self) -> str:
        return f"<FileStore {self.path}>"

    def prepare(self) -> None:
        """Create the store and its folders where missing."""
        for folder in FOLDERS:
            os.makedirs(os.path.join(self.path, folder), exist_ok=True)

    def folder(self, folder: str) -> str:
        if folder not in FOLDERS:
            raise ValueError(f"Unknown spool folder: {folder!r}")
        return os.path.join(self.path, folder)

    def real_folder(self, folder: str) -> str:
        """The path of `folder`; FileNotFoundError when it is a link that leads elsewhere, so
        that nothing outside the spool is ever listed, served or written through it."""
        path = self.folder(folder)
        if os.path.realpath(path) != os.path.join(os.path.realpath(self.path), folder):
            raise FileNotFoundError(errno.ENOENT, "Not a folder of the spool", path)
        return path

    def list(self, folder: str) -> list[str]:
        """Full paths of the files in `folder` by name, without hidden ones."""
        path = self.real_folder(folder)
        with os.scandir(path) as entries:
            return sorted(
                entry.path
                for entry in entries
                if not entry.name.startswith(".") and entry.is_file(follow_symlinks=False)
            )

    def path_of(self, folder: str, name: str) -> str:
        """The path of the file `name` in `folder`; FileNotFoundError for an unsafe name."""
        return os.path.join(self.real_folder(folder), check_file_name(name))

    def create(self, name: str):
        """Open ``tmp/NAME`` for binary writing."""
        return open(self.path_of("tmp", name), "wb")

    def move(self, name_or_path: str, source: str, destination: str) -> str:
        """Move a file from `source` to `destination`, never over an existing file there.

        Returns the new path; raises FileExistsError when `destination` has the name already.
        """
        name = os.path.basename(name_or_path)
        target = self.path_of(destination, name)
        place_new_file(self.path_of(source, name), target)
        return target

    # A download in tmp/ is first a hidden partial file; once complete and synced it gets its
    # name, beside a journal of where it came from, until it is moved on to new/.

    def partial_path(self, name: str) -> str:
        return os.path.join(self.folder("tmp"), f".{name}{PARTIAL_SUFFIX}")

    def journal_path(self, name: str) -> str:
        return os.path.join(self.folder("tmp"), f".{name}{JOURNAL_SUFFIX}")

    def complete(self, name: str, journal: dict) -> None:
        """Durably turn the synced partial file of `name` into ``tmp/NAME`` with `journal`."""
        with open(self.journal_path(name), "w") as handle:
            json.dump(journal, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.rename(self.partial_path(name), os.path.join(self.folder("tmp"), name))
        sync_folder(self.folder("tmp"))

    def deliver(self, name: str) -> str:
        """Move the complete file `name` from ``tmp/`` to ``new/``, under a free name when
        `name` is taken there, and drop its journal. Returns the name in ``new/``."""
        final = self.free_name(name) if os.path.lexists(self.path_of("new", name)) else name
        if final != name:
            os.rename(self.path_of("tmp", name), self.path_of("tmp", final))
        self.move(final, "tmp", "new")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.journal_path(name))
        return final

    def leftovers(self) -> tuple[Names, Names, Journeys]:
        """What a run that died left in ``tmp/``, sorted out: the names of the partial
        downloads (discarded here), of the complete files without a journal (to deliver),
        and the complete files with their journal (whose removal on the server may be due).
        """
        tmp = self.folder("tmp")
        discarded, complete, journeys = [], [], []
        for name in sorted(os.listdir(tmp)):
            path = os.path.join(tmp, name)
            if name.startswith(".") and name.endswith(PARTIAL_SUFFIX):
                os.unlink(path)
                discarded.append(name[1 : -len(PARTIAL_SUFFIX)])
            elif name.startswith(".") and name.endswith(JOURNAL_SUFFIX):
                if not os.path.exists(os.path.join(tmp, name[1 : -len(JOURNAL_SUFFIX)])):
                    os.unlink(path)
            elif not name.startswith("."):
                try:
                    with open(self.journal_path(name)) as handle:
                        journeys.append((name, json.load(handle)))
                except FileNotFoundError:
                    complete.append(name)
        return discarded, complete, journeys

    def free_name(self, name: str) -> str:
        """`name`, or `name.N` with the smallest N, so that no folder of the spool has it yet."""
        candidate, number = name, 1
        while any(os.path.lexists(os.path.join(self.folder(f), candidate)) for f in FOLDERS):
            candidate, number = f"{name}.{number}", number + 1
        return candidate

    # Records of the locks we hold on the server. Whether a lock there is our own is known
    # from these alone: many drop boxes let us write and delete a file but never read it back.

    def _lock_record_path(self, lock: str) -> str:
        return os.path.join(self.path, f".{lock}.lock.json")

    def lock_record(self, lock: str) -> dict | None:
        """What we recorded of holding `lock` on the server, or None."""
        try:
            with open(self._lock_record_path(lock)) as handle:
                record = json.load(handle)
        except FileNotFoundError:
            return None
        except ValueError:
            return {}  # a record cut short by a crash: ours, with nothing known about it
        return record if isinstance(record, dict) else {}

    def write_lock_record(self, lock: str, record: dict) -> None:
        """Durably record that we are about to hold `lock` on the server."""
        path = self._lock_record_path(lock)
        temp_path = f"{path}.tmp"
        with open(temp_path, "w") as handle:
            json.dump(record, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp_path, path)
        sync_folder(self.path)

    def remove_lock_record(self, lock: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._lock_record_path(lock))


def sync_folder(path: str) -> None:
    """Make the entries of the folder `path` (creations, renames, removals) durable."""
    descriptor = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
