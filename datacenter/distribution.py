"""Distributing the outputs of a batch run: the steps, which a run cut off half-way
finishes by applying them again."""

import csv
import os
import shutil
from dataclasses import asdict, dataclass, field

from .files import move_file


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
