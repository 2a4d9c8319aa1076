"""Exceptions and warnings raised by scoping.

Every error says what went wrong and how to fix it. They all derive from
:class:`ScopingError`, so ``except scoping.ScopingError`` catches any of them.
"""

from __future__ import annotations

__all__ = [
    "NoScopeToken",
    "ScopeViolation",
    "ScopingError",
    "ScopingWarning",
]


class ScopingError(Exception):
    """Base class of every error raised by scoping."""


class NoScopeToken(ScopingError, LookupError):
    """The token strategy was used where no token is bound.

    Raised when a ``scope="token"`` session is touched outside any
    ``Session.scope(token)`` block and no ``scopefunc`` was given.
    """


class ScopeViolation(ScopingError):
    """A guarded Session was used from a scope that does not own it.

    Raised only with ``scoped_session(..., guard=True)``: the Session object
    was handed to another greenlet, thread or task, or a shared token's
    Session was touched by two greenlets at once.
    """


class ScopingWarning(UserWarning):
    """A setup that works today but is known to break under greenlets."""
