import os
from functools import wraps

from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_not_required, permission_required
from django.core.paginator import Paginator
from django.http import FileResponse, Http404, JsonResponse
from django.shortcuts import redirect, render
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_http_methods, require_safe

from . import health
from .forms import LogSearchForm, ProcessForm, RelocateForm, UploadForm
from .models import Upload, current_datacenter, relocate_storage
from .processing import ProcessingError, mode_of_pending_file, process_file, processors
from .storage import StorageError, read_csv_preview
from .uploads import UploadError, save_upload

PREVIEW_ROWS = 20
PREVIEW_ERRORS = 200


def datacenter_permission(codename: str):
    return permission_required(f"datacenter.{codename}", raise_exception=True)


def file_or_404(view):
    """Turn a missing or unsafe file name into a 404."""

    @wraps(view)
    def wrapper(request, *args, **kwargs):
        try:
            return view(request, *args, **kwargs)
        except FileNotFoundError as exc:
            raise Http404("No such file.") from exc

    return wrapper


def paginate(request, items):
    return Paginator(items, settings.DATACENTER_PAGE_SIZE).get_page(request.GET.get("page"))


@datacenter_permission("view_files")
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
            stored = save_upload(current_datacenter(), uploaded, uploaded.name, user=request.user)
        except UploadError as exc:
            form.add_error("file", str(exc))
        else:
            converted = f" ({stored.conversion})" if stored.conversion else ""
            messages.success(
                request,
                f"Uploaded {stored.name}{converted}: {stored.rows} data rows, "
                f"{stored.get_size()}.",
            )
            return redirect("datacenter:pending")
    return render(request, "datacenter/upload.html", {"form": form})


@datacenter_permission("view_files")
@file_or_404
def download(request, name, folder=""):
    datacenter = current_datacenter()
    file = datacenter.get_file(name, folder)
    datacenter.log_action(request.user, "download", file.rel_path)
    return FileResponse(open(file.path, "rb"), as_attachment=True, filename=file.name)


@datacenter_permission("view_files")
@file_or_404
def preview(request, name):
    file = current_datacenter().get_file(name)
    header, rows = read_csv_preview(file.path, PREVIEW_ROWS)
    return render(
        request, "datacenter/preview.html", {"file": file, "header": header, "rows": rows}
    )


@datacenter_permission("delete_files")
@require_http_methods(["GET", "POST"])
@file_or_404
def delete(request, name):
    datacenter = current_datacenter()
    file = datacenter.get_file(name)
    if request.method == "POST":
        deleted_as = datacenter.delete_file(file.name)
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
    context = {"file": file, "form": form}
    if request.method == "POST" and form.is_valid():
        processor, mode = form.cleaned_data["processor"], form.cleaned_data["mode"]
        dry_run = request.POST.get("step") != "process"
        try:
            result = process_file(
                datacenter, name, processor, mode, user=request.user, dry_run=dry_run
            )
        except ProcessingError as exc:
            form.add_error(None, str(exc))
        else:
            context |= {"result": result, "errors": result.errors[:PREVIEW_ERRORS]}
            if dry_run:
                return render(request, "datacenter/process_dry_run.html", context)
            context |= {
                "finished_name": os.path.basename(result.finished_file),
                "pending_name": result.pending_file and os.path.basename(result.pending_file),
            }
            return render(request, "datacenter/process_result.html", context)
    context["header"], context["rows"] = read_csv_preview(file.path, PREVIEW_ROWS)
    return render(request, "datacenter/process.html", context)


@datacenter_permission("view_files")
def finished(request):
    page = paginate(request, current_datacenter().finished_listing())
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
    query = form.cleaned_data["q"] if form.is_valid() else ""
    page = request.GET.get("page", "")
    page_number = int(page) if page.isdigit() and int(page) > 0 else 1
    page_size = settings.DATACENTER_PAGE_SIZE * 4
    lines = []
    try:
        found = datacenter.query_log(
            name, query, limit=page_size + 1, start=(page_number - 1) * page_size
        )
        lines = [line.rstrip("\n") for line in found]
    except ValueError as exc:
        form.add_error("q", str(exc))
    context = {
        "name": name,
        "form": form,
        "lines": lines[:page_size],
        "page_number": page_number,
        "has_next": len(lines) > page_size,
    }
    return render(request, "datacenter/log_search.html", context)


@datacenter_permission("relocate_storage")
def storage(request):
    datacenter = current_datacenter()
    form = RelocateForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        try:
            not_moved = relocate_storage(user=request.user, **form.cleaned_data)
        except StorageError as exc:
            form.add_error("path", str(exc))
        else:
            new_path = current_datacenter().storage
            messages.success(request, f"The storage is now at {new_path}.")
            context = {
                "old_path": datacenter.storage,
                "new_path": new_path,
                "move": form.cleaned_data["move"],
                "not_moved": sorted(not_moved.items()),
            }
            return render(request, "datacenter/relocated.html", context)
    context = {"datacenter": datacenter, "free_space": datacenter.free_space(), "form": form}
    return render(request, "datacenter/storage.html", context)


@login_not_required
@never_cache
@require_safe
def healthz(request):
    """For load balancers and monitoring, without login: 503 when the database or the
    storage fails; the report says how the task worker is."""
    status, report = health.check()
    return JsonResponse(report, status=status)
