"""Running the site in production: the health check, the task worker's heartbeat and the
settings behind TLS."""

import io
import json
import re
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
from django.contrib.auth.models import User
from django.core.management import CommandError, call_command
from django.urls import reverse
from django.utils import timezone

from datacenter import health
from datacenter.models import StorageLocation, WorkerHeartbeat

from .conftest import process_env, start_manage, wait_for

ROOT = Path(__file__).resolve().parent.parent
PRODUCTION = {
    "DJANGO_DEBUG": "false",
    "DJANGO_HTTPS": "true",
    "DJANGO_ALLOWED_HOSTS": "testserver",
    "EMAIL_URL": "smtp+tls://datacenter:secret@mail.example.org",
}

pytestmark = pytest.mark.django_db


def manage(*args: str, **env) -> subprocess.CompletedProcess:
    environment = process_env(**env)
    environment.pop("DJANGO_ALLOW_ASYNC_UNSAFE")  # the tests' own, which a deployment lacks
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
    )


def test_the_health_check_needs_no_login_and_reports_each_part(client):
    health.beat()

    response = client.get(reverse("healthz"))

    assert response.status_code == 200
    report = response.json()
    assert (report["status"], report["database"], report["storage"]) == ("ok", "ok", "ok")
    assert report["workers"]["datacenter"]["status"] == "ok"
    assert report["workers"]["imports"]["age_seconds"] < 60
    assert response["Cache-Control"].startswith("max-age=0")


def test_a_worker_not_heard_from_degrades_the_check_without_failing_it(client, settings):
    workers = client.get(reverse("healthz")).json()["workers"]
    assert workers["datacenter"]["status"] == workers["imports"]["status"] == "never seen"

    WorkerHeartbeat.objects.create(
        host="elsewhere",
        pid=1,
        queues="datacenter",
        seen=timezone.now() - timedelta(seconds=settings.DATACENTER_WORKER_STALE + 1),
    )
    WorkerHeartbeat.objects.create(host="elsewhere", pid=2, queues="imports", seen=timezone.now())
    response = client.get(reverse("healthz"))

    assert response.status_code == 200
    report = response.json()
    assert report["status"] == "degraded"
    assert (report["workers"]["datacenter"]["status"], report["workers"]["imports"]["status"]) == (
        "stale",
        "ok",
    )


