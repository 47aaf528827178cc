"""Real servers of Debian's packages, started by the tests on 127.0.0.1 with free ports.

Each gets a folder, a configuration and a log of its own; the system's services are never
touched. `.ci/run` installs the packages; elsewhere a missing server skips its tests, unless
DATACENTER_REQUIRE_SERVERS is set (as in CI), when it fails them.
"""

import getpass
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

VSFTPD = "/usr/sbin/vsftpd"


def require(program: str) -> None:
    if os.path.exists(program) and os.geteuid() == 0:
        return
    reason = f"{program} is not installed" if not os.path.exists(program) else "needs root"
    if os.environ.get("DATACENTER_REQUIRE_SERVERS"):
        pytest.fail(f"This test needs {program}: {reason}.")
    pytest.skip(f"{program}: {reason} (install it as .ci/run does).")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen, log: Path | None = None) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if process.poll() is not None:
            detail = log.read_text() if log and log.exists() else ""
            raise RuntimeError(f"the server ended with {process.returncode}: {detail}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port}")


def make_certificate(folder: Path, name: str = "127.0.0.1") -> tuple[Path, Path]:
    """A self-signed certificate for `name` (an IP address or a host name) and its key."""
    cert, key = folder / f"{name}.crt", folder / f"{name}.key"
    kind = "IP" if name.replace(".", "").isdigit() else "DNS"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2"]
        + ["-keyout", str(key), "-out", str(cert), "-subj", f"/CN={name}"]
        + ["-addext", f"subjectAltName={kind}:{name}"],
        check=True,
        capture_output=True,
    )
    return cert, key


def tls_options(certificate, **extra) -> dict:
    """vsftpd's options for FTPS with TLS required, with `certificate` (cert, key)."""
    cert, key = certificate
    return {
        "ssl_enable": "YES",
        "rsa_cert_file": cert,
        "rsa_private_key_file": key,
        "allow_anon_ssl": "YES",
        "force_anon_logins_ssl": "YES",
        "force_anon_data_ssl": "YES",
        **extra,
    }


class ServerProcess:
    """A server of Debian's that a test started: `start(**options)` (re)starts it on the same
    port, and its exchange directory is `dir`."""

    def launch(self, command: list[str], **popen) -> None:
        self.process = subprocess.Popen(command, **popen)
        try:
            wait_for_port(self.port, self.process, self.log)
        except RuntimeError:
            self.stop()
            raise

    def stop(self) -> None:
        self.process.kill()
        self.process.wait()
        if self.process.stderr:
            self.process.stderr.close()

    def restart(self, **options) -> None:
        self.stop()
        self.start(**options)

    def put(self, name: str | bytes, data: bytes = b"data") -> None:
        """A file the partner published: readable by all, as partners' files are."""
        path = os.path.join(bytes(self.dir), os.fsencode(name))
        with open(path, "wb") as handle:
            handle.write(data)
        os.chmod(path, 0o644)

    def names(self) -> list[bytes]:
        return sorted(os.listdir(bytes(self.dir)))


