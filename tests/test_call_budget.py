"""Function-call budgets for the hot paths (SQLAlchemy's ``aaa_profiling`` idea).

The counts come from ``python -m stress.bench --only calls`` run in a fresh
interpreter (``sys.setprofile`` 'call' and 'c_call' events, garbage collector
off while counting), so they do not depend on wall time, on the machine nor
on what other tests imported. A change that adds a call to a hot path fails
here: if the call is worth it, raise the budget in the same change and say
why. Lowering a count is welcome; lower the budget with it.

``sqlalchemy`` is SQLAlchemy's own thread-local ``scoped_session``: printed as
the reference, and our hit paths may never make more Python calls than it.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import typing as t
from pathlib import Path

import pytest

from tests._subproc import Background

ROOT = Path(__file__).resolve().parent.parent

# (Python calls, C calls).
# info: Session.info with a Session present (the generated `info` property,
#       then the strategy's key function where it is not inline).
# call: Session() with a Session present.
# miss: Session() creating the Session in a new raw greenlet, minus the
#       session factory's own calls: the registry's and the strategy's share.
# Changes with the lifecycle work (issue 9), each for a reason:
# - auto keys by the execution Context outside a running task (item 2:
#   asyncio.to_thread work never shares a Session), so its hits cost one more
#   C call (id) and one fewer Python call, and its miss watches the Context as
#   contextvar does;
# - a miss in a raw greenlet checks whether the greenlet poller must be woken
#   (item 8: bounded cleanup when nothing touches the registry): +1 C call
#   (isinstance) for the greenlet strategy, whose keys are polled;
# - thread hits call greenlet.getcurrent (C) instead of a Python closure: the
#   running greenlet is the key, or not a key at all (then current() decides,
#   which is why its miss makes two more calls);
# - the token miss lost two calls (the key is computed once).
# Changes with the hot-path work (issue 13):
# - auto keys by the execution Context everywhere, tasks included (the task
#   rule is TaskScope, async_scoped_session's "auto"): its hits lose the
#   running-loop check (one C call) and its miss is contextvar's;
# - a contextvar/auto miss first checks whether the greenlet has a Context
#   yet (+1 Python call in a new raw greenlet, which has none); where it has
#   one, the miss no longer asks the strategy for the key again;
# - the inlined hits keep no local for the key (3 % of a hit), so a miss
#   computes it again: +1 C call (greenlet, thread), +2 (contextvar, auto).
# - every SQLAlchemy proxy runs the lookup in its own body
#   (scoping._hot_path): info lost the `_proxied` property call (-1 Python
#   call for every strategy), as did every other proxied method and attribute.
# - a token whose end nobody can see (a str request id) is not watched
#   (scopes.ENDLESS_KEY_TYPES): the token miss lost watch() and its
#   bookkeeping, -3 Python and -4 C calls.
# - token without a scopefunc reads the scope() block's binding inline (the
#   "token" key shape): -1 Python call on hits and on the miss. Over a
#   scopefunc (the cycle row) it keeps calling the strategy's key function.
# - cycle (new): the cycle section's request, so that "at or below
#   SQLAlchemy's per-request cost" is also checked where wall time is too
#   noisy to (its Python calls may not exceed SQLAlchemy's; the C calls are
#   greenlet.getcurrent, id and ContextVar.get, tens of ns each).
# - thread's miss makes the Session straight from the running greenlet where
#   the strategy says it is the key (ThreadScope.fast_key_is_key: a thread's
#   main greenlet, or any greenlet once threading is patched), with no
#   current() call: -1 Python call on the cycle (a thread's request); the
#   raw-greenlet miss (never its own key) pays +1 for asking.
BUDGET: dict[str, dict[str, tuple[int, int]]] = {
    "thread": {"info": (1, 1), "call": (1, 1), "miss": (14, 8), "cycle": (5, 7)},
    "greenlet": {"info": (1, 1), "call": (1, 1), "miss": (7, 8), "cycle": (3, 7)},
    "contextvar": {"info": (1, 2), "call": (1, 2), "miss": (13, 18), "cycle": (4, 11)},
    "token": {"info": (1, 1), "call": (1, 1), "miss": (2, 2), "cycle": (7, 9)},
    "auto": {"info": (1, 2), "call": (1, 2), "miss": (13, 18), "cycle": (4, 11)},
}
# guard=True changes nothing on hit paths. Its miss path installs SQLAlchemy event
# listeners, whose cost belongs to SQLAlchemy's event system: reported, not budgeted.
GUARD_BUDGET = {
    f"{name}+guard": {op: ops[op] for op in ("info", "call")} for name, ops in BUDGET.items()
}


Counts = dict[str, dict[str, dict[str, int]]]


def _count_in_a_fresh_interpreter(out: Path) -> Counts:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, "-m", "stress.bench", "--only", "calls", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env=env,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    # The table, with SQLAlchemy's reference row, shows up with `pytest -s` or on failure.
    print(proc.stdout)
    results: Counts = json.loads(out.read_text())["calls"]["results"]
    return results


@pytest.fixture(scope="module")
def children(tmp_path_factory: pytest.TempPathFactory) -> t.Iterator[Background[str, Counts]]:
    """Two fresh interpreters counting side by side: the counts, and a second run."""
    folder = tmp_path_factory.mktemp("calls")
    jobs = {
        run: functools.partial(_count_in_a_fresh_interpreter, folder / f"{run}.json")
        for run in ("first", "again")
    }
    with Background(jobs) as background:
        yield background


@pytest.fixture(scope="module")
def counts(children: Background[str, Counts]) -> Counts:
    return children.result("first")


def _pair(cell: dict[str, int]) -> tuple[int, int]:
    return cell["python"], cell["c"]


@pytest.mark.parametrize(
    ("variant", "op"),
    [(v, op) for budget in (BUDGET, GUARD_BUDGET) for v, ops in budget.items() for op in ops],
)
def test_hot_path_stays_within_its_call_budget(
    counts: dict[str, dict[str, dict[str, int]]], variant: str, op: str
) -> None:
    budget = {**BUDGET, **GUARD_BUDGET}[variant][op]
    measured = _pair(counts[variant][op])
    reference = _pair(counts["sqlalchemy"][op])
    message = (
        f"{variant} {op}: {measured[0]} Python + {measured[1]} C calls, budget "
        f"{budget[0]} + {budget[1]} (SQLAlchemy's scoped_session: {reference[0]} + "
        f"{reference[1]}). A call was added to a hot path: remove it, or raise the "
        f"budget in tests/test_call_budget.py and say why"
    )
    assert measured[0] <= budget[0], message
    assert measured[1] <= budget[1], message


@pytest.mark.parametrize(
    ("variant", "op"),
    [(v, op) for v in [*BUDGET, *GUARD_BUDGET] for op in ("info", "call")]
    + [(v, "cycle") for v in BUDGET],
)
def test_hits_make_no_more_python_calls_than_sqlalchemy(
    counts: dict[str, dict[str, dict[str, int]]], variant: str, op: str
) -> None:
    ours = counts[variant][op]["python"]
    theirs = counts["sqlalchemy"][op]["python"]
    assert ours <= theirs, f"{variant} {op}: {ours} Python calls, SQLAlchemy's proxy {theirs}"


def test_sqlalchemy_reference_is_what_its_source_says(
    counts: dict[str, dict[str, dict[str, int]]],
) -> None:
    # info property -> _proxied property -> ThreadLocalRegistry.__call__.
    assert _pair(counts["sqlalchemy"]["info"]) == (3, 0)
    # scoped_session.__call__ -> ThreadLocalRegistry.__call__ (hit and miss alike).
    assert _pair(counts["sqlalchemy"]["call"]) == (2, 0)
    assert _pair(counts["sqlalchemy"]["miss"]) == (2, 0)
    # Beyond an explicit Session: __call__ and registry (2); info, _proxied and
    # registry (3); remove, the registry's has, the registry again and clear
    # (4); minus the explicit Session's __enter__ and __exit__ (2). The C call
    # is ThreadLocalRegistry.has's hasattr.
    assert _pair(counts["sqlalchemy"]["cycle"]) == (7, 1)
    # A direct Session reads the memoized info dict with no call at all.
    assert _pair(counts["direct"]["info"]) == (0, 0)


def test_counts_are_deterministic(counts: Counts, children: Background[str, Counts]) -> None:
    """A second fresh interpreter counts exactly the same calls."""
    assert children.result("again") == counts
