"""Run the app under a real ``gunicorn -k gevent`` and read what its log says."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import typing as t
import urllib.error
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CONF_TEMPLATE = """\
# Written by stress.http for one variant (0600, in a 0700 directory).
bind = {bind!r}
workers = {workers}
worker_class = "gevent"
worker_connections = 1000
preload_app = {preload}
timeout = {timeout}
graceful_timeout = 3
wsgi_app = "stress.http.app:app"
errorlog = "-"
loglevel = "info"
from stress.http.hooks import post_fork, post_worker_init  # noqa: E402,F401
"""


def write_private(path: str, text: str) -> None:
    """Create ``path`` with mode 0600 (never readable by other users, even briefly)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Gunicorn:
    """One gunicorn master with gevent workers, its log in ``<workdir>/gunicorn.log``."""

    def __init__(
        self,
        workdir: str,
        config: dict[str, t.Any],
        *,
        preload: bool,
        workers: int = 2,
        timeout: int = 5,
    ) -> None:
        self.workdir = workdir
        self.workers = workers
        self.port = free_port()
        self.config_path = os.path.join(workdir, "app-config.json")
        self.conf_path = os.path.join(workdir, "gunicorn.conf.py")
        self.log_path = os.path.join(workdir, "gunicorn.log")
        write_private(self.config_path, json.dumps(config))
        write_private(
            self.conf_path,
            CONF_TEMPLATE.format(
                bind=f"127.0.0.1:{self.port}", workers=workers, preload=preload, timeout=timeout
            ),
        )
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in ("SCOPING_DSN", "PGPASSWORD")}
        env["STRESS_HTTP_CONFIG"] = self.config_path  # a path, not a secret
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
        env["XDG_RUNTIME_DIR"] = self.workdir  # gunicorn 27's control socket stays private
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def start(self, ready_timeout: float = 60.0) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gunicorn", "-c", self.conf_path],
                cwd=self.workdir,
                env=self.env(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + ready_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"gunicorn exited with {self.proc.returncode}: {self.log_tail()}"
                )
            if self.booted() >= self.workers and self._answers():
                return
            time.sleep(0.1)
        raise RuntimeError(f"gunicorn not ready within {ready_timeout:.0f} s: {self.log_tail()}")

    def _answers(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/items/-", timeout=2) as response:
                return response.status in (200, 404)
        except urllib.error.HTTPError as exc:
            return exc.code == 404
        except OSError:
            return False

    def log(self) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as fh:
                return fh.read()
        except OSError:
            return ""

    def log_tail(self, lines: int = 8) -> str:
        return " | ".join(self.log().strip().splitlines()[-lines:])

    def booted(self) -> int:
        """Workers that ran post_worker_init."""
        return self.log().count("stress-http doctor pid=")

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


_EXC_RE = re.compile(r"^(?:[\w.]+\.)?(\w+(?:Error|Exception|Timeout|Exit))(?::|$)", re.M)


def read_log(text: str, workers: int) -> dict[str, t.Any]:
    """Worker timeouts, restarts, doctor hazards and exception classes from a gunicorn log."""
    exceptions: dict[str, int] = {}
    # The /fail route raises on purpose; only the other exceptions tell anything.
    text_wo_purpose = "\n".join(line for line in text.splitlines() if "on purpose" not in line)
    for name in _EXC_RE.findall(text_wo_purpose):
        exceptions[name] = exceptions.get(name, 0) + 1
    doctor = sorted(
        {codes for codes in re.findall(r"stress-http doctor pid=\d+ hazards=(\S+)", text)}
    )
    booted = text.count("Booting worker with pid")
    return {
        "worker_timeouts": text.count("WORKER TIMEOUT"),
        "worker_restarts": max(0, booted - workers),
        "doctor_hazards": sorted({c for codes in doctor for c in codes.split(",") if c != "-"}),
        "exceptions": dict(sorted(exceptions.items(), key=lambda kv: -kv[1])),
    }
