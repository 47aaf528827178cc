import os
import secrets

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand


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
        password = os.environ.get("DJANGO_ADMIN_PASSWORD")
        users.create_superuser(username=username, email="", password=password or None)
        if password:
            return f"Created the administrator account {username!r} with DJANGO_ADMIN_PASSWORD."
        password = secrets.token_urlsafe(12)
        user = users.get(username=username)
        user.set_password(password)
        user.save(update_fields=["password"])
        return f"Created the administrator account: user {username!r}, password {password!r}."
