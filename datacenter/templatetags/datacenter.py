"""One way to write a size on every page."""

from django import template

from datacenter.files import human_size

register = template.Library()


@register.filter
def size(value) -> str:
    """A number of bytes as people read it (``13 bytes``, ``1.50 kb``, ``2.00 MB``); "—" for
    none."""
    if value is None or value == "":
        return "—"
    return human_size(int(value))
