"""Opt-in concurrency guard: ``scoped_session(..., guard=True)``.

A guarded Session remembers the scope that created it and checks, on every
public Session method (``add``, ``get``, ``execute``, ``flush``, ``commit``,
``rollback``, ``close``, ...) and on every transaction begin, that it is
still used from that scope. A Session object handed to another greenlet,
thread or task raises :class:`~scoping.ScopeViolation` on its first use
there, naming both scopes, instead of corrupting data later.

For the token strategy, where several units may share a token on purpose,
it catches the two ways sharing goes wrong: a unit using the Session while
another unit is *inside* a Session call (suspended mid-statement), and a
unit using it while another unit's transaction holds *writes* (pending or
flushed objects, or ORM DML), which the second unit would then commit or
roll back. Units that take turns (a parent reads, its child reads after it)
are not flagged.

Cost: the Session's class is swapped, once, for a cached subclass whose
guarded methods do one strategy lookup each; three SQLAlchemy event
listeners (begin, flush, transaction end). Proxied attribute reads are not
affected. A Session retired by the registry (its scope ended, or
``close_all()``) is closed without checks.
"""

from __future__ import annotations

import functools
import typing as t

from sqlalchemy import event

from . import _units
from .errors import NoScopeToken, ScopeViolation

if t.TYPE_CHECKING:
    from sqlalchemy.engine import Connection
    from sqlalchemy.orm import ORMExecuteState, Session, SessionTransaction, UOWTransaction

    from .scopes import ScopeStrategy

__all__ = ["SessionGuard", "describe_scope"]

_INFO_KEY = "scoping.guard"
_ATTR = "_scoping_guard"
#: Session methods that check the scope before they run.
GUARDED_METHODS: t.Final = (
    "add",
    "add_all",
    "begin",
    "begin_nested",
    "close",
    "commit",
    "connection",
    "delete",
    "execute",
    "expunge",
    "expunge_all",
    "flush",
    "get",
    "get_one",
    "merge",
    "query",
    "refresh",
    "rollback",
    "scalar",
    "scalars",
)


class _Outside:
    __slots__ = ()

    def __repr__(self) -> str:
        return "<no scope>"


_OUTSIDE: t.Final = _Outside()


def describe_scope(key: object) -> str:
    """A short human name for a scope key (greenlet, task, context or token)."""
    if key is _OUTSIDE:
        return "outside any scope"
    kind = type(key).__name__
    if hasattr(key, "gr_frame") or hasattr(key, "switch"):
        name = getattr(key, "name", None) or getattr(key, "minimal_ident", None)
        return f"greenlet {name or hex(id(key))} ({kind})"
    if hasattr(key, "get_name") and hasattr(key, "done"):
        return f"asyncio task {key.get_name()}"
    if isinstance(key, int) and not isinstance(key, bool):
        return f"{kind} key {key:#x}"
    return f"token {key!r}"


_classes: dict[type, type] = {}


def _guarded_class(cls: type) -> type:
    sub = _classes.get(cls)
    if sub is not None:
        return sub
    namespace: dict[str, t.Any] = {"__module__": cls.__module__}
    for name in GUARDED_METHODS:
        original = getattr(cls, name, None)
        if original is None:
            continue

        def make(name: str, original: t.Callable[..., t.Any]) -> t.Callable[..., t.Any]:
            @functools.wraps(original)
            def method(self: t.Any, *args: t.Any, **kw: t.Any) -> t.Any:
                guard: SessionGuard | None = self.__dict__.get(_ATTR)
                if guard is None or guard.released:
                    return original(self, *args, **kw)
                unit = guard.enter(name)
                try:
                    return original(self, *args, **kw)
                finally:
                    guard.leave(unit)

            return method

        namespace[name] = make(name, original)
    sub = _classes[cls] = type(cls.__name__, (cls,), namespace)
    return sub


