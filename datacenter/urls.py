from django.urls import path

from . import views

app_name = "datacenter"
urlpatterns = [
    path("", views.pending, name="pending"),
    path("upload/", views.upload, name="upload"),
    path("files/<str:name>/", views.preview, name="preview"),
    path("files/<str:name>/download/", views.download, name="download"),
    path("files/<str:name>/delete/", views.delete, name="delete"),
    path("files/<str:name>/process/", views.process, name="process"),
    path("files/<str:name>/edit/", views.edit, name="edit"),
    path("files/<str:name>/replace/", views.replace, name="replace"),
    path("jobs/", views.job_list, name="jobs"),
    path("jobs/<int:pk>/", views.job, name="job"),
    path("exports/", views.export_list, name="exports"),
    path("exports/<str:name>/download/", views.download_export, name="download_export"),
    path("finished/", views.finished, name="finished"),
    path(
        "finished/<str:name>/download/",
        views.download,
        {"folder": "finished"},
        name="download_finished",
    ),
    path("logs/", views.logs, name="logs"),
    path("logs/<str:name>/", views.log_search, name="log"),
    path("storage/", views.storage, name="storage"),
]
