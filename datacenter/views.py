from collections.abc import Sequence
from functools import partial, wraps

from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_not_required, permission_required
from django.core.exceptions import PermissionDenied
from django.core.paginator import Paginator
from django.http import FileResponse, Http404, JsonResponse
from django.shortcuts import redirect, render
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_http_methods, require_safe

from . import editing, exports, health, jobs, recovery
from .exports import ExportError
from .forms import LogSearchForm, ProcessForm, RelocateForm, ReplaceForm, UploadForm
from .limits import check_site_storage_path
from .models import Job, Upload, current_datacenter, storage_for_writing
from .paging import paginate
from .processing import ProcessingError, mode_of_pending_file, processors
from .reach import reads_pending_files, works_on_pending_files
from .reading import counted
from .storage import EXPORTS_FOLDER, StorageError, read_csv_preview
from .tasks import JOBS_QUEUE
from .uploads import UploadError, replace_upload, save_upload

PREVIEW_ROWS = 20
PREVIEW_ERRORS = 200
EDITOR_ROWS = 50


def datacenter_permission(codename: str):
    return permission_required(f"datacenter.{codename}", raise_exception=True)


def allowed_if(test):
    """A view for the users that pass `test`; a 403 page for the others."""

    def decorator(view):
        @wraps(view)
        def wrapper(request, *args, **kwargs):
            if not test(request.user):
                raise PermissionDenied
            return view(request, *args, **kwargs)

        return wrapper

    return decorator


#: Where a person lands after logging in: the first of these pages they may use.
START_PAGES = [
    (works_on_pending_files, "datacenter:pending"),
    (lambda user: user.has_perm("datacenter.export_records"), "datacenter:exports"),
    (lambda user: user.has_perm("datacenter.relocate_storage"), "datacenter:storage"),
    (lambda user: user.has_perm("imports.view_importrun"), "imports:overview"),
    (lambda user: user.is_staff, "admin:index"),
]


@require_safe
def home(request):
    """The first page the person may use, or a page that says what to ask for."""
    for allowed, page in START_PAGES:
        if allowed(request.user):
            return redirect(page)
    return render(request, "home.html")


def file_or_404(view):
    """Turn a missing or unsafe file name into a 404."""

    @wraps(view)
    def wrapper(request, *args, **kwargs):
        try:
            return view(request, *args, **kwargs)
        except FileNotFoundError as exc:
            raise Http404("No such file.") from exc

    return wrapper


@allowed_if(works_on_pending_files)
def pending(request):
    sort = request.GET.get("sort")
    if sort not in {"name", "date"}:
        sort = "name"
    page = paginate(request, current_datacenter().pending_listing(sort=sort))
    uploaders = {
        upload.name: upload.uploaded_by
        for upload in Upload.objects.filter(name__in=[file.name for file in page]).select_related(
            "uploaded_by"
        )
    }
    for file in page:
        file.uploader = uploaders.get(file.name)
    return render(request, "datacenter/pending.html", {"page": page, "sort": sort})


@datacenter_permission("upload_files")
def upload(request):
    form = UploadForm(request.POST or None, request.FILES or None)
    if request.method == "POST" and form.is_valid():
        uploaded = form.cleaned_data["file"]
        try:
            with storage_for_writing() as datacenter:
                stored = save_upload(datacenter, uploaded, uploaded.name, user=request.user)
        except (UploadError, StorageError) as exc:
            form.add_error("file", str(exc))
        else:
            converted = f" ({stored.conversion})" if stored.conversion else ""
            messages.success(
                request,
                f"Uploaded {stored.name}{converted}: {counted(stored.rows, 'data row')}, "
                f"{stored.get_size()}.",
            )
            return redirect("datacenter:pending")
    return render(request, "datacenter/upload.html", {"form": form})


@datacenter_permission("view_files")
@file_or_404
def download(request, name, folder=""):
    return _logged_download(request, name, folder)


def _logged_download(request, name: str, folder: str) -> FileResponse:
    datacenter = current_datacenter()
    file = datacenter.get_file(name, folder)
    datacenter.log_action(request.user, "download", file.rel_path)
    return FileResponse(open(file.path, "rb"), as_attachment=True, filename=file.name)


@allowed_if(reads_pending_files)
@file_or_404
def preview(request, name):
    file = current_datacenter().get_file(name)
    header, rows = read_csv_preview(file.path, PREVIEW_ROWS)
    editable = mode_of_pending_file(name) is not None
    context = {"file": file, "header": header, "rows": rows, "editable": editable}
    return render(request, "datacenter/preview.html", context)


