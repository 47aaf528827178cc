"""What each permission lets a person reach, tried through the site as an attacker would: every
test acts as a user holding exactly the permissions named (DESIGN.md, "Who may do what")."""

import io
import os
import signal
import subprocess
import sys
import time

import pytest
from django.conf import settings as django_settings
from django.contrib.auth.models import Group, Permission, User
from django.urls import reverse

from datacenter.files import STALE_PART_SECONDS
from datacenter.models import Job, StorageLocation, current_datacenter
from imports.models import CdsSource

from .conftest import PASSWORD, ROOT, process_env, run_worker, tree, wait_for, write

pytestmark = pytest.mark.django_db


def person(django_user_model, username, *permissions, **fields):
    """A user holding exactly `permissions` ("app.codename"), logged in on a client of its own."""
    from django.test import Client

    user = django_user_model.objects.create_user(username=username, password=PASSWORD, **fields)
    for name in permissions:
        app_label, codename = name.split(".")
        user.user_permissions.add(
            Permission.objects.get(content_type__app_label=app_label, codename=codename)
        )
    client = Client()
    client.force_login(user)
    return user, client


def cds_source(spool, **fields) -> CdsSource:
    defaults = {"name": "partner", "host": "127.0.0.1", "user": "u", "remote_dir": "/"}
    return CdsSource.objects.create(**{**defaults, **fields, "spool_dir": str(spool)})


def pending(datacenter, name, text):
    return write(os.path.join(datacenter.storage, name), text)


# Relocation reaches only the folders the operator set aside


@pytest.fixture
def relocator(django_user_model):
    return person(django_user_model, "mover", "datacenter.relocate_storage")[1]


def relocate(client, path, **options):
    """Relocate as the form does, confirmed at once."""
    return client.post(reverse("datacenter:storage"), {"path": path, "confirmed": 1, **options})


@pytest.mark.parametrize(
    "target",
    [
        "/etc",
        "/",
        "/root",
        str(django_settings.BASE_DIR),
        str(django_settings.BASE_DIR / "datacenter"),
        str(django_settings.VAR_DIR),
        "$HOME",
        "~/storage",
    ],
)
def test_relocation_refuses_folders_outside_the_storage_parents(relocator, datacenter, target):
    response = relocate(relocator, target)

    error = response.context["form"].errors["path"][0]
    assert "not inside a folder where the storage may be kept" in error or "absolute" in error
    assert not StorageLocation.objects.exists()
    assert not Job.objects.exists()
    assert current_datacenter().storage == datacenter.storage


def test_relocation_refuses_the_parent_itself_and_a_folder_holding_the_code(
    relocator, datacenter, settings, tmp_path
):
    settings.DATACENTER_STORAGE_PARENTS = [os.path.dirname(settings.BASE_DIR)]

    holds_code = relocate(relocator, os.path.dirname(settings.BASE_DIR))
    code = relocate(relocator, str(settings.BASE_DIR))
    inside_code = relocate(relocator, str(settings.BASE_DIR / "templates"))

    assert "not inside a folder" in holds_code.context["form"].errors["path"][0]
    assert "is or holds the site's code" in code.context["form"].errors["path"][0]
    assert "lies inside the site's code" in inside_code.context["form"].errors["path"][0]
    assert not StorageLocation.objects.exists()


def test_relocation_refuses_a_cds_spool_and_a_folder_holding_one(relocator, tmp_path):
    cds_source(tmp_path / "cds" / "in")

    for target in (tmp_path / "cds", tmp_path / "cds" / "in", tmp_path / "cds" / "in" / "new"):
        response = relocate(relocator, str(target))

        assert "the spool of the CDS source partner" in response.context["form"].errors["path"][0]
    assert not StorageLocation.objects.exists()


