"""Run one cell in its own subprocess and watch it from outside.

A Session shared by greenlets on psycopg2 can deadlock the OS thread inside
libpq; then no timer in that process ever fires. So the watcher lives in
another process: it reads the cell's progress events, and when the cell makes
no progress for ``stall`` seconds (or passes its ``deadline``) it takes the
stack of the stuck process (``py-spy dump`` if installed, else faulthandler
through SIGUSR1), kills it and reports a hang. The harness itself never waits
on the cell without a timeout.
"""

from __future__ import annotations

import dataclasses
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import typing as t

from .detectors import Probe, Record

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass
class CellRun:
    records: list[Record]
    probe: Probe | None
    hang: bool = False
    hang_reason: str = ""
    stack: str = ""
    returncode: int | None = None
    stderr_tail: str = ""
    driver: str | None = None
    wall: float = 0.0


def _py_spy() -> str | None:
    found = shutil.which("py-spy")
    if found:
        return found
    candidate = os.path.join(os.path.dirname(sys.executable), "py-spy")
    return candidate if os.path.exists(candidate) else None


def capture_stack(pid: int, stderr_path: str) -> str:
    """The stack of a stuck process: py-spy if it works, else faulthandler (SIGUSR1)."""
    spy = _py_spy()
    if spy:
        try:
            out = subprocess.run(
                [spy, "dump", "--pid", str(pid)],
                capture_output=True,
                text=True,
                timeout=15,
            )
            if out.returncode == 0 and out.stdout.strip():
                return "py-spy dump:\n" + out.stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            pass
    try:
        size = os.path.getsize(stderr_path)
        os.kill(pid, signal.SIGUSR1)
        time.sleep(0.5)
        with open(stderr_path, encoding="utf-8", errors="replace") as f:
            f.seek(size)
            dumped = f.read().strip()
        return "faulthandler:\n" + dumped if dumped else "no stack: faulthandler wrote nothing"
    except OSError as exc:
        return f"no stack: {exc}"


def _tail(path: str, lines: int = 15) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return "\n".join(f.read().strip().splitlines()[-lines:])
    except OSError:
        return ""


def run_cell(
    config: dict[str, t.Any],
    *,
    stall: float,
    deadline: float,
    on_progress: t.Callable[[int], None] = lambda n: None,
    command: list[str] | None = None,
) -> CellRun:
    """Run ``python -m stress.worker CONFIG`` and collect its events, hang or not.

    ``command`` replaces the worker command line (tests feed it a process that
    hangs on purpose).
    """
    fd, stderr_path = tempfile.mkstemp(prefix="stress-cell-", suffix=".err")
    os.close(fd)
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("PYTHONWARNINGS", "ignore")
    run = CellRun(records=[], probe=None)
    start = time.monotonic()
    with open(stderr_path, "wb") as err:
        proc = subprocess.Popen(
            command or [sys.executable, "-m", "stress.worker", json.dumps(config)],
            stdout=subprocess.PIPE,
            stderr=err,
            cwd=ROOT,
            env=env,
        )
    events: queue.Queue[dict[str, t.Any] | None] = queue.Queue()

    def reader() -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            try:
                events.put(json.loads(raw))
            except ValueError:
                pass
        events.put(None)

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    last = time.monotonic()
    ready = False
    eof = False
    try:
        while True:
            try:
                ev = events.get(timeout=0.1)
            except queue.Empty:
                ev = None
                now = time.monotonic()
                if eof or (proc.poll() is not None and not thread.is_alive()):
                    break
                # Start-up (imports, patching, connecting) counts against the
                # deadline only; the stall clock starts once the cell is ready.
                if ready and now - last > stall:
                    run.hang, run.hang_reason = True, f"no request finished for {stall:g} s"
                    break
                if now - start > deadline:
                    run.hang, run.hang_reason = True, f"cell passed its {deadline:g} s deadline"
                    break
                continue
            if ev is None:
                eof = True
                continue
            last = time.monotonic()
            kind = ev.pop("ev", None)
            if kind == "ready":
                ready = True
                run.driver = ev.get("driver")
            elif kind == "req":
                run.records.append(Record.from_json(ev))
                on_progress(len(run.records))
            elif kind == "done":
                run.probe = Probe(**ev["probe"])
        if run.hang and proc.poll() is None:
            run.stack = capture_stack(proc.pid, stderr_path)
    finally:
        if proc.poll() is None:
            proc.kill()
        try:
            run.returncode = proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            run.returncode = None
        thread.join(timeout=2)
        if proc.stdout is not None:
            proc.stdout.close()
        run.stderr_tail = _tail(stderr_path)
        try:
            os.unlink(stderr_path)
        except OSError:
            pass
    run.wall = time.monotonic() - start
    return run
