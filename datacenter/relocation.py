"""Moving the contents of a storage folder to another, entry by entry: each entry is copied,
checked against its original and only then removed at the old place."""

import contextlib
import errno
import filecmp
import os
import re
import shutil
import tempfile

from .files import copy_beside


def _moved_files(folder: str, skip: str = ""):
    """The paths of the files (and links) below `folder` that a move of the storage would
    handle; the folder `skip` of the top level stays out."""
    for parent, dirs, files in os.walk(folder):
        if parent == folder and skip in dirs:
            dirs.remove(skip)
        links = [name for name in dirs if os.path.islink(os.path.join(parent, name))]
        for name in files + links:
            yield os.path.join(parent, name)


def count_files(folder: str, skip: str = "") -> int:
    return sum(1 for _ in _moved_files(folder, skip))


def tree_size(folder: str, skip: str = "") -> tuple[int, int]:
    """(files, bytes) of what count_files() counts."""
    files = size = 0
    for path in _moved_files(folder, skip):
        files += 1
        with contextlib.suppress(OSError):
            size += os.lstat(path).st_size
    return files, size


def move_tree(
    source_dir, dest_dir, overwrite, not_moved, skip="", prefix="", done=lambda files: None
):
    """Move the entries of `source_dir` into `dest_dir`, merging folders of the same name;
    the entry `skip` of the top level stays where it is.

    Each entry is copied, checked against its original and only then removed at the old
    place. What cannot be moved stays and is recorded in `not_moved` with the reason.
    `done(files)` is told how many files were handled after each entry.
    """
    with os.scandir(source_dir) as scan:
        entries = sorted(scan, key=lambda entry: entry.name)
    _remove_stale_copies(dest_dir, {entry.name for entry in entries})
    for entry in entries:
        name = prefix + entry.name
        if name == skip:
            continue
        dest = os.path.join(dest_dir, entry.name)
        source_is_dir = entry.is_dir(follow_symlinks=False)
        dest_exists = os.path.lexists(dest)
        dest_is_dir = os.path.isdir(dest) and not os.path.islink(dest)
        merged = source_is_dir and dest_is_dir  # its files are told one by one
        files = 0 if merged else count_files(entry.path) if source_is_dir else 1
        try:
            if merged:
                move_tree(entry.path, dest, overwrite, not_moved, prefix=name + "/", done=done)
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
            not_moved[name] = _reason(exc)
        done(files)


def _reason(exc: OSError) -> str:
    """Why an entry was not moved, in words. copytree tells each file it could not copy as
    text, such as (source, copy, "[Errno 28] No space left on device: 'path'")."""
    if isinstance(exc, shutil.Error):
        for *_, why in exc.args[0]:
            if found := re.search(r"\[Errno \d+\] ([^:]+)", why):
                return found[1]
        return "its files could not all be copied"
    return exc.strerror or str(exc)


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
        temp_path = copy_beside(source, dest)
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
