"""E-mail to the import managers on uploads, through a real SMTP server."""

import io

import pytest
from django.urls import reverse

from datacenter.uploads import replace_upload, save_upload
from datacenter_site.settings import mailer_from_env

pytestmark = pytest.mark.django_db

ROWS = (
    "username,email,first_name\n"
    "ann,ann@example.org,Ann\n"
    "bob,bob@example.org,Bob\n"
    "cy,cy@example.org,Cy\n"
    "dee,dee@example.org,Dee\n"
)


def test_an_upload_is_mailed_to_the_import_managers_with_its_first_rows(
    clerk_client, clerk, managers, smtp_server, datacenter, settings
):
    settings.DATACENTER_SITE_URL = "https://datacenter.example.org"
    clerk.first_name, clerk.last_name = "Clara", "Clerk"
    clerk.save()
    upload = io.BytesIO(ROWS.replace(",", ";").encode("cp1252"))
    upload.name = "new staff.csv"

    response = clerk_client.post(reverse("datacenter:upload"), {"file": upload})

    assert response.status_code == 302
    [envelope] = smtp_server.envelopes
    assert sorted(envelope.rcpt_tos) == ["max@example.org", "mia@example.org"]
    [mail] = smtp_server.received
    assert mail["Subject"] == "[Datacenter] new_staff.csv uploaded by Clara Clerk (clerk)"
    body = mail.get_content().replace("\r\n", "\n")
    assert "Clara Clerk (clerk) uploaded new_staff.csv in the data center." in body
    assert f"Size: {len(ROWS)} bytes" in body
    assert "Rows: 4 (besides the header)" in body
    assert "Converted: " in body and "semicolon" in body
    preview = (
        "username,email,first_name\n"
        "ann,ann@example.org,Ann\n"
        "bob,bob@example.org,Bob\n"
        "cy,cy@example.org,Cy\n"
    )
    assert preview in body
    assert "dee" not in body
    assert "Open it: https://datacenter.example.org/datacenter/files/new_staff.csv/" in body


def test_a_replacement_is_mailed_too(clerk, managers, smtp_server, datacenter):
    save_upload(datacenter, io.BytesIO(b"username\nann\n"), "s.csv", user=clerk)

    replace_upload(datacenter, io.BytesIO(ROWS.encode()), "s.csv", user=clerk)

    assert [mail["Subject"] for mail in smtp_server.received] == [
        "[Datacenter] s.csv uploaded by clerk",
        "[Datacenter] s.csv replaced by clerk",
    ]


def test_long_cells_are_cut_in_the_mail(clerk, managers, smtp_server, datacenter):
    save_upload(datacenter, io.BytesIO(b"note\n" + b"x" * 10_000 + b"\n"), "n.csv", user=clerk)

    body = smtp_server.received[0].get_content()
    assert "x" * 200 + "…" in body and "x" * 201 not in body


def test_a_mail_server_that_cannot_be_reached_never_fails_the_upload(
    clerk_client, managers, datacenter, settings, caplog
):
    settings.MAILERS = {
        "default": {
            "BACKEND": "django.core.mail.backends.smtp.EmailBackend",
            "OPTIONS": {"host": "127.0.0.1", "port": closed_port(), "timeout": 2},
        }
    }
    upload = io.BytesIO(ROWS.encode())
    upload.name = "staff.csv"

    response = clerk_client.post(reverse("datacenter:upload"), {"file": upload}, follow=True)

    assert "Uploaded staff.csv" in response.content.decode()
    assert [file.name for file in datacenter.pending_files()] == ["staff.csv"]
    assert "Sending 'staff.csv uploaded by clerk' to max@example.org, mia@example.org failed." in (
        caplog.text
    )
    [line] = datacenter.query_log("datacenter.log", "notify")
    assert " - ERROR - clerk - notify: the mail about staff.csv could not be sent" in line


def test_no_managers_no_mail(clerk, smtp_server, datacenter):
    save_upload(datacenter, io.BytesIO(b"id\n1\n"), "a.csv", user=clerk)

    assert smtp_server.received == []


def closed_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize(
    ("environment", "options"),
    [
        ({}, None),
        ({"EMAIL_URL": "console://"}, None),
        (
            {"EMAIL_URL": "smtp+tls://me%40example.org:p%2Fss@mail.example.org"},
            {
                "host": "mail.example.org",
                "port": 587,
                "username": "me@example.org",
                "password": "p/ss",
                "use_ssl": False,
                "use_tls": True,
                "timeout": 10,
            },
        ),
        (
            {"EMAIL_URL": "smtps://mail.example.org:2465", "EMAIL_TIMEOUT": "3"},
            {
                "host": "mail.example.org",
                "port": 2465,
                "username": "",
                "password": "",
                "use_ssl": True,
                "use_tls": False,
                "timeout": 3,
            },
        ),
        (
            {"EMAIL_HOST": "relay", "EMAIL_PORT": "2525", "EMAIL_USE_TLS": "true"},
            {
                "host": "relay",
                "port": 2525,
                "username": "",
                "password": "",
                "use_ssl": False,
                "use_tls": True,
                "timeout": 10,
            },
        ),
    ],
)
def test_the_mailer_comes_from_the_environment(monkeypatch, environment, options):
    for name in ("EMAIL_URL", "EMAIL_HOST", "EMAIL_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)

    mailer = mailer_from_env()

    if options is None:
        assert mailer == {"BACKEND": "django.core.mail.backends.console.EmailBackend"}
    else:
        assert mailer == {
            "BACKEND": "django.core.mail.backends.smtp.EmailBackend",
            "OPTIONS": options,
        }


def test_an_unknown_email_url_is_refused(monkeypatch):
    monkeypatch.setenv("EMAIL_URL", "http://mail.example.org")

    with pytest.raises(ValueError, match="EMAIL_URL: unknown scheme 'http'"):
        mailer_from_env()
