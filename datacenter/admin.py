from django.contrib import admin

from .models import Upload


@admin.register(Upload)
class UploadAdmin(admin.ModelAdmin):
    list_display = ("name", "uploaded_by", "uploaded")
    search_fields = ("name", "uploaded_by__username")
    readonly_fields = ("name", "uploaded_by", "uploaded")

    def has_add_permission(self, request):
        return False
