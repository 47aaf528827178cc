from django.core.management.base import BaseCommand

from imports.alerts import ALERT, RECOVERY, check_source, moment_text
from imports.management.commands.cds_import import named_sources
from imports.models import CdsSource
from imports.runs import interrupt_dead_runs

SENT = {ALERT: " (alert sent)", RECOVERY: " (recovery sent)", None: ""}


class Command(BaseCommand):
    help = (
        "Check the alerts of CDS sources (every enabled one by default), for cron: a source "
        "whose runs failed or stopped is reported once by e-mail, and once when it recovers."
    )

    def add_arguments(self, parser):
        parser.add_argument("sources", nargs="*", metavar="SOURCE", help="source names")

    def handle(self, *args, sources, **options):
        selected = named_sources(sources) if sources else CdsSource.objects.filter(enabled=True)
        interrupt_dead_runs()
        checked = [(source, check_source(source)) for source in selected]
        if not checked:
            self.stdout.write("No enabled sources to check.")
        for source, sent in checked:
            if source.alert_since:
                since = moment_text(source.alert_since)
                state = f"needs attention since {since}: {source.alert_reason}"
            else:
                state = "fine"
            self.stdout.write(f"{source.name}: {state}{SENT[sent]}")
