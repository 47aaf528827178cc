from django.contrib import admin
from django.urls import include, path

from datacenter.views import healthz, home

handler500 = "datacenter.busy.server_error"

urlpatterns = [
    path("", home, name="home"),
    path("healthz", healthz, name="healthz"),
    path("accounts/", include("django.contrib.auth.urls")),
    path("admin/", admin.site.urls),
    path("datacenter/", include("datacenter.urls")),
    path("imports/", include("imports.urls")),
]
