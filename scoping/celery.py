"""Celery: one Session per task run, removed however the run ends.

::

    from celery import Celery
    import scoping, scoping.celery

    app = Celery("jobs")
    Session = scoping.scoped_session(sessionmaker(engine), scope="auto")
    scoping.celery.install(app, Session)

    @app.task
    def charge(order_id):
        Session.get(Order, order_id).charged = True
        Session.commit()                 # no remove(): install() does it

Unit of isolation: **the task run, keyed by the unit that runs it** (the
Session's own strategy: use ``"greenlet"`` or ``"auto"``). Why not the task
request id as a token: a retry runs again under the *same* id, and so does a
task re-delivered after a worker crash (``acks_late``), so a stale Session
left by an earlier run would be handed to the next one; and the gevent pool
already gives every task run its own greenlet (``-P gevent``; ``-P eventlet``
likewise), whose end scoping notices by itself, even when the run is killed
without any signal (``revoke(terminate=True)``, a hard ``time_limit``, a pool
shut down mid-task). Under ``-P prefork``, ``solo`` and ``threads`` one
thread runs many tasks one after the other, so the removal at the end of each
run is what separates them. A Session built with ``scope="token"`` gets a
fresh token per run (never the request id, for the reason above).

When the Session is removed (always in the unit that ran the task):

- ``task_postrun``: after every run, whatever its state: success, failure
  (``task_failure`` comes first), ``Retry`` (``task_retry`` comes first),
  ``Ignore``/``Reject``, a soft time limit (``SoftTimeLimitExceeded`` is an
  ordinary failure), and a run killed by ``revoke(terminate=True)`` under the
  gevent pool (Celery sends ``task_postrun`` from a ``finally`` while the
  ``GreenletExit`` propagates). A Session with uncommitted work is rolled
  back by ``close()``: nothing from a failed run is ever committed;
- a run nested in another run of the same unit (``task.apply()`` inside a
  task) leaves the outer run's Session alone: only the outermost run of a
  unit removes it;
- ``task_revoked`` is sent by the worker's consumer, not by the task's unit,
  so it only asks the registry to ``collect()`` scopes that have ended.

Fork: on ``worker_process_init`` (each ``-P prefork`` child) the engines the
Session factory binds are disposed with ``scoping.fork.dispose_engines`` (the
child forgets the pooled connections it inherited without closing them: the
parent may still use them). Thread hop: work handed to another thread or
greenlet inside a task gets that unit's own Session, removed when it ends.
Costs: three signal receivers, one dict entry per running task.
"""

from __future__ import annotations

import dataclasses
import typing as t

from scoping import _units
from scoping.errors import ScopingError

__all__ = ["Installation", "install"]


class _Removable(t.Protocol):
    registry: t.Any

    def remove(self) -> None: ...


@dataclasses.dataclass(eq=False)
class Installation:
    """What ``install()`` connected; ``uninstall()`` disconnects it (tests, reloads)."""

    app: t.Any
    session: t.Any
    #: task id -> (the unit running it, its token block or None)
    running: dict[str, tuple[object, t.Any]] = dataclasses.field(default_factory=dict)
    #: unit -> runs in progress in it (more than one only for nested eager runs)
    depth: dict[object, int] = dataclasses.field(default_factory=dict)
    _receivers: list[tuple[t.Any, t.Callable[..., None]]] = dataclasses.field(default_factory=list)

    def uninstall(self) -> None:
        """Disconnect every receiver; Sessions of runs in progress stay with their units."""
        for signal, receiver in self._receivers:
            signal.disconnect(receiver)
        self._receivers.clear()

    # -- receivers ---------------------------------------------------------------

    def _ours(self, task: t.Any) -> bool:
        return getattr(task, "app", None) is self.app

    def prerun(
        self, sender: t.Any = None, task_id: str | None = None, task: t.Any = None, **_: t.Any
    ) -> None:
        task = task if task is not None else sender
        if task_id is None or not self._ours(task):
            return
        unit = _units.current_unit()
        block = None
        if _strategy_name(self.session) == "token":
            block = self.session.scope(object())
            block.__enter__()
        self.depth[unit] = self.depth.get(unit, 0) + 1
        self.running[task_id] = (unit, block)

    def postrun(
        self, sender: t.Any = None, task_id: str | None = None, task: t.Any = None, **_: t.Any
    ) -> None:
        task = task if task is not None else sender
        if task_id is None or not self._ours(task):
            return
        unit, block = self.running.pop(task_id, (None, None))
        left = self.depth.pop(unit, 1) - 1
        if left > 0:  # a nested run ended: the outer run keeps its Session
            self.depth[unit] = left
        if block is not None:
            block.__exit__(None, None, None)
        elif left <= 0:
            self.session.remove()

    def revoked(self, sender: t.Any = None, **_: t.Any) -> None:
        # Sent by the consumer, never from the task's own unit: only sweep ended scopes.
        collect = getattr(self.session.registry, "collect", None)
        if collect is not None:
            collect()

    def process_init(self, **_: t.Any) -> None:
        dispose = getattr(self.session, "dispose_engines", None)
        if dispose is not None:
            dispose()
            return
        from scoping import fork

        fork.dispose_engines(*_engines(self.session))


def _strategy_name(session: t.Any) -> str | None:
    strategy = getattr(session, "strategy", None)
    name = getattr(strategy, "name", None)
    return name if isinstance(name, str) else None


def _engines(session: t.Any) -> list[t.Any]:
    kw = getattr(getattr(session, "session_factory", None), "kw", {}) or {}
    engines = [kw["bind"]] if kw.get("bind") is not None else []
    engines.extend((kw.get("binds") or {}).values())
    return [getattr(e, "engine", e) for e in engines]


def install(app: t.Any, session: _Removable) -> Installation:
    """Scope ``session`` to each run of ``app``'s tasks (see the module doc).

    ``app`` is a ``celery.Celery``; ``session`` a ``scoping.scoped_session``
    (any strategy; ``"auto"`` or ``"greenlet"`` recommended) or SQLAlchemy's
    own ``scoped_session``. Returns an :class:`Installation` whose
    ``uninstall()`` disconnects the receivers. Raises
    :class:`~scoping.errors.ScopingError` for a Session instance or an object
    without ``remove()``, and ``TypeError`` for an ``app`` that is not Celery.
    """
    if not callable(getattr(session, "remove", None)) or not hasattr(session, "registry"):
        raise ScopingError(
            f"scoping.celery.install(app, session): {session!r} is not a scoped_session; "
            "pass the scoped_session registry (Session), not a Session instance (Session())"
        )
    if not hasattr(app, "tasks") or not hasattr(app, "conf"):
        raise TypeError(f"scoping.celery.install(app, session): {app!r} is not a Celery app")
    from celery import signals

    inst = Installation(app, session)
    for signal, receiver in (
        (signals.task_prerun, inst.prerun),
        (signals.task_postrun, inst.postrun),
        (signals.task_revoked, inst.revoked),
        (signals.worker_process_init, inst.process_init),
    ):
        signal.connect(receiver, weak=False)
        inst._receivers.append((signal, receiver))
    return inst
