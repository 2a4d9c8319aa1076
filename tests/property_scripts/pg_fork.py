"""A forked child uses the registry while the parent has open transactions (PostgreSQL).

A smaller property than ``programs.py``, on a real server: units (threads, or raw
greenlets of one thread) each flush INSERTs in their Session and keep the transaction
open; one of them, or the main thread, forks; the child makes its own Session, writes and
commits a row, leaves a thread that forgets ``remove()``, runs ``collect()`` and exits.
Then every parent unit commits. Nothing the parent flushed may be lost (a child that
closes an inherited Session sends ROLLBACK on the parent's socket, and the parent's
``commit()`` then returns normally with its rows gone), and the child's row must be there.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
import traceback
import typing as t

import greenlet
from sqlalchemy import create_engine, text
from sqlalchemy.orm import sessionmaker

import scoping


class ForkPlan(t.NamedTuple):
    strategy: str
    runtime: str  # "threads" or "greenlets"
    flushes: tuple[int, ...]  # rows each unit flushes before the fork (0: no Session yet)
    forker: int  # index of the unit that forks, or -1 for the main thread
    child_thread: bool  # the child also runs a thread that forgets remove()
    use_block: bool  # units work inside Session.scope() (always, for the token strategy)


def _child(S: t.Any, table: str, plan: ForkPlan, report: int) -> None:
    problems: list[str] = []
    try:
        with S.scope("child") if plan.strategy == "token" else S.scope():
            S.execute(text(f"INSERT INTO {table} (tag) VALUES ('child')"))
            S.commit()
        if plan.child_thread:

            def forgetful() -> None:
                with S.scope("child-thread") if plan.strategy == "token" else _nothing():
                    S.execute(text("SELECT 1"))
                    S.commit()

            th = threading.Thread(target=forgetful)
            th.start()
            th.join()
        S.registry.collect()
    except BaseException:
        problems.append(traceback.format_exc())
    data = json.dumps(problems).encode()
    while data:
        data = data[os.write(report, data) :]


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _fork(S: t.Any, table: str, plan: ForkPlan) -> list[str]:
    with tempfile.TemporaryFile() as report:
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                _child(S, table, plan, report.fileno())
            except BaseException:
                code = 1
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        report.seek(0)
        raw = report.read()
    if status != 0 or not raw:
        return [f"the child exited with status {status}"]
    return [f"child: {p}" for p in json.loads(raw)]


def run_plan(url: str, plan: ForkPlan) -> None:
    """Run one plan; raise AssertionError naming what was lost."""
    table = f"h3_fork_{plan.strategy}"
    engine = create_engine(url, pool_size=len(plan.flushes) + 2, max_overflow=0, pool_timeout=20)
    try:
        with engine.begin() as conn:
            conn.execute(text(f"DROP TABLE IF EXISTS {table}"))
            conn.execute(text(f"CREATE TABLE {table} (id serial primary key, tag text)"))
        S = scoping.scoped_session(sessionmaker(bind=engine), scope=plan.strategy)
        problems = _run(S, table, plan)
        with engine.connect() as conn:
            rows = dict(conn.execute(text(f"SELECT tag, count(*) FROM {table} GROUP BY tag")).all())
            conn.execute(text(f"DROP TABLE {table}"))
            conn.commit()
        expected = {f"u{i}": n for i, n in enumerate(plan.flushes) if n}
        expected["child"] = 1
        if rows != expected:
            problems.append(f"rows by tag after every commit: {rows}, expected {expected}")
        if len(S.registry):
            problems.append(f"the parent's registry holds {len(S.registry)} Sessions at the end")
        if engine.pool.checkedout():  # type: ignore[attr-defined]
            problems.append(f"{engine.pool.checkedout()} connections still checked out")  # type: ignore[attr-defined]
        assert not problems, f"{plan}:\n" + "\n".join(problems)
    finally:
        engine.dispose()


def _run(S: t.Any, table: str, plan: ForkPlan) -> list[str]:
    run = _ParentRun(S, table, plan)
    if plan.runtime == "threads":
        run.drive_threads()
    else:
        run.drive_greenlets()
    return run.problems


class _ParentRun:
    """The parent's units, in threads or in raw greenlets of this thread."""

    def __init__(self, S: t.Any, table: str, plan: ForkPlan) -> None:
        self.S = S
        self.table = table
        self.plan = plan
        self.problems: list[str] = []
        self.flushed = [threading.Event() for _ in plan.flushes]

    def unit(self, i: int, pause: t.Callable[[], None]) -> None:
        try:
            self._unit(i, pause)
        except BaseException:
            self.problems.append(f"u{i}: {traceback.format_exc()}")
            self.flushed[i].set()

    def _unit(self, i: int, pause: t.Callable[[], None]) -> None:
        """Flush, wait, (fork,) commit."""
        S, plan = self.S, self.plan
        token = f"u{i}"
        block: t.Any = _nothing()
        if plan.strategy == "token":
            block = S.scope(token)
        elif plan.use_block:
            block = S.scope()
        with block:
            for _ in range(plan.flushes[i]):
                S.execute(text(f"INSERT INTO {self.table} (tag) VALUES (:tag)"), {"tag": token})
            S.flush()
            self.flushed[i].set()
            pause()
            if plan.forker == i:
                self.problems.extend(_fork(S, self.table, plan))
                pause()
            S.commit()
        if isinstance(block, _nothing):
            S.remove()

    def drive_threads(self) -> None:
        go = threading.Event()

        def wait_go() -> None:
            go.wait(30)

        threads = [
            threading.Thread(target=self.unit, args=(i, wait_go)) for i in range(len(self.flushed))
        ]
        for th in threads:
            th.start()
        for ev in self.flushed:
            ev.wait(30)
        if self.plan.forker < 0:
            self.problems.extend(_fork(self.S, self.table, self.plan))
        go.set()
        for th in threads:
            th.join(30)

    def drive_greenlets(self) -> None:
        main = greenlet.getcurrent()

        def to_main() -> None:
            main.switch()

        glets = [
            greenlet.greenlet(lambda i=i: self.unit(i, to_main)) for i in range(len(self.flushed))
        ]
        for g in glets:
            g.switch()  # flush, then come back
        if self.plan.forker < 0:
            self.problems.extend(_fork(self.S, self.table, self.plan))
        for _ in range(2):
            for g in glets:
                if not g.dead:
                    g.switch()
        if not all(g.dead for g in glets):
            self.problems.append("a unit did not finish")
        self.S.registry.collect()
