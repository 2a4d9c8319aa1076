"""Detectors: each turns what a cell did into exact counts.

- :func:`session_objects` / :func:`foreign_objects` look inside a Session without
  loading anything (no I/O, so no greenlet switch while looking): used at request
  start (stale Session) and during the request (cross-request leak in process).
- :func:`audit_rows` compares the rows in the database with what each request
  reported: rows committed in a transaction that another request reported
  (cross-request commit), rows of requests that failed, lost and duplicated rows.
- :func:`summarize` folds the per-request records and end-of-cell probes into the
  metrics of one cell; :func:`anomalies` and :func:`judge` decide what they mean.
"""

from __future__ import annotations

import collections
import dataclasses
import typing as t

from sqlalchemy import inspect

if t.TYPE_CHECKING:
    from sqlalchemy.orm import Session

# Outcomes a request reports.
OK = "ok"  # committed
FAILED = "failed"  # raised the injected failure (planned)
TIMEOUT = "timeout"  # gevent.Timeout mid-statement (planned)
KILLED = "killed"  # kill() mid-statement (planned)
ERROR = "error"  # anything unplanned
PLANNED = {FAILED, TIMEOUT, KILLED}


#: Plain (unmapped) attribute naming the request that created an object. It
#: survives expiry, which empties the mapped attributes after a commit.
OWNER = "_stress_owner"


def owner_of(obj: object) -> object:
    """The request an object belongs to, read without loading anything.

    Never triggers a lazy load: that would be I/O, and under gevent a switch
    in the middle of the look. An object loaded from the database has no
    owner tag; then its loaded ``request_id`` is used (None if expired).
    """
    owner = vars(obj).get(OWNER)
    if owner is not None:
        return owner
    return inspect(obj).dict.get("request_id")


def session_objects(session: Session) -> list[object]:
    """Every object a Session holds: pending, persistent (identity map), deleted."""
    objs: list[object] = list(session.new)
    objs.extend(session.identity_map.values())
    objs.extend(session.deleted)
    return objs


def foreign_objects(session: Session, request_id: str) -> int:
    """How many objects in ``session`` belong to a request other than ``request_id``."""
    return sum(1 for obj in session_objects(session) if owner_of(obj) != request_id)


def stale_state(session: Session) -> int:
    """What a Session holds at request start: objects, plus 1 for an open transaction.

    A fresh Session holds nothing, so anything counted here is another request's.
    """
    return len(session_objects(session)) + (1 if session.in_transaction() else 0)


@dataclasses.dataclass
class Record:
    """What one request reports about itself."""

    rid: str
    plan: str = OK
    outcome: str = ERROR
    exc: str | None = None  # exception class of an unplanned error
    message: str | None = None  # first line of its message
    stale: int = 0  # stale_state() at start
    leaked: int = 0  # most foreign objects seen at any checkpoint
    readback: int = -1  # own rows read back before commit
    rows: int = 0  # rows it inserted
    committed: bool = False
    xact: int | None = None  # the transaction id it committed (PostgreSQL)
    lingering: int = 0  # own statements still running on the server after it ended
    latency: float = 0.0
    removed: bool = False  # the app called remove() for it

    def to_json(self) -> dict[str, t.Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: t.Mapping[str, t.Any]) -> Record:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclasses.dataclass
class DbAudit:
    """Rows in the database against what requests reported."""

    cross: int = 0  # rows committed in a transaction reported by another request (or several)
    failed: int = 0  # rows of requests that did not commit (failed, timed out, killed)
    lost: int = 0  # rows a committed request reported that are missing
    dup: int = 0  # rows beyond what a committed request inserted
    unattributed: int = 0  # rows of requests that never reported (hang, crash)
    attribution: bool = True  # False without transaction ids (SQLite)


def audit_rows(
    groups: t.Iterable[tuple[str, int | None, int]],
    records: t.Mapping[str, Record],
) -> DbAudit:
    """Audit ``(request_id, xact, count)`` row groups against request records.

    ``xact`` is the transaction that inserted the rows (``txid_current()`` as a
    column default), or None where the database has none (SQLite): then
    cross-request commits are not attributed.
    """
    audit = DbAudit()
    reporters: dict[int, set[str]] = collections.defaultdict(set)
    for rec in records.values():
        if rec.committed and rec.xact is not None:
            reporters[rec.xact].add(rec.rid)
    found: collections.Counter[str] = collections.Counter()
    for request_id, xact, count in groups:
        found[request_id] += count
        owner = records.get(request_id)
        if owner is None:
            audit.unattributed += count
            continue
        if not owner.committed:
            audit.failed += count
            continue
        if xact is None:
            audit.attribution = False
        elif reporters.get(xact) != {request_id}:
            audit.cross += count
    for rec in records.values():
        if rec.committed:
            have = found.get(rec.rid, 0)
            audit.lost += max(0, rec.rows - have)
            audit.dup += max(0, have - rec.rows)
    return audit


