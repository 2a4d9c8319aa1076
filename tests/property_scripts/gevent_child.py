"""Run the program properties under gevent, every strategy, in this one process.

argv: order (``registry-first``: the scoped_sessions are built before
``patch_all()``; ``patch-first``: after it), examples per strategy, then the
strategies. hypothesis runs here; the last stdout line is JSON:
``{"results": {strategy: {"runs": n, "failure": text or null}}}``.
"""

from __future__ import annotations

import json
import os
import sys
import traceback

order, examples, *strategies = sys.argv[1:]
max_examples = int(examples)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

pools: dict[str, list[object]] = {}
if order == "registry-first":
    import programs

    import scoping

    programs.freeze_heap()
    factory = programs.make_factory()
    # One per example, and some for shrinking; any more are built after patch_all().
    pools = {
        name: [scoping.scoped_session(factory, scope=name) for _ in range(max_examples + 50)]
        for name in strategies
    }

from gevent import monkey  # noqa: E402

monkey.patch_all()

import programs  # noqa: E402
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import scoping  # noqa: E402


def run(strategy: str) -> dict[str, object]:
    runs = 0
    factory = programs.make_factory()

    @settings(
        max_examples=max_examples,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        print_blob=False,
        phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink],
    )
    @given(steps=st.lists(programs.step_strategy("gevent"), max_size=programs.MAX_STEPS))
    @lambda test: programs.with_seeds(test, "gevent")
    def check(steps: list[programs.Step]) -> None:
        nonlocal runs
        runs += 1
        pool = pools.get(strategy)

        def make_session() -> object:  # the pool's, built before patch_all(), if any left
            return pool.pop() if pool else scoping.scoped_session(factory, scope=strategy)

        programs.run_example(strategy, "gevent", steps, make_session)

    try:
        check()
    except BaseException as exc:  # report every failure, with hypothesis' notes
        return {"runs": runs, "failure": "".join(traceback.format_exception(exc))[-12000:]}
    return {"runs": runs, "failure": None}


results = {name: run(name) for name in strategies}
sys.stdout.write(json.dumps({"results": results}) + "\n")
