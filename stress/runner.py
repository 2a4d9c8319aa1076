"""Run one cell in its own subprocess and watch it from outside.

A Session shared by greenlets on psycopg2 can deadlock the OS thread inside
libpq; then no timer in that process ever fires. So the watcher lives in
another process: it reads the cell's progress events, and when the cell makes
no progress for ``stall`` seconds (or passes its ``deadline``) it takes the
stack of the stuck process (``py-spy dump`` if installed, else faulthandler
through SIGUSR1), kills it and reports a hang. The harness itself never waits
on the cell without a timeout, and the deadline holds whatever the cell emits.

Nothing is written to disk: the configuration goes to the cell on stdin, its
stderr is read through a pipe and only its tail is kept.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
import typing as t

from .childproc import ROOT, child_env
from .detectors import Probe, Record


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
    notes: dict[str, t.Any] = dataclasses.field(default_factory=dict)
    started: float = 0.0  # time.monotonic() when the cell was started


def _py_spy() -> str | None:
    found = shutil.which("py-spy")
    if found:
        return found
    candidate = os.path.join(os.path.dirname(sys.executable), "py-spy")
    return candidate if os.path.exists(candidate) else None


class _Stderr:
    """The cell's stderr, drained by a thread; keeps its tail in memory (no temp file)."""

    def __init__(self, stream: t.IO[bytes]) -> None:
        self.stream = stream
        self.chunks: collections.deque[bytes] = collections.deque(maxlen=64)
        self.total = 0
        self.thread = threading.Thread(target=self._drain, daemon=True)
        self.thread.start()

    def _drain(self) -> None:
        for chunk in iter(lambda: self.stream.read1(65536), b""):  # type: ignore[attr-defined]
            self.chunks.append(chunk)
            self.total += len(chunk)

    def since(self, mark: int) -> str:
        """What arrived after ``mark`` bytes (as far as the kept tail reaches)."""
        data = b"".join(self.chunks)
        keep = self.total - mark
        return data[-keep:].decode("utf-8", "replace") if keep > 0 else ""

    def tail(self, lines: int = 15) -> str:
        text = b"".join(self.chunks).decode("utf-8", "replace")
        return "\n".join(text.strip().splitlines()[-lines:])


def capture_stack(pid: int, stderr: _Stderr) -> str:
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
        mark = stderr.total
        os.kill(pid, signal.SIGUSR1)
        time.sleep(0.5)
        dumped = stderr.since(mark).strip()
        return "faulthandler:\n" + dumped if dumped else "no stack: faulthandler wrote nothing"
    except OSError as exc:
        return f"no stack: {exc}"


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """Kill the cell and anything it forked (it leads its own process group)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except OSError:
        pass


def _watch(
    run: CellRun,
    events: queue.Queue[dict[str, t.Any] | None],
    *,
    stall: float,
    deadline: float,
    on_progress: t.Callable[[int], None],
) -> None:
    """Read events until the cell ends, stalls or passes its wall-clock deadline.

    The deadline is checked on every turn, whatever the cell emits: a cell that
    keeps reporting requests forever is stopped as surely as a silent one.
    """
    last = time.monotonic()
    ready = False
    while True:
        now = time.monotonic()
        if now - run.started > deadline:
            run.hang, run.hang_reason = True, f"cell passed its {deadline:g} s deadline"
            return
        # Start-up (imports, patching, connecting) counts against the deadline
        # only; the stall clock starts once the cell is ready.
        if ready and now - last > stall:
            run.hang, run.hang_reason = True, f"no request finished for {stall:g} s"
            return
        try:
            ev = events.get(timeout=0.1)
        except queue.Empty:
            continue
        if ev is None:
            return
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
            run.notes = ev.get("notes") or {}


def run_cell(
    config: dict[str, t.Any],
    *,
    stall: float,
    deadline: float,
    on_progress: t.Callable[[int], None] = lambda n: None,
    command: list[str] | None = None,
) -> CellRun:
    """Run ``python -m stress.worker`` with ``config`` on its stdin; collect its events.

    The configuration (its URL may hold a password) goes over stdin, never argv.
    ``command`` replaces the worker command line (tests feed it a process that
    hangs on purpose). The cell leads its own process group, so a cell that
    forked is killed with its children.
    """
    env = child_env({"PYTHONUNBUFFERED": "1"})
    env.setdefault("PYTHONWARNINGS", "ignore")
    run = CellRun(records=[], probe=None, started=time.monotonic())
    proc = subprocess.Popen(
        command or [sys.executable, "-m", "stress.worker"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
        env=env,
        start_new_session=True,
    )
    assert proc.stdin is not None
    assert proc.stdout is not None
    assert proc.stderr is not None
    try:
        proc.stdin.write(json.dumps(config).encode() + b"\n")
        proc.stdin.close()
    except OSError:
        pass  # the cell died at once: its stderr says why
    stderr = _Stderr(proc.stderr)
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
    try:
        _watch(run, events, stall=stall, deadline=deadline, on_progress=on_progress)
        if run.hang and proc.poll() is None:
            run.stack = capture_stack(proc.pid, stderr)
    finally:
        _kill_group(proc)
        try:
            run.returncode = proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            run.returncode = None
        thread.join(timeout=2)
        stderr.thread.join(timeout=2)
        proc.stdout.close()
        proc.stderr.close()
        run.stderr_tail = stderr.tail()
    run.wall = time.monotonic() - run.started
    return run
