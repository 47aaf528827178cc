"""The main flows in a real Chromium, driven by Playwright against the live server."""

import os
import re

import pytest
from django.contrib.auth.models import Permission, User
from django.core.management import call_command
from playwright.sync_api import expect, sync_playwright

from .conftest import PASSWORD, run_worker, write

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@pytest.fixture(scope="session")
def browser():
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, live_server):
    context = browser.new_context(base_url=live_server.url)
    page = context.new_page()
    page.set_default_timeout(10_000)
    yield page
    context.close()


def log_in(page, username):
    page.goto("/")
    expect(page).to_have_url(re.compile(r"/accounts/login/\?next=/$"))
    page.get_by_label("Username").fill(username)
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Log in").click()
    expect(page.get_by_role("heading", name="Pending files")).to_be_visible()


def test_assets_are_served_by_the_site_itself(page, clerk):
    log_in(page, "clerk")

    for asset in ("bootstrap/css/bootstrap.min.css", "bootstrap/js/bootstrap.bundle.min.js"):
        assert page.request.get(f"/static/{asset}").ok
    # Bootstrap's CSS is applied: the navigation bar is dark.
    navbar_colour = page.locator("nav.navbar").evaluate("e => getComputedStyle(e).backgroundColor")
    assert navbar_colour == "rgb(33, 37, 41)"


def test_upload_preview_and_delete(page, clerk, datacenter):
    log_in(page, "clerk")

    page.get_by_role("link", name="Upload a CSV file").click()
    page.get_by_label("CSV file").set_input_files(
        files=[{"name": "New People.csv", "mimeType": "text/csv", "buffer": b"id,name\n1,Ann\n"}]
    )
    page.get_by_role("button", name="Upload").click()
    expect(page.get_by_role("alert")).to_contain_text("Uploaded New_People.csv: 1 data row,")
    row = page.get_by_role("row", name="New_People.csv")
    expect(row).to_contain_text("clerk")

    row.get_by_role("link", name="Preview").click()
    expect(page.locator("#preview thead")).to_have_text("idname")
    expect(page.locator("#preview tbody")).to_have_text("1Ann")

    page.get_by_role("link", name="Delete").click()
    page.get_by_role("button", name="Delete").click()
    expect(page.get_by_role("alert")).to_contain_text("kept as deleted/New_People.csv")
    expect(page.get_by_text("No pending files.")).to_be_visible()
    assert os.listdir(datacenter.deleted_path) == ["New_People.csv"]


def test_an_invalid_upload_is_explained(page, clerk, datacenter):
    log_in(page, "clerk")
    page.goto("/datacenter/upload/")

    page.get_by_label("CSV file").set_input_files(
        files=[{"name": "bad.csv", "mimeType": "text/csv", "buffer": b"id,id\n1,2\n"}]
    )
    page.get_by_role("button", name="Upload").click()

    error = page.get_by_text("The header row names these columns more than once: id")
    expect(error).to_be_visible()
    assert datacenter.pending_files() == []


def test_relocate_the_storage_with_its_files_as_a_job(page, clerk, datacenter, tmp_path):
    write(os.path.join(datacenter.storage, "people.csv"), "id\n1\n")
    new = tmp_path / "relocated"
    log_in(page, "clerk")

    page.get_by_role("link", name="Storage").click()
    expect(page.locator("#current-path")).to_have_text(datacenter.storage)
    page.get_by_label("New storage path").fill(str(new))
    page.get_by_label("Move existing files to the new path").check()
    page.get_by_role("button", name="Relocate storage").click()
    expect(page.locator("#confirm-summary")).to_contain_text("1 file (5 bytes) will be copied")
    page.get_by_role("button", name="Relocate and move 1 file").click()

    expect(page.locator("#job-status")).to_have_text("queued")
    run_worker()
    expect(page.locator("#job-status")).to_have_text("success")
    expect(page.locator("#new-path")).to_have_text(str(new))
    expect(page.locator("#moved-count")).to_have_text("1 file (5 bytes) moved.")
    expect(page.get_by_text("Every file was moved.")).to_be_visible()
    assert (new / "people.csv").read_text() == "id\n1\n"
    assert not os.path.exists(os.path.join(datacenter.storage, "people.csv"))
    page.locator("#nav").get_by_role("link", name="Pending files").click()
    expect(page.get_by_role("row", name="people.csv")).to_be_visible()


def test_a_viewer_gets_403_on_the_storage_page(page, viewer):
    log_in(page, "viewer")
    expect(page.get_by_role("link", name="Storage")).to_have_count(0)

    response = page.goto("/datacenter/storage/")

    assert response.status == 403
    expect(page.get_by_role("heading", name="Not allowed")).to_be_visible()


