"""The local spool of a CDS import: ``tmp/``, ``new/`` and ``cur/``, Maildir style.

A file is written in ``tmp/`` and moved to ``new/`` only when complete; whoever consumes it
moves it on to ``cur/``. Moves are renames inside one filesystem, so another process sees a file
either whole or not at all. Hidden names in ``tmp/`` belong to downloads in progress.
"""

import os

from datacenter.storage import check_file_name, place_new_file

FOLDERS = ("tmp", "new", "cur")


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

    def list(self, folder: str) -> list[str]:
        """Full paths of the files in `folder` by name, without hidden ones."""
        path = self.folder(folder)
        with os.scandir(path) as entries:
            return sorted(
                entry.path
                for entry in entries
                if not entry.name.startswith(".") and entry.is_file(follow_symlinks=False)
            )

    def path_of(self, folder: str, name: str) -> str:
        """The path of the file `name` in `folder`; FileNotFoundError for an unsafe name."""
        return os.path.join(self.folder(folder), check_file_name(name))

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

    def free_name(self, name: str) -> str:
        """`name`, or `name.N` with the smallest N, so that no folder of the spool has it yet."""
        candidate, number = name, 1
        while any(os.path.lexists(os.path.join(self.folder(f), candidate)) for f in FOLDERS):
            candidate, number = f"{name}.{number}", number + 1
        return candidate
