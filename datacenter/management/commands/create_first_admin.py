import os
import secrets

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError


class Command(BaseCommand):
    help = (
        "Create a superuser when there is none yet, named by DJANGO_ADMIN_USER (default admin) "
        "with the password DJANGO_ADMIN_PASSWORD (generated and printed when unset)."
    )

    def handle(self, *args, **options):
        users = get_user_model().objects
        if users.filter(is_superuser=True).exists():
            return "An administrator account exists already; none was created."
        username = os.environ.get("DJANGO_ADMIN_USER", "admin")
        if users.filter(username=username).exists():
            raise CommandError(
                f"An account {username!r} exists and is no administrator; none was created. "
                "Set DJANGO_ADMIN_USER to a new name, or make that account a superuser."
            )
        given = os.environ.get("DJANGO_ADMIN_PASSWORD")
        password = given or secrets.token_urlsafe(12)
        users.create_superuser(username=username, email="", password=password)
        if given:
            return f"Created the administrator account {username!r} with DJANGO_ADMIN_PASSWORD."
        return f"Created the administrator account: user {username!r}, password {password!r}."
