"""Run a snippet in a fresh interpreter and return the JSON it prints last.

gevent is never patched inside the pytest process; everything that needs
``patch_all()`` runs through here. The work is done by :func:`stress.childproc.run_json`,
the project's one "run a child Python, read its JSON" helper.

:class:`Background` runs a test module's independent child processes side by
side (the suite's wall time is mostly waiting for children), and
:func:`selected_tests` says which of them this session needs.
"""

from __future__ import annotations

import concurrent.futures
import os
import textwrap
import typing as t

from stress.childproc import ROOT, run_json

if t.TYPE_CHECKING:
    from collections.abc import Callable, Collection, Mapping

    import pytest

__all__ = ["ROOT", "Background", "ChildRuns", "run_python", "selected_params", "selected_tests"]

K = t.TypeVar("K")
T = t.TypeVar("T")
F = t.TypeVar("F", bound="Callable[..., t.Any]")


def run_python(
    code: str,
    *,
    env: dict[str, str] | None = None,
    timeout: float = 120,
    args: t.Sequence[str] = (),
    stdin: str | None = None,
) -> t.Any:
    """Run ``code`` in a subprocess and return the JSON on its last stdout line."""
    return run_json(["-c", textwrap.dedent(code), *args], env=env, timeout=timeout, stdin=stdin)


def default_workers() -> int:
    """As many jobs at once as there are cores (children are mostly CPU-bound imports)."""
    return max(2, os.cpu_count() or 2)


class Background(t.Generic[K, T]):
    """Independent jobs of one test module (each runs child processes), run side by side.

    A module-scoped fixture builds one with every job the selected tests need;
    the jobs start at once on ``workers`` threads (a thread only waits for its
    child). Each test then waits for its own job with :meth:`result`, which
    returns the job's value or raises what the job raised (an ``AssertionError``,
    ``pytest.fail``, a timeout), so a failure is reported by the test the job
    belongs to, as if the test had run it itself. What each child does and what
    each test asserts on its output are unchanged: only the waiting overlaps.
    Jobs must not share mutable state (files, tables, ports) with each other.
    """

    def __init__(
        self,
        jobs: Mapping[K, Callable[[], T]],
        *,
        start: Collection[K] | None = None,
        workers: int | None = None,
    ) -> None:
        self._jobs = dict(jobs)
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=workers or default_workers(), thread_name_prefix="test-background"
        )
        # Submitted in the mapping's order (put the longest jobs first); a job left
        # out of ``start`` runs when a test asks for it.
        self._futures = {
            key: self._pool.submit(job)
            for key, job in self._jobs.items()
            if start is None or key in start
        }

    def result(self, key: K) -> T:
        """The value of job ``key`` (waiting for it); raises what the job raised."""
        if key not in self._futures:
            self._futures[key] = self._pool.submit(self._jobs[key])
        return self._futures[key].result()

    def close(self) -> None:
        """Drop the jobs not started yet and wait for the running ones (they are bounded)."""
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> Background[K, T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ChildRuns(t.Generic[F]):
    """A test module's child runs, each registered with the tests that assert on it.

    ``@runs.of("test_x")`` above a function that runs a child registers it; a
    module fixture then hands :meth:`wanted` (the runs of the selected tests)
    to :class:`Background` as the jobs to start at once.
    """

    def __init__(self) -> None:
        self.tests: dict[F, tuple[str, ...]] = {}

    def of(self, *tests: str) -> Callable[[F], F]:
        """Register the decorated run as the child that ``tests`` assert on."""

        def register(run: F) -> F:
            self.tests[run] = tests
            return run

        return register

    @property
    def by_name(self) -> dict[str, F]:
        """The runs under their function names."""
        return {run.__name__: run for run in self.tests}

    def wanted(self, selected: Collection[str]) -> list[F]:
        """The runs that at least one of the ``selected`` tests asserts on."""
        return [run for run, tests in self.tests.items() if not set(tests).isdisjoint(selected)]


def _module_items(request: pytest.FixtureRequest) -> list[pytest.Item]:
    return [
        item for item in request.session.items if getattr(item, "module", None) is request.module
    ]


def selected_tests(request: pytest.FixtureRequest) -> set[str]:
    """Names (without parameters) of the tests of the requesting module this session runs.

    A module fixture uses it to start only the jobs of selected tests (``-k``, ``-m``).
    """
    return {getattr(item, "originalname", item.name) for item in _module_items(request)}


def selected_params(request: pytest.FixtureRequest, test: str, argname: str) -> list[t.Any]:
    """The values of parameter ``argname`` of the selected items of ``test`` (its module's)."""
    return [
        item.callspec.params[argname]
        for item in _module_items(request)
        if getattr(item, "originalname", None) == test and hasattr(item, "callspec")
    ]
