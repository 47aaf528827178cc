import os
import sys

from django.core.management.base import BaseCommand, CommandError

from datacenter import exports
from datacenter.models import current_datacenter


class Command(BaseCommand):
    help = (
        "Export the records of a processor as CSV (or a workbook) in its columns, with every "
        "value (password hashes too): to the storage's exports/ folder, to --output FILE "
        "(replaced when it exists, never half-written) or to standard output with --output -."
    )

    def add_arguments(self, parser):
        parser.add_argument("processor", metavar="PROCESSOR", help="the processor's name")
        parser.add_argument("--output", metavar="FILE", help="the file to write; - for stdout")
        parser.add_argument(
            "--format",
            dest="file_format",
            choices=list(exports.FORMATS),
            default="csv",
            help="csv (default), excel-csv (UTF-8 with a byte order mark) or xlsx",
        )

    def handle(self, *args, processor, output, file_format, **options):
        try:
            exporter = exports.check_export(processor, None)
        except exports.ExportError as exc:
            names = ", ".join(p.name for p in exports.exportable())
            raise CommandError(f"{exc} Processors that export: {names}.") from None
        datacenter = current_datacenter()
        if output == "-":
            if file_format == "xlsx":
                raise CommandError("A workbook cannot go to standard output; give --output FILE.")
            count = exports.write_csv(exporter, sys.stdout)
            sys.stdout.flush()
            where = "standard output"
        elif output:
            try:
                count = exports.write_file(exporter, output, file_format=file_format)
            except OSError as exc:
                raise CommandError(f"Cannot write {output}: {exc.strerror}.") from None
            where = output
        else:
            exports.remove_expired(datacenter)
            file, count = exports.export_to_storage(
                datacenter,
                exporter,
                part_name=f".command-{os.getpid()}{exports.PART_SUFFIX}",
                file_format=file_format,
            )
            where = file.path
        datacenter.log_action(None, "export", f"{exporter.name}: {count} records -> {where}")
        self.stderr.write(f"Exported {count} records of {exporter.title} to {where}.")
