"""Where the site may put the storage: strictly below one of the operator's
DATACENTER_STORAGE_PARENTS, never in the code, DATACENTER_VAR_DIR, a CDS spool, or a folder
that holds any of them.

A person who may relocate the storage decides which folder the site lists, serves, replaces
and deletes files in, so the folders are the operator's decision, not theirs. The path is
taken literally: no `~`, no `$VARIABLES`. The seed's Python API
(DataCenter.set_storage_path) is for trusted code and knows none of these limits.
"""

import os

from django.apps import apps
from django.conf import settings

from .files import StorageError
from .storage import DataCenter


def storage_parents() -> list[str]:
    """The real paths of the folders below which the site may put the storage."""
    parents = settings.DATACENTER_STORAGE_PARENTS or [
        os.path.dirname(os.path.abspath(settings.DATACENTER_STORAGE_ROOT))
    ]
    return [os.path.realpath(parent) for parent in parents]


def protected_places() -> list[tuple[str, str]]:
    """(what it is, real path) of the folders the storage may neither be nor hold."""
    places = [
        ("the site's code", os.path.realpath(settings.BASE_DIR)),
        ("the site's own data (DATACENTER_VAR_DIR)", os.path.realpath(settings.VAR_DIR)),
    ]
    if apps.is_installed("imports"):
        source_model = apps.get_model("imports", "CdsSource")
        for name, spool in source_model.objects.values_list("name", "spool_dir"):
            places.append((f"the spool of the CDS source {name}", os.path.realpath(spool)))
    return places


def check_site_storage_path(datacenter: DataCenter, path: str, *, create: bool = True) -> str:
    """Validate and create (unless not `create`) the folder `path` typed by staff for
    relocating `datacenter`; return it, real and absolute. Raises StorageError in words for
    a path outside the limits, and then creates nothing."""
    literal = str(path).strip()
    if literal and "\x00" not in literal and os.path.isabs(literal):
        real = os.path.realpath(literal)
        if real != os.path.realpath(datacenter.storage):
            _check_within_limits(real)
        if not create:
            return real
    return datacenter.check_new_storage_path(literal, literal=True)


def _check_within_limits(real: str) -> None:
    parents = storage_parents()
    if not any(_inside(real, parent) for parent in parents):
        raise StorageError(
            f"{real} is not inside a folder where the storage may be kept. Choose a folder "
            f"below {' or '.join(parents)} (the operator sets these folders with "
            "DATACENTER_STORAGE_PARENTS)."
        )
    code, var_dir = os.path.realpath(settings.BASE_DIR), os.path.realpath(settings.VAR_DIR)
    for what, place in protected_places():
        if real == place or _inside(place, real):
            raise StorageError(f"{real} is or holds {what}; choose another folder.")
        # Below var/ is where the site keeps its data (var/storage by default), even where
        # the code holds var/.
        below_var = place in (code, var_dir) and _inside(real, var_dir)
        if _inside(real, place) and not below_var:
            raise StorageError(f"{real} lies inside {what}; choose another folder.")


def _inside(path: str, folder: str) -> bool:
    """Whether `path` lies strictly below `folder` (both real paths)."""
    return path.startswith(folder.rstrip(os.sep) + os.sep)
