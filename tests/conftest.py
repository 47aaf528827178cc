import errno
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import pytest
from django.contrib.auth.models import Permission

from datacenter.storage import DataCenter

# Playwright's sync API runs an event loop in the test thread; Django's ORM refuses to run
# beside one unless told that this is safe, which it is here (one thread drives both).
os.environ.setdefault("DJANGO_ALLOW_ASYNC_UNSAFE", "true")

DATACENTER_PERMISSIONS = [
    "view_files",
    "upload_files",
    "delete_files",
    "process_files",
    "relocate_storage",
]
PASSWORD = "correct horse battery staple"


@pytest.fixture(scope="session")
def django_db_modify_db_settings(django_db_modify_db_settings_parallel_suffix, tmp_path_factory):
    """A SQLite test database in a file, so that processes started by a test share it."""
    from django.conf import settings

    database = settings.DATABASES["default"]
    if database["ENGINE"].endswith("sqlite3"):
        name = tmp_path_factory.mktemp("database") / "test.sqlite3"
        database.setdefault("TEST", {})["NAME"] = str(name)


def process_env(**extra) -> dict:
    """The environment of a manage.py process that uses the test database and the test's
    storage settings, as processes of one site share their environment."""
    from django.conf import settings
    from django.db import connection

    database = connection.settings_dict
    if database["ENGINE"].endswith("sqlite3"):
        url = f"sqlite:///{database['NAME']}"
    else:
        url = (
            f"postgres://{database['USER']}:{database['PASSWORD']}@{database['HOST']}:"
            f"{database['PORT']}/{database['NAME']}"
        )
    storage = {"DATACENTER_STORAGE_ROOT": settings.DATACENTER_STORAGE_ROOT}
    return {**os.environ, "DATABASE_URL": url, **storage, **extra}


@pytest.fixture(autouse=True)
def storage_root(settings, tmp_path):
    """Every test gets a data center of its own (and cheap password hashing)."""
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    settings.DATACENTER_STORAGE_ROOT = str(tmp_path / "storage")
    return settings.DATACENTER_STORAGE_ROOT


@pytest.fixture
def datacenter(storage_root):
    return DataCenter(storage_root)


def processing_job(user, *, host: str, pid: int, **fields):
    """A job processing staff.csv (users, create) that the process `pid` of `host` carries
    out."""
    from datacenter.models import Job

    return Job.objects.create(
        kind=Job.PROCESS,
        user=user,
        file_name="staff.csv",
        processor="users",
        mode="create",
        status=Job.RUNNING,
        host=host,
        pid=pid,
        **fields,
    )


def make_user(django_user_model, username, codenames):
    user = django_user_model.objects.create_user(username=username, password=PASSWORD)
    user.user_permissions.set(
        Permission.objects.filter(content_type__app_label="datacenter", codename__in=codenames)
    )
    return user


@pytest.fixture
def clerk(django_user_model):
    """Staff who may do everything in the data center."""
    return make_user(django_user_model, "clerk", DATACENTER_PERMISSIONS)


@pytest.fixture
def viewer(django_user_model):
    """Staff who may only look at files and logs."""
    return make_user(django_user_model, "viewer", ["view_files"])


@pytest.fixture
def stranger(django_user_model):
    """A user without any permission."""
    return make_user(django_user_model, "stranger", [])


@pytest.fixture
def clerk_client(client, clerk):
    client.force_login(clerk)
    return client


@pytest.fixture
def viewer_client(client, viewer):
    client.force_login(viewer)
    return client


def write(path, text: str | bytes) -> str:
    data = text.encode() if isinstance(text, str) else text
    with open(path, "wb") as handle:
        handle.write(data)
    return str(path)


def tree(root) -> dict[str, bytes]:
    """Every regular file below `root` with its content, to show that nothing changed."""
    result = {}
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            if not os.path.isfile(path):
                continue
            with open(path, "rb") as handle:
                result[os.path.relpath(path, root)] = handle.read()
    return result


def started_servers(tmp_path, server_class, prefix: str):
    """A fixture's body: yields start(**options) -> a server in a folder of its own, and
    stops every server it started after the test."""
    servers = []

    def start(**options):
        server = server_class(tmp_path / f"{prefix}{len(servers)}", **options)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def start_ftp_server(tmp_path):
    """Start a real FTP server (pyftpdlib) on 127.0.0.1; its options are the handler's."""
    from .ftp import ServerThread

    yield from started_servers(tmp_path, ServerThread, "ftp")


@pytest.fixture
def ftp_server(start_ftp_server):
    return start_ftp_server()


@pytest.fixture
def small_filesystem(tmp_path):
    """mount(size) -> a folder on a real filesystem of `size` ("64k", "2m": tmpfs, mounted as
    root), unmounted after the test: disks that fill up. With `read_only`, a filesystem that
    not even root may write to; `at`, an existing folder to mount it on instead of a new one."""
    mounted = []

    def mount(size: str, read_only: bool = False, at: Path | None = None) -> Path:
        folder = at or tmp_path / f"small-{len(mounted)}"
        folder.mkdir(exist_ok=at is not None)
        options = f"size={size}" + (",ro" if read_only else "")
        result = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True
        )
        if result.returncode != 0:
            if os.environ.get("DATACENTER_REQUIRE_SERVERS"):
                pytest.fail(f"Could not mount a small filesystem: {result.stderr!r}")
            pytest.skip("mounting a small filesystem needs root")
        mounted.append(folder)
        return folder

    yield mount
    for folder in mounted:
        subprocess.run(["umount", "-l", str(folder)], check=True)


