"""A large job never blocks the site: write latency while the worker processes a large file,
the job's speed against processing in one transaction, and a job killed half-way.

For SQLite and PostgreSQL (a throwaway cluster of bin/with-postgres), side by side, while
CLIENTS people use the site through gunicorn (each, once a second, uploads a file, saves a
group in the admin or logs in):
0. no job, for 30 s: the people's writes by themselves;
1. one transaction: ROWS user accounts created by ``process_file`` inside one transaction, as
   before batches;
2. batched, nobody on the site: the same number processed by a real task worker as a job,
   the people paused (the job's own speed against run 1);
3. batched, under load: the same again, the people at work for the job's whole length;
4. killed and resumed, under the same load: the job's worker is killed with SIGKILL at 50%,
   a new worker goes on after the last committed batch; its outputs are compared with those
   of run 3, byte for byte.
Prints the errors the people met (goal 0), the latency of their writes (p50/p95/max; goal on
SQLite p95 <= 1 s, max <= 2 s), rows/s of runs 2 and 3 against run 1 (goal >= 0.9x) and the
time of run 4 against run 3 (goal <= 1.1x).

    .venv/bin/pip install -r requirements-bench.txt
    .venv/bin/python bench/busy_site.py [--rows 1000000] [--clients 20]
"""

import argparse
import hashlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PASSWORD = "bench-password-1"
#: How long the people use the site before any job, for a reference.
IDLE_SECONDS = 30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--one", action="store_true", help="one database: DATABASE_URL's")
    args = parser.parse_args()
    if args.one:
        print("RESULT " + json.dumps(run_one(args.rows, args.clients)), flush=True)
        return
    this = [sys.executable, __file__, "--one", "--rows", str(args.rows)]
    this += ["--clients", str(args.clients)]
    results = {}
    for name, command in [
        ("SQLite", this),
        ("PostgreSQL", [str(ROOT / "bin" / "with-postgres"), *this]),
    ]:
        env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
        print(f"{name}: running ...", file=sys.stderr, flush=True)
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
        lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        if done.returncode or not lines:
            sys.stderr.write(done.stdout[-3000:] + done.stderr[-3000:])
            raise SystemExit(f"{name}: the benchmark failed")
        results[name] = json.loads(lines[-1][len("RESULT ") :])
    report(results, args)


def report(results: dict, args) -> None:
    names = list(results)
    print(
        f"{time.strftime('%Y-%m-%d')}: {args.rows:,} user rows, while {args.clients} people "
        "upload, save in the admin and log in"
    )
    rows = [
        (f"no job ({IDLE_SECONDS} s):", None),
        ("  errors the people met", lambda r: errors(r["idle"])),
        ("  writes p50/p95/max", lambda r: latency(r["idle"], "all")),
        ("one transaction (before):", None),
        ("  errors the people met", lambda r: errors(r["one"])),
        ("  writes p50/p95/max", lambda r: latency(r["one"], "all")),
        ("  rows/s", lambda r: f"{r['one_rate']:,.0f}"),
        ("batched job (runs 3 and 4):", None),
        ("  errors the people met", lambda r: errors(r["batched"])),
        ("  writes p50/p95/max", lambda r: latency(r["batched"], "all")),
        *[
            (f"    {action}", lambda r, a=action: latency(r["batched"], a))
            for action in ("upload", "save", "login")
        ],
        ("  rows/s", lambda r: f"{r['batched_rate']:,.0f}"),
        ("  against one transaction", lambda r: f"{r['batched_rate'] / r['one_rate']:.2f}x"),
        ("batched job, nobody on the site:", None),
        ("  rows/s", lambda r: f"{r['alone_rate']:,.0f}"),
        ("  against one transaction", lambda r: f"{r['alone_rate'] / r['one_rate']:.2f}x"),
        ("killed at 50% and resumed:", None),
        ("  uninterrupted job", lambda r: f"{r['uninterrupted']:.1f} s"),
        ("  killed and resumed", lambda r: f"{r['resumed']:.1f} s"),
        ("  against uninterrupted", lambda r: f"{r['resumed'] / r['uninterrupted']:.2f}x"),
        ("  outputs identical", lambda r: "yes" if r["identical"] else "NO"),
    ]
    print(f"  {'':28}" + "".join(f"{name:>24}" for name in names))
    for label, value in rows:
        cells = "" if value is None else "".join(f"{value(results[n]):>24}" for n in names)
        print(f"  {label:28}{cells}")


def errors(phase: dict) -> str:
    return f"{phase['errors']} of {phase['writes']}"


def latency(phase: dict, action: str) -> str:
    times = phase["latency"].get(action)
    if not times:
        return "-"
    return "/".join(f"{value:.2f}" for value in times) + " s"


