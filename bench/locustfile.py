"""The users of bench/load.py: staff who log in once and then browse the main pages."""

import os
import random

from locust import HttpUser, between, task

PAGES = int(os.environ.get("BENCH_PAGES", "400"))
# Sessions of the one staff account, made by bench/load.py: the users are logged in already
# (a login hashes a password on purpose, which is not what this measures).
SESSIONS = iter(os.environ["BENCH_SESSIONS"].split(","))


class Staff(HttpUser):
    wait_time = between(0.5, 1.5)

    def on_start(self):
        self.client.cookies.set("sessionid", next(SESSIONS))

    @task(4)
    def pending(self):
        sort = random.choice(["name", "date"])
        self.client.get(
            f"/datacenter/?sort={sort}&page={random.randint(1, PAGES)}", name="pending"
        )

    @task(2)
    def finished(self):
        self.client.get(f"/datacenter/finished/?page={random.randint(1, PAGES)}", name="finished")

    @task(1)
    def imports(self):
        self.client.get("/imports/", name="imports")

    @task(1)
    def runs(self):
        self.client.get("/imports/runs/", name="runs")
