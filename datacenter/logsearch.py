"""Searching the logs of the data center with expressions that can never hang a process."""

import os
import re
from collections.abc import Iterator

import re2

# A rotated log backup such as "datacenter.log.3".
LOG_BACKUP_NAME = re.compile(r"^(?P<base>.+)\.(?P<number>\d+)$")

MAX_SEARCH_LENGTH = 500
#: Back-references and look-around, which RE2 does not have (they need backtracking).
UNSUPPORTED = re.compile(r"\\[1-9]|\(\?<?[=!]")
READ_BACK_CHUNK = 64 * 1024


def compile_search(query: str, ignore_case: bool = False):
    """`query` compiled by RE2, which matches in time linear in the text whatever the
    expression, so that no search can hang a web process; ValueError in one sentence for
    an expression that is too long or that RE2 does not support."""
    if not isinstance(query, str):
        raise ValueError("Invalid search expression: it must be text.")
    if len(query) > MAX_SEARCH_LENGTH:
        raise ValueError(
            f"The search expression is too long: at most {MAX_SEARCH_LENGTH} characters."
        )
    if UNSUPPORTED.search(query):
        raise ValueError(
            "Back-references (\\1) and look-around ((?=...), (?!...), (?<=...)) are not "
            "supported: search for the text itself instead."
        )
    options = re2.Options()
    options.log_errors = False
    options.case_sensitive = not ignore_case
    try:
        return re2.compile(query, options)
    except re2.error as exc:
        reason = exc.args[0].decode() if exc.args and isinstance(exc.args[0], bytes) else exc
        raise ValueError(f"The search expression is not valid ({reason}).") from None


def log_and_backups(folder: str, basename: str) -> list[str]:
    """`basename` and its rotated backups in `folder`, oldest (highest number) first."""
    backups = []
    with os.scandir(folder) as entries:
        for entry in entries:
            match = LOG_BACKUP_NAME.match(entry.name)
            if match and match["base"] == basename:
                backups.append((int(match["number"]), entry.name))
    return [name for _, name in sorted(backups, reverse=True)] + [basename]


def matching_lines(
    folder, names, pattern, limit, start, newest_first: bool = False
) -> Iterator[str]:
    """The lines of the files `names` (oldest first) in `folder` that `pattern` matches, in
    order, or the newest first; skip the first `start` matches, return at most `limit`
    (0: all)."""
    found = 0
    for name in reversed(names) if newest_first else names:
        path = os.path.join(folder, name)
        if os.path.islink(path) or not os.path.isfile(path):
            continue  # a link could lead anywhere: backups are the site's own files
        for line in _lines_backwards(path) if newest_first else _lines(path):
            if not pattern.search(line):
                continue
            found += 1
            if found <= start:
                continue
            yield line
            if limit and found - start >= limit:
                return


def _lines(path: str) -> Iterator[str]:
    with open(path, encoding="utf-8", errors="replace") as handle:
        yield from handle


def _lines_backwards(path: str) -> Iterator[str]:
    """The lines of the file `path`, the last first, read from its end a chunk at a time."""
    with open(path, "rb") as handle:
        position = handle.seek(0, os.SEEK_END)
        rest = b""
        while position > 0:
            step = min(READ_BACK_CHUNK, position)
            position -= step
            handle.seek(position)
            lines = (handle.read(step) + rest).split(b"\n")
            rest = lines.pop(0)  # may go on in the chunk before
            for line in reversed(lines):
                if line:
                    yield line.decode("utf-8", "replace") + "\n"
        if rest:
            yield rest.decode("utf-8", "replace") + "\n"