# One database


def run_one(rows: int, clients: int) -> dict:
    work = Path(tempfile.mkdtemp(prefix="bench-busy-"))
    os.environ.update(
        {
            "DATACENTER_VAR_DIR": str(work),
            "DATACENTER_STORAGE_ROOT": str(work / "storage"),
            "DJANGO_ALLOWED_HOSTS": "127.0.0.1",
            "DJANGO_SETTINGS_MODULE": "datacenter_site.settings",
            "DATACENTER_RUN_AT_ONCE_SIZE": "0",
        }
    )
    os.environ.setdefault("DATABASE_URL", f"sqlite:///{work}/db.sqlite3")
    sys.path.insert(0, str(ROOT))
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)
    server, worker = None, Worker()
    try:
        manager, people = accounts(clients)
        datacenter = storage()
        port = free_port()
        server = subprocess.Popen(
            [str(Path(sys.executable).parent / "gunicorn"), "-w", "4", "--threads", "2"]
            + ["-b", f"127.0.0.1:{port}", "--timeout", "120", "datacenter_site.wsgi"],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        load = Load(f"http://127.0.0.1:{port}", people)
        load.start()
        load.phase = "idle"
        time.sleep(IDLE_SECONDS)
        load.phase = "one"
        one_rate = rows / one_transaction(datacenter, rows)
        worker.start()
        # The job's own speed, the processor not shared with the people's requests.
        load.phase = "nobody"
        load.paused.set()
        alone, _ = job(datacenter, manager, rows, "n", worker)
        load.paused.clear()
        load.phase = "batched"
        uninterrupted, outputs = job(datacenter, manager, rows, "b", worker)
        resumed, killed_outputs = job(datacenter, manager, rows, "c", worker, kill_at=rows // 2)
        load.stop()
        return {
            "idle": load.summary("idle"),
            "one": load.summary("one"),
            "batched": load.summary("batched"),
            "one_rate": one_rate,
            "alone_rate": rows / alone,
            "batched_rate": rows / uninterrupted,
            "uninterrupted": uninterrupted,
            "resumed": resumed,
            "identical": outputs == killed_outputs,
        }
    finally:
        worker.stop()
        if server is not None:
            server.kill()
            server.wait()
        shutil.rmtree(work, ignore_errors=True)


def percentiles(prefix: str, latencies: list[float]) -> dict:
    if not latencies:
        return {}
    return {
        f"{prefix}p50": statistics.median(latencies),
        f"{prefix}p95": latencies[int(len(latencies) * 0.95)],
        f"{prefix}max": latencies[-1],
    }


def accounts(clients: int):
    from django.contrib.auth.models import Group, Permission, User

    Group.objects.create(name="staff")
    manager = User.objects.create_superuser("bench", password=PASSWORD)
    allowed = Permission.objects.filter(
        codename__in=["upload_files", "view_files", "change_group"]
    )
    people = []
    for number in range(clients):
        person = User.objects.create_user(f"person{number}", password=PASSWORD, is_staff=True)
        person.user_permissions.set(allowed)
        people.append((person.username, Group.objects.create(name=f"team{number}").pk))
    return manager, people


def storage():
    from datacenter.models import current_datacenter

    return current_datacenter()


def users_file(datacenter, rows: int, prefix: str) -> str:
    """ROWS accounts, one in a hundred with an address that is refused."""
    name = f"{prefix}.csv"
    with open(os.path.join(datacenter.storage, name), "w") as handle:
        handle.write("username,email,first_name,groups\n")
        for n in range(rows):
            email = "not-an-address" if n % 100 == 7 else f"{prefix}{n}@example.org"
            handle.write(f"{prefix}{n:07d},{email},First{n},staff\n")
    return name


def one_transaction(datacenter, rows: int) -> float:
    from django.db import transaction

    from datacenter.processing import process_file

    name = users_file(datacenter, rows, "a")
    started = time.perf_counter()
    with transaction.atomic():
        process_file(datacenter, name, "users", "create")
    return time.perf_counter() - started


class Worker:
    """The task worker of the data center's jobs, as a process of its own."""

    process = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "manage.py", "task_worker", "--no-reload"]
            + ["--queue-name", "datacenter"],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()


def job(datacenter, manager, rows, prefix, worker, kill_at=0) -> tuple[float, str]:
    """Seconds from the job's start to its end, and a digest of its outputs (the prefix of
    the names taken out, so that two runs compare)."""
    from datacenter import jobs
    from datacenter.models import Job

    name = users_file(datacenter, rows, prefix)
    job = jobs.start_processing(
        name=name, processor="users", mode="create", dry_run=False, user=manager
    )
    while kill_at:
        if Job.objects.get(pk=job.pk).done >= kill_at:
            worker.stop()
            worker.start()
            break
        time.sleep(0.05)
    while True:
        job.refresh_from_db()
        if not job.in_progress:
            break
        time.sleep(0.2)
    assert job.status == Job.SUCCESS, job.error
    assert not kill_at or job.result["resumed"], "the job was not resumed"
    digest = hashlib.sha256()
    for path in (
        os.path.join(datacenter.finished_path, f"{prefix}.create.finished.csv"),
        os.path.join(datacenter.storage, f"{prefix}.create.pending.csv"),
    ):
        with open(path, "rb") as handle:
            digest.update(handle.read().replace(prefix.encode(), b"X"))
    return (job.finished - job.started).total_seconds(), digest.hexdigest()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


#: What each person does, one action a second, over and over: a login every ten seconds
#: (each hashes a password on purpose, which takes a core for a good part of a second).
ACTIONS = [
    "upload",
    "save",
    "upload",
    "save",
    "upload",
    "save",
    "upload",
    "save",
    "upload",
    "login",
]


class Load:
    """People using the site: each, once a second, uploads a file, saves a group in the
    admin or logs in (ACTIONS); the latency of every such write is kept, by phase and kind."""

    def __init__(self, url: str, people: list[tuple[str, int]]):
        self.url, self.people = url, people
        self.phase = "start"
        self.latencies: dict[tuple[str, str], list[float]] = {}
        self.errors: dict[str, list[str]] = {}
        self.stopping = threading.Event()
        self.paused = threading.Event()
        self.threads = [
            threading.Thread(target=self.person, args=(number, person), daemon=True)
            for number, person in enumerate(people)
        ]

    def start(self) -> None:
        import requests

        deadline = time.monotonic() + 60
        while True:
            try:
                requests.get(self.url + "/healthz", timeout=2)
                break
            except requests.RequestException:
                if time.monotonic() > deadline:
                    raise SystemExit("gunicorn did not start") from None
                time.sleep(0.2)
        for thread in self.threads:
            thread.start()

    def stop(self) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join()

    def summary(self, phase: str) -> dict:
        """Errors, writes and p50/p95/max latency in seconds by kind (and "all") of the
        writes begun in `phase`."""
        by_action = {
            action: sorted(times)
            for (their_phase, action), times in self.latencies.items()
            if their_phase == phase
        }
        by_action["all"] = sorted(sum(by_action.values(), []))
        errors = self.errors.get(phase, [])
        return {
            "errors": len(errors),
            "error_examples": sorted(set(errors))[:5],
            "writes": len(by_action["all"]) + len(errors),
            "latency": {
                action: [statistics.median(times), times[int(len(times) * 0.95)], times[-1]]
                for action, times in by_action.items()
                if times
            },
        }

    def person(self, number: int, person: tuple[str, int]) -> None:
        import requests

        username, group = person
        session = requests.Session()
        # Not all at the same moment, as people are.
        self.stopping.wait(number / len(self.people))
        self.write(
            session, "login", "/accounts/login/", {"username": username, "password": PASSWORD}
        )
        step = number
        while not self.stopping.wait(1):
            if self.paused.is_set():
                continue
            step += 1
            action = ACTIONS[step % len(ACTIONS)]
            if action == "upload":
                content = b"username,email\nx,x@example.org\n"
                files = {"file": (f"{username}-{step}.csv", content)}
                self.write(session, action, "/datacenter/upload/", {}, files)
            elif action == "save":
                path = f"/admin/auth/group/{group}/change/"
                self.write(session, action, path, {"name": f"team-{username}-{step}"})
            else:
                data = {"username": username, "password": PASSWORD}
                self.write(session, action, "/accounts/login/", data)

    def write(self, session, action: str, path: str, data: dict, files=None) -> None:
        import requests

        phase, url = self.phase, self.url + path
        try:
            if "csrftoken" not in session.cookies:
                session.get(url, timeout=60)
            data = {**data, "csrfmiddlewaretoken": session.cookies.get("csrftoken", "")}
            started = time.perf_counter()
            response = session.post(url, data=data, files=files, allow_redirects=False, timeout=60)
            elapsed = time.perf_counter() - started
        except requests.RequestException as exc:
            self.errors.setdefault(phase, []).append(f"{action}: {type(exc).__name__}")
            return
        if response.status_code != 302:
            self.errors.setdefault(phase, []).append(f"{action}: HTTP {response.status_code}")
        else:
            self.latencies.setdefault((phase, action), []).append(elapsed)


if __name__ == "__main__":
    main()
