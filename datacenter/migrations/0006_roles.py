"""Permissions named so that a person understands them, and ready-made groups to start from
(editable in the admin afterwards)."""

from django.contrib.auth.management import create_permissions
from django.db import migrations

PERMISSIONS = [
    ("view_files", "Can view and download files, jobs and logs"),
    ("upload_files", "Can upload files and fix pending files"),
    ("delete_files", "Can delete pending files"),
    ("process_files", "Can process pending files"),
    ("relocate_storage", "Can relocate the storage"),
    ("export_records", "Can export records and download own exports"),
]

ACCOUNTS = ["auth.view_user", "auth.add_user", "auth.change_user"]
ROLES = {
    "Data center viewers": ["datacenter.view_files"],
    "Data center clerks": [
        *("datacenter.view_files", "datacenter.upload_files", "datacenter.process_files"),
        *ACCOUNTS,
    ],
    "Data center managers": [
        *(f"datacenter.{codename}" for codename, _ in PERMISSIONS),
        *ACCOUNTS,
        "auth.delete_user",
    ],
    "Import managers": [
        "imports.view_cdssource",
        "imports.add_cdssource",
        "imports.change_cdssource",
        "imports.view_importrun",
        "imports.run_import",
        "imports.manage_spool",
    ],
}


def create_roles(apps, schema_editor):
    # On a new database the permissions come after the migrations: make them now.
    for app_config in apps.get_app_configs():
        app_config.models_module = True
        create_permissions(app_config, apps=apps, verbosity=0)
        app_config.models_module = None
    Permission = apps.get_model("auth", "Permission")
    Group = apps.get_model("auth", "Group")
    for codename, name in PERMISSIONS:
        Permission.objects.filter(content_type__app_label="datacenter", codename=codename).update(
            name=name
        )
    for role, permissions in ROLES.items():
        group, created = Group.objects.get_or_create(name=role)
        if not created:
            continue  # the operator's own group of that name stays as it is
        for permission in permissions:
            app_label, codename = permission.split(".")
            group.permissions.add(
                Permission.objects.get(content_type__app_label=app_label, codename=codename)
            )


class Migration(migrations.Migration):
    dependencies = [
        ("datacenter", "0005_job_sha256_export_format"),
        ("imports", "0005_sftp_and_export"),
        ("auth", "0012_alter_user_first_name_max_length"),
        ("contenttypes", "0002_remove_content_type_name"),
    ]

    operations = [
        migrations.AlterModelOptions(
            name="storagelocation",
            options={
                "default_permissions": (),
                "permissions": PERMISSIONS,
                "verbose_name": "files and storage",
                "verbose_name_plural": "files and storage",
            },
        ),
        migrations.RunPython(create_roles, migrations.RunPython.noop),
    ]
