"""Listing the files of a data center folder: the files described, and listings that read
only the files a page shows."""

import contextlib
import csv
import functools
import os
import time
from collections.abc import Sequence
from datetime import UTC, datetime

from .files import human_size

# A cell may be as large as a file (Python's csv module stops at 128 KiB by default).
csv.field_size_limit(2**31 - 1)


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