def test_the_import_wizard(page, clerk, datacenter):
    clerk.user_permissions.add(*Permission.objects.filter(content_type__app_label="auth"))
    rows = "username,email,groups\nann,ann@example.org,\nbob,bob@example,\n"
    write(os.path.join(datacenter.storage, "staff.csv"), rows)
    log_in(page, "clerk")

    page.get_by_role("row", name="staff.csv").get_by_role("link", name="Process").click()
    expect(page.locator("#preview tbody tr")).to_have_count(2)
    page.get_by_label("Mode").select_option("create")
    page.get_by_role("button", name="Check and try (dry run)").click()

    expect(page.locator("#dry-run-summary")).to_contain_text("1 would succeed")
    expect(page.locator("#row-errors")).to_contain_text("email: Enter a valid email address.")
    assert not User.objects.filter(username="ann").exists()
    page.get_by_role("button", name="Process").click()

    expect(page.locator("#result-summary")).to_contain_text("1 successful")
    assert User.objects.filter(username="ann").exists()
    page.get_by_role("link", name="staff.create.pending.csv").click()
    expect(page.locator("#preview tbody")).to_contain_text("bob@example")
    expect(page.locator("#preview thead")).to_contain_text("--ERRORS--")


def test_run_an_import_from_the_overview_and_watch_it_complete(page, clerk, source, ftp_server):
    clerk.user_permissions.add(
        *Permission.objects.filter(codename__in=["view_importrun", "run_import"])
    )
    ftp_server.put("story.xml", b"<story/>")
    log_in(page, "clerk")

    page.get_by_role("link", name="CDS imports").click()
    page.get_by_role("row", name="partner").get_by_role("button", name="Run now").click()
    expect(page.locator("#run-status")).to_have_text("queued")

    # The worker that the README's serve command starts beside the web server.
    call_command("db_worker", "--batch", "--no-startup-delay", "--no-reload", "--queue-name", "*")

    expect(page.locator("#run-status")).to_have_text("success")
    expect(page.locator("#run-log")).to_contain_text("Moved from 'tmp' to 'new': story.xml")
    expect(page.locator("#run-files")).to_contain_text("delivered")
    page.get_by_role("link", name="CDS imports").click()
    expect(page.get_by_role("row", name="partner")).to_contain_text("1")


def test_send_a_file_to_the_partner_from_the_spool_page(page, clerk, source, ftp_server, tmp_path):
    clerk.user_permissions.add(
        *Permission.objects.filter(codename__in=["view_importrun", "run_import"])
    )
    (ftp_server.root / "inbox").mkdir()
    source.export_dir = "/inbox"
    source.save()
    reply = write(tmp_path / "reply.xml", "<reply/>")
    log_in(page, "clerk")

    page.get_by_role("link", name="CDS imports").click()
    page.get_by_role("link", name="partner").click()
    page.get_by_role("link", name="outgoing: new").click()
    page.get_by_label("File to send").set_input_files(reply)
    page.get_by_role("button", name="Add to the outgoing spool").click()
    expect(page.get_by_role("alert")).to_contain_text("reply.xml waits in the outgoing spool")
    expect(page.locator("#spool-files")).to_contain_text("reply.xml")
    page.get_by_role("button", name="Export now").click()
    expect(page.locator("#run-status")).to_have_text("queued")
    run_worker()

    expect(page.locator("#run-status")).to_have_text("success")
    expect(page.locator("#run-log")).to_contain_text("Moved from 'new' to 'cur': reply.xml")
    assert (ftp_server.root / "inbox" / "reply.xml").read_bytes() == b"<reply/>"


