"""Locust load for the ``stress.http`` app: the same file runs locally and distributed.

Local (what ``python -m stress.http`` does, one variant at a time)::

    locust -f stress/http/locustfile.py --headless -u 100 -r 100 -t 10s \\
        --host http://127.0.0.1:8000

Past one machine, run it unchanged as a master and workers::

    locust -f stress/http/locustfile.py --master --headless -u 2000 -r 200 -t 5m \\
        --expect-workers 4 --host http://app:8000
    locust -f stress/http/locustfile.py --worker --master-host master   # on each machine

Every request gets a fresh client-chosen id. When ``STRESS_HTTP_JOURNAL`` names
a file prefix, each Locust process writes its journal there at the end (one
JSON line per request: start time, operation, id, HTTP status and end time, or
nulls when it never got an answer), and the harness audits the database against it.
``STRESS_HTTP_WEIGHTS`` (``op=weight,...``) changes the mix; ``kill`` is off
by default.
"""

from __future__ import annotations

import json
import os
import random
import time
import typing as t
import uuid

from locust import FastHttpUser, between, events, task

#: (operation, expected status): anything else is a failure in Locust's stats.
EXPECTED = {"create": 201, "read": 200, "slow": 200, "fail": 500, "timeout": 504, "kill": 200}
DEFAULT_WEIGHTS = {"create": 10, "read": 6, "slow": 2, "fail": 1, "timeout": 1, "kill": 0}

#: One entry per request: [start, op, id, status, end]; status and end stay None until
#: the answer arrives.
JOURNAL: list[list[t.Any]] = []


def _weights() -> dict[str, int]:
    weights = dict(DEFAULT_WEIGHTS)
    for part in filter(None, os.environ.get("STRESS_HTTP_WEIGHTS", "").split(",")):
        op, _, value = part.partition("=")
        if op not in weights or not value.isdigit():
            raise SystemExit(
                f"STRESS_HTTP_WEIGHTS: bad entry {part!r}; use op=int with op in "
                f"{', '.join(weights)}"
            )
        weights[op] = int(value)
    return weights


WEIGHTS = _weights()


class AppUser(FastHttpUser):
    """One client: writes under fresh ids, reads its own acknowledged writes back."""

    wait_time = between(0.0, 0.02)
    network_timeout = 10.0
    connection_timeout = 5.0

    def on_start(self) -> None:
        self.acked: list[str] = []

    def _call(self, op: str, method: str, path: str, name: str, rid: str) -> int | None:
        entry: list[t.Any] = [time.time(), op, rid, None, None]
        JOURNAL.append(entry)
        with self.client.request(method, path, name=name, catch_response=True) as response:
            status = int(response.status_code or 0)
            entry[3] = status
            entry[4] = time.time()
            if status == EXPECTED[op]:
                response.success()
            else:
                response.failure(f"{op}: HTTP {status} (expected {EXPECTED[op]})")
        return status

    @task(WEIGHTS["create"])
    def create(self) -> None:
        rid = uuid.uuid4().hex
        if self._call("create", "POST", f"/items/{rid}", "/items/[id] POST", rid) == 201:
            self.acked.append(rid)

    @task(WEIGHTS["read"])
    def read(self) -> None:
        if not self.acked:
            return
        rid = random.choice(self.acked)
        self._call("read", "GET", f"/items/{rid}", "/items/[id] GET", rid)

    @task(WEIGHTS["slow"])
    def slow(self) -> None:
        self._call("slow", "GET", "/slow", "/slow", "")

    @task(WEIGHTS["fail"])
    def fail(self) -> None:
        rid = uuid.uuid4().hex
        self._call("fail", "POST", f"/fail/{rid}", "/fail/[id]", rid)

    @task(WEIGHTS["timeout"])
    def timeout(self) -> None:
        rid = uuid.uuid4().hex
        self._call("timeout", "POST", f"/timeout/{rid}", "/timeout/[id]", rid)

    @task(WEIGHTS["kill"])
    def kill(self) -> None:
        rid = uuid.uuid4().hex
        self._call("kill", "POST", f"/kill/{rid}", "/kill/[id]", rid)


def _write_journal(environment: t.Any, **_kw: t.Any) -> None:
    prefix = os.environ.get("STRESS_HTTP_JOURNAL")
    if not prefix or not JOURNAL:
        return
    path = f"{prefix}.{os.getpid()}.jsonl"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(entry) + "\n" for entry in JOURNAL)


t.cast("t.Any", events.quitting).add_listener(_write_journal)