def test_relocation_takes_the_path_literally_below_a_parent(relocator, tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    literal = tmp_path / "$HOME"

    response = relocate(relocator, str(literal))

    assert response.status_code == 302
    assert StorageLocation.objects.get().path == str(literal)
    assert os.path.isdir(literal / "finished")
    assert os.listdir(home) == []


@pytest.mark.django_db(transaction=True)
def test_a_queued_relocation_is_checked_again_when_it_runs(relocator, tmp_path, datacenter):
    target = tmp_path / "later"
    relocate(relocator, str(target), move="on")
    cds_source(target, name="late")

    run_worker()

    job = Job.objects.get()
    assert job.status == Job.FAILED
    assert "the spool of the CDS source late" in job.error
    assert current_datacenter().storage == datacenter.storage


# The site reaches data center files only


@pytest.fixture
def foreign_files(datacenter):
    """Files that are not the data center's, lying in its folders."""
    names = {
        "secret_key": "the key",
        "db.sqlite3": "the database",
        "manage.py": "print('code')",
        "finished/notes.txt": "notes",
        "logs/shadow": "root:x:0:",
        "exports/users.json": "{}",
    }
    os.makedirs(os.path.join(datacenter.storage, "exports"), exist_ok=True)
    for name, text in names.items():
        write(os.path.join(datacenter.storage, name), text)
    return names


def test_a_viewer_reaches_no_other_file_than_the_data_centers(
    django_user_model, datacenter, foreign_files
):
    _, viewer = person(django_user_model, "viewer", "datacenter.view_files")

    for url in [
        reverse("datacenter:download", args=["secret_key"]),
        reverse("datacenter:download", args=["db.sqlite3"]),
        reverse("datacenter:preview", args=["manage.py"]),
        reverse("datacenter:download_finished", args=["notes.txt"]),
        reverse("datacenter:log", args=["shadow"]),
    ]:
        assert viewer.get(url).status_code == 404, url
    logs = viewer.get(reverse("datacenter:logs"))
    assert b"shadow" not in logs.content


def test_an_uploader_cannot_replace_or_edit_any_other_file(
    django_user_model, datacenter, foreign_files
):
    _, uploader = person(django_user_model, "uploader", "datacenter.upload_files")
    before = tree(datacenter.storage)
    evil = io.BytesIO(b"import os\n")
    evil.name = "manage.csv"

    replaced = uploader.post(reverse("datacenter:replace", args=["manage.py"]), {"file": evil})
    edited = uploader.post(reverse("datacenter:edit", args=["secret_key"]), {"version": "x"})

    assert (replaced.status_code, edited.status_code) == (404, 404)
    assert tree(datacenter.storage) == before


def test_a_deleter_cannot_delete_any_other_file(django_user_model, datacenter, foreign_files):
    _, deleter = person(django_user_model, "deleter", "datacenter.delete_files")
    before = tree(datacenter.storage)

    response = deleter.post(reverse("datacenter:delete", args=["db.sqlite3"]))

    assert response.status_code == 404
    assert tree(datacenter.storage) == before


def test_an_exporter_cannot_download_other_files_of_the_exports_folder(
    django_user_model, datacenter, foreign_files
):
    _, exporter = person(django_user_model, "exporter", "datacenter.export_records")

    response = exporter.get(reverse("datacenter:download_export", args=["users.json"]))

    assert response.status_code == 404


# A dry run binds the file it checked


def test_process_after_a_dry_run_refuses_a_file_swapped_meanwhile(
    admin_client, admin_user, django_user_model, datacenter
):
    clerk, clerk_client = person(
        django_user_model, "clerk", "datacenter.upload_files", "datacenter.process_files"
    )
    pending(datacenter, "staff.csv", f"username,first_name\n{admin_user.username},Boss\n")
    choice = {"processor": "users", "mode": "update"}
    url = reverse("datacenter:process", args=["staff.csv"])
    dry_run = admin_client.post(url, choice, follow=True).context["job"]
    assert dry_run.result["change_counts"] == {"update": 1}

    clerk.set_password("mine")
    evil = io.BytesIO(f"username,password\n{admin_user.username},{clerk.password}\n".encode())
    evil.name = "staff.csv"
    clerk_client.post(reverse("datacenter:replace", args=["staff.csv"]), {"file": evil})
    page = admin_client.get(dry_run.get_absolute_url())
    assert b'name="after_dry_run"' in page.content
    response = admin_client.post(
        url, {**choice, "step": "process", "after_dry_run": dry_run.pk}, follow=True
    )

    assert "The file changed after its dry run; check it again" in response.content.decode()
    admin_user.refresh_from_db()
    assert not admin_user.check_password("mine")
    assert Job.objects.filter(dry_run=False).count() == 0
    assert os.path.exists(os.path.join(datacenter.storage, "staff.csv"))


def test_process_after_a_dry_run_processes_the_file_it_checked(admin_client, datacenter):
    User.objects.create_user("ann")
    pending(datacenter, "staff.csv", "username,first_name\nann,Ann\n")
    choice = {"processor": "users", "mode": "update"}
    url = reverse("datacenter:process", args=["staff.csv"])
    dry_run = admin_client.post(url, choice, follow=True).context["job"]

    done = admin_client.post(
        url, {**choice, "step": "process", "after_dry_run": dry_run.pk}, follow=True
    )

    assert done.context["job"].status == Job.SUCCESS
    assert User.objects.get(username="ann").first_name == "Ann"


def test_process_after_a_dry_run_of_another_file_is_refused(admin_client, datacenter):
    User.objects.create_user("ann")
    pending(datacenter, "a.csv", "username,first_name\nann,A\n")
    pending(datacenter, "b.csv", "username,first_name\nann,B\n")
    choice = {"processor": "users", "mode": "update"}
    dry_run = admin_client.post(
        reverse("datacenter:process", args=["a.csv"]), choice, follow=True
    ).context["job"]

    response = admin_client.post(
        reverse("datacenter:process", args=["b.csv"]),
        {**choice, "step": "process", "after_dry_run": dry_run.pk},
    )

    assert "There is no finished dry run" in response.content.decode()
    assert User.objects.get(username="ann").first_name == ""


# A file gives nobody more than the person processing it holds


@pytest.fixture
def powerful(db):
    """A group holding every permission."""
    group = Group.objects.create(name="Powerful")
    group.permissions.set(Permission.objects.all())
    return group


@pytest.fixture
def user_clerk(django_user_model):
    """Uploads, processes and manages accounts, but is no staff."""
    return person(
        django_user_model,
        "clerk",
        "datacenter.upload_files",
        "datacenter.process_files",
        "datacenter.view_files",
        "auth.add_user",
        "auth.change_user",
        "auth.view_user",
    )


def process(client, datacenter, name, text, mode):
    pending(datacenter, name, text)
    url = reverse("datacenter:process", args=[name])
    return client.post(url, {"processor": "users", "mode": mode, "step": "process"}, follow=True)


def test_a_file_cannot_make_its_processor_staff_or_add_them_to_a_stronger_group(
    user_clerk, powerful, datacenter
):
    clerk, client = user_clerk

    response = process(
        client, datacenter, "me.csv", "username,is_staff,groups\nclerk,1,Powerful\n", "update"
    )

    job = response.context["job"]
    assert (job.succeeded, job.failed) == (0, 1)
    assert "only a superuser's file makes an account staff" in job.result["errors"][0][1]
    clerk.refresh_from_db()
    assert not clerk.is_staff
    assert not clerk.groups.exists()

    groups_only = process(
        client, datacenter, "g.csv", "username,groups\nclerk,Powerful\n", "update"
    ).context["job"]
    assert "Powerful grant permissions you do not have" in groups_only.result["errors"][0][1]
    assert not clerk.groups.exists()


def test_a_file_cannot_create_a_staff_account_or_one_in_a_stronger_group(
    user_clerk, powerful, datacenter
):
    _, client = user_clerk

    response = process(
        client,
        datacenter,
        "new.csv",
        "username,is_staff,groups\nboss,1,\nhelper,0,Powerful\nplain,0,\n",
        "create",
    )

    job = response.context["job"]
    assert (job.succeeded, job.failed) == (1, 2)
    assert list(User.objects.filter(username__in=["boss", "helper", "plain"])) == [
        User.objects.get(username="plain")
    ]


def test_a_file_cannot_change_the_password_email_or_activity_of_a_staff_account(
    user_clerk, datacenter
):
    clerk, client = user_clerk
    staff = []
    for name in ("s1", "s2", "s3"):
        account = User.objects.create_user(name, f"{name}@example.org", "theirs", is_staff=True)
        staff.append(account)
    clerk.set_password("mine")

    response = process(
        client,
        datacenter,
        "take.csv",
        "username,password,email,is_active\n"
        f"s1,{clerk.password},,\n"
        "s2,,clerk@example.org,\n"
        "s3,,,0\n",
        "update",
    )

    job = response.context["job"]
    assert job.failed == 3
    assert [error for _, error in job.result["errors"]] == [
        f"{name} is a staff account: its {field} is changed by a file only when a superuser "
        "processes it."
        for name, field in [("s1", "password"), ("s2", "email"), ("s3", "is_active")]
    ]
    for account in staff:
        account.refresh_from_db()
        assert account.check_password("theirs")
        assert (account.email, account.is_active) == (f"{account.username}@example.org", True)


def test_a_file_may_add_groups_within_reach_and_pass_rows_that_change_nothing(
    user_clerk, powerful, datacenter
):
    _, client = user_clerk
    readers = Group.objects.create(name="Readers")
    readers.permissions.set(Permission.objects.filter(codename="view_files"))
    staff = User.objects.create_user("staffer", "staff@example.org", is_staff=True)
    staff.groups.add(powerful)
    User.objects.create_user("ann")

    response = process(
        client,
        datacenter,
        "round.csv",
        "username,email,is_staff,is_active,groups\n"
        "staffer,staff@example.org,1,1,Powerful\n"
        "ann,,0,1,Readers\n",
        "update",
    )

    job = response.context["job"]
    assert (job.succeeded, job.failed) == (2, 0)
    assert list(User.objects.get(username="ann").groups.all()) == [readers]


# Exports are private


def export(client):
    response = client.post(reverse("datacenter:exports"), {"processor": "users"}, follow=True)
    job = response.context["job"]
    assert job.status == Job.SUCCESS
    return job.file_name


def test_exports_are_private_to_their_maker_and_hashes_reach_superusers_only(
    admin_client, django_user_model, datacenter
):
    perms = ("datacenter.export_records", "datacenter.view_files", "auth.view_user")
    _, exporter = person(django_user_model, "exporter", *perms)
    _, other = person(django_user_model, "other", *perms)
    admins = export(admin_client)
    own = export(exporter)

    listed = exporter.get(reverse("datacenter:exports"))
    admin_download = exporter.get(reverse("datacenter:download_export", args=[admins]))
    own_download = exporter.get(reverse("datacenter:download_export", args=[own]))
    others_download = other.get(reverse("datacenter:download_export", args=[own]))

    assert admins != own
    assert admins.encode() not in listed.content and own.encode() in listed.content
    assert admin_download.status_code == 404
    assert others_download.status_code == 404
    assert b"pbkdf2" not in b"".join(own_download.streaming_content)
    with open(os.path.join(datacenter.storage, "exports", admins), "rb") as handle:
        assert b"md5$" in handle.read()  # the superuser's export does hold hashes


def test_an_export_neutralises_formulas_and_processes_back_unchanged(admin_client, datacenter):
    User.objects.create_user("ann", first_name='=HYPERLINK("http://x")', last_name="+cmd|x")
    User.objects.create_user("bob", first_name="'=quoted", last_name="-5")
    name = export(admin_client)
    path = os.path.join(datacenter.storage, "exports", name)
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    assert "'=HYPERLINK" in text and ",'+cmd|x," in text
    assert "''=quoted" in text and ",'-5," in text
    os.rename(path, os.path.join(datacenter.storage, "round.csv"))
    url = reverse("datacenter:process", args=["round.csv"])

    dry_run = admin_client.post(url, {"processor": "users", "mode": "update"}, follow=True)

    counts = dry_run.context["job"].result["change_counts"]
    assert set(counts) == {"unchanged"}
    admin_client.post(url, {"processor": "users", "mode": "update", "step": "process"})
    ann, bob = User.objects.get(username="ann"), User.objects.get(username="bob")
    assert (ann.first_name, ann.last_name) == ('=HYPERLINK("http://x")', "+cmd|x")
    assert (bob.first_name, bob.last_name) == ("'=quoted", "-5")


def test_dry_run_values_are_shown_only_to_those_who_may_view_the_records(
    admin_client, django_user_model, datacenter
):
    User.objects.create_user("ann", "old@example.org")
    pending(datacenter, "mail.csv", "username,email\nann,new@example.org\n")
    url = reverse("datacenter:process", args=["mail.csv"])
    job = admin_client.post(url, {"processor": "users", "mode": "update"}, follow=True)
    job = job.context["job"]
    _, viewer = person(django_user_model, "viewer", "datacenter.view_files")
    _, user_viewer = person(
        django_user_model, "userviewer", "datacenter.view_files", "auth.view_user"
    )

    hidden = viewer.get(job.get_absolute_url())
    shown = user_viewer.get(job.get_absolute_url())

    assert b"old@example.org" not in hidden.content and b"new@example.org" not in hidden.content
    assert b"shown only to those who may view these records" in hidden.content
    assert b"old@example.org" in shown.content and b"new@example.org" in shown.content


# Secrets are write-only


def test_a_source_viewer_in_the_admin_sees_no_secret(django_user_model, tmp_path):
    source = cds_source(
        tmp_path / "spool", protocol="sftp", password="ftp-s3cret", passphrase="key-s3cret"
    )
    _, viewer = person(django_user_model, "viewer", "imports.view_cdssource", is_staff=True)

    page = viewer.get(reverse("admin:imports_cdssource_change", args=[source.pk]))

    assert page.status_code == 200
    assert b"ftp-s3cret" not in page.content and b"key-s3cret" not in page.content
    assert b"Password" in page.content and b"set" in page.content


def test_a_source_editor_gets_fields_to_set_the_secrets_never_their_values(admin_client, tmp_path):
    source = cds_source(tmp_path / "s", password="pw1x")

    page = admin_client.get(reverse("admin:imports_cdssource_change", args=[source.pk]))

    assert b'name="password"' in page.content
    assert b"pw1x" not in page.content


# No step costs more than linear time in the file's size


@pytest.fixture
def cpu_guard():
    """Fail a test whose process spends more than `seconds` of CPU time: a step that is
    quadratic in a wide header takes hours here, a linear one seconds. CPU time, not the
    clock, so that a busy machine does not fail it."""

    def expire(signum, frame):
        raise AssertionError("the CPU budget ran out: some step is worse than linear")

    previous = signal.signal(signal.SIGPROF, expire)
    signal.setitimer(signal.ITIMER_PROF, 120)
    yield
    signal.setitimer(signal.ITIMER_PROF, 0)
    signal.signal(signal.SIGPROF, previous)


def test_a_header_of_a_million_columns_is_uploaded_and_checked_in_linear_time(
    admin_client, datacenter, cpu_guard
):
    columns = [f"c{number}" for number in range(1_000_000)]
    columns[1] = columns[2] = "twice"
    header = ",".join(columns)
    upload = io.BytesIO(f"{header}\n{','.join(['x'] * len(columns))}\n".encode())
    upload.name = "wide.csv"

    refused = admin_client.post(reverse("datacenter:upload"), {"file": upload})
    assert "names these columns more than once: twice" in refused.content.decode()
    row = "ann" + ",x" * len(columns)
    pending(datacenter, "wide.csv", ",".join(["username", *columns]) + "\n" + row + "\n")
    dry_run = admin_client.post(
        reverse("datacenter:process", args=["wide.csv"]), {"processor": "users", "mode": "create"}
    )

    error = dry_run.context["form"].non_field_errors()[0]
    assert "These columns appear more than once: twice." in error
    # The unknown columns are named ten at most.
    assert "unknown to User accounts: c0, twice, twice, c3, c4, c5" in error
    assert "c9 and 999990 more." in error


# Smaller doors


def test_the_lock_names_never_enter_the_outgoing_spool(django_user_model, tmp_path):
    source = cds_source(tmp_path / "s", export_dir="/out")
    _, operator = person(django_user_model, "op", "imports.view_importrun", "imports.run_import")

    for name in ("read", "write"):
        upload = io.BytesIO(b"lock")
        upload.name = name
        response = operator.post(source.get_absolute_url(), {"file": upload})

        assert "name of a CDS lock file" in response.content.decode()
    for name in ("read", "write"):
        assert not os.path.exists(tmp_path / "s" / "out" / "new" / name)


def test_repeated_failed_logins_are_throttled(client, django_user_model, settings):
    django_user_model.objects.create_user("ann", password=PASSWORD)
    login = reverse("login")

    for _ in range(settings.AXES_FAILURE_LIMIT):
        client.post(login, {"username": "ann", "password": "wrong"})
    locked = client.post(login, {"username": "ann", "password": PASSWORD})

    assert locked.status_code == 429
    assert "The password was wrong 5 times" in locked.content.decode()
    assert "_auth_user_id" not in client.session


def test_a_right_password_before_the_limit_logs_in_and_forgets_the_failures(
    client, django_user_model, settings
):
    django_user_model.objects.create_user("ann", password=PASSWORD)
    login = reverse("login")
    for _ in range(settings.AXES_FAILURE_LIMIT - 1):
        client.post(login, {"username": "ann", "password": "wrong"})

    response = client.post(login, {"username": "ann", "password": PASSWORD})

    assert response.status_code == 302
    assert client.session["_auth_user_id"]


@pytest.mark.django_db(transaction=True)
def test_the_part_of_an_upload_whose_process_was_killed_is_removed_later(clerk_client, datacenter):
    StorageLocation.objects.create(pk=1, path=datacenter.storage)
    # An upload that stops half-way: the file object reads from a pipe that never ends.
    code = (
        "import sys; from datacenter.models import current_datacenter; "
        "from datacenter.uploads import save_upload; "
        "save_upload(current_datacenter(), sys.stdin.buffer, 'slow.csv')"
    )
    uploader = subprocess.Popen(
        [sys.executable, "manage.py", "shell", "-c", code],
        cwd=ROOT,
        env=process_env(),
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    uploader.stdin.write(b"username\n" + b"ann\n" * 20_000)
    uploader.stdin.flush()

    def parts():
        return [name for name in os.listdir(datacenter.storage) if name.startswith(".upload-")]

    wait_for(lambda: parts() and os.path.getsize(os.path.join(datacenter.storage, parts()[0])))
    uploader.kill()
    uploader.wait()
    [part] = parts()
    fresh = write(os.path.join(datacenter.storage, ".upload-fresh.part"), "in progress")
    # Pinned to an hour ago rather than slept.
    old = time.time() - STALE_PART_SECONDS - 1
    os.utime(os.path.join(datacenter.storage, part), (old, old))
    upload = io.BytesIO(b"username\nbob\n")
    upload.name = "next.csv"

    clerk_client.post(reverse("datacenter:upload"), {"file": upload})

    assert parts() == [".upload-fresh.part"]
    assert os.path.exists(fresh)
    assert os.path.exists(os.path.join(datacenter.storage, "next.csv"))


def test_a_line_break_in_a_users_name_does_not_silence_the_upload_mail(
    clerk_client, clerk, managers, smtp_server
):
    clerk.first_name = "Clara\r\nBcc: victim@example.org"
    clerk.save()
    upload = io.BytesIO(b"username\nann\n")
    upload.name = "new.csv"

    clerk_client.post(reverse("datacenter:upload"), {"file": upload})

    [mail] = smtp_server.received
    assert (
        mail["Subject"].strip()
        == "[Datacenter] new.csv uploaded by Clara Bcc: victim@example.org (clerk)"
    )
    assert mail["Bcc"] is None
    [envelope] = smtp_server.envelopes
    assert "victim@example.org" not in envelope.rcpt_tos
