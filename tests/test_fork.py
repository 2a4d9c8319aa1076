"""Fork: a child never does I/O on what it inherited (issue 9, item 1).

Every test forks a real child (``multiprocessing`` with the "fork" start
method, or ``os.fork()`` as gunicorn ``--preload`` does) against real
PostgreSQL, and checks the parent's transaction and connection afterwards.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
import typing as t

import pytest
import sqlalchemy
from sqlalchemy import text
from sqlalchemy.orm import sessionmaker

import scoping
import scoping.fork
from scoping.scopes import STRATEGY_NAMES

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")


def _table(engine: sqlalchemy.Engine, name: str) -> None:
    with engine.begin() as conn:
        conn.execute(text(f"DROP TABLE IF EXISTS {name}"))
        conn.execute(text(f"CREATE TABLE {name} (id int)"))


def _rows(engine: sqlalchemy.Engine, name: str) -> int:
    with engine.connect() as conn:
        return int(conn.execute(text(f"select count(*) from {name}")).scalar_one())


def test_freeing_an_inherited_psycopg2_connection_spares_the_parent(pg_url: str) -> None:
    """Measured (docs/cleanup.md): psycopg2 2.9 sends no Terminate from a forked child.

    psycopg2 remembers the pid that opened a connection and skips
    ``PQfinish`` when it is freed in another process, so merely dropping an
    inherited connection is harmless; ROLLBACK from ``close()`` is not, and
    other drivers may not check: scoping quarantines them anyway.
    """
    import gc

    import psycopg2

    dsn = sqlalchemy.engine.make_url(pg_url).render_as_string(hide_password=False)
    dsn = dsn.replace("postgresql+psycopg2://", "postgresql://")
    conn = psycopg2.connect(dsn)
    cur = conn.cursor()
    cur.execute("select 1")
    pid = os.fork()
    if pid == 0:  # child: drop the last reference, then leave without cleanup
        del cur, conn
        gc.collect()
        os._exit(0)
    os.waitpid(pid, 0)
    cur.execute("select 1")  # the parent's backend is still there
    assert cur.fetchone() == (1,)
    conn.close()


def _child_uses_registry(S: t.Any, strategy: str, table: str) -> None:
    scope = S.scope("child") if strategy == "token" else S.scope()
    with scope:
        S.execute(text(f"INSERT INTO {table} VALUES (2)"))
        S.commit()


@pytest.mark.parametrize("strategy", STRATEGY_NAMES)
def test_forked_child_never_touches_the_parents_transaction(
    strategy: str, pg_engine: sqlalchemy.Engine
) -> None:
    table = f"fork_{strategy}"
    _table(pg_engine, table)
    S = scoping.scoped_session(sessionmaker(bind=pg_engine), scope=strategy)
    flushed, forked, result = threading.Event(), threading.Event(), []

    def parent_thread() -> None:
        scope = S.scope("parent") if strategy == "token" else S.scope()
        with scope:
            S.execute(text(f"INSERT INTO {table} VALUES (1)"))
            flushed.set()
            forked.wait(30)
            S.commit()
            result.append("committed")

    th = threading.Thread(target=parent_thread)
    th.start()
    assert flushed.wait(30)
    ctx = multiprocessing.get_context("fork")
    child = ctx.Process(target=_child_uses_registry, args=(S, strategy, table))
    child.start()
    child.join(60)
    forked.set()
    th.join(30)
    assert child.exitcode == 0
    assert result == ["committed"]
    assert _rows(pg_engine, table) == 2  # the parent's row survived, the child's too
    assert scoping.fork.forked_at() is None  # the parent was not forked


def test_preloaded_engine_gets_a_fresh_pool_in_the_child(pg_engine: sqlalchemy.Engine) -> None:
    """gunicorn --preload: warm-up query in the parent, the worker uses the registry."""
    S = scoping.scoped_session(sessionmaker(bind=pg_engine))
    parent_pid = S.execute(text("select pg_backend_pid()")).scalar_one()
    S.remove()  # back to the pool: the child inherits an idle pooled connection
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            assert scoping.fork.forked_at() is not None
            assert len(S.registry) == 0
            child_pid = S.execute(text("select pg_backend_pid()")).scalar_one()
            S.remove()
            os.write(write, str(child_pid).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    _, status = os.waitpid(pid, 0)
    child_pid = int(os.read(read, 64) or b"0")
    os.close(read)
    assert status == 0
    assert child_pid not in (0, parent_pid)  # a connection of its own
    # The parent's pooled connection was neither used nor terminated by the child.
    assert S.execute(text("select pg_backend_pid()")).scalar_one() == parent_pid
    S.remove()


def test_dispose_engines_quarantines_and_replaces_the_pool(pg_engine: sqlalchemy.Engine) -> None:
    S = scoping.scoped_session(sessionmaker(binds={object: pg_engine}))
    old_pool = pg_engine.pool
    S.dispose_engines()
    assert pg_engine.pool is not old_pool
    assert old_pool in scoping.fork.quarantine
    scoping.fork.quarantine.remove(old_pool)
    old_pool.dispose()
