import logging
import sys

from django.core.management.base import BaseCommand, CommandError

from imports.models import CdsSource, ImportRun
from imports.runs import run_import

EX_TEMPFAIL = 75
EXIT_CODES = {
    ImportRun.SUCCESS: 0,
    ImportRun.NOTHING: 0,
    ImportRun.LOCKED: EX_TEMPFAIL,
    ImportRun.BUSY: EX_TEMPFAIL,
    ImportRun.FAILED: 1,
    ImportRun.INTERRUPTED: 1,
}


class Command(BaseCommand):
    help = (
        "Import new files from CDS sources into their spools. Exits 0 on success or nothing to "
        "do, 1 when a run failed and 75 (EX_TEMPFAIL) when a source was locked or busy."
    )
    direction = ImportRun.IMPORT
    # Cron starts this every few minutes: the site's checks (a tenth of a second, and every
    # view imported) belong to deployment (`manage.py check --deploy`), not to each run.
    requires_system_checks = []

    def add_arguments(self, parser):
        parser.add_argument("sources", nargs="*", metavar="SOURCE", help="source names")
        parser.add_argument("--all", action="store_true", help="every enabled source")

    def handle(self, *args, sources, all, **options):
        selected = self.select(sources, all)
        handler = logging.StreamHandler(self.stdout)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logger = logging.getLogger("imports.cds")
        logger.addHandler(handler)
        propagate, logger.propagate = logger.propagate, False  # printed once, to stdout
        try:
            runs = [
                run_import(
                    source,
                    direction=self.direction,
                    trigger="cron",
                    progress=self.progress_bar(),
                )
                for source in selected
            ]
        finally:
            logger.removeHandler(handler)
            logger.propagate = propagate
        for run in runs:
            self.stdout.write(f"{run.source}: {run.get_status_display()}, {run.files} files")
        codes = {EXIT_CODES[run.status] for run in runs}
        code = 1 if 1 in codes else max(codes, default=0)
        if code:
            sys.exit(code)

    def select(self, names: list[str], all_enabled: bool) -> list[CdsSource]:
        if all_enabled == bool(names):
            raise CommandError("Name one or more sources, or give --all for every enabled one.")
        if all_enabled:
            return list(self.sources().filter(enabled=True))
        sources = named_sources(names)
        able = set(self.sources().values_list("pk", flat=True))
        unable = [source.name for source in sources if source.pk not in able]
        if unable:
            raise CommandError(f"No export directory is set for: {', '.join(unable)}.")
        return sources

    def sources(self):
        """The sources that can run in this direction."""
        return CdsSource.objects.all()

    def progress_bar(self):
        if not self.stdout.isatty():
            return None

        def show(done: int, total: int) -> None:
            width = 30
            filled = width * done // total if total else width
            end = "\n" if done == total else ""
            self.stdout.write(
                f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} files", ending=end
            )
            self.stdout.flush()

        return show


def named_sources(names: list[str]) -> list[CdsSource]:
    """The sources `names` in their order; CommandError naming those that do not exist."""
    sources = {source.name: source for source in CdsSource.objects.filter(name__in=names)}
    unknown = [name for name in names if name not in sources]
    if unknown:
        known = ", ".join(CdsSource.objects.values_list("name", flat=True)) or "none"
        raise CommandError(f"Unknown source: {', '.join(unknown)} (known: {known}).")
    return [sources[name] for name in names]
