import os

import pytest
from django.contrib.auth.models import Permission, User
from django.urls import reverse

from .conftest import tree, write

pytestmark = pytest.mark.django_db


@pytest.fixture
def manager_client(client, clerk):
    """Staff who may process files and manage user accounts."""
    clerk.user_permissions.add(*Permission.objects.filter(content_type__app_label="auth"))
    client.force_login(clerk)
    return client


def url(name):
    return reverse("datacenter:process", kwargs={"name": name})


def test_the_wizard_shows_the_first_rows_and_the_choices(manager_client, datacenter):
    write(os.path.join(datacenter.storage, "new.csv"), "username,email\nann,a@example.org\n")

    response = manager_client.get(url("new.csv"))

    assert response.context["header"] == ["username", "email"]
    assert response.context["rows"] == [["ann", "a@example.org"]]
    form = response.context["form"]
    assert form.fields["processor"].choices == [("users", "User accounts")]
    assert [value for value, _ in form.fields["mode"].choices] == ["create", "update", "remove"]


def test_a_pending_file_offers_only_its_mode(manager_client, datacenter):
    write(os.path.join(datacenter.storage, "new.update.pending.csv"), "username\nann\n")

    response = manager_client.get(url("new.update.pending.csv"))

    assert response.context["form"].fields["mode"].choices == [("update", "update")]
    response = manager_client.post(
        url("new.update.pending.csv"), {"processor": "users", "mode": "create"}
    )
    assert "mode" in response.context["form"].errors


def test_wrong_headers_stop_the_wizard_with_the_reason(manager_client, datacenter):
    write(os.path.join(datacenter.storage, "new.csv"), "username,shoe_size\nann,44\n")
    before = tree(datacenter.storage)

    response = manager_client.post(url("new.csv"), {"processor": "users", "mode": "create"})

    assert "unknown to User accounts: shoe_size" in response.context["form"].non_field_errors()[0]
    assert b"shoe_size" in response.content
    assert tree(datacenter.storage) == before


def test_dry_run_then_process(manager_client, datacenter):
    rows = "username,email\nann,a@example.org\nbob,not-an-email\n"
    write(os.path.join(datacenter.storage, "new.csv"), rows)
    choice = {"processor": "users", "mode": "create"}

    dry_run = manager_client.post(url("new.csv"), choice, follow=True)

    job = dry_run.context["job"]
    assert (job.dry_run, job.status, job.succeeded, job.failed) == (True, "success", 1, 1)
    assert dry_run.context["errors"] == [(3, "email: Enter a valid email address.", None)]
    assert [list(change) for change in dry_run.context["changes"]] == [
        [2, "create", "ann", [["email", "", "a@example.org"]]]
    ]
    assert b"would succeed" in dry_run.content
    assert not User.objects.filter(username="ann").exists()

    done = manager_client.post(url("new.csv"), {**choice, "step": "process"}, follow=True)

    job = done.context["job"]
    assert job.result["finished_name"] == "new.create.finished.csv"
    assert job.result["pending_name"] == "new.create.pending.csv"
    assert b"1</strong> successful" in done.content
    assert User.objects.filter(username__in=["ann", "bob"]).get().username == "ann"
    assert os.listdir(datacenter.unfinished_path) == ["new.csv"]


def test_processing_needs_the_permissions_of_the_processor(client, clerk, datacenter):
    write(os.path.join(datacenter.storage, "new.csv"), "username\nann\n")
    client.force_login(clerk)

    response = client.post(
        url("new.csv"), {"processor": "users", "mode": "create", "step": "process"}
    )

    assert "needs the permission auth.add_user" in response.context["form"].non_field_errors()[0]
    assert not User.objects.filter(username="ann").exists()
