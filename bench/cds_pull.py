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

Then one large file over each protocol, each tool's whole command with its data on the disk at
the end: FTP and FTPS (vsftpd with TLS) against ``lftp`` followed by ``sync``, SFTP (OpenSSH's
sshd, as the tests start it) against OpenSSH's ``sftp`` followed by ``sync``. Ours makes its
files durable itself.

It prints files/s or MB/s, the ratio to lftp --parallel=4 (or to the write limit, or to the
protocol's reference) and each process's peak resident memory.

    .venv/bin/python bench/cds_pull.py [--small N] [--large N] [--large-mib MIB]
                                       [--one-file-mib MIB] [--rounds R] [--dir DIR]
    (defaults: 3000 files of 4 KiB, 4 files of 256 MiB, one file of 1024 MiB per protocol,
    3 rounds with the tools in a rotating order and the median reported; about 2.5 GiB in
    DIR, a new folder in the system's temporary folder by default; 0 skips a data set)
"""

import argparse
import os
import shlex
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


def servers_can_run() -> bool:
    """Whether Debian's vsftpd and sshd can be started here, as the tests start them."""
    return all(os.path.exists(f"/usr/sbin/{name}") for name in ("vsftpd", "sshd")) and (
        os.geteuid() == 0
    )


class Server:
    """The FTP server of the data sets: vsftpd where it can run, else pyftpdlib. With a
    `certificate` (vsftpd only), FTPS with TLS required."""

    user, password = "anonymous", "bench"
    remote_dir = "/outbox"

    def __init__(self, work: Path, certificate: tuple[Path, Path] | None = None):
        self.protocol, self.options, self.lftp_settings = "ftp", {}, ""
        if certificate:
            cert = certificate[0]
            self.protocol, self.options = "ftps", {"ca_file": str(cert)}
            self.lftp_settings = (
                f"set ftp:ssl-force yes; set ftp:ssl-protect-data yes; set ssl:ca-file {cert}; "
            )
        self.source = f"bench-{self.protocol}"
        if servers_can_run():
            from tests.servers import Vsftpd, tls_options

            tls = tls_options(certificate) if certificate else {}
            self.vsftpd = Vsftpd(
                work / self.protocol, xferlog_enable="NO", log_ftp_protocol="NO", **tls
            )
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

    def lftp(self, parallel: int, then: str = ""):
        """lftp's mirror of the exchange folder, which removes each file it got; `then` is
        a shell command run after it."""

        def command(dest: Path) -> list[str]:
            mirror = f"mirror --Remove-source-files --parallel={parallel} /outbox {dest}"
            lftp = ["lftp", "-u", f"{self.user},{self.password}", "-p", str(self.port)] + [
                "127.0.0.1",
                "-e",
                f"set cmd:fail-exit yes; {self.lftp_settings}{mirror}; quit",
            ]
            return ["sh", "-c", f"{shlex.join(lftp)} && {then}"] if then else lftp

        return command

    def reference(self) -> tuple[str, object]:
        return "lftp + sync", self.lftp(1, then="sync")


class SftpServer:
    """OpenSSH's sshd serving the exchange folder over SFTP, as the tests start it; the
    reference is OpenSSH's own sftp client."""

    protocol = source = "sftp"
    name, password = "OpenSSH sshd", ""

    def __init__(self, work: Path):
        from tests.servers import Sshd

        self.sshd = Sshd(work / "sshd")
        self.port, self.dir, self.user = self.sshd.port, self.sshd.dir, self.sshd.user
        self.remote_dir = str(self.dir)
        self.options = {"host_key": self.sshd.host_key, "key_file": str(self.sshd.key_file)}
        self.known_hosts = work / "known_hosts"
        self.known_hosts.write_text(f"[127.0.0.1]:{self.port} {self.sshd.host_key}\n")

    def stop(self) -> None:
        self.sshd.stop()

    def reference(self) -> tuple[str, object]:
        def command(dest: Path) -> list[str]:
            batch = f"get {self.dir}/* {dest}/\nrm {self.dir}/*\n"
            sftp = ["sftp", "-q", "-b", "-", "-i", self.options["key_file"]]
            sftp += ["-P", str(self.port), "-o", f"UserKnownHostsFile={self.known_hosts}"]
            sftp += ["-o", "StrictHostKeyChecking=yes", f"{self.user}@127.0.0.1"]
            script = f"mkdir -p {dest} && printf {shlex.quote(batch)} | {shlex.join(sftp)}"
            return ["sh", "-c", f"{script} && sync"]

        return "OpenSSH sftp + sync", command


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


def tools(server, env: dict) -> dict:
    """Ours as a function of the destination folder that returns its command."""

    def import_(dest: Path) -> list[str]:
        options = "".join(f", {name}={value!r}" for name, value in server.options.items())
        call = (
            f"import_({str(dest)!r}, '127.0.0.1', {server.port}, {server.user!r}, "
            f"{server.password!r}, {server.remote_dir!r}, protocol={server.protocol!r}, "
            f"timeout=60, parallel=4{options})"
        )
        return [
            sys.executable,
            "-c",
            f"from imports.cds import import_; assert {call}.status == 'success'",
        ]

    def cds_import(dest: Path) -> list[str]:
        # Spool folders are unique: the source that used `dest` last gives it up first.
        update = (
            "from django.db.models import F, Value; from django.db.models.functions import "
            "Concat; from imports.models import CdsSource; "
            f"CdsSource.objects.filter(spool_dir={str(dest)!r}).update("
            f"spool_dir=Concat(Value({str(dest)!r} + '-'), F('name'))); "
            f"CdsSource.objects.filter(name={server.source!r}).update(spool_dir={str(dest)!r})"
        )
        manage = [sys.executable, "manage.py"]
        subprocess.run(
            [*manage, "shell", "-c", update], cwd=ROOT, env=env, check=True, capture_output=True
        )
        return [*manage, "cds_import", server.source]

    return {"ours: import_": import_, "ours: manage.py cds_import": cds_import}


def prepare_database(servers: list, work: Path) -> dict:
    """A database of its own for cds_import, with a source for each server."""
    env = {**os.environ, "DATACENTER_VAR_DIR": str(work / "var")}
    env.pop("DATABASE_URL", None)
    # Our commands start with their modules compiled, as on every machine that ran them once.
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    manage = [sys.executable, "manage.py"]
    subprocess.run([*manage, "migrate", "-v0"], cwd=ROOT, env=env, check=True)
    for server in servers:
        fields = {
            "name": server.source,
            "protocol": server.protocol,
            "host": "127.0.0.1",
            "port": server.port,
            "user": server.user,
            "password": server.password,
            "remote_dir": server.remote_dir,
            "spool_dir": str(work / "spool" / server.source),
            "timeout": 60,
            **server.options,
        }
        create = f"from imports.models import CdsSource; CdsSource.objects.create(**{fields!r})"
        done = subprocess.run(
            [*manage, "shell", "-c", create], cwd=ROOT, env=env, capture_output=True, text=True
        )
        if done.returncode:
            raise SystemExit(f"The source {server.source} was refused: {done.stderr[-1000:]}")
    return env


LIMIT = "durable-write limit"


def run_data_set(
    server, work, env, commands, files: dict[str, int], block: bytes, rounds: int, limit=0
):
    """Pull the data set with every tool of `commands`, `rounds` times in a rotating order;
    return each tool's seconds (median and all rounds) and highest peak RSS. With `limit`
    (MiB), the durable-write limit takes its turn in the rotation too, under the same
    conditions."""
    count = len(files)
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


def pull_with_lftp(server: Server, work: Path, env: dict, args) -> None:
    """The many small files and the large ones, against lftp --parallel=1 and 4."""
    commands = {
        **tools(server, env),
        "lftp --parallel=1": server.lftp(1),
        "lftp --parallel=4": server.lftp(4),
    }
    if args.small:
        print(f"{args.small} files of 4 KiB:", flush=True)
        files = {f"story-{n:05d}.xml": 4096 for n in range(args.small)}
        results = run_data_set(server, work, env, commands, files, os.urandom(4096), args.rounds)
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
            server, work, env, commands, files, os.urandom(MIB), args.rounds, total // MIB
        )
        limit, rounds, _ = results[LIMIT]
        print_results(
            results, lambda seconds: f"{total / seconds / 1e6:8.1f} MB/s   ", limit, "limit   "
        )
        rates = [f"{total / seconds / 1e6:.0f}" for seconds in sorted(rounds, reverse=True)]
        print(
            f"  {LIMIT} (dd bs=1M count={total // MIB} conv=fsync): "
            f"{total / limit / 1e6:.1f} MB/s (rounds: {', '.join(rates)} MB/s)"
        )
        reference = results["lftp --parallel=4"][0]
        for label in ("ours: import_", "ours: manage.py cds_import"):
            print(f"  {label:28} {reference / results[label][0]:5.2f}x lftp -P4")


def one_file_each_protocol(servers: list, work: Path, env: dict, args) -> None:
    """One large file over each protocol: ours against the protocol's reference tool."""
    size = args.one_file_mib * MIB
    print(f"One file of {args.one_file_mib} MiB, whole command, data on disk at the end:")
    summary = []
    for server in servers:
        against, reference = server.reference()
        commands = {**tools(server, env), against: reference}
        print(f" {server.protocol.upper()} ({server.name}):", flush=True)
        results = run_data_set(
            server, work, env, commands, {"video.bin": size}, os.urandom(MIB), args.rounds
        )
        print_results(
            results,
            lambda seconds: f"{size / seconds / 1e6:8.1f} MB/s   ",
            results[against][0],
            against,
        )
        for label, (_, rounds, _) in results.items():
            print(f"    {label:28} rounds: {', '.join(f'{took:.2f}' for took in rounds)} s")
        for label in ("ours: import_", "ours: manage.py cds_import"):
            ratio = results[against][0] / results[label][0]
            summary.append(f"  {server.protocol.upper():5} {label:28} {ratio:5.2f}x {against}")
    print("\n".join(summary))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", type=int, default=3000, help="files of 4 KiB")
    parser.add_argument("--large", type=int, default=4, help="large files")
    parser.add_argument("--large-mib", type=int, default=256, help="size of a large file")
    parser.add_argument(
        "--one-file-mib", type=int, default=1024, help="size of the one file of each protocol"
    )
    parser.add_argument("--dir", help="where the server's files and the spools go")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each tool (median)")
    args = parser.parse_args()
    if not shutil.which("lftp"):
        raise SystemExit("lftp is missing: apt-get install lftp")
    work = Path(tempfile.mkdtemp(prefix="bench-cds-", dir=args.dir))
    servers = [Server(work)]
    try:
        if args.one_file_mib and servers_can_run():
            from tests.servers import make_certificate

            servers.append(Server(work, certificate=make_certificate(work)))
            servers.append(SftpServer(work))
        elif args.one_file_mib:
            print("vsftpd and sshd cannot run here (not installed, or not root): no FTPS or SFTP.")
        env = prepare_database(servers, work)
        print(
            f"{time.strftime('%Y-%m-%d')}, {servers[0].name} on 127.0.0.1, files in {work}, "
            f"median of {args.rounds} rounds"
        )
        pull_with_lftp(servers[0], work, env, args)
        if args.one_file_mib:
            one_file_each_protocol(servers, work, env, args)
    finally:
        for server in servers:
            server.stop()
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
