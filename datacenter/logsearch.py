"""Searching the logs of the data center with expressions that can never hang a process."""

import os
import re
from collections.abc import Iterator

import re2

# A rotated log backup such as "datacenter.log.3".
LOG_BACKUP_NAME = re.compile(r"^(?P<base>.+)\.(?P<number>\d+)$")

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


def log_and_backups(folder: str, basename: str) -> list[str]:
    """`basename` and its rotated backups in `folder`, oldest (highest number) first."""
    backups = []
    with os.scandir(folder) as entries:
        for entry in entries:
            match = LOG_BACKUP_NAME.match(entry.name)
            if match and match["base"] == basename:
                backups.append((int(match["number"]), entry.name))
    return [name for _, name in sorted(backups, reverse=True)] + [basename]


def matching_lines(folder, names, pattern, limit, start) -> Iterator[str]:
    """The lines of the files `names` in `folder` that `pattern` matches, in order; skip
    the first `start` matches, return at most `limit` (0: all)."""
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
