"""scoping: the right SQLAlchemy Session in the right place.

One Session per thread, greenlet, execution context or explicit token, behind
SQLAlchemy's own ``scoped_session`` API::

    import scoping
    from sqlalchemy.orm import sessionmaker

    Session = scoping.scoped_session(sessionmaker(bind=engine), scope="greenlet")
    Session.add(obj)
    Session.commit()
    with Session.scope():          # the Session is removed on exit
        ...

Importing scoping imports neither gevent nor psycopg2 and binds nothing from
:mod:`threading`, so it is safe before or after ``gevent.monkey.patch_all()``.
"""

from __future__ import annotations

import typing as t

from .errors import (
    NoScopeToken,
    ScopeEnded,
    ScopeReentered,
    ScopeViolation,
    ScopingError,
    ScopingWarning,
)
from .registry import Registry
from .scopes import (
    AutoScope,
    BaseScope,
    ContextVarScope,
    GreenletScope,
    ScopeStrategy,
    TaskScope,
    ThreadScope,
    TokenScope,
)
from .session import scoped_session

if t.TYPE_CHECKING:
    from .doctor import Diagnosis

__all__ = [
    "AutoScope",
    "BaseScope",
    "ContextVarScope",
    "GreenletScope",
    "NoScopeToken",
    "Registry",
    "ScopeEnded",
    "ScopeReentered",
    "ScopeStrategy",
    "ScopeViolation",
    "ScopingError",
    "ScopingWarning",
    "TaskScope",
    "ThreadScope",
    "TokenScope",
    "__version__",
    "diagnose",
    "scoped_session",
]

__version__ = "0.1.0"


def diagnose() -> Diagnosis:
    """Inspect this process and say which scoping setup is safe (see :mod:`scoping.doctor`)."""
    from .doctor import diagnose as _diagnose

    return _diagnose()
