"""Each detector of the stress harness, fed a known-bad situation, counts exactly what happened.

SQLite files and raw greenlets (stress.greenloop) only: no gevent in this process.
"""

from __future__ import annotations

import typing as t

import greenlet
import pytest
from sqlalchemy import create_engine, select, text
from sqlalchemy.orm import Session, scoped_session, sessionmaker

from stress import app as appmod
from stress.detectors import (
    FAILED,
    OK,
    OWNER,
    DbAudit,
    Probe,
    Record,
    anomalies,
    audit_rows,
    foreign_objects,
    judge,
    percentile,
    stale_state,
    summarize,
)
from stress.greenloop import Loop
from stress.scenarios import SCENARIOS, STRATEGIES, not_applicable, parse_list

TABLE = "stress_rows_t"


@pytest.fixture
def db(tmp_path: t.Any) -> t.Iterator[tuple[t.Any, type[t.Any]]]:
    engine = create_engine(f"sqlite:///{tmp_path / 'detectors.db'}")
    with engine.begin() as conn:
        for ddl in appmod.create_table_sql(TABLE, "sqlite"):
            conn.execute(text(ddl))
    yield engine, appmod.make_model(TABLE)
    engine.dispose()


def _rows(engine: t.Any) -> list[tuple[str, int | None, int]]:
    with engine.connect() as conn:
        return [
            (r[0], r[1], r[2])
            for r in conn.execute(
                text(f"SELECT request_id, xact, count(*) FROM {TABLE} GROUP BY 1, 2 ORDER BY 1")
            )
        ]


def _app(setup: t.Any, model: type[t.Any], loop: Loop, **kw: t.Any) -> appmod.App:
    hooks = appmod.sqlite_hooks(lambda: loop.sleep(0))
    return appmod.App(setup=setup, model=model, hooks=hooks, **kw)


# --------------------------------------------------------------------- in process


def test_stale_state_counts_objects_and_open_transaction(db: t.Any) -> None:
    engine, Row = db
    session = Session(engine)
    assert stale_state(session) == 0
    rows = [Row(request_id="a", payload="x"), Row(request_id="a", payload="y")]
    session.add_all(rows)
    assert stale_state(session) == 3  # two pending objects + the transaction add() began
    session.flush()
    assert stale_state(session) == 3  # two persistent objects + the transaction
    session.commit()
    assert stale_state(session) == 2  # expired objects stay in the identity map
    session.close()
    assert stale_state(session) == 0


def test_foreign_objects_counts_only_other_requests(db: t.Any) -> None:
    engine, Row = db
    session = Session(engine)
    objs = [Row(request_id=rid, payload="p") for rid in ("a", "b", "b")]
    for obj in objs:
        setattr(obj, OWNER, obj.request_id)
    session.add_all(objs)
    assert [foreign_objects(session, r) for r in ("a", "b", "c")] == [2, 1, 3]  # pending
    session.commit()  # expired: request_id is gone from the instance, the tag is not
    assert [foreign_objects(session, r) for r in ("a", "b", "c")] == [2, 1, 3]
    loaded = Session(engine)
    rows = loaded.scalars(select(Row).order_by(Row.id)).all()  # no tag: loaded request_id
    assert len(rows) == 3
    assert [foreign_objects(loaded, r) for r in ("a", "b", "c")] == [2, 1, 3]
    session.close()
    loaded.close()


def test_shared_session_between_two_greenlets(db: t.Any) -> None:
    """SQLAlchemy's thread-local registry with raw greenlets: one Session for both.

    A adds 3 rows and yields; B starts on A's Session (stale: 3 pending objects
    and the transaction A's add() began), sees A's 3 objects next to its own (a
    leak) and yields; A sees B's 3 (a leak), flushes and commits all 6 rows, then
    remove() closes the shared Session under B; B's commit has nothing left and
    its refresh fails.
    """
    engine, Row = db
    loop = Loop()
    setup = appmod.SAScoped("baseline", scoped_session(sessionmaker(engine)))
    app = _app(setup, Row, loop)
    records: dict[str, Record] = {}
    for rid in ("A", "B"):
        loop.spawn(lambda rid=rid: records.__setitem__(rid, appmod.handle(app, rid)))
    loop.run()
    a, b = records["A"], records["B"]
    assert (a.stale, a.leaked, a.outcome, a.committed) == (0, 3, OK, True)
    assert (b.stale, b.leaked, b.outcome, b.exc) == (4, 3, "error", "DetachedInstanceError")
    audit = audit_rows(_rows(engine), records)
    # B's commit "succeeded" (nothing was left to commit) and its rows are there,
    # committed in A's transaction: without transaction ids (SQLite) the audit
    # cannot attribute that, so it shows in process only.
    assert _rows(engine) == [("A", None, 3), ("B", None, 3)]
    assert b.committed
    assert audit == DbAudit(attribution=False)
    m = summarize(list(records.values()), None, audit)
    assert (m["stale"], m["leaks"], m["errors"], m["db_failed"]) == (1, 2, 1, 0)
    assert m["errors_by_class"] == {"DetachedInstanceError": 1}