@dataclasses.dataclass
class Probe:
    """End-of-cell state read inside the cell process."""

    registry: int | None = None  # live Sessions in the registry
    checkedout: int | None = None  # pool.checkedout()
    rss_start: int = 0
    rss_end: int = 0
    elapsed: float = 0.0  # seconds for the request phase
    expected: int = 0  # requests the cell was asked to run


def percentile(values: t.Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); 0.0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))  # ceil without floats drifting
    return ordered[int(rank) - 1]


def summarize(
    records: t.Sequence[Record],
    probe: Probe | None,
    audit: DbAudit | None,
    *,
    hang: bool = False,
) -> dict[str, t.Any]:
    """The metrics of one cell, from its request records and probes."""
    errors: collections.Counter[str] = collections.Counter()
    samples: dict[str, str] = {}
    outcomes: collections.Counter[str] = collections.Counter()
    for rec in records:
        outcomes[rec.outcome] += 1
        if rec.outcome == ERROR:
            name = rec.exc or "Unknown"
            errors[name] += 1
            if rec.message and name not in samples:
                samples[name] = rec.message
    latencies = [rec.latency for rec in records]
    m: dict[str, t.Any] = {
        "requests": len(records),
        "expected": probe.expected if probe else None,
        "outcomes": dict(sorted(outcomes.items())),
        "errors": sum(errors.values()),
        "errors_by_class": dict(sorted(errors.items())),
        "error_samples": samples,
        "stale": sum(1 for rec in records if rec.stale),
        "leaks": sum(1 for rec in records if rec.leaked or (rec.readback not in (-1, rec.rows))),
        "lingering": sum(rec.lingering for rec in records),
        "hang": 1 if hang else 0,
        "registry": probe.registry if probe else None,
        "checkedout": probe.checkedout if probe else None,
        "rss_growth_mb": round((probe.rss_end - probe.rss_start) / 2**20, 1) if probe else None,
        "throughput": round(len(records) / probe.elapsed, 1) if probe and probe.elapsed else None,
        "p50_ms": round(percentile(latencies, 50) * 1000, 1),
        "p99_ms": round(percentile(latencies, 99) * 1000, 1),
        "unfinished": (max(0, probe.expected - len(records)) if probe and not hang else 0),
    }
    if audit is not None:
        m.update(
            db_cross=audit.cross if audit.attribution else None,
            db_failed=audit.failed,
            lost=audit.lost,
            dup=audit.dup,
            unattributed=audit.unattributed,
        )
    else:
        m.update(db_cross=None, db_failed=None, lost=None, dup=None, unattributed=None)
    return m


# Every metric that must be zero for a safe setup.
ANOMALY_KEYS = (
    "hang",
    "errors",
    "stale",
    "leaks",
    "db_cross",
    "db_failed",
    "lost",
    "dup",
    "registry",
    "checkedout",
    "lingering",
    "unfinished",
    "crash",
)


def anomalies(metrics: t.Mapping[str, t.Any]) -> dict[str, int]:
    """The non-zero anomaly counts of a cell (missing or unmeasured counts are skipped)."""
    out: dict[str, int] = {}
    for key in ANOMALY_KEYS:
        value = metrics.get(key)
        if isinstance(value, int) and value > 0:
            out[key] = value
    return out


def judge(kind: str, targets: t.Sequence[str], metrics: t.Mapping[str, t.Any]) -> tuple[bool, str]:
    """Whether a cell did what it must, and a one-line reason.

    A strategy passes with zero anomalies. A baseline passes when it shows the
    hazard its scenario targets (any of ``targets`` > 0): a harness that cannot
    reproduce the race has failed too.
    """
    found = anomalies(metrics)
    if kind == "strategy":
        if not found:
            return True, "clean"
        return False, "anomalies: " + ", ".join(f"{k}={v}" for k, v in found.items())
    shown = {k: v for k, v in found.items() if k in targets}
    if shown:
        return True, "hazard reproduced: " + ", ".join(f"{k}={v}" for k, v in shown.items())
    if "crash" in found:
        return False, f"cell crashed before showing the hazard ({', '.join(targets)})"
    return False, "hazard not reproduced: none of " + ", ".join(targets) + " > 0"
