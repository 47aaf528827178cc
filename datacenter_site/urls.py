from django.contrib import admin
from django.urls import include, path
from django.views.generic import RedirectView

from datacenter.views import healthz

urlpatterns = [
    path("", RedirectView.as_view(pattern_name="datacenter:pending"), name="home"),
    path("healthz", healthz, name="healthz"),
    path("accounts/", include("django.contrib.auth.urls")),
    path("admin/", admin.site.urls),
    path("datacenter/", include("datacenter.urls")),
    path("imports/", include("imports.urls")),
]
