"""Speed and memory of pulling a CDS directory, side by side with lftp.

Serves the data sets from Debian's vsftpd on 127.0.0.1 (as the tests start it; pyftpdlib in
a process of its own where vsftpd is missing or this is not root, and then it says so) and
pulls every file with each tool in turn, each a process of its own, the server's folder
refilled and the disk settled before each:

- ours through ``imports.cds.import_`` alone with four connections (its default is the seed's
  one), and through ``manage.py cds_import`` (what cron runs: Django, the database log and the
  file records included, with the source's four connections);
- ``lftp -e "mirror --Remove-source-files --parallel=N"`` with N = 1 and 4;
- for the large files, the disk's durable-write limit (``dd bs=1M conv=fsync`` of as many
  bytes), which takes its turn among the tools: this disk's speed changes within minutes.

It prints files/s or MB/s, the ratio to lftp --parallel=4 (or to the write limit) and each
process's peak resident memory.

    .venv/bin/python bench/cds_pull.py [--small N] [--large N] [--large-mib MIB]
                                       [--rounds R] [--dir DIR]
    (defaults: 3000 files of 4 KiB, 4 files of 256 MiB, 3 rounds with the tools in a rotating
    order and the median reported; about 2.5 GiB in DIR, a new folder in the system's
    temporary folder by default; 0 files skip a data set)
"""

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MIB = 1024 * 1024


