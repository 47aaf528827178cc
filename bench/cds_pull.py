"""Speed and memory of pulling files from a CDS FTP server into a spool.

Serves a folder with `manage.py cds_devserver` (pyftpdlib, in a process of its own) on
127.0.0.1 and imports from it with `imports.cds.import_`: prints files/s for many small files and
MB/s for a few large ones, each with the importer's peak Python memory (tracemalloc) and the
process's peak resident size.

    .venv/bin/python bench/cds_pull.py [SMALL_FILES] [LARGE_FILES] [LARGE_MIB]
    (defaults: 2000 files of 4 KiB, 4 files of 256 MiB; about 2 GiB of disk in /tmp)
"""

import logging
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from imports.cds import import_  # noqa: E402

MIB = 1024 * 1024


def start_server(root: Path) -> tuple[subprocess.Popen, int]:
    server = subprocess.Popen(
        [sys.executable, "manage.py", "cds_devserver", "--root", str(root), "--port", "0"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    line = server.stdout.readline()
    match = re.search(r"ftp://127\.0\.0\.1:(\d+)/", line)
    if not match:
        server.kill()
        raise SystemExit(f"The FTP server did not start: {line!r}")
    return server, int(match[1])


def pull(work: Path, port: int) -> tuple[float, int, int]:
    """Import everything; return seconds, files and the Python peak in bytes."""
    spool = work / f"spool-{time.monotonic_ns()}"
    tracemalloc.start()
    started = time.perf_counter()
    result = import_(str(spool), "127.0.0.1", port, "cds", "cds", "outbox", timeout=60)
    elapsed = time.perf_counter() - started
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert result.status == "success", result.error
    shutil.rmtree(spool)
    return elapsed, len(result.delivered), peak


def max_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    small = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    large = int(sys.argv[2]) if len(sys.argv) > 2 else 4
    large_mib = int(sys.argv[3]) if len(sys.argv) > 3 else 256
    logging.getLogger("imports.cds").setLevel(logging.WARNING)
    work = Path(tempfile.mkdtemp(prefix="bench-cds-"))
    outbox = work / "ftp" / "outbox"
    outbox.mkdir(parents=True)
    server, port = start_server(work / "ftp")
    try:
        block = os.urandom(4096)
        for number in range(small):
            (outbox / f"story-{number:05d}.xml").write_bytes(block)
        seconds, files, peak = pull(work, port)
        print(
            f"{files} files of 4 KiB: {files / seconds:8.1f} files/s ({seconds:.2f} s), "
            f"Python peak {peak / MIB:.2f} MiB, process peak RSS {max_rss_mib():.0f} MiB"
        )

        chunk = os.urandom(MIB)
        for number in range(large):
            with open(outbox / f"video-{number}.bin", "wb") as handle:
                for _ in range(large_mib):
                    handle.write(chunk)
        seconds, files, peak = pull(work, port)
        megabytes = files * large_mib * MIB / 1e6
        print(
            f"{files} files of {large_mib} MiB: {megabytes / seconds:8.1f} MB/s "
            f"({seconds:.2f} s), Python peak {peak / MIB:.2f} MiB, "
            f"process peak RSS {max_rss_mib():.0f} MiB"
        )
    finally:
        server.terminate()
        server.wait()
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
