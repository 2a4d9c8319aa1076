"""10,000 gevent greenlets each use a Session and never call remove().

argv: "scoping" or "sqlalchemy", greenlet count. Pool of 5, no overflow.
Prints one JSON line with what is left once the greenlets have ended.
"""

from __future__ import annotations

import json
import os
import sys

from gevent import monkey

monkey.patch_all()

import gevent  # noqa: E402
import greenlet  # noqa: E402
from sqlalchemy import create_engine, text  # noqa: E402
from sqlalchemy.exc import TimeoutError as PoolTimeout  # noqa: E402
from sqlalchemy.orm import sessionmaker  # noqa: E402
from sqlalchemy.util import ScopedRegistry  # noqa: E402

import scoping  # noqa: E402
from scoping.green import patch_psycopg2  # noqa: E402

patch_psycopg2()
kind, count = sys.argv[1], int(sys.argv[2])
engine = create_engine(
    os.environ["SCOPING_TEST_URL"], pool_size=5, max_overflow=0, pool_timeout=float(sys.argv[3])
)
factory = sessionmaker(bind=engine)
if kind == "scoping":
    Session = scoping.scoped_session(factory, scope="greenlet")
    registry = Session.registry
    sessions = registry.registry
else:
    registry = ScopedRegistry(factory, greenlet.getcurrent)
    sessions = registry.registry

timeouts = 0
errors: list[str] = []
done = 0


def request() -> None:
    global timeouts, done
    try:
        registry().execute(text("select 1"))  # checks out a connection, never returned
        done += 1
    except PoolTimeout:
        timeouts += 1
    except Exception as exc:
        errors.append(f"{type(exc).__name__}: {exc}"[:200])


glets = [gevent.spawn(request) for _ in range(count)]
gevent.joinall(glets, timeout=300)
# Let the hub run the cleanup greenlets: their ROLLBACKs are real I/O. Bounded:
# at most 2 s of hub cycles.
cycles = 0
while cycles < 200 and engine.pool.checkedout():
    gevent.sleep(0.01)
    cycles += 1
print(
    json.dumps(
        {
            "ended": sum(1 for g in glets if g.dead),
            "done": done,
            "timeouts": timeouts,
            "errors": errors[:5],
            "live": len(sessions),
            "checked_out": engine.pool.checkedout(),
            "hub_cycles": cycles,
        }
    )
)