class Server:
    """The FTP server of the data sets: vsftpd where it can run, else pyftpdlib."""

    user, password = "anonymous", "bench"

    def __init__(self, work: Path):
        if os.path.exists("/usr/sbin/vsftpd") and os.geteuid() == 0:
            from tests.servers import Vsftpd

            self.vsftpd = Vsftpd(work / "vsftpd", xferlog_enable="NO", log_ftp_protocol="NO")
            self.name, self.port, self.dir = "vsftpd", self.vsftpd.port, self.vsftpd.dir
            self.process = None
            return
        print("vsftpd cannot run here (not installed, or not root): pyftpdlib serves instead.")
        self.vsftpd, self.name = None, "pyftpdlib"
        self.dir = work / "ftp" / "outbox"
        self.dir.mkdir(parents=True)
        self.user, self.password = "cds", "cds"
        self.process = subprocess.Popen(
            [sys.executable, "manage.py", "cds_devserver", "--root", str(self.dir.parent)]
            + ["--port", "0"],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.port = int(self.process.stdout.readline().split("127.0.0.1:")[1].split("/")[0])

    def stop(self) -> None:
        if self.vsftpd:
            self.vsftpd.stop()
        else:
            self.process.terminate()
            self.process.wait()


def measure(command: list[str], env: dict | None = None) -> tuple[float, float]:
    """Run `command`; return its seconds and its peak resident memory in MiB."""
    started = time.perf_counter()
    process = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{command[:3]} failed: {process.stderr.read().decode()[-2000:]}")
    process.stderr.close()
    return seconds, usage.ru_maxrss / 1024


def settle() -> None:
    """Write back what the filling left dirty, so that each tool starts alike."""
    os.sync()
    time.sleep(1)


def fill(server: Server, files: dict[str, int], block: bytes) -> None:
    for name, size in files.items():
        with open(server.dir / name, "wb") as handle:
            for _ in range(size // len(block)):
                handle.write(block)
        os.chmod(server.dir / name, 0o644)
    settle()


def tools(server: Server, env: dict) -> dict:
    """Each tool as a function of the destination folder that returns its command."""

    def import_(dest: Path) -> list[str]:
        call = (
            f"import_({str(dest)!r}, '127.0.0.1', {server.port}, {server.user!r}, "
            f"{server.password!r}, '/outbox', timeout=60, parallel=4)"
        )
        return [
            sys.executable,
            "-c",
            f"from imports.cds import import_; assert {call}.status == 'success'",
        ]

    def cds_import(dest: Path) -> list[str]:
        update = (
            "from imports.models import CdsSource; "
            f"CdsSource.objects.filter(name='bench').update(spool_dir={str(dest)!r})"
        )
        manage = [sys.executable, "manage.py"]
        subprocess.run(
            [*manage, "shell", "-c", update], cwd=ROOT, env=env, check=True, capture_output=True
        )
        return [*manage, "cds_import", "bench"]

    def lftp(parallel: int):
        def command(dest: Path) -> list[str]:
            mirror = f"mirror --Remove-source-files --parallel={parallel} /outbox {dest}"
            return ["lftp", "-u", f"{server.user},{server.password}", "-p", str(server.port)] + [
                "127.0.0.1",
                "-e",
                f"set cmd:fail-exit yes; {mirror}; quit",
            ]

        return command

    return {
        "ours: import_": import_,
        "ours: manage.py cds_import": cds_import,
        "lftp --parallel=1": lftp(1),
        "lftp --parallel=4": lftp(4),
    }


def prepare_database(server: Server, work: Path) -> dict:
    """A database of its own for cds_import, with the source 'bench'."""
    env = {**os.environ, "DATACENTER_VAR_DIR": str(work / "var")}
    env.pop("DATABASE_URL", None)
    manage = [sys.executable, "manage.py"]
    subprocess.run([*manage, "migrate", "-v0"], cwd=ROOT, env=env, check=True)
    create = (
        "from imports.models import CdsSource; CdsSource.objects.create(name='bench', "
        f"host='127.0.0.1', port={server.port}, user={server.user!r}, "
        f"password={server.password!r}, remote_dir='/outbox', spool_dir={str(work)!r} + "
        "'/spool', timeout=60)"
    )
    subprocess.run(
        [*manage, "shell", "-c", create], cwd=ROOT, env=env, check=True, capture_output=True
    )
    return env


LIMIT = "durable-write limit"


def run_data_set(server, work, env, files: dict[str, int], block: bytes, rounds: int, limit=0):
    """Pull the data set with every tool, `rounds` times in a rotating order; return each
    tool's seconds (median and all rounds) and highest peak RSS. With `limit` (MiB), the
    durable-write limit takes its turn in the rotation too, under the same conditions."""
    count = len(files)
    commands = tools(server, env)
    labels = list(commands) + ([LIMIT] if limit else [])
    seconds, rss = {label: [] for label in labels}, {label: [0.0] for label in labels}
    for round_ in range(rounds):
        for label in labels[round_ % len(labels) :] + labels[: round_ % len(labels)]:
            if label == LIMIT:
                seconds[label].append(write_durably(work, limit))
                continue
            fill(server, files, block)
            dest = work / "dest"
            took, peak = measure(commands[label](dest), env)
            received = sum(
                1
                for path in dest.rglob("*")
                if path.is_file() and path.relative_to(dest).parts[0] != "tmp"
            )
            left = len(os.listdir(server.dir))
            if received != count or left:
                raise SystemExit(f"{label}: {received} of {count} files arrived, {left} left.")
            seconds[label].append(took)
            rss[label].append(peak)
            shutil.rmtree(dest)
    return {
        label: (statistics.median(seconds[label]), seconds[label], max(rss[label]))
        for label in labels
    }


def print_results(results: dict, rate, reference: float, against: str) -> None:
    for label, (seconds, _, rss) in results.items():
        if label != LIMIT:
            print(
                f"  {label:28} {rate(seconds)} ({seconds:6.2f} s)  {reference / seconds:5.2f}x "
                f"{against}  peak RSS {rss:4.0f} MiB"
            )


def write_durably(work: Path, mib: int) -> float:
    """Seconds of ``dd bs=1M conv=fsync`` writing `mib` MiB into `work`."""
    settle()
    started = time.perf_counter()
    subprocess.run(
        ["dd", "if=/dev/zero", f"of={work / 'dd.bin'}", "bs=1M", f"count={mib}", "conv=fsync"],
        check=True,
        capture_output=True,
    )
    seconds = time.perf_counter() - started
    os.unlink(work / "dd.bin")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", type=int, default=3000, help="files of 4 KiB")
    parser.add_argument("--large", type=int, default=4, help="large files")
    parser.add_argument("--large-mib", type=int, default=256, help="size of a large file")
    parser.add_argument("--dir", help="where the server's files and the spools go")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each tool (median)")
    args = parser.parse_args()
    if not shutil.which("lftp"):
        raise SystemExit("lftp is missing: apt-get install lftp")
    work = Path(tempfile.mkdtemp(prefix="bench-cds-", dir=args.dir))
    server = Server(work)
    try:
        env = prepare_database(server, work)
        print(
            f"{time.strftime('%Y-%m-%d')}, {server.name} on 127.0.0.1, files in {work}, "
            f"median of {args.rounds} rounds"
        )
        if args.small:
            print(f"{args.small} files of 4 KiB:", flush=True)
            files = {f"story-{n:05d}.xml": 4096 for n in range(args.small)}
            results = run_data_set(server, work, env, files, os.urandom(4096), args.rounds)
            print_results(
                results,
                lambda seconds: f"{args.small / seconds:8.1f} files/s",
                results["lftp --parallel=4"][0],
                "lftp -P4",
            )
        if args.large:
            print(f"{args.large} files of {args.large_mib} MiB:", flush=True)
            files = {f"video-{n}.bin": args.large_mib * MIB for n in range(args.large)}
            total = args.large * args.large_mib * MIB
            results = run_data_set(
                server, work, env, files, os.urandom(MIB), args.rounds, limit=total // MIB
            )
            limit, rounds, _ = results[LIMIT]
            print_results(
                results,
                lambda seconds: f"{total / seconds / 1e6:8.1f} MB/s   ",
                limit,
                "limit   ",
            )
            rates = [f"{total / seconds / 1e6:.0f}" for seconds in sorted(rounds, reverse=True)]
            print(
                f"  {LIMIT} (dd bs=1M count={total // MIB} conv=fsync): "
                f"{total / limit / 1e6:.1f} MB/s (rounds: {', '.join(rates)} MB/s)"
            )
            reference = results["lftp --parallel=4"][0]
            for label in ("ours: import_", "ours: manage.py cds_import"):
                print(f"  {label:28} {reference / results[label][0]:5.2f}x lftp -P4")
    finally:
        server.stop()
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
