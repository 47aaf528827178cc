import os

from django import forms
from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.http import HttpResponseRedirect
from django.utils.html import format_html

from .models import CdsSource, ImportedFile, ImportLogEntry, ImportRun
from .runs import enqueue_import, interrupt_dead_runs


def secret_field(help_text: str) -> forms.CharField:
    return forms.CharField(
        required=False, widget=forms.PasswordInput(render_value=False), help_text=help_text
    )


class CdsSourceForm(forms.ModelForm):
    password = secret_field("Never shown again. Leave empty to keep the current password.")
    passphrase = secret_field(
        "SFTP only: the passphrase of the private key. Never shown again. Leave empty to keep "
        "the current one."
    )
    clear_passphrase = forms.BooleanField(
        required=False, help_text="Remove the stored passphrase (for a key without one)."
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
            "export_dir",
            "spool_dir",
            "enabled",
            "timeout",
            "ca_file",
            "host_key",
            "key_file",
            "passphrase",
            "clear_passphrase",
            "passive",
            "parallel",
            "stable_after",
            "alert_after_failures",
            "alert_after_hours",
            "alert_emails",
        ]

    def clean_password(self):
        return self.cleaned_data["password"] or self.instance.password

    def clean_passphrase(self):
        return self.cleaned_data["passphrase"] or self.instance.passphrase

    def clean(self):
        cleaned = super().clean()
        if cleaned.get("clear_passphrase"):
            cleaned["passphrase"] = self.instance.passphrase = ""
        return cleaned

    def clean_host_key(self):
        return " ".join(self.cleaned_data["host_key"].split())

    def clean_host(self):
        return self.cleaned_data["host"].strip()

    def clean_spool_dir(self):
        return os.path.expanduser(self.cleaned_data["spool_dir"].strip())


#: Write-only: a field to set or clear them, never their value, for anybody.
SECRET_FIELDS = ("password", "passphrase", "clear_passphrase")


@admin.register(CdsSource)
class CdsSourceAdmin(admin.ModelAdmin):
    form = CdsSourceForm
    list_display = ("name", "host", "port", "remote_dir", "spool_dir", "enabled", "alert_since")
    list_filter = ("enabled",)
    readonly_fields = (
        "offered_host_key_to_trust",
        "alert_since",
        "alert_reason",
        "password_stored",
        "passphrase_stored",
    )
    search_fields = ("name", "host")
    actions = ["run_now", "export_now"]

    @admin.action(description="Run CDS import now", permissions=["run_import"])
    def run_now(self, request, queryset):
        self.enqueue(request, queryset, ImportRun.IMPORT)

    @admin.action(description="Run CDS export now", permissions=["run_import"])
    def export_now(self, request, queryset):
        without = [source.name for source in queryset if not source.exports]
        if without:
            self.message_user(
                request, f"No export directory is set for: {', '.join(without)}.", messages.WARNING
            )
        self.enqueue(request, queryset.exporting(), ImportRun.EXPORT)

    def enqueue(self, request, queryset, direction: str) -> None:
        runs = [
            enqueue_import(source, trigger="admin", user=request.user, direction=direction)
            for source in queryset
        ]
        if runs:
            self.message_user(
                request,
                f"Queued {len(runs)} {direction} run(s): {', '.join(str(run) for run in runs)}. "
                "A worker carries them out; their progress is on the imports pages.",
            )

    def get_fields(self, request, obj=None):
        # Whoever may only view a source sees the form's fields as text: its secrets would
        # be shown in clear, so only whether they are set is.
        fields = super().get_fields(request, obj)
        if obj is None or self.has_change_permission(request, obj):
            return [f for f in fields if f not in ("password_stored", "passphrase_stored")]
        return [f for f in fields if f not in SECRET_FIELDS]

    @admin.display(description="Password")
    def password_stored(self, source):
        return "set" if source.password else "not set"

    @admin.display(description="Key passphrase")
    def passphrase_stored(self, source):
        return "set" if source.passphrase else "not set"

    @admin.display(description="Host key the server offered")
    def offered_host_key_to_trust(self, source):
        if not source.offered_host_key or source.offered_host_key == source.host_key:
            return "—"
        offered = fingerprint(source.offered_host_key)
        return format_html(
            '<code>{}</code><br>{} <button type="submit" name="_trust_host_key" value="{}" '
            'class="button">Trust this key</button><div class="help">Compare the fingerprint '
            "with the one the partner gives you (for instance over the phone) before you "
            "trust the key: the run failed because it is not the pinned one.</div>",
            offered,
            source.offered_host_key,
            offered,
        )

    def change_view(self, request, object_id, form_url="", extra_context=None):
        if request.method == "POST" and "_trust_host_key" in request.POST:
            return self.trust_host_key(request, object_id)
        return super().change_view(request, object_id, form_url, extra_context)

    def trust_host_key(self, request, object_id):
        """Pin the key the server offered, if it is still the one whose fingerprint the
        page showed."""
        source = self.get_object(request, object_id)
        if source is None or not self.has_change_permission(request, source):
            raise PermissionDenied
        shown = request.POST["_trust_host_key"]
        offered = source.offered_host_key
        if not offered or fingerprint(offered) != shown:
            self.message_user(
                request,
                "The offered key changed since the page was shown; compare it again.",
                messages.ERROR,
            )
        else:
            CdsSource.objects.filter(pk=source.pk).update(host_key=offered, offered_host_key="")
            self.message_user(request, f"The host key {shown} of {source} is now trusted.")
        return HttpResponseRedirect(request.path)

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
    list_display = (
        "__str__",
        "source",
        "direction",
        "trigger",
        "user",
        "status",
        "files",
        "bytes",
        "finished",
    )
    list_filter = ("source", "direction", "status", "trigger")
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


def fingerprint(key_line: str) -> str:
    # asyncssh is loaded only where a host key is shown: it adds about 0.2 s to the start of
    # every process, cron's commands included.
    from . import sftp

    return sftp.fingerprint(key_line)
