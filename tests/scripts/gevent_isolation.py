"""200+ concurrent gevent greenlets on PostgreSQL through every strategy, in one process.

argv: order ("registry-first" builds the scoped_sessions before patch_all(),
"patch-first" after), greenlet count. The strategies run one after another in
this one interpreter (one child per import order, not per strategy). Prints one
JSON object: strategy name -> counts.
"""

from __future__ import annotations

import json
import os
import sys

order, count = sys.argv[1], int(sys.argv[2])
url = os.environ["SCOPING_TEST_URL"]

from sqlalchemy.orm import sessionmaker  # noqa: E402

import scoping  # noqa: E402
from scoping.scopes import STRATEGY_NAMES  # noqa: E402

if order == "registry-first":
    sessions = {name: scoping.scoped_session(sessionmaker(), scope=name) for name in STRATEGY_NAMES}

from gevent import monkey  # noqa: E402

monkey.patch_all()

import gevent  # noqa: E402
from sqlalchemy import Integer, String, create_engine, select, text  # noqa: E402
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column  # noqa: E402

from scoping.green import patch_psycopg2  # noqa: E402

patch_psycopg2()

if order == "patch-first":
    sessions = {name: scoping.scoped_session(sessionmaker(), scope=name) for name in STRATEGY_NAMES}


class Base(DeclarativeBase):
    pass


table = f"iso_{order.replace('-', '_')}"


class Row(Base):
    __tablename__ = table
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    tag: Mapped[str] = mapped_column(String(40))


engine = create_engine(url, pool_size=20, max_overflow=0, pool_timeout=60)
ROWS = 3


def run(strategy: str) -> dict[str, object]:
    Session = sessions[strategy]
    Session.configure(bind=engine)
    with engine.begin() as conn:
        conn.execute(text(f"DROP TABLE IF EXISTS {table}"))
    Base.metadata.create_all(engine)
    errors: list[str] = []
    foreign = stale = 0

    def request(i: int) -> None:
        nonlocal foreign, stale
        tag = f"g{i}"
        scope = Session.scope(tag) if strategy == "token" else Session.scope()
        try:
            with scope as session:
                if session.identity_map or session.new:
                    stale += 1
                Session.add_all([Row(tag=tag) for _ in range(ROWS)])
                Session.execute(text("select pg_sleep(0.002)"))  # real I/O: others run now
                Session.flush()
                mine = Session.scalars(select(Row).where(Row.tag == tag)).all()
                gevent.sleep(0)
                foreign += sum(
                    1
                    for obj in list(Session.identity_map.values()) + list(Session.new)
                    if getattr(obj, "tag", tag) != tag
                )
                if len(mine) != ROWS:
                    errors.append(f"{tag}: read back {len(mine)} rows")
                Session.commit()
        except Exception as exc:  # counted, not hidden: the test asserts zero
            errors.append(f"{type(exc).__name__}: {exc}"[:200])

    gevent.joinall([gevent.spawn(request, i) for i in range(count)], timeout=120, raise_error=False)
    with engine.connect() as conn:
        per_tag = dict(conn.execute(text(f"select tag, count(*) from {table} group by tag")).all())
        conn.execute(text(f"DROP TABLE {table}"))
        conn.commit()
    return {
        "errors": errors[:20],
        "error_count": len(errors),
        "foreign": foreign,
        "stale": stale,
        "tags": len(per_tag),
        "bad_tags": sum(1 for n in per_tag.values() if n != ROWS),
        "total_rows": sum(per_tag.values()),
        "live": len(Session.registry),
        "checked_out": engine.pool.checkedout(),
    }


print(json.dumps({name: run(name) for name in STRATEGY_NAMES}))
