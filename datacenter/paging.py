"""One way to page a listing, for the pages of both apps."""

from django.conf import settings
from django.core.paginator import Page, Paginator


def paginate(request, items) -> Page:
    """The page of `items` that the request's ``page`` parameter asks for (the last one for a
    number past the end, the first for anything else)."""
    return Paginator(items, settings.DATACENTER_PAGE_SIZE).get_page(request.GET.get("page"))
