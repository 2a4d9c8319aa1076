"""Opt-in concurrency guard: ``scoped_session(..., guard=True)``.

A guarded Session remembers the scope that created it and checks, on every
ORM execute, flush and transaction begin, that it is still used from that
scope. A Session object handed to another greenlet, thread or task raises
:class:`~scoping.ScopeViolation` on its first use there, naming both scopes,
instead of corrupting data later. For the token strategy, where several
greenlets may share a token on purpose, it also catches two of them touching
the shared Session while the other's transaction is open.

Cost: three SQLAlchemy event listeners per Session and one strategy lookup per
execute, flush or begin; proxied attribute reads are not affected.
"""

from __future__ import annotations

import typing as t

from sqlalchemy import event

from .errors import NoScopeToken, ScopeViolation
from .scopes import ScopeStrategy, _current_unit, _getcurrent, unit_ended

if t.TYPE_CHECKING:
    from sqlalchemy.engine import Connection
    from sqlalchemy.orm import ORMExecuteState, Session, SessionTransaction, UOWTransaction

__all__ = ["SessionGuard", "describe_scope"]

_INFO_KEY = "scoping.guard"


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


class SessionGuard:
    """Checks that one Session is used only from the scope that owns it."""

    __slots__ = ("_getcurrent", "holder", "owner", "strategy")

    def __init__(self, strategy: ScopeStrategy) -> None:
        self.strategy = strategy
        self.owner = strategy.current()
        self.holder: object = None
        self._getcurrent = _getcurrent()

    @classmethod
    def install(cls, session: Session, strategy: ScopeStrategy) -> SessionGuard:
        """Attach a guard to ``session`` (once) and return it."""
        existing = session.info.get(_INFO_KEY)
        if isinstance(existing, SessionGuard):
            return existing
        guard = cls(strategy)
        session.info[_INFO_KEY] = guard
        event.listen(session, "do_orm_execute", guard._on_execute)
        event.listen(session, "before_flush", guard._on_flush)
        event.listen(session, "after_begin", guard._on_begin)
        event.listen(session, "after_transaction_end", guard._on_transaction_end)
        return guard

    def check(self, action: str) -> None:
        """Raise :class:`ScopeViolation` if the current scope does not own the Session."""
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
        holder = self.holder
        if holder is not None:
            unit = _current_unit(self._getcurrent)
            if holder is not unit and not unit_ended(holder):
                raise ScopeViolation(
                    f"the Session of {describe_scope(key)} was used ({action}) by "
                    f"{describe_scope(unit)} while {describe_scope(holder)} has a transaction "
                    f"open on it: greenlets that share a token must not use its Session at "
                    f"the same time. Give each greenlet its own token, or finish (commit or "
                    f"rollback) before another greenlet takes over"
                )

    def _on_execute(self, state: ORMExecuteState) -> None:
        self.check("execute")

    def _on_flush(self, session: Session, context: UOWTransaction, instances: object) -> None:
        self.check("flush")

    def _on_begin(
        self, session: Session, transaction: SessionTransaction, connection: Connection
    ) -> None:
        self.check("begin")
        if transaction.parent is None:
            self.holder = _current_unit(self._getcurrent)

    def _on_transaction_end(self, session: Session, transaction: SessionTransaction) -> None:
        if transaction.parent is None:
            self.holder = None