@datacenter_permission("delete_files")
@require_http_methods(["GET", "POST"])
@file_or_404
def delete(request, name):
    datacenter = current_datacenter()
    file = datacenter.get_file(name)
    if request.method == "POST":
        try:
            with jobs.changing_pending_file(file.name) as datacenter:
                deleted_as = datacenter.delete_file(file.name)
        except StorageError as exc:
            messages.error(request, str(exc))
            return redirect("datacenter:pending")
        datacenter.log_action(request.user, "delete", f"{file.name} -> deleted/{deleted_as}")
        messages.success(request, f"Deleted {file.name}; it was kept as deleted/{deleted_as}.")
        return redirect("datacenter:pending")
    return render(request, "datacenter/delete.html", {"file": file})


@datacenter_permission("process_files")
@require_http_methods(["GET", "POST"])
@file_or_404
def process(request, name):
    """The import wizard: choose processor and mode, try a dry run, then process."""
    datacenter = current_datacenter()
    file = datacenter.get_file(name)
    form = ProcessForm(
        request.POST or None, processors=processors(), fixed_mode=mode_of_pending_file(name)
    )
    if request.method == "POST" and form.is_valid():
        try:
            job = jobs.start_processing(
                name=name,
                processor=form.cleaned_data["processor"],
                mode=form.cleaned_data["mode"],
                dry_run=request.POST.get("step") != "process",
                user=request.user,
                after_dry_run=request.POST.get("after_dry_run"),
            )
        except (ProcessingError, StorageError) as exc:
            form.add_error(None, str(exc))
        else:
            return redirect(job)
    header, rows = read_csv_preview(file.path, PREVIEW_ROWS)
    context = {"file": file, "form": form, "header": header, "rows": rows}
    context["at_once_size"] = settings.DATACENTER_RUN_AT_ONCE_SIZE
    return render(request, "datacenter/process.html", context)


@datacenter_permission("view_files")
def job_list(request):
    recovery.recover_jobs()
    page = paginate(request, Job.objects.select_related("user"))
    return render(request, "datacenter/jobs.html", {"page": page})


def job(request, pk):
    """A job's page: for those who may view files, and for the person who started it."""
    recovery.recover_jobs()
    try:
        job = Job.objects.select_related("user").get(pk=pk)
    except Job.DoesNotExist:
        raise Http404("No such job.") from None
    if job.user_id != request.user.pk and not request.user.has_perm("datacenter.view_files"):
        raise PermissionDenied
    if request.method == "POST" and request.POST.get("action") == "resume":
        try:
            job = jobs.resume_job(job, request.user)
        except ProcessingError as exc:
            messages.error(request, str(exc))
        return redirect(job)
    context = {"job": job, "done": job.done}
    if job.in_progress:
        context["worker"] = health.worker_status(JOBS_QUEUE)
    context["can_resume"] = jobs.may_resume(job, request.user)
    result = job.result or {}
    # Each failed row with the line where the row editor shows it, once it is pending.
    lines = result.get("pending_lines", [])
    context["errors"] = [
        (line, message, lines[index] if index < len(lines) else None)
        for index, (line, message) in enumerate(result.get("errors", [])[:PREVIEW_ERRORS])
    ]
    if job.dry_run and job.status == Job.SUCCESS:
        if exports.may_view_records(request.user, job.processor):
            context["changes"] = paginate(request, result.get("changes", []))
        else:
            context["changes_hidden"] = True
        context["change_counts"] = result.get("change_counts", {})
        context["can_process"] = request.user.has_perm("datacenter.process_files") and (
            _is_pending(job.file_name)
        )
    return render(request, "datacenter/job.html", context)


def _is_pending(name: str) -> bool:
    try:
        current_datacenter().get_file(name)
    except FileNotFoundError:
        return False
    return True


@datacenter_permission("upload_files")
@require_http_methods(["GET", "POST"])
@file_or_404
def edit(request, name):
    """Correct the failed rows of a pending file in the browser, a page at a time."""
    datacenter = current_datacenter()
    file = datacenter.get_file(name)
    if mode_of_pending_file(name) is None:
        raise Http404("Only the pending files of failed rows can be edited here.")
    table = editing.FailedRows(file)
    page = Paginator(table, EDITOR_ROWS).get_page(request.GET.get("page"))
    error = None
    if request.method == "POST":
        try:
            with jobs.changing_pending_file(name) as datacenter:
                saved = editing.save_corrections(datacenter, file, request.POST, user=request.user)
        except (editing.EditError, StorageError) as exc:
            error = str(exc)
        else:
            messages.success(request, saved.message)
            return redirect("datacenter:preview", name=name)
    context = {"file": file, "table": table, "page": page, "error": error}
    return render(request, "datacenter/edit.html", context)


