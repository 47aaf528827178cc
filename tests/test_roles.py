"""Where each person lands and what they can reach without a dead end; the ready-made groups;
the permissions the admin offers."""

import io
import os

import pytest
from django.contrib.auth.models import Group
from django.urls import reverse

from imports.models import ImportRun

from .conftest import PASSWORD, make_source, write
from .test_security import person

pytestmark = pytest.mark.django_db


def log_in(client, username):
    return client.post(reverse("login"), {"username": username, "password": PASSWORD}, follow=True)


def test_a_clerk_who_may_upload_and_process_never_meets_a_dead_end(
    client, django_user_model, datacenter
):
    person(
        django_user_model,
        "clerk",
        "datacenter.upload_files",
        "datacenter.process_files",
        "auth.add_user",
    )

    landed = log_in(client, "clerk")
    upload = io.BytesIO(b"username\nann\n")
    upload.name = "staff.csv"
    uploaded = client.post(reverse("datacenter:upload"), {"file": upload}, follow=True)
    url = reverse("datacenter:process", args=["staff.csv"])
    dry_run = client.post(url, {"processor": "users", "mode": "create"}, follow=True)

    assert landed.request["PATH_INFO"] == reverse("datacenter:pending")
    assert landed.status_code == 200
    assert uploaded.status_code == 200 and b"Uploaded staff.csv" in uploaded.content
    assert b"staff.csv" in uploaded.content
    assert dry_run.status_code == 200
    assert dry_run.context["job"].succeeded == 1


def test_someone_without_any_permission_is_told_what_to_ask_for(client, django_user_model):
    person(django_user_model, "newcomer")

    landed = log_in(client, "newcomer")

    assert landed.status_code == 200
    assert b"may not use any page of the site yet" in landed.content
    assert b"Data center clerks" in landed.content


@pytest.mark.parametrize(
    ("permission", "page"),
    [
        ("datacenter.view_files", "datacenter:pending"),
        ("datacenter.delete_files", "datacenter:pending"),
        ("datacenter.export_records", "datacenter:exports"),
        ("datacenter.relocate_storage", "datacenter:storage"),
        ("imports.view_importrun", "imports:overview"),
    ],
)
def test_everybody_lands_on_a_page_they_may_use(client, django_user_model, permission, page):
    person(django_user_model, "someone", permission)

    landed = log_in(client, "someone")

    assert landed.status_code == 200
    assert landed.request["PATH_INFO"] == reverse(page)


def test_a_job_page_is_for_its_starter_and_the_viewers_only(django_user_model, datacenter):
    starter, starter_client = person(
        django_user_model, "starter", "datacenter.process_files", "auth.add_user"
    )
    _, other = person(django_user_model, "other", "datacenter.upload_files")
    _, viewer = person(django_user_model, "viewer", "datacenter.view_files")
    write(os.path.join(datacenter.storage, "a.csv"), "username\nann\n")
    url = reverse("datacenter:process", args=["a.csv"])
    job = starter_client.post(url, {"processor": "users", "mode": "create"}, follow=True)
    job = job.context["job"]

    assert starter_client.get(job.get_absolute_url()).status_code == 200
    assert viewer.get(job.get_absolute_url()).status_code == 200
    assert other.get(job.get_absolute_url()).status_code == 403


def test_a_run_page_is_for_its_starter_too(django_user_model, ftp_server, spool):
    source = make_source(ftp_server, spool)
    starter, client = person(django_user_model, "starter", "imports.run_import")

    response = client.post(reverse("imports:run_now", kwargs={"name": source.name}))
    run = ImportRun.objects.get()

    assert response["Location"] == run.get_absolute_url()
    assert client.get(run.get_absolute_url()).status_code == 200
    assert client.get(reverse("imports:runs")).status_code == 403


def test_ready_made_groups_hold_their_roles_permissions():
    def codenames(name):
        group = Group.objects.get(name=name)
        return sorted(group.permissions.values_list("codename", flat=True))

    assert codenames("Data center viewers") == ["view_files"]
    assert codenames("Data center clerks") == [
        *("add_user", "change_user", "process_files", "upload_files", "view_files", "view_user")
    ]
    assert {"relocate_storage", "export_records", "delete_files"} <= set(
        codenames("Data center managers")
    )
    assert {"run_import", "view_importrun", "manage_spool"} <= set(codenames("Import managers"))


def test_the_admin_offers_only_permissions_that_mean_something(admin_client):
    page = admin_client.get(reverse("admin:auth_group_add")).content.decode()

    assert "Data center | files and storage | Can process pending files" in page
    assert "Can add worker heartbeat" not in page
    assert "Can add job" not in page
    assert "Can delete import log entry" not in page
    assert "Can run CDS imports" in page


def test_deleting_files_shows_their_names_not_their_contents(django_user_model, datacenter):
    _, deleter = person(django_user_model, "deleter", "datacenter.delete_files")
    write(os.path.join(datacenter.storage, "a.csv"), "username\nsecret-name\n")

    listing = deleter.get(reverse("datacenter:pending"))
    preview = deleter.get(reverse("datacenter:preview", args=["a.csv"]))

    assert b"a.csv" in listing.content
    assert b">Preview<" not in listing.content and b">Download<" not in listing.content
    assert b">Delete<" in listing.content
    assert preview.status_code == 403
