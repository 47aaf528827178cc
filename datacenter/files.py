"""File primitives both apps use: safe names, placing a file without replacing another,
locks, durable writes and moves across filesystems.

Every change of a file is made so that a failure half-way leaves the file either where it was
or where it belongs: copies are written under a hidden temporary name, checked, and renamed
into place; an original is removed only after its copy is complete.
"""

import contextlib
import errno
import fcntl
import filecmp
import hashlib
import os
import shutil
import tempfile
import time
from collections.abc import Callable


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
        temp_path = copy_beside(source, dest)
        os.replace(temp_path, dest)
        os.unlink(source)


def copy_beside(source: str, dest: str) -> str:
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


def sha256_of(fd: int) -> str:
    """The SHA-256 of the whole open file `fd`, read without moving its position."""
    digest, offset = hashlib.sha256(), 0
    while chunk := os.pread(fd, 1 << 20, offset):
        digest.update(chunk)
        offset += len(chunk)
    return digest.hexdigest()


#: A hidden partial file nobody wrote to for this long belongs to a process that died.
STALE_PART_SECONDS = 3600


def remove_stale_parts(folder: str, prefixes: tuple[str, ...], suffix: str = ".part") -> list[str]:
    """Remove the partial files of `folder` (regular files whose names begin with one of
    `prefixes` and end in `suffix`) that nobody wrote to for STALE_PART_SECONDS; return
    their names. A missing folder has none."""
    removed = []
    now = time.time()
    with contextlib.suppress(FileNotFoundError), os.scandir(folder) as entries:
        for entry in entries:
            if not (entry.name.startswith(prefixes) and entry.name.endswith(suffix)):
                continue
            with contextlib.suppress(FileNotFoundError):
                stale = now - entry.stat(follow_symlinks=False).st_mtime > STALE_PART_SECONDS
                if stale and entry.is_file(follow_symlinks=False):
                    os.unlink(entry.path)
                    removed.append(entry.name)
    return removed
