"""Alerts of CDS sources: one mail when a source goes bad, one when it recovers, through a
real SMTP server, with runs against a real FTP server."""

import io
from datetime import timedelta

import pytest
from django.core.exceptions import ValidationError
from django.core.management import call_command
from django.urls import reverse
from django.utils import timezone

from imports.alerts import ALERT, check_source
from imports.models import CdsSource, ImportRun
from imports.runs import run_import

pytestmark = pytest.mark.django_db


def subjects(smtp_server) -> list[str]:
    return [mail["Subject"] for mail in smtp_server.received]


def body(mail) -> str:
    return mail.get_content().replace("\r\n", "\n")


def break_source(source):
    source.remote_dir = "/missing"
    source.save()


def mend_source(source):
    source.remote_dir = "/outbox"
    source.save()


def test_an_alert_goes_out_once_on_failure_and_once_on_recovery(
    source, managers, smtp_server, admin_client, settings
):
    settings.DATACENTER_SITE_URL = "https://dc.example.org"
    source.alert_after_failures = 2
    break_source(source)

    assert run_import(source, trigger="cron").status == ImportRun.FAILED
    assert smtp_server.received == []  # one failure is not yet a pattern

    second = run_import(source, trigger="cron")
    [alert] = smtp_server.received
    assert alert["Subject"] == "[Datacenter] CDS source partner: The last 2 runs failed."
    assert sorted(smtp_server.envelopes[0].rcpt_tos) == ["max@example.org", "mia@example.org"]
    text = body(alert)
    assert "The CDS import of partner needs attention: The last 2 runs failed." in text
    assert f"Last run: #{second.pk}, failed" in text
    assert "550 No such file or directory" in text
    assert f"Its log: https://dc.example.org/imports/runs/{second.pk}/" in text
    source.refresh_from_db()
    assert source.alerted and source.alert_since is not None
    overview = admin_client.get(reverse("imports:overview")).content.decode()
    assert 'class="table-danger"' in overview
    assert "Needs attention since" in overview and "The last 2 runs failed." in overview

    for _ in range(3):  # every five minutes from cron: no mail more
        run_import(source, trigger="cron")
    assert len(smtp_server.received) == 1
    source.refresh_from_db()
    assert source.alert_reason == "The last 5 runs failed."

    mend_source(source)
    assert run_import(source, trigger="cron").status == ImportRun.NOTHING
    run_import(source, trigger="cron")

    assert subjects(smtp_server) == [
        "[Datacenter] CDS source partner: The last 2 runs failed.",
        "[Datacenter] CDS source partner works again",
    ]
    assert "It had needed attention since" in body(smtp_server.received[1])
    source.refresh_from_db()
    assert (source.alerted, source.alert_since, source.alert_reason) == (False, None, "")
    overview = admin_client.get(reverse("imports:overview")).content.decode()
    assert "table-danger" not in overview


def test_runs_locked_out_by_the_partner_neither_break_nor_mend_a_streak(
    source, ftp_server, managers, smtp_server
):
    source.alert_after_failures = 2
    break_source(source)
    run_import(source, trigger="cron")
    mend_source(source)
    ftp_server.put("write", b"")  # the partner is writing
    assert run_import(source, trigger="cron").status == ImportRun.LOCKED
    break_source(source)

    run_import(source, trigger="cron")

    assert subjects(smtp_server) == ["[Datacenter] CDS source partner: The last 2 runs failed."]


