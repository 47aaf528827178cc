from django.urls import path

from . import views

app_name = "imports"
urlpatterns = [
    path("", views.overview, name="overview"),
    path("runs/", views.runs, name="runs"),
    path("runs/<int:pk>/", views.run, name="run"),
    path("sources/<slug:name>/run/", views.run_now, name="run_now"),
    path("sources/<slug:name>/export/", views.export_now, name="export_now"),
    path("sources/<slug:name>/spool/", views.spool, name="spool"),
    path(
        "sources/<slug:name>/spool/<str:folder>/<str:filename>/",
        views.spool_download,
        name="spool_download",
    ),
    path(
        "sources/<slug:name>/spool/new/<str:filename>/processed/",
        views.mark_processed,
        name="mark_processed",
    ),
]
