"""CDS sources are validated in the admin and wherever they are saved."""

import os

import pytest
from django.core.exceptions import ValidationError
from django.urls import reverse

from imports.models import CdsSource

pytestmark = pytest.mark.django_db


@pytest.fixture
def valid(tmp_path) -> dict:
    return {
        "name": "partner",
        "protocol": "ftp",
        "host": "ftp.example.org",
        "port": 21,
        "user": "partner",
        "password": "secret",
        "remote_dir": "/outbox",
        "spool_dir": str(tmp_path / "spool"),
        "ca_file": "",
        "enabled": "on",
        "timeout": 30,
        "passive": "on",
        "parallel": 4,
        "stable_after": "",
    }


def admin_errors(admin_client, data) -> dict:
    response = admin_client.post(reverse("admin:imports_cdssource_add"), data)
    if response.status_code == 302:
        return {}
    return response.context["adminform"].form.errors


def test_a_valid_source_is_saved(admin_client, valid):
    assert admin_errors(admin_client, valid) == {}
    assert CdsSource.objects.get().host == "ftp.example.org"


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("port", 0, "greater than or equal to 1"),
        ("port", 65536, "less than or equal to 65535"),
        ("timeout", 0, "greater than or equal to 1"),
        ("parallel", 0, "greater than or equal to 1"),
        ("parallel", 17, "less than or equal to 16"),
        ("alert_after_failures", 0, "greater than or equal to 1"),
        ("alert_after_hours", 0, "greater than or equal to 1"),
        ("alert_emails", "ops@example.org, ops", "These are no e-mail addresses: ops."),
        ("host", "ftp://ftp.example.org", "Enter a host name"),
        ("host", "ftp.example.org:21", "Enter a host name"),
        ("host", "two words", "Enter a host name"),
        ("host", "-bad-.example.org", "Enter a host name"),
        ("remote_dir", "outbox", "must be an absolute path"),
        ("remote_dir", "/outbox/../etc", "may not contain '..'"),
        ("spool_dir", "spool", "must be an absolute path"),
        ("spool_dir", "/", "is a system folder"),
        ("spool_dir", "/etc", "is a system folder"),
        ("spool_dir", "/usr/local/spool", "is a system folder"),
        ("spool_dir", "/tmp", "is a system folder"),
        ("ca_file", "relative.pem", "must be given as an absolute path"),
        ("ca_file", "/nonexistent/ca.pem", "There is no file /nonexistent/ca.pem"),
    ],
)
def test_refusals_in_words(admin_client, valid, field, value, message):
    errors = admin_errors(admin_client, valid | {"protocol": "ftps", field: value})

    assert message in " ".join(errors[field])
    assert not CdsSource.objects.exists()


def test_the_spool_may_not_overlap_the_data_center_storage(admin_client, valid, storage_root):
    inside = admin_errors(admin_client, valid | {"spool_dir": f"{storage_root}/cds"})
    around = admin_errors(admin_client, valid | {"spool_dir": os.path.dirname(storage_root)})

    assert "may not overlap the data center storage" in inside["spool_dir"][0]
    assert "may not overlap the data center storage" in around["spool_dir"][0]


def test_the_spool_must_be_a_folder(admin_client, valid, tmp_path):
    (tmp_path / "a-file").write_text("")

    errors = admin_errors(admin_client, valid | {"spool_dir": str(tmp_path / "a-file" / "x")})

    assert errors["spool_dir"] == [f"{tmp_path / 'a-file'} is a file, not a folder."]


def test_the_spool_must_be_writable(admin_client, valid, tmp_path, small_filesystem):
    if os.geteuid() == 0:  # root may write anywhere but to a read-only filesystem
        locked = small_filesystem("64k", read_only=True)
    else:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)

    errors = admin_errors(admin_client, valid | {"spool_dir": str(locked / "spool")})

    assert errors["spool_dir"] == [f"The site may not write to {locked}."]


def test_two_sources_may_not_share_a_spool(admin_client, valid):
    admin_errors(admin_client, valid)

    errors = admin_errors(admin_client, valid | {"name": "other"})

    assert "already exists" in errors["spool_dir"][0]


def test_the_ca_file_must_hold_certificates_and_goes_with_ftps(
    admin_client, valid, tmp_path, certificate
):
    not_pem = tmp_path / "notes.txt"
    not_pem.write_text("not a certificate")

    bad = admin_errors(admin_client, valid | {"protocol": "ftps", "ca_file": str(not_pem)})
    plain_ftp = admin_errors(admin_client, valid | {"ca_file": str(certificate[0])})
    ftps = admin_errors(admin_client, valid | {"protocol": "ftps", "ca_file": str(certificate[0])})

    assert bad["ca_file"] == [f"{not_pem} is not a PEM file of CA certificates."]
    assert plain_ftp["ca_file"] == ["A CA file is used with FTPS only."]
    assert ftps == {}


def test_sources_saved_by_scripts_are_held_to_the_same_rules(tmp_path):
    with pytest.raises(ValidationError) as refused:
        CdsSource.objects.create(
            name="scripted", host="ftp.example.org", user="u", spool_dir="/etc/cds"
        )

    assert "is a system folder" in str(refused.value)
    assert not CdsSource.objects.exists()