def test_registry_keyed_by_a_reused_ident(db: t.Any) -> None:
    """A registry keyed by an ident that dead greenlets hand on (get_ident under gevent).

    The key is fixed at 7 to make the reuse exact. r1 fails and its error path
    skips remove(); r2 inherits r1's Session (3 pending objects and the transaction
    add() began: stale), sees
    them (leak) and commits them with its own; r3 gets a fresh Session.
    """
    engine, Row = db
    loop = Loop()
    setup = appmod.SAScoped("baseline", scoped_session(sessionmaker(engine), scopefunc=lambda: 7))
    app = _app(setup, Row, loop, forget_on_error=True)
    plans = {"r0": appmod.P_OK, "r1": appmod.P_FAIL, "r2": appmod.P_OK, "r3": appmod.P_OK}
    records: dict[str, Record] = {}

    def run_all() -> None:
        for rid, plan in plans.items():  # one after another, like greenlets reusing an id
            g = greenlet.greenlet(lambda rid=rid, plan=plan: appmod.handle(app, rid, plan))
            records[rid] = g.switch()

    loop.spawn(run_all)
    loop.run()
    assert [records[r].stale for r in plans] == [0, 0, 4, 0]  # 3 objects + open transaction
    assert [records[r].leaked for r in plans] == [0, 0, 3, 0]
    assert records["r1"].outcome == FAILED
    assert not records["r1"].removed
    audit = audit_rows(_rows(engine), records)
    assert (audit.failed, audit.lost, audit.dup) == (3, 0, 0)
    assert setup.registry_size() == 0


def test_registry_keyed_by_greenlet_without_remove(db: t.Any) -> None:
    """Keyed by the greenlet object, forgotten remove(): every forgotten Session stays,
    with the connection its post-commit refresh checked out."""
    engine, Row = db
    loop = Loop()
    setup = appmod.SAScoped(
        "baseline", scoped_session(sessionmaker(engine), scopefunc=greenlet.getcurrent)
    )
    app = _app(setup, Row, loop)
    plans = [appmod.P_FORGET, appmod.P_OK, appmod.P_FORGET, appmod.P_OK, appmod.P_FORGET]
    records = []
    for i, plan in enumerate(plans):
        loop.spawn(lambda i=i, plan=plan: records.append(appmod.handle(app, f"r{i}", plan)))
    loop.run()
    assert [r.outcome for r in records] == [OK] * 5
    assert setup.registry_size() == 3
    assert engine.pool.checkedout() == 3
    m = summarize(records, Probe(registry=3, checkedout=3, expected=5), None)
    assert anomalies(m) == {"registry": 3, "checkedout": 3}


@pytest.mark.parametrize("strategy", ["greenlet", "contextvar", "token", "auto"])
def test_scoping_strategy_is_clean_where_the_shared_session_was_not(
    db: t.Any, strategy: str
) -> None:
    """The same two interleaved requests as the shared-session test, on a scoping strategy."""
    import scoping

    engine, Row = db
    loop = Loop()
    setup = appmod.Scoped(strategy, scoping.scoped_session(sessionmaker(engine), scope=strategy))
    app = _app(setup, Row, loop)
    records: dict[str, Record] = {}
    for rid in ("A", "B"):
        loop.spawn(lambda rid=rid: records.__setitem__(rid, appmod.handle(app, rid)))
    loop.run()
    assert [(r.stale, r.leaked, r.outcome) for r in records.values()] == [(0, 0, OK)] * 2
    audit = audit_rows(_rows(engine), records)
    assert (audit.failed, audit.lost, audit.dup, audit.unattributed) == (0, 0, 0, 0)
    assert setup.registry_size() == 0
    assert engine.pool.checkedout() == 0


# --------------------------------------------------------------------- database audit


def _rec(rid: str, *, committed: bool, xact: int | None, rows: int = 3) -> Record:
    return Record(
        rid=rid, outcome=OK if committed else FAILED, committed=committed, xact=xact, rows=rows
    )


