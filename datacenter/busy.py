"""A database too busy to take a write in time is a moment's wait, not a server error: the
person gets a page in words with Retry-After (HTTP 503), whatever part of the request met it
(a view, the session, the login throttle)."""

import logging
import sys

from django.db import OperationalError
from django.http import HttpResponse
from django.template import loader

log = logging.getLogger(__name__)

#: Seconds after which a browser or a program may try again.
RETRY_AFTER = 5
#: PostgreSQL's codes for a lock not granted in time, a statement cancelled by its
#: timeout and a deadlock.
BUSY_SQLSTATES = {"55P03", "57014", "40P01"}


def is_busy(exception: BaseException | None) -> bool:
    """Whether `exception` says that the database was busy, not broken."""
    if not isinstance(exception, OperationalError):
        return False
    cause = exception.__cause__
    if getattr(cause, "sqlstate", None) in BUSY_SQLSTATES:
        return True
    return "database is locked" in str(exception) or "database table is locked" in str(exception)


def busy_page(request) -> HttpResponse:
    page = loader.render_to_string("busy.html")
    response = HttpResponse(page, status=503)
    response["Retry-After"] = str(RETRY_AFTER)
    return response


class BusyDatabaseMiddleware:
    """Answers a view that met a busy database with the busy page (also with DEBUG on)."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        return self.get_response(request)

    def process_exception(self, request, exception):
        if is_busy(exception):
            log.warning(
                "The database was busy for %s %s: %s", request.method, request.path, exception
            )
            return busy_page(request)
        return None


def server_error(request) -> HttpResponse:
    """handler500: the busy page for a busy database met outside a view (saving the
    session, say), else the plain server error page."""
    if is_busy(sys.exc_info()[1]):
        return busy_page(request)
    return HttpResponse(loader.render_to_string("500.html"), status=500)