def test_process_a_file_as_a_background_job_and_fix_two_rows_in_the_editor(
    page, clerk, datacenter, settings
):
    settings.DATACENTER_RUN_AT_ONCE_SIZE = 0  # every file goes to the worker
    clerk.user_permissions.add(*Permission.objects.filter(content_type__app_label="auth"))
    rows = "username,email\nann,ann@example.org\nbob,bob@example\ncy,cy@\ndee,dee@example.org\n"
    write(os.path.join(datacenter.storage, "staff.csv"), rows)
    log_in(page, "clerk")

    page.get_by_role("row", name="staff.csv").get_by_role("link", name="Process").click()
    page.get_by_label("Mode").select_option("create")
    page.get_by_role("button", name="Process without a dry run").click()
    expect(page.locator("#job-status")).to_have_text("queued")
    run_worker()
    expect(page.locator("#job-status")).to_have_text("success")
    expect(page.locator("#result-summary")).to_contain_text("2 successful")
    expect(page.locator("#row-errors")).to_contain_text("email: Enter a valid email address.")

    page.get_by_role("link", name="fix them here").click()
    expect(page.locator("#editor tbody tr")).to_have_count(2)
    page.get_by_label("Row 1 email").fill("bob@example.org")
    page.get_by_label("Row 2 email").fill("cy@example.org")
    page.get_by_role("button", name="Save corrections").click()
    expect(page.get_by_role("alert")).to_contain_text("2 rows corrected, 0 dropped")
    assert os.listdir(datacenter.deleted_path) == ["staff.create.pending.csv"]

    page.get_by_role("link", name="Process").click()
    page.get_by_role("button", name="Check and try (dry run)").click()
    run_worker()
    expect(page.locator("#dry-run-summary")).to_contain_text("2 would succeed")
    expect(page.locator("#changes")).to_contain_text("bob@example.org")
    page.get_by_role("button", name="Process", exact=True).click()
    run_worker()
    expect(page.locator("#result-summary")).to_contain_text("2 successful")
    assert set(User.objects.exclude(username="clerk").values_list("email", flat=True)) == {
        "ann@example.org",
        "bob@example.org",
        "cy@example.org",
        "dee@example.org",
    }
    # The set is complete: the original and all its rows are finished, nothing is pending.
    assert sorted(os.listdir(datacenter.finished_path)) == [
        "staff.create.finished.csv",
        "staff.csv",
    ]
    assert os.listdir(datacenter.unfinished_path) == []
    assert datacenter.pending_files() == []
    page.get_by_role("link", name="Jobs", exact=True).click()
    expect(page.locator("#jobs tbody tr")).to_have_count(3)


def test_export_edit_upload_and_a_dry_run_shows_only_the_edit(page, clerk, settings):
    clerk.user_permissions.add(
        *Permission.objects.filter(content_type__app_label="auth"),
        Permission.objects.get(codename="export_records"),
    )
    User.objects.create(username="ann", email="ann@example.org", first_name="Ann")
    User.objects.create(username="bob", email="bob@example.org", first_name="Bob")
    settings.DATACENTER_EXPORT_AT_ONCE_ROWS = 1  # a job of the task worker
    log_in(page, "clerk")

    page.get_by_role("link", name="Exports").click()
    page.get_by_role("row", name="User accounts").get_by_role("button", name="Export").click()
    expect(page.locator("#job-status")).to_have_text("queued")
    run_worker()
    expect(page.locator("#export-result")).to_contain_text("3 records exported")
    with page.expect_download() as download:
        page.get_by_role("link", name="Download").click()
    exported = download.value.path().read_text(encoding="utf-8")
    assert exported.splitlines()[0] == (
        "username,email,first_name,last_name,is_active,is_staff,groups,password"
    )

    page.get_by_role("link", name="Upload").click()
    edited = exported.replace("bob@example.org,Bob,", "bob@example.org,Robert,")
    page.get_by_label("CSV file").set_input_files(
        files=[{"name": "users.csv", "mimeType": "text/csv", "buffer": edited.encode()}]
    )
    page.get_by_role("button", name="Upload").click()
    page.get_by_role("row", name="users.csv").get_by_role("link", name="Process").click()
    page.get_by_label("Mode").select_option("update")
    page.get_by_role("button", name="Check and try (dry run)").click()

    expect(page.locator("#change-counts")).to_contain_text("1 would update a record")
    expect(page.locator("#change-counts")).to_contain_text("2 would change nothing")
    expect(page.locator("#changes tbody tr")).to_have_count(1)
    expect(page.locator("#changes")).to_contain_text("Robert")


