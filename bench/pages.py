"""Milliseconds per page of the pending, finished and CDS spool listings, against a full read.

Fills a storage of its own with FILES pending and FILES finished CSV files, and a CDS
source's spool with FILES files in new/, and requests pages of the listings (both sort
orders of the pending one, pages spread over the whole listing) through Django's test client
in this one process, logged in, templates rendered. The same requests are then made with
the listing read whole on every request: as Kofa's data center makes it (stat and line count
of each file, then sort and slice), and for the spool as its page did before (stat of each
file, then slice). Prints the median and 95th percentile of each and the ratio of the
medians.

    .venv/bin/python bench/pages.py [FILES] [REQUESTS]      (default 10000 and 200)
"""

import os
import shutil
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from unittest import mock

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
WORK = tempfile.mkdtemp(prefix="bench-pages-")
os.environ["DATACENTER_VAR_DIR"] = WORK
os.environ.pop("DATABASE_URL", None)
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "datacenter_site.settings")
os.environ["DJANGO_ALLOWED_HOSTS"] = "testserver"

import django  # noqa: E402

django.setup()

from django.conf import settings  # noqa: E402
from django.contrib.auth.models import User  # noqa: E402
from django.core.management import call_command  # noqa: E402
from django.test import Client  # noqa: E402

from datacenter.storage import DataCenter, DataCenterFile  # noqa: E402
from imports import views as import_views  # noqa: E402
from imports.models import CdsSource  # noqa: E402


def fill(datacenter: DataCenter, count: int) -> None:
    now = time.time()
    for number in range(count):
        for folder, name in (
            (datacenter.storage, f"pending-{number:05d}.csv"),
            (datacenter.finished_path, f"batch-{number:05d}.create.finished.csv"),
        ):
            path = os.path.join(folder, name)
            with open(path, "w") as handle:
                handle.write("username,email\n" + f"user{number},u{number}@example.org\n" * 3)
            os.utime(path, (now - number * 7 % 100_000, now - number * 7 % 100_000))
    settle = now - 60
    for folder in (datacenter.storage, datacenter.finished_path):
        os.utime(folder, (settle, settle))


class FullRead(list):
    """A listing as Kofa makes it: every file of the folder stat'ed and read."""

    def __init__(self, folder: str, folder_name: str, suffix: str, sort: str):
        files = []
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.name.endswith(suffix) and entry.is_file(follow_symlinks=False):
                    file = DataCenterFile(entry.path, folder_name)
                    with open(entry.path, "rb") as handle:
                        file.line_count = sum(1 for _ in handle)
                    files.append(file)
        if sort == "name":
            files.sort(key=lambda file: file.name)
        else:
            files.sort(key=lambda file: (file.modified, file.name), reverse=True)
        super().__init__(files)


def fill_spool(name: str, count: int) -> None:
    source = CdsSource.objects.create(
        name=name,
        host="127.0.0.1",
        port=21,
        user="cds",
        remote_dir="/outbox",
        spool_dir=os.path.join(WORK, name),
    )
    source.store.prepare()
    new = source.store.folder("new")
    for number in range(count):
        with open(os.path.join(new, f"story-{number:05d}.xml"), "w") as handle:
            handle.write(f"<story n='{number}'/>\n")
    settle = time.time() - 60
    os.utime(new, (settle, settle))


def full_read_spool(store, subfolder: str) -> list[dict]:
    """The spool folder as its page read it before: every file stat'ed on every request."""
    files = []
    for path in store.list(subfolder):
        stat = os.stat(path)
        files.append(
            {
                "name": os.path.basename(path),
                "size": stat.st_size,
                "modified": datetime.fromtimestamp(stat.st_mtime, tz=UTC),
            }
        )
    return files


def full_read_pending(self, sort="name"):
    return FullRead(self.storage, "", ".csv", sort)


def full_read_finished(self, suffix=".finished.csv"):
    return FullRead(self.finished_path, "finished", suffix, "date")


def timings(client: Client, urls: list[str]) -> list[float]:
    result = []
    for url in urls:
        started = time.perf_counter()
        response = client.get(url)
        result.append((time.perf_counter() - started) * 1000)
        assert response.status_code == 200, (url, response.status_code)
    return result


def main() -> None:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 10_000
    requests = int(sys.argv[2]) if len(sys.argv) > 2 else 200
    call_command("migrate", verbosity=0)
    datacenter = DataCenter(settings.DATACENTER_STORAGE_ROOT)
    fill(datacenter, count)
    fill_spool("partner", count)
    fill_spool("small", settings.DATACENTER_PAGE_SIZE)  # one page: what a page should cost
    client = Client()
    client.force_login(User.objects.create_superuser("bench", password="bench-password-1"))
    pages = -(-count // settings.DATACENTER_PAGE_SIZE)
    spread = [1 + number * 37 % pages for number in range(requests // 3 + 1)]
    urls = {
        "pending by name": [f"/datacenter/?sort=name&page={page}" for page in spread],
        "pending by date": [f"/datacenter/?sort=date&page={page}" for page in spread],
        "finished": [f"/datacenter/finished/?page={page}" for page in spread],
        "CDS spool new/": [f"/imports/sources/partner/spool/?page={page}" for page in spread],
    }
    print(
        f"{time.strftime('%Y-%m-%d')}, {count} files in each folder, "
        f"{len(spread)} requests per listing, median / p95 in ms"
    )
    medians = {}
    for label, listing in urls.items():
        timings(client, listing[:3])  # warm: templates, the folder's index
        ours = timings(client, listing)
        with (
            mock.patch.object(DataCenter, "pending_listing", full_read_pending),
            mock.patch.object(DataCenter, "finished_listing", full_read_finished),
            mock.patch.object(import_views, "spool_listing", full_read_spool),
        ):
            full = timings(client, listing[: max(5, len(listing) // 10)])
        ours_median, full_median = statistics.median(ours), statistics.median(full)
        print(
            f"  {label:16} ours {ours_median:6.1f} / {percentile(ours, 95):6.1f}   "
            f"full read {full_median:7.1f} / {percentile(full, 95):7.1f}   "
            f"{full_median / ours_median:5.1f}x faster"
        )
        medians[label] = ours_median
    one_page = [f"/imports/sources/small/spool/?page={number % 2 + 1}" for number in spread]
    timings(client, one_page[:3])
    small = statistics.median(timings(client, one_page))
    print(
        f"  CDS spool new/ of {settings.DATACENTER_PAGE_SIZE} files: {small:.1f} ms; "
        f"of {count}: {medians['CDS spool new/'] / small:.2f}x that"
    )


def percentile(values: list[float], percent: int) -> float:
    return statistics.quantiles(values, n=100)[percent - 1]


if __name__ == "__main__":
    try:
        main()
    finally:
        shutil.rmtree(WORK)
