"""The processor of user accounts, with the rules that keep a file from giving anybody more
than the person processing it holds.
"""

import functools
import secrets

from django.contrib.auth import get_user_model
from django.contrib.auth.hashers import UNUSABLE_PASSWORD_PREFIX, identify_hasher
from django.contrib.auth.models import Group

from .processors import DELETE_MARKER, IGNORE_MARKER, ModelProcessor, RowError, shown, shown_values


class UserProcessor(ModelProcessor):
    """User accounts of django.contrib.auth, by username.

    New accounts get an unusable password unless the file gives a hashed one; clear-text
    passwords are refused. Only a superuser's file changes or removes a superuser account
    (a row that changes nothing, as in an export, passes), and only a superuser's export
    holds password hashes.
    """

    name = "users"
    title = "User accounts"
    key = "username"
    fields = ("email", "first_name", "last_name", "is_active", "is_staff", "groups", "password")
    related_by = {"groups": "name"}
    secret_fields = ("password",)

    def __init__(self):
        self.model = get_user_model()
        super().__init__()

    def prepare(self, instance, row, mode):
        password = row.get("password", "")
        # An unusable password, as Django stores an account without one, is kept as it is.
        if password not in ("", IGNORE_MARKER, DELETE_MARKER) and not password.startswith(
            UNUSABLE_PASSWORD_PREFIX
        ):
            try:
                identify_hasher(password)
            except ValueError:
                raise RowError(
                    "password: only hashed passwords are accepted (as Django stores them, "
                    "such as pbkdf2_sha256$...); clear-text passwords are refused."
                ) from None
        elif mode == "create":
            # What set_unusable_password() stores, without its slow random choice per character.
            instance.password = UNUSABLE_PASSWORD_PREFIX + secrets.token_hex(20)

    def hidden_on_export(self) -> set[str]:
        # Password hashes are as good as passwords against a slow attacker.
        if self.user is not None and not self.user.is_superuser:
            return {"password"}
        return set()

    @functools.cached_property
    def groups_within_reach(self) -> set[int]:
        """The groups whose every permission the processor's user holds."""
        held = self.user.get_all_permissions()
        reach = set()
        for group in Group.objects.prefetch_related("permissions__content_type"):
            needed = {
                f"{permission.content_type.app_label}.{permission.codename}"
                for permission in group.permissions.all()
            }
            if needed <= held:
                reach.add(group.pk)
        return reach

    @property
    def checks_changes(self) -> bool:
        # A file gives nobody more than the person processing it holds.
        return self.user is not None and not self.user.is_superuser

    def check_change(self, instance, before, changed, many):
        after = shown_values(instance)

        def changes(attname: str) -> bool:
            return attname in changed and (before is None or before[attname] != after[attname])

        if changes("is_staff") and (before is not None or instance.is_staff):
            raise RowError(
                "is_staff: only a superuser's file makes an account staff or changes that."
            )
        if before is not None and before["is_staff"] == shown(True):
            touched = [name for name in ("password", "email", "is_active") if changes(name)]
            if touched:
                raise RowError(
                    f"{instance.get_username()} is a staff account: its "
                    f"{' and '.join(touched)} is changed by a file only when a superuser "
                    "processes it."
                )
        beyond = set(many.get("groups", ())) - self.groups_within_reach
        if beyond and instance.pk is not None:
            beyond -= set(instance.groups.values_list("pk", flat=True))
        if beyond:
            names = sorted(Group.objects.filter(pk__in=beyond).values_list("name", flat=True))
            raise RowError(
                f"groups: {', '.join(names)} grant permissions you do not have; only a person "
                "who has them all adds an account to such a group."
            )

    def check_existing(self, instance, mode):
        # A clerk who may change users must not take over or lock out an administrator.
        if instance.is_superuser and not (self.user is not None and self.user.is_superuser):
            action = "removed" if mode == "remove" else "changed"
            raise RowError(
                f"{instance.get_username()} is a superuser account: it is {action} by a file "
                "only when a superuser processes it."
            )
