import os
from collections.abc import Sequence
from datetime import timedelta

from django.contrib import messages
from django.contrib.auth.decorators import permission_required
from django.core.exceptions import PermissionDenied
from django.db.models import Sum
from django.db.models.functions import TruncDate
from django.http import FileResponse, Http404
from django.shortcuts import get_object_or_404, redirect, render
from django.utils import timezone
from django.views.decorators.http import require_POST

from datacenter import health
from datacenter.listings import FileListing
from datacenter.paging import paginate

from .charts import CHART_DAYS, daily_bars
from .forms import OutgoingFileForm
from .models import CdsSource, ImportRun
from .runs import enqueue_import, interrupt_dead_runs
from .spool import FileStore
from .tasks import RUNS_QUEUE

# The folders of a source's spool page: the import's, and the outgoing spool's.
SPOOL_FOLDERS = {
    "new": ("store", "new"),
    "cur": ("store", "cur"),
    "out-new": ("outgoing_store", "new"),
    "out-cur": ("outgoing_store", "cur"),
}
#: What the spool page calls each folder (its tab and its empty message).
FOLDER_TITLES = {
    "new": "new/",
    "cur": "cur/",
    "out-new": "out/new/ (outgoing, waiting to be sent)",
    "out-cur": "out/cur/ (outgoing, sent)",
}


def imports_permission(codename: str):
    return permission_required(f"imports.{codename}", raise_exception=True)


def waiting_files(source: CdsSource) -> int | None:
    try:
        return len(source.store.list("new"))
    except FileNotFoundError:
        return None


def files_per_day(direction: str, days: int = CHART_DAYS) -> list[dict]:
    """The bars of the files moved in `direction` per day over the last `days` days."""
    today = timezone.localdate()
    counts = dict(
        ImportRun.objects.filter(
            direction=direction, finished__date__gte=today - timedelta(days=days - 1)
        )
        .annotate(day=TruncDate("finished"))
        .values_list("day")
        .annotate(Sum("files"))
    )
    return daily_bars(counts, today, days)


@imports_permission("view_importrun")
def overview(request):
    interrupt_dead_runs()
    sources = [
        {
            "source": source,
            "last_run": source.last_run(),
            "last_export": source.last_run(ImportRun.EXPORT) if source.exports else None,
            "waiting": waiting_files(source),
        }
        for source in CdsSource.objects.all()
    ]
    directions = [(ImportRun.IMPORT, "Files imported per day")]
    if any(item["source"].exports for item in sources):
        directions.append((ImportRun.EXPORT, "Files exported per day"))
    charts = []
    for direction, title in directions:
        bars = files_per_day(direction)
        total = sum(bar["files"] for bar in bars)
        charts.append({"direction": direction, "title": title, "bars": bars, "total": total})
    context = {"sources": sources, "charts": charts}
    return render(request, "imports/overview.html", context)


@imports_permission("run_import")
@require_POST
def run_now(request, name):
    source = get_object_or_404(CdsSource, name=name)
    run = enqueue_import(source, trigger="page", user=request.user)
    messages.success(request, f"Queued an import of {source}.")
    return redirect(run)


@imports_permission("run_import")
@require_POST
def export_now(request, name):
    source = get_object_or_404(CdsSource.objects.exporting(), name=name)
    run = enqueue_import(source, trigger="page", user=request.user, direction=ImportRun.EXPORT)
    messages.success(request, f"Queued an export to {source}.")
    return redirect(run)


@imports_permission("view_importrun")
def runs(request):
    interrupt_dead_runs()
    queryset = ImportRun.objects.select_related("source", "user")
    source, status = request.GET.get("source", ""), request.GET.get("status", "")
    if source:
        queryset = queryset.filter(source__name=source)
    if status:
        queryset = queryset.filter(status=status)
    page = paginate(request, queryset)
    context = {
        "page": page,
        "sources": CdsSource.objects.values_list("name", flat=True),
        "statuses": ImportRun.STATUSES,
        "source": source,
        "status": status,
    }
    return render(request, "imports/runs.html", context)


def run(request, pk):
    """A run's page: for those who may view runs, and for the person who started it."""
    interrupt_dead_runs()
    run = get_object_or_404(ImportRun.objects.select_related("source", "user"), pk=pk)
    if run.user_id != request.user.pk and not request.user.has_perm("imports.view_importrun"):
        raise PermissionDenied
    context = {
        "run": run,
        "entries": run.log_entries.all(),
        "file_records": run.file_records.all(),
    }
    if run.status == ImportRun.QUEUED:
        context["worker"] = health.worker_status(RUNS_QUEUE)
    return render(request, "imports/run.html", context)


def spool_folder(source: CdsSource, folder: str) -> tuple[FileStore, str]:
    """The spool and its folder that a spool page's `folder` names."""
    if folder not in SPOOL_FOLDERS:
        raise Http404("No such folder.")
    store, subfolder = SPOOL_FOLDERS[folder]
    return getattr(source, store), subfolder


def spool_file(source: CdsSource, folder: str, filename: str) -> str:
    store, subfolder = spool_folder(source, folder)
    try:
        path = store.path_of(subfolder, filename)
    except FileNotFoundError:
        raise Http404("No such file.") from None
    if os.path.islink(path) or not os.path.isfile(path):
        raise Http404("No such file.")
    return path


def spool_listing(store: FileStore, subfolder: str) -> Sequence:
    """The files of a spool folder by name, as the data center lists its folders: a page
    costs the files it shows, not the folder."""
    try:
        return FileListing(store.real_folder(subfolder), "", "", "name")
    except FileNotFoundError:
        return FileListing.empty("")


@imports_permission("view_importrun")
def spool(request, name):
    source = get_object_or_404(CdsSource, name=name)
    folder = request.GET.get("folder", "new")
    if folder not in SPOOL_FOLDERS:
        folder = "new"
    store, subfolder = spool_folder(source, folder)
    form = OutgoingFileForm()
    if request.method == "POST":
        if not request.user.has_perm("imports.run_import") or not source.exports:
            raise PermissionDenied
        form = OutgoingFileForm(request.POST, request.FILES, source=source)
        if form.is_valid() and (name := form.save()):
            messages.success(request, f"{name} waits in the outgoing spool for the next export.")
            return redirect(f"{source.get_absolute_url()}?folder=out-new")
        folder, store, subfolder = "out-new", source.outgoing_store, "new"
    page = paginate(request, spool_listing(store, subfolder))
    context = {
        "source": source,
        "folder": folder,
        "folder_title": FOLDER_TITLES[folder],
        "page": page,
        "form": form,
    }
    return render(request, "imports/spool.html", context)


@imports_permission("view_importrun")
def spool_download(request, name, folder, filename):
    source = get_object_or_404(CdsSource, name=name)
    path = spool_file(source, folder, filename)
    return FileResponse(open(path, "rb"), as_attachment=True, filename=filename)


@imports_permission("manage_spool")
@require_POST
def mark_processed(request, name, filename):
    source = get_object_or_404(CdsSource, name=name)
    spool_file(source, "new", filename)
    try:
        source.store.move(filename, "new", "cur")
    except FileExistsError:
        messages.error(
            request, f"{filename} is in cur/ already; the file in new/ was left where it is."
        )
    else:
        messages.success(request, f"Marked {filename} as processed (moved to cur/).")
    return redirect(f"{source.get_absolute_url()}?folder=new")