class SessionGuard:
    """Checks that one Session is used only from the scope that owns it."""

    __slots__ = ("active", "depth", "holder", "owner", "released", "session", "strategy", "wrote")

    def __init__(self, strategy: ScopeStrategy, session: Session) -> None:
        self.strategy = strategy
        self.owner = strategy.current()
        self.holder: object = None  # the unit whose transaction is open
        self.wrote = False  # that transaction holds writes
        self.active: object = None  # the unit inside a Session call now
        self.depth = 0
        self.released = False  # retired by the registry: no more checks
        self.session = session

    @classmethod
    def install(cls, session: Session, strategy: ScopeStrategy) -> SessionGuard:
        """Attach a guard to ``session`` (once) and return it."""
        existing = session.__dict__.get(_ATTR)
        if isinstance(existing, SessionGuard):
            return existing
        guard = cls(strategy, session)
        session.__dict__[_ATTR] = guard
        session.info[_INFO_KEY] = guard
        session.__class__ = _guarded_class(type(session))
        event.listen(session, "after_begin", guard._on_begin)
        event.listen(session, "after_flush", guard._on_flush)
        event.listen(session, "do_orm_execute", guard._on_execute)
        event.listen(session, "after_transaction_end", guard._on_transaction_end)
        return guard

    @staticmethod
    def release(session: object) -> None:
        """The registry took ``session`` back (scope ended): stop checking it."""
        guard = getattr(session, "__dict__", {}).get(_ATTR)
        if guard is not None:
            guard.released = True

    def enter(self, action: str) -> object:
        unit = self.check(action)
        if self.depth == 0:
            self.active = unit
        self.depth += 1
        return unit

    def leave(self, unit: object) -> None:
        self.depth -= 1
        if self.depth <= 0:
            self.depth = 0
            self.active = None

    def check(self, action: str) -> object:
        """Raise :class:`ScopeViolation` if the current scope may not use the Session.

        Returns the current unit (task or greenlet).
        """
        try:
            key = self.strategy.current()
        except NoScopeToken:
            key = _OUTSIDE
        if key != self.owner:
            raise ScopeViolation(
                f"Session created in {describe_scope(self.owner)} was used ({action}) from "
                f"{describe_scope(key)}: a Session belongs to one scope. Do not pass the "
                f"Session object to other greenlets, threads or tasks; call the scoped_session "
                f"proxy there instead (it gives each scope its own Session)"
            )
        unit = _units.current_unit()
        active = self.active
        if active is not None and active is not unit and not _units.unit_ended(active):
            raise ScopeViolation(
                f"the Session of {describe_scope(key)} was used ({action}) by "
                f"{describe_scope(unit)} while {describe_scope(active)} is inside a Session "
                f"call on it: units that share a token must take turns. Give each its own "
                f"token, or let one finish before another starts"
            )
        holder = self.holder
        if (
            holder is not None
            and holder is not unit
            and (self.wrote or self._pending())
            and not _units.unit_ended(holder)
        ):
            raise ScopeViolation(
                f"the Session of {describe_scope(key)} was used ({action}) by "
                f"{describe_scope(unit)} while {describe_scope(holder)} has a transaction "
                f"open on it with writes: units that share a token must not mix their "
                f"writes. Give each its own token, or commit (or roll back) before another "
                f"unit takes over"
            )
        return unit

    def _pending(self) -> bool:
        session = self.session
        return bool(session._new or session._deleted or session.identity_map._modified)

    def _on_begin(
        self, session: Session, transaction: SessionTransaction, connection: Connection
    ) -> None:
        if self.released:
            return
        self.check("begin")
        if transaction.parent is None:
            self.holder = _units.current_unit()

    def _on_flush(self, session: Session, context: UOWTransaction) -> None:
        self.wrote = True

    def _on_execute(self, state: ORMExecuteState) -> None:
        if state.is_insert or state.is_update or state.is_delete:
            self.wrote = True

    def _on_transaction_end(self, session: Session, transaction: SessionTransaction) -> None:
        if transaction.parent is None:
            self.holder = None
            self.wrote = False