def test_export_a_workbook_edit_it_upload_it_and_a_dry_run_shows_only_the_edit(
    page, clerk, tmp_path
):
    import openpyxl

    clerk.user_permissions.add(
        *Permission.objects.filter(content_type__app_label="auth"),
        Permission.objects.get(codename="export_records"),
    )
    User.objects.create(username="007", email="bond@example.org", first_name="James")
    User.objects.create(username="bob", email="bob@example.org", first_name="Bob")
    log_in(page, "clerk")

    page.get_by_role("link", name="Exports").click()
    row = page.get_by_role("row", name="User accounts")
    row.get_by_label("Format").select_option("xlsx")
    row.get_by_role("button", name="Export").click()
    expect(page.locator("#export-result")).to_contain_text("3 records exported")
    with page.expect_download() as download:
        page.get_by_role("link", name="Download").click()
    assert download.value.suggested_filename.endswith(".xlsx")
    exported = tmp_path / download.value.suggested_filename
    download.value.save_as(exported)
    # Edited as a person would in a spreadsheet program: one cell changed, then saved.
    book = openpyxl.load_workbook(exported)
    sheet = book.active
    [bob] = [row for row in sheet.iter_rows(min_row=2) if row[0].value == "bob"]
    bob[2].value = "Robert"
    edited = tmp_path / "users.xlsx"
    book.save(edited)

    page.get_by_role("link", name="Upload").click()
    page.get_by_label("CSV file or workbook").set_input_files(str(edited))
    page.get_by_role("button", name="Upload").click()
    expect(page.locator(".alert-success")).to_contain_text("converted from Excel workbook")
    page.get_by_role("row", name="users.csv").get_by_role("link", name="Process").click()
    page.get_by_label("Mode").select_option("update")
    page.get_by_role("button", name="Check and try (dry run)").click()

    expect(page.locator("#change-counts")).to_contain_text("1 would update a record")
    expect(page.locator("#change-counts")).to_contain_text("2 would change nothing")
    expect(page.locator("#changes")).to_contain_text("Robert")
    expect(page.locator("#changes")).not_to_contain_text("007")


SCREENSHOTS = os.path.join(os.path.dirname(os.path.dirname(__file__)), "test-artifacts", "pages")


def test_every_main_page_fits_a_phone_and_a_desk(browser, live_server, admin_user, datacenter):
    """At 390 px no page scrolls sideways as a whole (wide tables scroll in their own box);
    screenshots of both widths go to test-artifacts/pages/ for people to look at."""
    from imports.models import CdsSource, ImportedFile, ImportRun

    long_name = "a-file-whose-name-is-quite-long-as-real-exports-often-are-2026-11-30.csv"
    write(os.path.join(datacenter.storage, long_name), "username,email\nann,a@example.org\n")
    write(os.path.join(datacenter.finished_path, "x.create.finished.csv"), "username\nann\n")
    source = CdsSource.objects.create(
        name="partner",
        host="ftp.partner.example.org",
        user="u",
        remote_dir="/outbox/with/a/long/path",
        export_dir="/inbox",
        spool_dir=str(datacenter.storage) + "-spool",
    )
    run = ImportRun.objects.create(source=source, trigger="cron", status="success", files=1)
    ImportedFile.objects.create(
        run=run, name=long_name, size=3_000_075, outcome="delivered", sha256="ab" * 32
    )
    pages = {
        "pending": "/datacenter/",
        "preview": f"/datacenter/files/{long_name}/",
        "finished": "/datacenter/finished/",
        "jobs": "/datacenter/jobs/",
        "exports": "/datacenter/exports/",
        "logs": "/datacenter/logs/",
        "storage": "/datacenter/storage/",
        "imports": "/imports/",
        "runs": "/imports/runs/",
        "run": run.get_absolute_url(),
        "spool": source.get_absolute_url(),
    }
    os.makedirs(SCREENSHOTS, exist_ok=True)
    for width, height in ((390, 844), (1366, 768)):
        context = browser.new_context(
            base_url=live_server.url, viewport={"width": width, "height": height}
        )
        page = context.new_page()
        page.goto("/accounts/login/")
        page.get_by_label("Username").fill(admin_user.username)
        page.get_by_label("Password").fill("password")
        page.get_by_role("button", name="Log in").click()
        too_wide = []
        for name, url in pages.items():
            page.goto(url)
            page.screenshot(path=os.path.join(SCREENSHOTS, f"{name}-{width}.png"), full_page=True)
            if page.evaluate("document.documentElement.scrollWidth") > width:
                too_wide.append(name)
        context.close()
        assert too_wide == [], f"at {width} px these pages scroll sideways: {too_wide}"


AXE = os.path.join(
    os.path.dirname(os.path.dirname(__file__)), "node_modules", "axe-core", "axe.min.js"
)


def serious_violations(page) -> list[str]:
    """What axe-core finds on the page that is serious or critical, in words."""
    page.add_script_tag(path=AXE)
    violations = page.evaluate("async () => (await axe.run(document)).violations")
    return [
        f"{violation['id']} ({violation['impact']}): {node['target']}"
        for violation in violations
        if violation["impact"] in ("serious", "critical")
        for node in violation["nodes"]
    ]


