"""Every strategy under real gevent, against PostgreSQL, in both import orders.

Each case runs in a fresh interpreter (gevent is never patched in pytest's); the
children of the default tests run side by side (fixture ``children``).
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import typing as t

import pytest

from scoping.scopes import STRATEGY_NAMES
from tests._subproc import Background, ChildRuns, run_python, selected_tests

if t.TYPE_CHECKING:
    from collections.abc import Callable, Iterator

pytestmark = [pytest.mark.gevent]

SCRIPTS = os.path.join(os.path.dirname(__file__), "scripts")
GREENLETS = 220


def run_script(name: str, *args: object, url: str, timeout: float = 240) -> dict[str, object]:
    code = (
        f"import runpy, sys; sys.argv = [{name!r}, *sys.argv[1:]]; "
        f"runpy.run_path({os.path.join(SCRIPTS, name)!r}, run_name='__main__')"
    )
    result = run_python(
        code, env={"SCOPING_TEST_URL": url}, timeout=timeout, args=[str(a) for a in args]
    )
    assert isinstance(result, dict)
    return result


ORDERS = ("registry-first", "patch-first")


def isolation_child(order: str, url: str) -> dict[str, object]:
    return run_script("gevent_isolation.py", order, GREENLETS, url=url)


#: The children of the default tests but the PostgreSQL ones: name -> (test, run).
#: The children of the tests that need no server, run side by side with the
#: PostgreSQL runs (fixture ``children``).
CHILD_RUNS: ChildRuns[Callable[[], t.Any]] = ChildRuns()


@pytest.fixture(scope="module")
def children(request: pytest.FixtureRequest) -> Iterator[Background[object, t.Any]]:
    """Every selected test's child, started at once; each test waits for its own.

    The PostgreSQL runs (keyed by import order) join when a server is there; their
    tests ask for ``pg_url`` themselves, so they skip (or fail) without one as before.
    """
    selected = selected_tests(request)
    jobs: dict[object, Callable[[], t.Any]] = {}
    if "test_concurrent_greenlets_are_isolated" in selected:
        try:
            url = request.getfixturevalue("pg_url")
        except (pytest.skip.Exception, pytest.fail.Exception):
            pass  # reported by the PostgreSQL tests themselves
        else:
            jobs.update({order: functools.partial(isolation_child, order, url) for order in ORDERS})
    jobs.update(CHILD_RUNS.by_name)
    wanted = {run.__name__ for run in CHILD_RUNS.wanted(selected)}
    start = [key for key in jobs if key in ORDERS or key in wanted]
    with Background(jobs, start=start) as background:
        yield background


@pytest.mark.postgres
@pytest.mark.parametrize("order", ORDERS)
def test_concurrent_greenlets_are_isolated(
    order: str, pg_url: str, children: Background[object, t.Any]
) -> None:
    """Every strategy, one after another in one gevent child per import order."""
    results = children.result(order)
    assert sorted(results) == sorted(STRATEGY_NAMES)
    expected = {
        "errors": [],
        "error_count": 0,
        "foreign": 0,
        "stale": 0,
        "tags": GREENLETS,
        "bad_tags": 0,
        "total_rows": GREENLETS * 3,
        "live": 0,
        "checked_out": 0,
    }
    assert results == dict.fromkeys(STRATEGY_NAMES, expected)


@pytest.mark.postgres
@pytest.mark.slow
def test_forgotten_remove_costs_nothing(pg_url: str) -> None:
    """10,000 greenlets never call remove() with a pool of 5: nothing is left."""
    r = run_script("gevent_cleanup.py", "scoping", 10_000, 30, url=pg_url)
    assert r["ended"] == 10_000
    assert r["errors"] == []
    assert r["timeouts"] == 0
    assert r["done"] == 10_000
    assert r["live"] == 0
    assert r["checked_out"] == 0


@pytest.mark.postgres
@pytest.mark.slow
def test_sqlalchemy_greenlet_registry_keeps_them_all(pg_url: str) -> None:
    """The same run on ScopedRegistry(scopefunc=greenlet.getcurrent)."""
    r = run_script("gevent_cleanup.py", "sqlalchemy", 10_000, 1, url=pg_url)
    assert r["ended"] == 10_000
    assert r["live"] == 10_000  # every dead greenlet's Session is still there
    assert r["checked_out"] == 5  # holding the whole pool
    assert r["done"] == 5
    assert r["timeouts"] == 10_000 - 5


@CHILD_RUNS.of("test_import_is_monkeypatch_safe")
def monkeypatch_safe_child() -> t.Any:
    code = """
        import gc, json, sys, threading, _thread
        def census():
            kinds = (_thread._local, _thread.LockType, _thread.RLock)
            return sum(1 for o in gc.get_objects() if isinstance(o, kinds))
        gc.collect(); before = census()
        import sqlalchemy.orm  # SQLAlchemy's own import-time objects are not ours
        gc.collect(); middle = census()
        import scoping, scoping.scopes, scoping.registry, scoping.session, scoping.guard
        import scoping.green, scoping.wsgi, scoping.doctor, scoping.__main__
        gc.collect(); after = census()
        print(json.dumps({
            "new_locals_or_locks": after - middle,
            "gevent": "gevent" in sys.modules,
            "psycopg2": "psycopg2" in sys.modules,
        }))
    """
    return run_python(code, env={"PYTHONWARNINGS": "error"})


def test_import_is_monkeypatch_safe(children: Background[object, t.Any]) -> None:
    """No module of scoping binds anything from threading or imports gevent or psycopg2."""
    r = children.result("monkeypatch_safe_child")
    assert r == {"new_locals_or_locks": 0, "gevent": False, "psycopg2": False}


@CHILD_RUNS.of("test_import_is_silent_with_warnings_as_errors")
def silent_import_child() -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-W", "error", "-c", "import scoping"],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_import_is_silent_with_warnings_as_errors(children: Background[object, t.Any]) -> None:
    proc = children.result("silent_import_child")
    assert proc.returncode == 0
    assert proc.stdout == ""
    assert proc.stderr == ""


@CHILD_RUNS.of("test_importing_before_patch_all_adds_no_gevent_warning")
def before_patch_all_child() -> t.Any:
    code = """
        import json, warnings
        import scoping
        from sqlalchemy.orm import sessionmaker
        Session = scoping.scoped_session(sessionmaker(), scope="thread")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            from gevent import monkey
            monkey.patch_all()
        import gevent
        first = Session()
        other = gevent.spawn(Session).get()
        print(json.dumps({
            "warnings": [str(w.message)[:200] for w in caught],
            "isolated": other is not first,
        }))
    """
    return run_python(code)


def test_importing_before_patch_all_adds_no_gevent_warning(
    children: Background[object, t.Any],
) -> None:
    r = children.result("before_patch_all_child")
    assert r == {"warnings": [], "isolated": True}


@CHILD_RUNS.of("test_gevent_greenlets_clean_up_without_database")
def cleanup_child() -> t.Any:
    code = """
        from gevent import monkey; monkey.patch_all()
        import gc, json, gevent, greenlet, scoping
        from scoping.scopes import STRATEGY_NAMES
        from sqlalchemy import create_engine
        from sqlalchemy.orm import Session, sessionmaker

        def run(strategy):
            closed = []
            class Counting(Session):
                def close(self):
                    closed.append(1)
                    super().close()
            S = scoping.scoped_session(
                sessionmaker(bind=create_engine("sqlite://"), class_=Counting), scope=strategy)
            def work(i):
                if strategy == "token":
                    S.strategy.bind(i)   # bound without scope(): nobody removes it
                S.info["i"] = i
                gevent.sleep(0)
            glets = [gevent.spawn(work, i) for i in range(500)]
            gevent.joinall(glets)
            gevent.sleep(0); gevent.sleep(0)
            del glets
            gc.collect()
            dead = sum(1 for o in gc.get_objects() if isinstance(o, greenlet.greenlet) and o.dead)
            return {"live": len(S.registry), "closed": len(closed), "dead_kept": dead,
                    "refs": len(getattr(S.strategy, "_refs", ()))}

        print(json.dumps({name: run(name) for name in STRATEGY_NAMES}))
    """
    return run_python(code)


def test_gevent_greenlets_clean_up_without_database(children: Background[object, t.Any]) -> None:
    """rawlink retires the Session as each greenlet ends; a cleanup greenlet closes it.

    Every strategy, one after another in one gevent child.
    """
    results = children.result("cleanup_child")
    assert isinstance(results, dict)
    # Integer tokens say nothing about when their work ends: they stay. For every other
    # strategy nothing keeps the dead greenlets (or their contexts) alive.
    cleaned = {"live": 0, "closed": 500, "dead_kept": 0, "refs": 0}
    expected = {name: cleaned for name in STRATEGY_NAMES}
    expected["token"] = {"live": 500, "closed": 0, "dead_kept": 0, "refs": 0}
    assert results == expected