def test_audit_rows_committed_under_another_request() -> None:
    records = {
        r.rid: r
        for r in (
            _rec("A", committed=True, xact=100),
            _rec("B", committed=True, xact=101),
            _rec("C", committed=False, xact=None),
            _rec("D", committed=True, xact=102),
            _rec("E", committed=True, xact=103),
            _rec("F", committed=True, xact=104),
            _rec("G", committed=True, xact=104),  # two requests committed one transaction
        )
    }
    groups = [
        ("A", 100, 3),  # fine
        ("B", 100, 3),  # B's rows went out in A's transaction
        ("C", 101, 2),  # a failed request's rows, committed by B
        # D reported 3 rows: none arrived
        ("E", 103, 4),  # one more than E inserted
        ("F", 104, 3),
        ("G", 104, 3),
        ("Z", 105, 1),  # nobody reported Z (its cell hung)
    ]
    audit = audit_rows(groups, records)
    assert audit == DbAudit(cross=9, failed=2, lost=3, dup=1, unattributed=1)


def test_audit_rows_without_transaction_ids() -> None:
    records = {"A": _rec("A", committed=True, xact=None)}
    audit = audit_rows([("A", None, 3)], records)
    assert audit == DbAudit(attribution=False)


# --------------------------------------------------------------------- verdicts


def test_judge_strategy_and_baseline() -> None:
    clean = {"errors": 0, "stale": 0, "registry": 0, "db_cross": None}
    assert judge("strategy", (), clean) == (True, "clean")
    assert judge("strategy", (), {**clean, "lingering": 2}) == (False, "anomalies: lingering=2")
    ok, why = judge("baseline", ("lingering",), {**clean, "lingering": 2})
    assert ok
    assert why == "hazard reproduced: lingering=2"
    ok, why = judge("baseline", ("lingering",), {**clean, "errors": 5})
    assert not ok
    assert "hazard not reproduced" in why
    assert judge("baseline", ("hang", "stale"), {"hang": 1})[0] is True


def test_summarize_counts_and_latency() -> None:
    recs = [
        Record(rid="a", outcome=OK, committed=True, rows=3, readback=3, latency=0.010),
        Record(rid="b", outcome="error", exc="InvalidRequestError", message="boom", latency=0.020),
        Record(rid="c", outcome="error", exc="InvalidRequestError", latency=0.030),
        Record(rid="d", outcome=OK, rows=3, readback=2, stale=1, lingering=1, latency=0.040),
    ]
    m = summarize(recs, Probe(registry=0, checkedout=1, elapsed=2.0, expected=5), DbAudit())
    assert m["errors_by_class"] == {"InvalidRequestError": 2}
    assert m["error_samples"] == {"InvalidRequestError": "boom"}
    assert (m["stale"], m["leaks"], m["lingering"], m["unfinished"]) == (1, 1, 1, 1)
    assert (m["p50_ms"], m["p99_ms"], m["throughput"]) == (20.0, 40.0, 2.0)
    assert anomalies(m) == {
        "errors": 2,
        "stale": 1,
        "leaks": 1,
        "checkedout": 1,
        "lingering": 1,
        "unfinished": 1,
    }
    assert percentile([], 50) == 0.0


def test_plans_are_seeded() -> None:
    mix = {"fail": 0.2, "forget": 0.1}
    one = appmod.make_plans(200, 1, "no-remove", mix)
    assert one == appmod.make_plans(200, 1, "no-remove", mix)
    assert one != appmod.make_plans(200, 2, "no-remove", mix)
    assert set(one) == {appmod.P_OK, appmod.P_FAIL, appmod.P_FORGET}


def test_matrix_names_every_not_applicable_cell() -> None:
    assert parse_list("all", STRATEGIES, "strategy") == list(STRATEGIES)
    with pytest.raises(ValueError, match="unknown scenario: nope"):
        parse_list("late-patch,nope", list(SCENARIOS), "scenario")
    reasons = {
        (s, st): not_applicable(SCENARIOS[s], st, sqlite=False)
        for s in SCENARIOS
        for st in STRATEGIES
    }
    na = {k for k, v in reasons.items() if v}
    asyncio_loop = {"gather-shared", "task-no-remove", "cancel-mid-query"}
    executor = {"to-thread", "threadpool-hop"}
    assert na == {
        ("thread-false", "thread"),
        ("raw-greenlet", "thread"),
        *((s, st) for s in asyncio_loop | executor for st in ("thread", "greenlet")),
    }
    assert "one thread and one greenlet" in (reasons["gather-shared", "thread"] or "")
    assert "executor threads outlive" in (reasons["threadpool-hop", "greenlet"] or "")
    assert "threading is not patched" in (reasons["raw-greenlet", "thread"] or "")
    assert not_applicable(SCENARIOS["timeout-kill"], "greenlet", sqlite=True)
