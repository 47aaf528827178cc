"""Who may see the pending files: one rule for the views and for the links the pages offer."""

#: Whoever views, fixes or processes files reads them.
READERS = ("view_files", "upload_files", "process_files")
#: Whoever works on pending files sees them listed: to upload, fix, process or delete one
#: you must know which there are (deleting one does not read it).
WORKERS = (*READERS, "delete_files")


def _holds_any(user, codenames: tuple[str, ...]) -> bool:
    return any(user.has_perm(f"datacenter.{codename}") for codename in codenames)


def works_on_pending_files(user) -> bool:
    return _holds_any(user, WORKERS)


def reads_pending_files(user) -> bool:
    return _holds_any(user, READERS)


def pending_files(request) -> dict:
    """Template context: whether the person sees the pending files listed, and read."""
    return {
        "works_on_pending_files": works_on_pending_files(request.user),
        "reads_pending_files": reads_pending_files(request.user),
    }
