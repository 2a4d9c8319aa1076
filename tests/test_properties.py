"""Property-based tests: random interleavings of scoped-Session operations, every
strategy, every runtime (issue 9, "What must hold afterwards").

hypothesis draws *programs* (``tests/property_scripts/programs.py``): steps such as
``Session()``, ``remove()``, ``scope()`` enter/exit (nested, the same token from several
units, one block object entered twice), spawn (fresh, copied or shared Context), finish,
kill/cancel, abandon, ``copy_context().run``, ``asyncio.create_task``, ``to_thread``,
``gevent.Timeout``, ``collect()``, ``close_all()`` and ``os.fork()``. A model of each
strategy's unit of isolation checks every step; the end of every program checks that
the registry and its bookkeeping are empty, every Session was closed exactly once (a
forked child never closes what it inherited) and nothing escaped from a callback.

Budgets, per strategy and runtime: the default run draws ``DEFAULT_EXAMPLES`` programs
(``[default]`` tests); the ``[ci]`` tests are marked slow and draw
``SCOPING_PROPERTY_EXAMPLES`` (500 when unset; ``.ci/run`` sets it), the PostgreSQL fork
property a fifth of that. Examples are derandomized and no example database is kept, so
a run is reproducible. gevent runs in one child process per import order, every
strategy in it, with hypothesis inside the child, which reports failures as JSON.
"""

from __future__ import annotations

import os
import sys

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from tests._subproc import run_python

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "property_scripts"))

import programs

from scoping.scopes import STRATEGY_NAMES

DEFAULT_EXAMPLES = 10
CI_EXAMPLES = int(os.environ.get("SCOPING_PROPERTY_EXAMPLES", "500"))
BUDGETS = [
    pytest.param(DEFAULT_EXAMPLES, id="default"),
    pytest.param(CI_EXAMPLES, id="ci", marks=pytest.mark.slow),
]
GEVENT_CHILD = os.path.join(os.path.dirname(__file__), "property_scripts", "gevent_child.py")

SETTINGS = settings(
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    print_blob=False,
    # No "explain" phase: it reruns the failing example many times to annotate it, and
    # the failure message already carries the trace of the shrunk program.
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink],
)


@pytest.mark.parametrize("examples", BUDGETS)
@pytest.mark.parametrize("runtime", ["greenlets", "threads", "asyncio"])
@pytest.mark.parametrize("strategy", STRATEGY_NAMES)
def test_programs(strategy: str, runtime: str, examples: int) -> None:
    """Every invariant holds for every generated program, in this process's runtimes."""

    @settings(SETTINGS, max_examples=examples)
    @given(steps=st.lists(programs.step_strategy(runtime), max_size=programs.MAX_STEPS))
    @lambda test: programs.with_seeds(test, runtime)
    def check(steps: list[programs.Step]) -> None:
        programs.run_example(strategy, runtime, steps)

    check()


@pytest.mark.gevent
@pytest.mark.parametrize("examples", BUDGETS)
@pytest.mark.parametrize("order", ["registry-first", "patch-first"])
def test_programs_under_gevent(order: str, examples: int) -> None:
    """The same properties after ``patch_all()``, every strategy in one child process."""
    code = (
        f"import runpy, sys; sys.argv = [{GEVENT_CHILD!r}, *sys.argv[1:]]; "
        f"runpy.run_path({GEVENT_CHILD!r}, run_name='__main__')"
    )
    result = run_python(
        code, args=[order, str(examples), *STRATEGY_NAMES], timeout=120 + examples * 5
    )
    results = result["results"]
    assert sorted(results) == sorted(STRATEGY_NAMES)
    failures = {name: r["failure"] for name, r in results.items() if r["failure"]}
    assert not failures, "\n\n".join(
        f"--- strategy {name!r} under gevent ({order}):\n{text}" for name, text in failures.items()
    )
    for r in results.values():
        assert r["runs"] >= min(examples, 10)


@pytest.mark.postgres
@pytest.mark.parametrize("examples", BUDGETS)
@pytest.mark.parametrize("strategy", STRATEGY_NAMES)
def test_fork_keeps_the_parents_transactions(strategy: str, pg_url: str, examples: int) -> None:
    """A forked child that uses the registry never touches what it inherited (PostgreSQL)."""
    import pg_fork

    plans = st.builds(
        pg_fork.ForkPlan,
        strategy=st.just(strategy),
        runtime=st.sampled_from(["threads", "greenlets"]),
        flushes=st.lists(st.integers(0, 2), min_size=1, max_size=3).map(tuple),
        forker=st.integers(-1, 2),
        child_thread=st.booleans(),
        use_block=st.booleans(),
    ).map(lambda p: p._replace(forker=min(p.forker, len(p.flushes) - 1)))

    @settings(SETTINGS, max_examples=max(3, examples // 5))
    @given(plan=plans)
    def check(plan: pg_fork.ForkPlan) -> None:
        pg_fork.run_plan(pg_url, plan)

    check()


class _IdKeyed:
    """A naive strategy: keyed by ``id(getcurrent())``, which is reused once a greenlet dies."""

    name = "greenlet"

    def current(self) -> object:
        import greenlet

        return id(greenlet.getcurrent())

    def watch(self, key: object, on_end: object) -> bool:
        return False

    def is_ended(self, key: object) -> bool:
        return False


def test_the_model_catches_a_naive_strategy() -> None:
    """The checks bite: a strategy keyed by reusable ids that never sees an end.

    Depending on whether the allocator reuses the dead greenlet's id, a new greenlet gets
    the dead one's Session (isolation) or both Sessions stay open (cleanup).
    """
    import scoping

    steps: list[programs.Step] = [
        ("spawn", 0, 0),
        ("get", 1, 0),
        ("finish", 1, 0),
        ("spawn", 0, 0),
        ("get", 1, 0),
    ]
    factory = programs.make_factory()
    with pytest.raises(
        programs.PropertyFailure, match=r"returned Session #1 of scope|was closed 0 times"
    ):
        programs.run_example(
            "greenlet",
            "greenlets",
            steps,
            lambda: scoping.scoped_session(factory, scope=_IdKeyed()),
        )