@datacenter_permission("upload_files")
@require_http_methods(["GET", "POST"])
@file_or_404
def replace(request, name):
    """Upload a corrected version of a pending file under the same name."""
    datacenter = current_datacenter()
    file = datacenter.get_file(name)
    form = ReplaceForm(request.POST or None, request.FILES or None)
    if request.method == "POST" and form.is_valid():
        try:
            with jobs.changing_pending_file(name) as datacenter:
                stored, kept = replace_upload(
                    datacenter, form.cleaned_data["file"], name, user=request.user
                )
        except (UploadError, StorageError) as exc:
            form.add_error("file", str(exc))
        else:
            converted = f" ({stored.conversion})" if stored.conversion else ""
            messages.success(
                request,
                f"Replaced {name}{converted}: {counted(stored.rows, 'data row')}; the old "
                f"version was kept as deleted/{kept}.",
            )
            return redirect("datacenter:preview", name=name)
    return render(request, "datacenter/replace.html", {"file": file, "form": form})


@datacenter_permission("export_records")
@require_http_methods(["GET", "POST"])
def export_list(request):
    """The exports in the storage, and the processors whose records can be exported."""
    datacenter = current_datacenter()
    if request.method == "POST":
        try:
            job = jobs.start_export(
                processor=request.POST.get("processor", ""),
                user=request.user,
                file_format=request.POST.get("format", "csv"),
            )
        except (ExportError, StorageError) as exc:
            messages.error(request, str(exc))
        else:
            return redirect(job)
    exports.remove_expired(datacenter)
    files = exports.export_files(datacenter)
    allowed = jobs.downloadable_exports(request.user, [file.name for file in files])
    files = [file for file in files if file.name in allowed]
    for file in files:
        file.expires = exports.expires(file)
    exporters = [
        (processor, request.user.has_perm(exports.export_permission(processor)))
        for processor in exports.exportable()
    ]
    context = {
        "files": files,
        "exporters": exporters,
        "days": settings.DATACENTER_EXPORT_DAYS,
        "formats": [(name, title) for name, (title, _) in exports.FORMATS.items()],
    }
    return render(request, "datacenter/exports.html", context)


@datacenter_permission("export_records")
@file_or_404
def download_export(request, name):
    if name not in jobs.downloadable_exports(request.user, [name]):
        raise Http404("No such export.")
    return _logged_download(request, name, EXPORTS_FOLDER)


@datacenter_permission("view_files")
def finished(request):
    page = paginate(request, current_datacenter().finished_listing(suffix=".csv"))
    return render(request, "datacenter/finished.html", {"page": page})


@datacenter_permission("view_files")
def logs(request):
    return render(request, "datacenter/logs.html", {"files": current_datacenter().log_files()})


@datacenter_permission("view_files")
def log_search(request, name):
    datacenter = current_datacenter()
    if name not in {file.name for file in datacenter.log_files()}:
        raise Http404("No such log file.")
    form = LogSearchForm(request.GET or None)
    search = form.cleaned_data if form.is_valid() else {}
    options = {
        "newest_first": search.get("order") != "oldest",
        "ignore_case": not search.get("match_case"),
    }
    page = None
    try:
        lines = LogLines(datacenter, name, search.get("q", ""), **options)
        page = Paginator(lines, settings.DATACENTER_PAGE_SIZE * 4).get_page(
            request.GET.get("page")
        )
    except ValueError as exc:
        form.add_error("q", str(exc))
    context = {"name": name, "form": form, "page": page, **options}
    return render(request, "datacenter/log_search.html", context)


class LogLines(Sequence):
    """The matching lines of a log as a sequence for the pager: counted once, and read a
    page at a time."""

    def __init__(self, datacenter, name: str, query: str, **options):
        self.search = partial(datacenter.query_log, name, query, **options)
        self.count = sum(1 for _ in self.search())

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, item):
        start, stop, _ = item.indices(self.count)
        lines = self.search(limit=stop - start, start=start) if stop > start else []
        return [line.rstrip("\n") for line in lines]


@datacenter_permission("relocate_storage")
def storage(request):
    """The storage's path and space, and relocating it: the form, then a confirmation that
    says what will move, then the job."""
    datacenter = current_datacenter()
    form = RelocateForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        try:
            if not request.POST.get("confirmed"):
                return _confirm_relocation(request, datacenter, form)
            job = jobs.start_relocation(user=request.user, **form.cleaned_data)
        except StorageError as exc:
            form.add_error("path", str(exc))
        else:
            return redirect(job)
    context = {"datacenter": datacenter, "free_space": datacenter.free_space(), "form": form}
    return render(request, "datacenter/storage.html", context)


def _confirm_relocation(request, datacenter, form):
    """The page that says what relocating will move, for a path within the limits."""
    path = check_site_storage_path(datacenter, form.cleaned_data["path"], create=False)
    files, size = datacenter.contents_size() if form.cleaned_data["move"] else (0, 0)
    context = {"datacenter": datacenter, "form": form, "path": path, "files": files}
    return render(request, "datacenter/relocate_confirm.html", context | {"size": size})


@login_not_required
@never_cache
@require_safe
def healthz(request):
    """For load balancers and monitoring, without login: 503 when the database or the
    storage fails; the report says how the task worker is."""
    status, report = health.check()
    return JsonResponse(report, status=status)
