"""Alerts for CDS sources: people hear once when a source goes bad and once when it recovers.

A source is bad when its last `alert_after_failures` finished runs failed (runs locked out by
the partner or busy do not count either way), or when no run succeeded for
`alert_after_hours` hours (a run that found nothing to do succeeded). Sources are checked at
the end of each run and by ``manage.py cds_check`` from cron, so that a source whose runs
stopped altogether is noticed too.

Several processes may check at once: each change of what people were told is claimed with a
conditional update, so each mail goes out once. A mail that could not be sent is tried again
at the next check.
"""

import logging
from datetime import datetime, timedelta

from django.urls import reverse
from django.utils import formats, timezone

from datacenter import emails

from .models import CdsSource, ImportRun
from .validation import email_list

log = logging.getLogger(__name__)

SUCCEEDED = (ImportRun.SUCCESS, ImportRun.NOTHING)
FAILED = (ImportRun.FAILED, ImportRun.INTERRUPTED)
ALERT, RECOVERY = "alert", "recovery"


def problem(source: CdsSource, now: datetime) -> str | None:
    """Why `source` is bad at `now`, in words, or None when it is fine. Imports and exports
    (for a source with an export directory) are judged apart: succeeding imports do not hide
    failing exports."""
    if not (source.alert_after_failures or source.alert_after_hours):
        return None
    runs = source.runs.filter(finished__isnull=False, finished__lte=now)
    reason = _problem(source, runs.filter(direction=ImportRun.IMPORT), now)
    if reason is None and source.exports:
        reason = _problem(source, runs.filter(direction=ImportRun.EXPORT), now)
        if reason:
            reason = f"Exports: {reason}"
    return reason


def _problem(source: CdsSource, runs, now: datetime) -> str | None:
    last_success = (
        runs.filter(status__in=SUCCEEDED).order_by("-finished").values_list("finished", flat=True)
    ).first()
    if source.alert_after_failures:
        failed = runs.filter(status__in=FAILED)
        if last_success:
            failed = failed.filter(finished__gt=last_success)
        count = failed.count()
        if count >= source.alert_after_failures:
            return "The last run failed." if count == 1 else f"The last {count} runs failed."
    if source.alert_after_hours and now - (last_success or source.created) > timedelta(
        hours=source.alert_after_hours
    ):
        if last_success:
            return (
                f"No run succeeded for more than {source.alert_after_hours} hours; the last "
                f"successful run ended {moment_text(last_success)}."
            )
        return (
            f"No run succeeded in the {source.alert_after_hours} hours since the source was "
            f"added ({moment_text(source.created)})."
        )
    return None


def check_source(source: CdsSource, *, now: datetime | None = None) -> str | None:
    """Bring the alert state of `source` up to date; return which mail went out, if any."""
    now = now or timezone.now()
    source.refresh_from_db()
    reason = problem(source, now)
    this = CdsSource.objects.filter(pk=source.pk)
    if reason:
        this.filter(alert_since__isnull=True).update(alert_since=now)
        this.update(alert_reason=reason)
        source.refresh_from_db()
        if not this.filter(alerted=False).update(alerted=True):
            return None
        if not _send_alert(source):
            this.update(alerted=False)  # tried again at the next check
            return None
        return ALERT
    if source.alert_since is None and not source.alerted:
        return None  # fine, and nothing to take back: no write on every good run
    bad_since = source.alert_since
    this.update(alert_since=None, alert_reason="")
    if not this.filter(alerted=True).update(alerted=False):
        return None
    if not _send_recovery(source, bad_since, now):
        this.update(alerted=True)
        return None
    return RECOVERY


def recipients(source: CdsSource) -> list[str]:
    return email_list(source.alert_emails) or emails.managers()


def _send_alert(source: CdsSource) -> bool:
    direction = ImportRun.EXPORT if source.alert_reason.startswith("Exports:") else "import"
    last = source.last_run(direction)
    lines = [
        f"The CDS {direction} of {source.name} needs attention: {source.alert_reason}",
        "",
        f"Bad since: {moment_text(source.alert_since)}",
        f"Server: {source.host}:{source.port}{source.remote_dir} ({source.protocol})",
    ]
    if last:
        ended = moment_text(last.finished) if last.finished else "not yet"
        lines.append(f"Last run: #{last.pk}, {last.get_status_display()}, ended {ended}")
        if last.error:
            lines.append(f"Its error: {last.error}")
        lines.append(f"Its log: {emails.absolute_url(last.get_absolute_url())}")
    lines += [
        f"All runs: {emails.absolute_url(reverse('imports:runs'))}?source={source.name}",
        "",
        "You will hear once more when it works again.",
    ]
    subject = f"CDS source {source.name}: {source.alert_reason}"
    return emails.send(subject, "\n".join(lines), recipients(source))


def _send_recovery(source: CdsSource, bad_since: datetime | None, now: datetime) -> bool:
    lines = [f"The CDS import of {source.name} works again."]
    if bad_since:
        lines.append(
            f"It had needed attention since {moment_text(bad_since)} ({_span(now - bad_since)})."
        )
    last = source.last_run()
    if last:
        lines.append(f"Last run: {emails.absolute_url(last.get_absolute_url())}")
    return emails.send(
        f"CDS source {source.name} works again", "\n".join(lines), recipients(source)
    )


def moment_text(moment: datetime) -> str:
    """`moment` as every page writes it (DATETIME_FORMAT), in the site's time zone."""
    return formats.date_format(timezone.localtime(moment), "DATETIME_FORMAT")


def _span(duration: timedelta) -> str:
    minutes = int(duration.total_seconds() // 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    parts = [(days, "day"), (hours, "hour"), (minutes, "minute")]
    words = [f"{count} {unit}{'s' if count != 1 else ''}" for count, unit in parts if count]
    return " ".join(words[:2]) or "less than a minute"
