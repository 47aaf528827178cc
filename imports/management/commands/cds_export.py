from imports.models import CdsSource, ImportRun

from .cds_import import Command as ImportCommand


class Command(ImportCommand):
    help = (
        "Deliver the files waiting in the outgoing spools of CDS sources (out/new/) to the "
        "partners' export directories. Exits 0 on success or nothing to do, 1 when a run "
        "failed and 75 (EX_TEMPFAIL) when a source was locked or busy."
    )
    direction = ImportRun.EXPORT

    def sources(self):
        return CdsSource.objects.exporting()
