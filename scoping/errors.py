"""Exceptions and warnings raised by scoping.

Every error says what went wrong and how to fix it. They all derive from
:class:`ScopingError`, so ``except scoping.ScopingError`` catches any of them.
"""

from __future__ import annotations

__all__ = [
    "NoScopeToken",
    "ScopeEnded",
    "ScopeReentered",
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


class ScopeEnded(NoScopeToken):
    """A token is bound, but every ``Session.scope(token)`` block for it has exited.

    Raised when a task or greenlet that copied its creator's context (and so
    its token) makes a Session after the block ended: that Session would
    belong to nobody and be handed to the next block for the same token.
    """


class ScopeReentered(ScopingError, RuntimeError):
    """One ``Session.scope()`` object was entered while it was already entered.

    Each ``with`` needs its own ``Session.scope(...)`` call; nested blocks for
    the same scope share the Session anyway.
    """


class ScopeViolation(ScopingError):
    """A guarded Session was used from a scope that does not own it.

    Raised only with ``scoped_session(..., guard=True)``: the Session object
    was handed to another greenlet, thread or task, or a shared token's
    Session was touched by two greenlets at once.
    """


class ScopingWarning(UserWarning):
    """A setup that works today but is known to break under greenlets."""