@pytest.mark.parametrize(
    "role",
    ["Data center viewers", "Data center clerks", "Data center managers", "Import managers", None],
)
def test_each_role_walks_its_pages_without_a_dead_end_or_an_accessibility_fault(
    page, django_user_model, datacenter, role
):
    """A person of each ready-made group (None: a superuser) logs in, lands on a page they may
    use and follows every link of the navigation; axe-core checks every page visited."""
    import importlib

    from django.contrib.auth.models import Group, Permission

    roles = importlib.import_module("datacenter.migrations.0006_roles").ROLES
    for name, permissions in roles.items():  # the test database is emptied between tests
        group, _ = Group.objects.get_or_create(name=name)
        for permission in permissions:
            app_label, codename = permission.split(".")
            group.permissions.add(
                Permission.objects.get(content_type__app_label=app_label, codename=codename)
            )
    if role:
        user = django_user_model.objects.create_user("person", password=PASSWORD)
        user.groups.add(Group.objects.get(name=role))
    else:
        django_user_model.objects.create_superuser("person", password=PASSWORD)
    write(os.path.join(datacenter.storage, "staff.csv"), "username,email\nann,a@example.org\n")

    page.goto("/")
    page.get_by_label("Username").fill("person")
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Log in").click()
    faults = {page.url: serious_violations(page)}
    assert "Not allowed" not in page.title()
    links = [
        link.get_attribute("href")
        for link in page.locator("#nav a.nav-link").all()
        if "/admin/" not in link.get_attribute("href")
    ]
    assert links, "the navigation offers nothing"
    for href in links:
        response = page.goto(href)
        assert response.status == 200, href
        faults[href] = serious_violations(page)
    if role in ("Data center clerks", "Data center managers", None):
        page.goto("/datacenter/files/staff.csv/process/")
        page.get_by_role("button", name="Check and try (dry run)").click()
        expect(page.locator("#dry-run-summary")).to_be_visible()
        faults[page.url] = serious_violations(page)
    assert {url: found for url, found in faults.items() if found} == {}


def tab_to(page, label: str, *, limit: int = 80) -> None:
    """Press Tab until the focused element is the one `label` names (its text, value or
    label), as a person without a mouse would; fail when it cannot be reached. The element
    focused already (autofocus) counts."""
    page.wait_for_load_state()
    for _ in range(limit):
        focused = page.evaluate(
            "() => { const e = document.activeElement; if (e === document.body) return '';"
            " return [e.innerText, e.value,"
            " e.getAttribute('aria-label'), e.labels && e.labels[0] && e.labels[0].innerText]"
            ".filter(Boolean).join(' | '); }"
        )
        if label in focused:
            return
        page.keyboard.press("Tab")
    raise AssertionError(f"{label!r} cannot be reached with the keyboard")


def follow(page) -> None:
    """Press Enter on the focused link or button and wait for the page it leads to."""
    with page.expect_navigation():
        page.keyboard.press("Enter")


def test_upload_dry_run_process_and_fix_rows_with_the_keyboard_alone(page, clerk, datacenter):
    clerk.user_permissions.add(*Permission.objects.filter(content_type__app_label="auth"))
    page.goto("/")
    tab_to(page, "Username")
    page.keyboard.type("clerk")
    tab_to(page, "Password")
    page.keyboard.type(PASSWORD)
    follow(page)
    expect(page.get_by_role("heading", name="Pending files")).to_be_visible()

    tab_to(page, "Upload a CSV file")
    follow(page)
    tab_to(page, "CSV file or workbook")
    # The file itself is chosen in the system's dialog, which no page controls.
    page.locator(":focus").set_input_files(
        files=[
            {"name": "staff.csv", "mimeType": "text/csv", "buffer": b"username,email\nann,ann@\n"}
        ]
    )
    tab_to(page, "Upload")
    follow(page)
    expect(page.get_by_role("alert")).to_contain_text("Uploaded staff.csv")

    tab_to(page, "Process")
    follow(page)
    tab_to(page, "Check and try (dry run)")
    follow(page)
    expect(page.locator("#dry-run-summary")).to_contain_text("0 would succeed")
    tab_to(page, "Process")
    follow(page)
    expect(page.locator("#job-status")).to_have_text("success")

    page.goto("/datacenter/files/staff.create.pending.csv/")
    tab_to(page, "Fix rows")
    follow(page)
    tab_to(page, "Row 1 email")
    page.keyboard.press("End")
    page.keyboard.type("example.org")
    tab_to(page, "Save corrections")
    follow(page)
    expect(page.get_by_role("alert")).to_contain_text("1 rows corrected")
    with open(os.path.join(datacenter.storage, "staff.create.pending.csv")) as handle:
        assert "ann,ann@example.org," in handle.read()