class Vsftpd(ServerProcess):
    """Debian's vsftpd serving an anonymous drop box `root/outbox`, with its defaults of a
    write-only drop box (uploads stored 0600 and never sent back) unless `options` say else.
    """

    user, password = "anonymous", "partner-password-42"

    def __init__(self, base: Path, **options):
        require(VSFTPD)
        self.base = base
        self.root = base / "root"
        self.dir = self.root / "outbox"
        self.dir.mkdir(parents=True)
        os.chmod(self.root, 0o755)
        shutil.chown(self.dir, "ftp", "ftp")
        self.log = base / "vsftpd.log"
        self.port = free_port()
        self.start(**options)

    def start(self, **options) -> None:
        """Serve with the defaults changed by `options`, on the same port every time."""
        config = {
            "listen": "YES",
            "listen_address": "127.0.0.1",
            "listen_port": self.port,
            "background": "NO",
            "anonymous_enable": "YES",
            "local_enable": "NO",
            "anon_root": self.root,
            "write_enable": "YES",
            "anon_upload_enable": "YES",
            "anon_other_write_enable": "YES",
            "ftp_username": "ftp",
            "xferlog_enable": "YES",
            "xferlog_std_format": "NO",
            "log_ftp_protocol": "YES",
            "vsftpd_log_file": self.log,
            # Containers refuse the namespaces and seccomp filters of vsftpd's sandbox.
            "seccomp_sandbox": "NO",
            "isolate": "NO",
            "isolate_network": "NO",
            **options,
        }
        self.config = self.base / "vsftpd.conf"
        self.config.write_text("".join(f"{key}={value}\n" for key, value in config.items()))
        os.chmod(self.config, 0o600)
        self.launch([VSFTPD, str(self.config)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def options(self, store_dir, **extra) -> dict:
        """The arguments of imports.cds.import_ for this server."""
        return {
            "store_dir": str(store_dir),
            "host": "127.0.0.1",
            "port": self.port,
            "user": self.user,
            "password": self.password,
            "path": "/outbox",
            "timeout": 10,
            **extra,
        }


SSHD = "/usr/sbin/sshd"


def make_ssh_key(path: Path, passphrase: str = "") -> tuple[Path, str]:
    """A new ed25519 key pair at `path`: the private key's path and the public key's line."""
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", passphrase, "-C", "", "-f", str(path)],
        check=True,
        capture_output=True,
    )
    return path, path.with_suffix(".pub").read_text().strip()


class Sshd(ServerProcess):
    """Debian's OpenSSH server with the SFTP subsystem internal-sftp and nothing else,
    letting this test's own key log in as the current user; the exchange directory is
    `root/outbox` (an absolute path on the server)."""

    def __init__(self, base: Path, **options):
        require(SSHD)
        self.base = base
        self.dir = base / "root" / "outbox"
        self.dir.mkdir(parents=True)
        self.user = getpass.getuser()
        self.key_file, public_key = make_ssh_key(base / "client_key")
        self.passphrase_key_file, other_key = make_ssh_key(base / "passphrase_key", "sesame")
        (base / "authorized_keys").write_text(f"{public_key}\n{other_key}\n")
        self.log = base / "sshd.log"
        self.port = free_port()
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege separation
        self.start(**options)

    def start(self, new_host_key: bool = False, sftp_flags: str = "") -> None:
        """Serve on the same port every time; with `new_host_key`, under a key of its own
        that is new, as after a reinstallation (or in an attacker's hands)."""
        host_key = self.base / "host_key"
        if new_host_key or not host_key.exists():
            for path in (host_key, host_key.with_suffix(".pub")):
                path.unlink(missing_ok=True)
            make_ssh_key(host_key)
        self.host_key = host_key.with_suffix(".pub").read_text().strip()
        config = {
            "Port": self.port,
            "ListenAddress": "127.0.0.1",
            "HostKey": host_key,
            "PidFile": self.base / "sshd.pid",
            "AuthorizedKeysFile": self.base / "authorized_keys",
            "StrictModes": "no",
            "UsePAM": "no",
            "PasswordAuthentication": "no",
            "KbdInteractiveAuthentication": "no",
            "PermitRootLogin": "prohibit-password",
            "AllowUsers": self.user,
            "Subsystem": "sftp internal-sftp",
            "ForceCommand": f"internal-sftp {sftp_flags}".strip(),
            "LogLevel": "VERBOSE",
        }
        self.config = self.base / "sshd_config"
        self.config.write_text("".join(f"{key} {value}\n" for key, value in config.items()))
        with open(self.log, "ab") as log:
            self.launch([SSHD, "-D", "-e", "-f", str(self.config)], stdout=log, stderr=log)

    def options(self, store_dir, **extra) -> dict:
        """The arguments of imports.cds.import_ for this server."""
        return {
            "store_dir": str(store_dir),
            "host": "127.0.0.1",
            "port": self.port,
            "user": self.user,
            "password": "",
            "path": str(self.dir),
            "protocol": "sftp",
            "host_key": self.host_key,
            "key_file": str(self.key_file),
            "timeout": 10,
            **extra,
        }
