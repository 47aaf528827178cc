import os

from django import forms
from django.contrib import admin

from .models import CdsSource, ImportedFile, ImportLogEntry, ImportRun
from .runs import enqueue_import, interrupt_dead_runs


class CdsSourceForm(forms.ModelForm):
    password = forms.CharField(
        required=False,
        widget=forms.PasswordInput(render_value=False),
        help_text="Never shown again. Leave empty to keep the current password.",
    )

    class Meta:
        model = CdsSource
        fields = [
            "name",
            "protocol",
            "host",
            "port",
            "user",
            "password",
            "remote_dir",
            "spool_dir",
            "enabled",
            "timeout",
            "ca_file",
            "passive",
            "parallel",
            "stable_after",
            "alert_after_failures",
            "alert_after_hours",
            "alert_emails",
        ]

    def clean_password(self):
        return self.cleaned_data["password"] or self.instance.password

    def clean_host(self):
        return self.cleaned_data["host"].strip()

    def clean_spool_dir(self):
        return os.path.expanduser(self.cleaned_data["spool_dir"].strip())


@admin.register(CdsSource)
class CdsSourceAdmin(admin.ModelAdmin):
    form = CdsSourceForm
    list_display = ("name", "host", "port", "remote_dir", "spool_dir", "enabled", "alert_since")
    list_filter = ("enabled",)
    readonly_fields = ("alert_since", "alert_reason")
    search_fields = ("name", "host")
    actions = ["run_now"]

    @admin.action(description="Run CDS import now", permissions=["run_import"])
    def run_now(self, request, queryset):
        runs = [enqueue_import(source, trigger="admin", user=request.user) for source in queryset]
        self.message_user(
            request,
            f"Queued {len(runs)} import run(s): {', '.join(str(run) for run in runs)}. "
            "A worker carries them out; their progress is on the imports pages.",
        )

    def has_run_import_permission(self, request):
        return request.user.has_perm("imports.run_import")


class ReadOnlyInline(admin.TabularInline):
    extra = 0
    can_delete = False
    show_change_link = False

    def has_add_permission(self, request, obj=None):
        return False

    def has_change_permission(self, request, obj=None):
        return False


class ImportLogEntryInline(ReadOnlyInline):
    model = ImportLogEntry
    fields = ("time", "level", "message", "traceback")


class ImportedFileInline(ReadOnlyInline):
    model = ImportedFile
    fields = ("name", "size", "outcome", "reason", "local_name", "sha256")


@admin.register(ImportRun)
class ImportRunAdmin(admin.ModelAdmin):
    list_display = ("__str__", "source", "trigger", "user", "status", "files", "bytes", "finished")
    list_filter = ("source", "status", "trigger")
    inlines = [ImportedFileInline, ImportLogEntryInline]

    def changelist_view(self, request, extra_context=None):
        interrupt_dead_runs()
        return super().changelist_view(request, extra_context)

    def change_view(self, request, object_id, form_url="", extra_context=None):
        interrupt_dead_runs()
        return super().change_view(request, object_id, form_url, extra_context)

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False