def fill_up(folder: Path, leave: int = 0) -> None:
    """Write into `folder` until its filesystem is full, then free `leave` bytes of it."""
    path = folder / "filler"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    try:
        while os.write(fd, b"x" * 4096):
            pass
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
    finally:
        os.close(fd)
    if leave:
        os.truncate(path, os.path.getsize(path) - leave)


@pytest.fixture
def cds_log(caplog):
    """The log of the CDS import and export, from INFO up."""
    caplog.set_level(logging.INFO, logger="imports.cds")
    return caplog


@pytest.fixture
def spool(tmp_path):
    return tmp_path / "spool"


def make_source(server, spool):
    """A CDS source named partner of a test FTP server (tests/ftp.py)."""
    from imports.models import CdsSource

    return CdsSource.objects.create(
        name="partner",
        host=server.host,
        port=server.port,
        user="partner",
        password="secret",
        remote_dir="/outbox",
        spool_dir=str(spool),
        timeout=5,
    )


@pytest.fixture
def source(db, ftp_server, spool):
    return make_source(ftp_server, spool)


def written(path) -> bool:
    return os.path.exists(path) and os.path.getsize(path) > 0


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def start_manage(*args: str, **env) -> subprocess.Popen:
    """Start ``manage.py ARGS`` on the test database, its output discarded."""
    return subprocess.Popen(
        [sys.executable, "manage.py", *args],
        cwd=ROOT,
        env=process_env(**env),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def run_worker() -> None:
    """Carry out the queued tasks in this process, as the task worker would."""
    from django.core.management import call_command

    call_command("db_worker", "--batch", "--no-startup-delay", "--no-reload", "--queue-name", "*")


def wait_for(condition, process: subprocess.Popen | None = None, timeout: float = 60) -> None:
    """Wait until `condition()` is true, failing when `process` ends first or time is up."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert process is None or process.poll() is None, "the process ended"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def kill_when(process: subprocess.Popen, ready, timeout: float = 60) -> None:
    """SIGKILL `process` as soon as `ready()` is true: in the middle of its work."""
    try:
        wait_for(ready, process, timeout)
    finally:
        process.kill()
        process.wait()


def descendants(pid: int) -> list[int]:
    """The processes below `pid`: a server's sessions and their helpers."""
    children: dict[int, list[int]] = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path("/proc", entry, "stat").read_text()
        except OSError:  # ended meanwhile
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])  # the name may hold spaces
        children.setdefault(parent, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        below = children.get(todo.pop(), [])
        found += below
        todo += below
    return found


@contextmanager
def sessions_frozen(server) -> Iterator[None]:
    """Stop every session of `server` with its connections open, as a hung server: no
    error, no data. The listener still takes new connections."""
    frozen = descendants(server.process.pid)
    assert frozen, "the server has no session to freeze"
    for pid in frozen:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in frozen:
            os.kill(pid, signal.SIGCONT)


@contextmanager
def sessions_killed(server) -> Iterator[None]:
    """SIGKILL every session of `server`: the server dying under its clients. The listener
    still takes new connections."""
    killed = descendants(server.process.pid)
    assert killed, "the server has no session to kill"
    for pid in killed:
        with suppress(ProcessLookupError):  # a helper that ended with its session
            os.kill(pid, signal.SIGKILL)
    yield


def import_with_fault(options: dict, name: str, fault) -> object:
    """The result of import_(**options) whose server meets `fault` (sessions_frozen(server),
    sessions_killed(server)) as soon as `name` begins to arrive in the spool; the run must
    end within the fault."""
    from imports.cds import import_

    outcome = []
    importer = threading.Thread(target=lambda: outcome.append(import_(**options)))
    importer.start()
    wait_for(lambda: written(Path(options["store_dir"]) / "tmp" / f".{name}.part"))
    with fault:
        importer.join(timeout=60)
        assert not importer.is_alive(), "the run waits for the server forever"
    [result] = outcome
    return result


@pytest.fixture
def start_vsftpd(tmp_path):
    """Start Debian's vsftpd on 127.0.0.1 (tests/servers.py); its options are vsftpd's."""
    from .servers import Vsftpd

    yield from started_servers(tmp_path, Vsftpd, "vsftpd")


@pytest.fixture
def certificate(tmp_path):
    """A self-signed certificate for 127.0.0.1 and its key."""
    from .servers import make_certificate

    return make_certificate(tmp_path)


@pytest.fixture
def smtp_server(settings):
    """A real SMTP server on 127.0.0.1 that the site sends its mail to."""
    from .smtp import SmtpServer

    server = SmtpServer()
    settings.MAILERS = {"default": server.mailer()}
    yield server
    server.stop()


@pytest.fixture
def managers(django_user_model):
    """The import managers group with two members who have addresses, one who has none and
    one who left."""
    from django.contrib.auth.models import Group

    group, _ = Group.objects.get_or_create(name="Import managers")
    for username, email, active in [
        ("mia", "mia@example.org", True),
        ("max", "max@example.org", True),
        ("nomail", "", True),
        ("gone", "gone@example.org", False),
    ]:
        user = django_user_model.objects.create_user(username=username, email=email)
        user.is_active = active
        user.save()
        user.groups.add(group)
    return group


@pytest.fixture
def start_sshd(tmp_path):
    """Start Debian's OpenSSH server on 127.0.0.1 for SFTP (tests/servers.py)."""
    from .servers import Sshd

    yield from started_servers(tmp_path, Sshd, "sshd")
