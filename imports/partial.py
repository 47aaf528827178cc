"""Where a download lands: its partial file in the spool's ``tmp/``, hashed as it is written.

Large files are written around the page cache in aligned blocks, by a thread of their own
while the next block is received (PartialFile). Local file errors are SpoolError, so that a
full or read-only spool is told apart from the server's faults.
"""

import errno
import fcntl
import hashlib
import mmap
import os
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_for

from .transports import ReadInto

# A connection receives into a buffer of DIRECT_BLOCK bytes and writes it out when full, in a
# thread of its own while the next block comes into a second buffer. Direct writes go from an
# address, to an offset and in a length that are multiples of ALIGNMENT (the largest logical
# block size of disks).
DIRECT_BLOCK = 1024 * 1024
ALIGNMENT = 4096


class SpoolError(Exception):
    """Writing to the local spool failed (disk full, permissions): not the server's fault."""

    def __init__(self, error: OSError):
        super().__init__(error.strerror or str(error))
        self.error = error


class spool_errors:
    """Raise local file errors as SpoolError."""

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, traceback):
        if isinstance(exc, OSError):
            raise SpoolError(exc) from exc
        return False


class Blocks:
    """A connection's two page-aligned buffers (as direct writes need) and the thread that
    writes one out while the other is received into."""

    def __init__(self):
        self.buffers = (mmap.mmap(-1, DIRECT_BLOCK), mmap.mmap(-1, DIRECT_BLOCK))
        self.writer = ThreadPoolExecutor(1, thread_name_prefix="spool-writer")


class PartialFile:
    """The sink of a download: the partial file, hashed as it is written.

    The bytes are received straight into the connection's buffer (a page-aligned block of
    memory) and hashed there a block at a time, not a TLS record at a time. A large file goes
    around the page cache (O_DIRECT): its batch's sync must put every byte on the disk anyway,
    and the copy into the cache costs about as much processor time as the SHA-256 (see
    bench/README.md). Each full buffer is written by the connection's writer thread while it
    is hashed and the next one is received, so that the disk, the hashing and the network work
    at once. The rest that does not fill a block of ALIGNMENT, and every file where the
    filesystem refuses direct writes, go through the cache as they come.
    """

    def __init__(self, path: str, blocks: Blocks, direct: bool):
        with spool_errors():
            self.fd = open_partial(path)
        self.direct = direct and write_around_cache(self.fd, True)
        self.buffer, self.spare = blocks.buffers
        self.writer = blocks.writer
        self.writing: Future | None = None
        self.filled = self.size = 0
        self.digest = hashlib.sha256()

    def receive(self, read_into: ReadInto) -> None:
        """Take the file's bytes: what `read_into` puts into the buffer until it puts none."""
        while True:
            with memoryview(self.buffer) as view:
                received = read_into(view[self.filled :])
            if not received:
                return
            self.size += received
            self.filled += received
            if not self.direct:
                self._write(self.filled)
            elif self.filled == DIRECT_BLOCK:
                self._write_behind()

    def finish(self) -> int:
        """Write what is still buffered; return the size of the file."""
        self._wait()
        if self.direct:
            self._write(self.filled - self.filled % ALIGNMENT)
            self._through_cache()
        self._write(self.filled)
        return self.size

    def close(self) -> None:
        """Close the file once the writer is done with it; finish() reported any failure."""
        if self.writing is not None:
            wait_for([self.writing])
        os.close(self.fd)

    def _write_behind(self) -> None:
        """Hand the full buffer to the writer thread, hash it while it is written, and
        receive on into the other one."""
        self._wait()
        self.writing = self.writer.submit(self._write_out, self.buffer, DIRECT_BLOCK)
        self.digest.update(self.buffer)
        self.buffer, self.spare = self.spare, self.buffer
        self.filled = 0

    def _wait(self) -> None:
        """Wait for the writer thread's block; raise its failure."""
        if self.writing is not None:
            writing, self.writing = self.writing, None
            writing.result()

    def _through_cache(self) -> None:
        write_around_cache(self.fd, False)
        self.direct = False

    def _write(self, length: int) -> None:
        """Write the first `length` bytes of the buffer and keep the rest at its start."""
        if not length:
            return
        self._wait()  # the writer thread may have a block before this one
        with memoryview(self.buffer) as view:
            self.digest.update(view[:length])
        self._write_out(self.buffer, length)
        self.buffer.move(0, length, self.filled - length)
        self.filled -= length

    def _write_out(self, buffer: mmap.mmap, length: int) -> None:
        """Write the first `length` bytes of `buffer`, around the cache while the filesystem
        takes it."""
        with spool_errors(), memoryview(buffer) as view:
            written = 0
            if self.direct:
                try:
                    written = os.write(self.fd, view[:length])
                except OSError as exc:
                    if exc.errno != errno.EINVAL:
                        raise
                if written < length:
                    # A direct write refused (EINVAL) or cut short (the disk filling up): the
                    # rest goes through the cache, which takes any length and tells the error.
                    self._through_cache()
            while written < length:
                written += os.write(self.fd, view[written:length])


def open_partial(path: str) -> int:
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)


def write_around_cache(fd: int, on: bool) -> bool:
    """Switch direct writes of `fd` on or off; False where the filesystem has none."""
    direct = getattr(os, "O_DIRECT", 0)
    if not direct:
        return False
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, flags | direct if on else flags & ~direct)
    except OSError:  # EINVAL: not on this filesystem
        return False
    return True
