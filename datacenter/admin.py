from django.contrib import admin
from django.contrib.auth import get_user_model
from django.contrib.auth.admin import GroupAdmin, UserAdmin
from django.contrib.auth.models import Group, Permission
from django.db.models import Q

from .models import Upload

#: The permissions that mean something to a person granting them; the others (adding a
#: job, a heartbeat or a log entry by hand, …) are records the site keeps for itself.
OFFERED = (
    Q(content_type__app_label="datacenter", content_type__model="storagelocation")
    | Q(content_type__app_label="auth", content_type__model__in=["user", "group"])
    | Q(content_type__app_label="imports", content_type__model="cdssource")
    | Q(content_type__app_label="imports", codename="view_importrun")
)


def offered_permissions():
    return Permission.objects.filter(OFFERED).select_related("content_type")


class OfferedPermissions:
    """Offers only the permissions of OFFERED in the admin's permission lists."""

    def formfield_for_manytomany(self, db_field, request, **kwargs):
        if db_field.name in ("permissions", "user_permissions"):
            kwargs["queryset"] = offered_permissions()
        return super().formfield_for_manytomany(db_field, request, **kwargs)


class RoleAdmin(OfferedPermissions, GroupAdmin):
    pass


class PersonAdmin(OfferedPermissions, UserAdmin):
    pass


admin.site.unregister(Group)
admin.site.register(Group, RoleAdmin)
admin.site.unregister(get_user_model())
admin.site.register(get_user_model(), PersonAdmin)


@admin.register(Upload)
class UploadAdmin(admin.ModelAdmin):
    list_display = ("name", "uploaded_by", "uploaded")
    search_fields = ("name", "uploaded_by__username")
    readonly_fields = ("name", "uploaded_by", "uploaded")

    def has_add_permission(self, request):
        return False
