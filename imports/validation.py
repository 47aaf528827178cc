"""Checks of what staff type into a CDS source, in words they understand.

They run in the admin form and whenever a source is saved, so that a source made by a script
is held to the same rules before anything connects or writes with it.
"""

import ipaddress
import os
import re
import ssl

from django.core.exceptions import ValidationError
from django.core.validators import validate_email

HOST_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")
# Folders that must never be a spool, and trees no spool may lie inside.
SYSTEM_FOLDERS = {"/", "/home", "/media", "/mnt", "/opt", "/srv", "/tmp", "/var"}
SYSTEM_TREES = (
    "/bin",
    "/boot",
    "/dev",
    "/etc",
    "/lib",
    "/lib32",
    "/lib64",
    "/libx32",
    "/proc",
    "/root",
    "/run",
    "/sbin",
    "/sys",
    "/usr",
)


def validate_host(value: str) -> None:
    try:
        ipaddress.ip_address(value)
        return
    except ValueError:
        pass
    name = value[:-1] if value.endswith(".") else value
    if not name or len(name) > 253 or not all(HOST_LABEL.match(p) for p in name.split(".")):
        raise ValidationError(
            "Enter a host name (such as ftp.example.org) or an IP address, without "
            "ftp:// or a port."
        )


def validate_remote_dir(value: str) -> None:
    if not value.startswith("/"):
        raise ValidationError("The remote directory must be an absolute path, such as /outbox.")
    if ".." in value.split("/"):
        raise ValidationError("The remote directory may not contain '..'.")
    if any(ord(char) < 32 or ord(char) == 127 for char in value):
        raise ValidationError("The remote directory may not contain control characters.")


def validate_spool_dir(value: str) -> None:
    path = os.path.expanduser(value)
    if not os.path.isabs(path):
        raise ValidationError("The spool folder must be an absolute path.")
    real = os.path.realpath(path)
    if real in SYSTEM_FOLDERS or any(
        real == tree or real.startswith(f"{tree}/") for tree in SYSTEM_TREES
    ):
        raise ValidationError(f"{real} is a system folder; choose a folder of its own.")
    _check_outside_datacenter(real)
    existing = real
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ValidationError(f"{existing} is a file, not a folder.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValidationError(f"The site may not write to {existing}.")


def _check_outside_datacenter(real: str) -> None:
    from datacenter.models import current_datacenter

    storage = os.path.realpath(current_datacenter().storage)
    if real == storage or real.startswith(f"{storage}/") or storage.startswith(f"{real}/"):
        raise ValidationError(
            f"The spool folder may not overlap the data center storage ({storage})."
        )


def validate_ca_file(value: str) -> None:
    if not os.path.isabs(value):
        raise ValidationError("The CA file must be given as an absolute path.")
    try:
        ssl.create_default_context(cafile=value)
    except FileNotFoundError:
        raise ValidationError(f"There is no file {value}.") from None
    except (OSError, ssl.SSLError, ValueError):
        raise ValidationError(f"{value} is not a PEM file of CA certificates.") from None


def email_list(value: str) -> list[str]:
    """The addresses of a comma-separated list, without blanks."""
    return [address.strip() for address in value.split(",") if address.strip()]


def validate_email_list(value: str) -> None:
    wrong = []
    for address in email_list(value):
        try:
            validate_email(address)
        except ValidationError:
            wrong.append(address)
    if wrong:
        raise ValidationError(
            f"These are no e-mail addresses: {', '.join(wrong)}. Separate addresses by commas."
        )


def validate_host_key(value: str) -> None:
    from .sftp import pinned_key

    try:
        pinned_key(value)
    except ValueError as exc:
        raise ValidationError(
            f"{exc} Paste the server's line of a known_hosts file (such as the output of "
            "ssh-keyscan: ssh-ed25519 AAAA…) or its fingerprint (SHA256:…)."
        ) from None


def validate_key_file(value: str) -> None:
    if not os.path.isabs(value):
        raise ValidationError("The key file must be given as an absolute path.")
    if not os.path.isfile(value):
        raise ValidationError(f"There is no file {value}.")
    if not os.access(value, os.R_OK):
        raise ValidationError(f"The site may not read {value}.")


def key_file_problem(path: str, passphrase: str) -> str | None:
    """Why the private key `path` cannot be opened with `passphrase`, or None."""
    from .sftp import private_key
    from .transports import PermanentError

    try:
        private_key(path, passphrase)
    except PermanentError as exc:
        return str(exc)
    return None