def test_a_source_whose_runs_stopped_is_found_by_cds_check(source, managers, smtp_server):
    source.alert_after_hours = 6
    source.save()
    mend_source(source)
    run_import(source, trigger="cron")  # nothing to do: a success
    ImportRun.objects.update(finished=timezone.now() - timedelta(hours=7))

    output = io.StringIO()
    call_command("cds_check", stdout=output)
    call_command("cds_check", stdout=io.StringIO())  # the next cron run: no second mail

    [alert] = smtp_server.received
    ended = timezone.localtime(ImportRun.objects.get().finished)
    assert alert["Subject"] == (
        "[Datacenter] CDS source partner: No run succeeded for more than 6 hours; the last "
        f"successful run ended {ended:%Y-%m-%d %H:%M %Z}."
    )
    assert output.getvalue().startswith("partner: needs attention since ")
    assert output.getvalue().rstrip().endswith("(alert sent)")

    run_import(source, trigger="cron")  # runs again: recovered at the end of the run
    assert subjects(smtp_server)[1] == "[Datacenter] CDS source partner works again"


def test_a_source_that_never_succeeded_counts_from_when_it_was_added(
    source, managers, smtp_server
):
    source.alert_after_hours = 1
    source.save()
    assert check_source(source) is None
    CdsSource.objects.update(created=timezone.now() - timedelta(hours=2))

    assert check_source(source) == ALERT
    assert "since the source was added" in smtp_server.received[0]["Subject"]


def test_an_alert_that_could_not_be_sent_is_sent_at_the_next_check(
    source, managers, smtp_server, settings
):
    source.alert_after_failures = 1
    break_source(source)
    working = settings.MAILERS
    settings.MAILERS = {
        "default": {**working["default"], "OPTIONS": {"host": "127.0.0.1", "port": 1}}
    }

    run_import(source, trigger="cron")

    source.refresh_from_db()
    assert (source.alerted, source.alert_since is not None) == (False, True)
    settings.MAILERS = working
    assert check_source(source) == ALERT
    assert check_source(source) is None
    assert len(smtp_server.received) == 1
    mend_source(source)
    assert run_import(source, trigger="cron").status == ImportRun.NOTHING
    assert check_source(source) is None  # the recovery went out at the end of the run
    assert subjects(smtp_server)[-1] == "[Datacenter] CDS source partner works again"


def test_a_source_names_its_own_addresses(source, managers, smtp_server):
    source.alert_after_failures = 1
    source.alert_emails = "ops@example.org, partner-desk@example.org"
    break_source(source)

    run_import(source, trigger="cron")

    assert smtp_server.envelopes[0].rcpt_tos == ["ops@example.org", "partner-desk@example.org"]
    assert smtp_server.received[0]["Subject"] == (
        "[Datacenter] CDS source partner: The last run failed."
    )


def test_alert_addresses_are_checked(source):
    source.alert_emails = "ops@example.org, not an address"

    with pytest.raises(ValidationError, match="These are no e-mail addresses: not an address."):
        source.save()


def test_a_recovery_is_told_only_after_an_alert_was(source, managers, smtp_server, settings):
    source.alert_after_failures = 1
    break_source(source)
    working = settings.MAILERS
    settings.MAILERS = {
        "default": {**working["default"], "OPTIONS": {"host": "127.0.0.1", "port": 1}}
    }
    run_import(source, trigger="cron")  # the alert could not be sent
    settings.MAILERS = working
    mend_source(source)

    run_import(source, trigger="cron")

    assert check_source(source) is None and smtp_server.received == []


def test_cds_check_refuses_unknown_sources(source):
    with pytest.raises(Exception, match=r"Unknown source: nope \(known: partner\)\."):
        call_command("cds_check", "nope")


def test_failing_exports_alert_even_while_imports_succeed(source, managers, smtp_server):
    from imports.runs import run_export

    source.alert_after_failures = 2
    source.export_dir = "/missing-inbox"
    source.save()
    source.outgoing_store.prepare()
    source.outgoing_store.add_new("a.xml", [b"a"])

    for _ in range(2):
        assert run_import(source, trigger="cron").status == ImportRun.NOTHING
        assert run_export(source, trigger="cron").status == ImportRun.FAILED

    [alert] = smtp_server.received
    assert alert["Subject"] == "[Datacenter] CDS source partner: Exports: The last 2 runs failed."
    assert "The CDS export of partner needs attention" in body(alert)