def test_a_storage_that_cannot_be_written_fails_the_check(client, settings, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    settings.DATACENTER_STORAGE_ROOT = str(blocker / "storage")

    response = client.get(reverse("healthz"))

    assert response.status_code == 503
    assert (response.json()["status"], response.json()["storage"]) == ("failing", "not writable")
    assert str(tmp_path) not in response.content.decode()


@pytest.mark.django_db(transaction=True)
def test_the_task_worker_records_its_heartbeat_and_forgets_it_when_it_stops(client):
    worker = start_manage("task_worker", "--no-reload", "--interval", "0.1")
    try:
        wait_for(lambda: WorkerHeartbeat.objects.filter(pid=worker.pid).exists(), worker, 30)
        assert WorkerHeartbeat.objects.get(pid=worker.pid).queues == "*"
        assert client.get(reverse("healthz")).json()["status"] == "ok"
    finally:
        worker.terminate()
        worker.wait()
    assert not WorkerHeartbeat.objects.filter(pid=worker.pid).exists()


@pytest.mark.django_db(transaction=True)
def test_a_killed_worker_is_reported_at_once_for_its_own_queue(client):
    workers = {
        queue: start_manage("task_worker", "--no-reload", "--queue-name", queue)
        for queue in ("datacenter", "imports")
    }
    try:
        for worker in workers.values():
            wait_for(lambda pid=worker.pid: WorkerHeartbeat.objects.filter(pid=pid).exists())
        assert client.get(reverse("healthz")).json()["status"] == "ok"

        workers["datacenter"].kill()
        workers["datacenter"].wait()

        report = client.get(reverse("healthz")).json()
        assert report["status"] == "degraded"
        assert report["workers"]["datacenter"]["status"] == "stale"
        assert report["workers"]["imports"]["status"] == "ok"
    finally:
        for worker in workers.values():
            worker.kill()
            worker.wait()


@pytest.mark.django_db(transaction=True)
def test_the_deploy_check_is_clean_behind_tls_and_not_before():
    behind_tls = manage("check", "--deploy", "--fail-level", "WARNING", **PRODUCTION)
    assert behind_tls.returncode == 0, behind_tls.stderr
    assert "no issues" in behind_tls.stdout

    plain = manage("check", "--deploy", "--fail-level", "WARNING", DJANGO_DEBUG="false")
    assert plain.returncode != 0
    for warning in ("W004", "W008", "W012", "W016", "mail.E001"):  # mail left on the console
        assert warning in plain.stderr


@pytest.mark.django_db(transaction=True)
def test_behind_tls_plain_http_is_redirected_except_the_health_check(tmp_path):
    StorageLocation.objects.update_or_create(pk=1, defaults={"path": str(tmp_path)})
    script = (
        "import json; from django.test import Client; c = Client(); "
        "r = [c.get('/datacenter/'), c.get('/healthz'), "
        "c.get('/datacenter/', HTTP_X_FORWARDED_PROTO='https')]; "
        "print(json.dumps([(x.status_code, x.get('Location'), "
        "x.get('Strict-Transport-Security')) for x in r]))"
    )
    result = manage("shell", "-c", script, **PRODUCTION)
    assert result.returncode == 0, result.stderr
    plain, healthz, proxied = json.loads(result.stdout.strip().splitlines()[-1])

    assert plain[:2] == [301, "https://testserver/datacenter/"]
    assert healthz[0] == 200  # answered over plain HTTP: the database and storage are fine
    assert proxied[0] == 302 and proxied[1].startswith("/accounts/login/")
    assert proxied[2] == "max-age=31536000; includeSubDomains; preload"


def test_the_first_admin_is_created_once_with_a_password_to_log_in(monkeypatch):
    monkeypatch.delenv("DJANGO_ADMIN_USER", raising=False)
    monkeypatch.delenv("DJANGO_ADMIN_PASSWORD", raising=False)
    out = io.StringIO()

    call_command("create_first_admin", stdout=out)

    said = re.fullmatch(
        r"Created the administrator account: user 'admin', password '([\w-]{16})'\.\n",
        out.getvalue(),
    )
    assert said, out.getvalue()
    password = said[1]
    assert User.objects.get(username="admin").check_password(password)
    again = io.StringIO()
    call_command("create_first_admin", stdout=again)
    assert again.getvalue().strip() == "An administrator account exists already; none was created."
    assert User.objects.count() == 1


def test_the_first_admin_takes_its_name_and_password_from_the_environment(monkeypatch):
    monkeypatch.setenv("DJANGO_ADMIN_USER", "root-of-all")
    monkeypatch.setenv("DJANGO_ADMIN_PASSWORD", "a long passphrase")
    out = io.StringIO()

    call_command("create_first_admin", stdout=out)

    assert out.getvalue().strip() == (
        "Created the administrator account 'root-of-all' with DJANGO_ADMIN_PASSWORD."
    )
    assert User.objects.get(username="root-of-all").check_password("a long passphrase")
    assert User.objects.get().is_superuser


def test_the_first_admin_never_takes_over_an_account(monkeypatch):
    User.objects.create_user(username="admin", password="mine")
    monkeypatch.delenv("DJANGO_ADMIN_USER", raising=False)

    with pytest.raises(CommandError, match="An account 'admin' exists and is no administrator"):
        call_command("create_first_admin")

    assert not User.objects.filter(is_superuser=True).exists()


def test_the_health_check_tells_a_database_that_cannot_be_reached(tmp_path):
    script = (
        "import json; from django.test import Client; r = Client().get('/healthz'); "
        "print(json.dumps([r.status_code, r.json()]))"
    )
    missing = f"sqlite:///{tmp_path}/no-such-folder/db.sqlite3"

    result = manage("shell", "-c", script, DATABASE_URL=missing, **PRODUCTION)

    assert result.returncode == 0, result.stderr
    status, report = json.loads(result.stdout.strip().splitlines()[-1])
    assert status == 503
    assert (report["status"], report["database"], report["workers"]) == (
        "failing",
        "unreachable",
        {},
    )
