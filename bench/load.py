"""Requests per second and latency of the site under 50 logged-in users, with Locust.

Starts gunicorn (2 workers, as on one small machine) on a free port of 127.0.0.1 with a
database and a storage of its own (FILES pending and FILES finished files), lets Locust's
users (bench/locustfile.py) log in and browse the pending, finished, CDS import and runs
pages for SECONDS (logged in already: a login hashes a password on purpose, which is not
what this measures), and prints requests/s, the median and 95th percentile and the errors.

    .venv/bin/pip install -r requirements-bench.txt
    .venv/bin/python bench/load.py [--users 50] [--seconds 60] [--files 10000] [--workers 2]
"""

import argparse
import csv
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def prepare(env: dict, files: int, users: int) -> list[str]:
    """Migrate, fill the storage and return a session of the staff account per user."""
    manage = [sys.executable, "manage.py"]
    subprocess.run([*manage, "migrate", "-v0"], cwd=ROOT, env=env, check=True)
    script = (
        "from django.contrib.auth.models import User; from django.conf import settings; "
        "from django.test import Client; from datacenter.storage import DataCenter; "
        "from pages import fill; "
        f"fill(DataCenter(settings.DATACENTER_STORAGE_ROOT), {files}); "
        "user = User.objects.create_superuser('bench', password='bench-password-1'); "
        "clients = [Client() for _ in range(%d)]; [c.force_login(user) for c in clients]; "
        "print(','.join(c.cookies['sessionid'].value for c in clients))" % users
    )
    result = subprocess.run(
        [*manage, "shell", "-c", script],
        cwd=ROOT,
        env={**env, "PYTHONPATH": str(ROOT / "bench")},
        check=True,
        capture_output=True,
        text=True,
    )
    return result.stdout.strip().splitlines()[-1].split(",")


def wait_until_serving(url: str, server: subprocess.Popen) -> None:
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(url + "/healthz", timeout=1)
            return
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("gunicorn did not start") from None
            time.sleep(0.2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=50)
    parser.add_argument("--seconds", type=int, default=60)
    parser.add_argument("--files", type=int, default=10_000)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-load-"))
    env = {
        **{k: v for k, v in os.environ.items() if k != "DATABASE_URL"},
        "DATACENTER_VAR_DIR": str(work),
        "DJANGO_ALLOWED_HOSTS": "127.0.0.1",
        "BENCH_PAGES": str(max(1, args.files // 25)),
    }
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = None
    try:
        env["BENCH_SESSIONS"] = ",".join(prepare(env, args.files, args.users))
        server = subprocess.Popen(
            [str(Path(sys.executable).parent / "gunicorn"), "-w", str(args.workers)]
            + ["-b", f"127.0.0.1:{port}", "datacenter_site.wsgi"],
            cwd=ROOT,
            env=env,
            stderr=subprocess.DEVNULL,
        )
        wait_until_serving(url, server)
        subprocess.run(
            [
                str(Path(sys.executable).parent / "locust"),
                "-f",
                str(ROOT / "bench" / "locustfile.py"),
            ]
            + ["--headless", "-u", str(args.users), "-r", "10", "-t", f"{args.seconds}s"]
            + [
                "--host",
                url,
                "--csv",
                str(work / "load"),
                "--only-summary",
                "--loglevel",
                "ERROR",
            ],
            cwd=ROOT,
            env=env,
            check=False,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        report(work / "load_stats.csv", args)
    finally:
        if server is not None:
            server.terminate()
            server.wait()
        shutil.rmtree(work)


def report(stats: Path, args) -> None:
    with open(stats, newline="") as handle:
        rows = {row["Name"]: row for row in csv.DictReader(handle)}
    requests, failures = rows["Aggregated"]["Request Count"], rows["Aggregated"]["Failure Count"]
    print(
        f"{time.strftime('%Y-%m-%d')}, gunicorn -w {args.workers}, {args.users} users for "
        f"{args.seconds} s, {args.files} files in each listing"
    )
    print(f"  {'page':10} {'requests':>9} {'req/s':>7} {'p50 ms':>7} {'p95 ms':>7} {'errors':>7}")
    for name, row in sorted(rows.items()):
        print(
            f"  {name:10} {row['Request Count']:>9} {float(row['Requests/s']):7.1f} "
            f"{row['50%']:>7} {row['95%']:>7} {row['Failure Count']:>7}"
        )
    print(f"  all pages: {requests} requests, {failures} errors")


if __name__ == "__main__":
    main()
