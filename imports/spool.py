"""The local spool of a CDS import: ``tmp/``, ``new/`` and ``cur/``, Maildir style.

A file is written in ``tmp/`` and moved to ``new/`` only when complete; whoever consumes it
moves it on to ``cur/``. Moves are renames inside one filesystem, so another process sees a file
either whole or not at all. Hidden names in ``tmp/`` belong to downloads in progress.

Downloads are made durable in batches: the partial files ``tmp/.NAME.part`` of a batch are
listed in a journal ``tmp/.batch-ID.journal`` (name, origin, size, SHA-256), and one sync
makes the files, their names and the journal durable together. Until its file is in ``new/``,
a journal entry is what lets the next run finish the delivery after a crash.
"""

import contextlib
import ctypes
import errno
import hashlib
import json
import os
import uuid

from datacenter.files import check_file_name, place_new_file, place_under_free_name

FOLDERS = ("tmp", "new", "cur")
PARTIAL_SUFFIX, JOURNAL_SUFFIX = ".part", ".journal"
JOURNAL_PREFIX = ".batch-"
Names = list[str]
Entries = list[dict]
Journeys = list[tuple[str, dict]]  # (journal path, entry) of complete, durable downloads


class FileStore:
    def __init__(self, path: str):
        self.path = os.path.abspath(str(path))
        self._real_folders: dict[str, str] = {}

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
        if folder in self._real_folders:  # checked once in the life of this object
            return self._real_folders[folder]
        path = self.folder(folder)
        if os.path.realpath(path) != os.path.join(os.path.realpath(self.path), folder):
            raise FileNotFoundError(errno.ENOENT, "Not a folder of the spool", path)
        self._real_folders[folder] = path
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

    def partial_path(self, name: str) -> str:
        """Where the download of the file to be named `name` is written."""
        return os.path.join(self.folder("tmp"), f".{name}{PARTIAL_SUFFIX}")

    def write_journal(self, entries: Entries) -> str:
        """Durably record a batch of complete partial files (each entry names its file as
        ``name`` and its ``sha256``) and return the journal's path. The files, their names and
        the journal are durable when this returns."""
        tmp = self.folder("tmp")
        path = os.path.join(tmp, f"{JOURNAL_PREFIX}{uuid.uuid4().hex}{JOURNAL_SUFFIX}")
        with open(path, "w") as handle:
            for entry in entries:
                handle.write(json.dumps(entry) + "\n")
        sync_files([path, *(self.partial_path(entry["name"]) for entry in entries)], tmp)
        return path

    def deliver_partial(self, name: str) -> str:
        """Move the durable partial file of `name` to ``new/``, under a free name when `name`
        is taken there; returns the name in ``new/``. Delivering again what a crash cut off
        after the move is harmless: the file is recognised in ``new/``."""
        partial = self.partial_path(name)
        final = name
        target = self.path_of("new", name)
        if os.path.lexists(target):
            if os.path.samefile(partial, target):  # linked into new/ before a crash
                os.unlink(partial)
                return name
            final = self.free_name(name)
            target = self.path_of("new", final)
        place_new_file(partial, target)
        return final

    def finish_journal(self, path: str) -> None:
        """Drop a journal whose files are all in ``new/`` (or discarded), once ``new/`` is
        durable."""
        sync_folder(self.folder("new"))
        os.unlink(path)

    def deliver(self, name: str) -> str:
        """Move the complete file ``tmp/NAME`` to ``new/``, under a free name when `name` is
        taken there; returns the name in ``new/``."""
        final = self.free_name(name) if os.path.lexists(self.path_of("new", name)) else name
        place_new_file(self.path_of("tmp", name), self.path_of("new", final))
        return final

    def leftovers(self) -> tuple[Names, Names, Journeys]:
        """What runs that died left in ``tmp/``, sorted out: the partial downloads that no
        journal vouches for (discarded here), the complete files of other writers (named,
        not hidden: to deliver), and the journal entries whose durable download still waits
        for its delivery (the file checked against its SHA-256). Journals with nothing left
        to deliver are dropped."""
        tmp = self.folder("tmp")
        names = sorted(os.listdir(tmp))
        journeys, vouched = [], set()
        for journal in (os.path.join(tmp, name) for name in names if _is_journal(name)):
            waiting = [
                entry
                for entry in _journal_entries(journal)
                if os.path.exists(self.partial_path(entry["name"]))
                and _sha256(self.partial_path(entry["name"])) == entry.get("sha256")
            ]
            if not waiting:
                os.unlink(journal)
            journeys.extend((journal, entry) for entry in waiting)
            vouched.update(os.path.basename(self.partial_path(e["name"])) for e in waiting)
        discarded, complete = [], []
        for name in names:
            if name.startswith(".") and name.endswith(PARTIAL_SUFFIX) and name not in vouched:
                os.unlink(os.path.join(tmp, name))
                discarded.append(name[1 : -len(PARTIAL_SUFFIX)])
            elif not name.startswith("."):
                complete.append(name)
        return discarded, complete, journeys

    def names(self) -> set[str]:
        """The names in all folders of the spool."""
        return {name for folder in FOLDERS for name in os.listdir(self.folder(folder))}

    def free_name(self, name: str, taken: set[str] | None = None) -> str:
        """`name`, or `name.N` with the smallest N, so that no folder of the spool has it yet;
        with `taken`, the names known to be in the spool (names()) and reserved."""

        def used(candidate: str) -> bool:
            if taken is not None:
                return candidate in taken
            return any(os.path.lexists(os.path.join(self.folder(f), candidate)) for f in FOLDERS)

        candidate, number = name, 1
        while used(candidate):
            candidate, number = f"{name}.{number}", number + 1
        return candidate

    def add_new(self, name: str, chunks) -> None:
        """Put a file into ``new/`` as a Maildir writer does: written to a hidden file in
        ``tmp/``, synced, then moved to ``new/``. FileExistsError when ``new/`` has `name`
        already; nothing is left behind on any failure."""
        target = self.path_of("new", name)
        temp = os.path.join(self.real_folder("tmp"), f".{uuid.uuid4().hex}.add")
        try:
            with open(temp, "xb") as handle:
                for chunk in chunks:
                    handle.write(chunk)
                handle.flush()
                os.fsync(handle.fileno())
            place_new_file(temp, target)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp)
        sync_folder(self.folder("new"))

    def archive(self, name: str) -> str:
        """Move ``new/NAME`` to ``cur/``, under a free name when `name` is taken there, and
        make both folders durable; returns the name in ``cur/``."""
        source = self.path_of("new", name)
        final = place_under_free_name(source, self.real_folder("cur"), name)
        sync_folder(self.folder("cur"))
        sync_folder(self.folder("new"))
        return final

    # Records of what we do on the server that a crash must not make us forget: the locks
    # we hold (whether a lock there is our own is known from these alone, as many drop boxes
    # let us write and delete a file but never read it back) and the upload in progress.

    def _record_path(self, key: str) -> str:
        return os.path.join(self.path, f".{key}.json")

    def record(self, key: str) -> dict | None:
        """The record `key`, or None."""
        try:
            with open(self._record_path(key)) as handle:
                record = json.load(handle)
        except FileNotFoundError:
            return None
        except ValueError:
            return {}  # a record cut short by a crash: ours, with nothing known about it
        return record if isinstance(record, dict) else {}

    def write_record(self, key: str, record: dict) -> None:
        """Durably replace the record `key`."""
        path = self._record_path(key)
        temp_path = f"{path}.tmp"
        with open(temp_path, "w") as handle:
            json.dump(record, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp_path, path)
        sync_folder(self.path)

    def remove_record(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._record_path(key))

    def lock_record(self, lock: str) -> dict | None:
        """What we recorded of holding `lock` on the server, or None."""
        return self.record(f"{lock}.lock")

    def write_lock_record(self, lock: str, record: dict) -> None:
        """Durably record that we are about to hold `lock` on the server."""
        self.write_record(f"{lock}.lock", record)

    def remove_lock_record(self, lock: str) -> None:
        self.remove_record(f"{lock}.lock")


def _is_journal(name: str) -> bool:
    return name.startswith(JOURNAL_PREFIX) and name.endswith(JOURNAL_SUFFIX)


def _journal_entries(path: str) -> list[dict]:
    """The entries of a journal; a line cut short by a crash ends it."""
    entries = []
    with open(path) as handle:
        for line in handle:
            try:
                entries.append(json.loads(line))
            except ValueError:
                break
    return entries


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest()


try:
    _syncfs = ctypes.CDLL(None, use_errno=True).syncfs
except (AttributeError, OSError):  # not Linux
    _syncfs = None


def sync_files(paths: list[str], folder: str) -> None:
    """Make the data of the files `paths` in `folder` and the folder's entries durable.

    One syncfs(2) of the filesystem makes a whole batch durable at once, where an fsync of
    each file would cost a disk flush each; elsewhere every file and the folder are synced one
    by one.
    """
    descriptor = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if _syncfs is not None and _syncfs(descriptor) == 0:
            return
        for path in paths:
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def sync_folder(path: str) -> None:
    """Make the entries of the folder `path` (creations, renames, removals) durable."""
    descriptor = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
