"""E-mail to staff: the notice of an upload, and sending for both apps.

Sending never fails the work that sends it: a refusal of the mail server is logged and
reported as False. Links point to DATACENTER_SITE_URL, since cron has no request to take the
site's address from.
"""

import csv
import io
import logging

from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group
from django.core.mail import EmailMessage
from django.urls import reverse

from .storage import DataCenter, DataCenterFile, read_csv_preview

log = logging.getLogger(__name__)

SUBJECT_PREFIX = "[Datacenter] "
PREVIEW_ROWS = 3
#: Cells longer than this are cut in a preview (a cell may be as large as the file).
PREVIEW_CELL = 200


def group_addresses(name: str) -> list[str]:
    """The e-mail addresses of the active members of the group `name`."""
    group = Group.objects.filter(name=name).first()
    if group is None:
        return []
    # From the group's side: one join over all accounts of a large site (a million, say)
    # let PostgreSQL read them all on every upload.
    members = group.user_set.through.objects.filter(group=group).values_list("user_id", flat=True)
    users = get_user_model().objects.filter(pk__in=list(members), is_active=True)
    return sorted(set(users.exclude(email="").values_list("email", flat=True)))


def managers() -> list[str]:
    return group_addresses(settings.DATACENTER_MANAGERS_GROUP)


def absolute_url(path: str) -> str:
    return settings.DATACENTER_SITE_URL + path


def send(subject: str, body: str, to: list[str]) -> bool:
    """Send a plain-text mail to `to`; return whether it went out (or had nobody to go to)."""
    if not to:
        log.info("Nobody to send %r to.", subject)
        return True
    # A header holds one line: a name with a line break in it would make the mail refused.
    subject = " ".join(subject.split())
    try:
        EmailMessage(subject=SUBJECT_PREFIX + subject, body=body, to=to).send()
    except Exception:
        log.exception("Sending %r to %s failed.", subject, ", ".join(to))
        return False
    return True


def notify_upload(datacenter: DataCenter, file: DataCenterFile, user, action: str) -> bool:
    """Tell the import managers that `user` uploaded (`action`: "uploaded" or "replaced")
    the pending file `file`, with its header and first rows; a failure is also written to
    the action log, where staff look."""
    who = _person(user)
    header, rows = read_csv_preview(file.path, PREVIEW_ROWS)
    preview = io.StringIO()
    csv.writer(preview, lineterminator="\n").writerows(
        [_cut(cell) for cell in row] for row in [header, *rows]
    )
    lines = [
        f"{who} {action} {file.name} in the data center.",
        "",
        f"Size: {file.get_size()}",
        f"Rows: {file.rows if file.rows is not None else 'unknown'} (besides the header)",
    ]
    if getattr(file, "conversion", ""):
        lines.append(f"Converted: {file.conversion}")
    lines += [
        "",
        f"The header and the first {len(rows)} rows:",
        "",
        preview.getvalue(),
        f"Open it: {absolute_url(reverse('datacenter:preview', kwargs={'name': file.name}))}",
    ]
    sent = send(f"{file.name} {action} by {who}", "\n".join(lines), managers())
    if not sent:
        datacenter.log_action(
            user, "notify", f"the mail about {file.name} could not be sent", level="ERROR"
        )
    return sent


def _person(user) -> str:
    name = user.get_full_name() if hasattr(user, "get_full_name") else ""
    return f"{name} ({user.get_username()})" if name else user.get_username()


def _cut(cell: str) -> str:
    return cell if len(cell) <= PREVIEW_CELL else cell[:PREVIEW_CELL] + "…"
