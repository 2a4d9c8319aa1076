"""Units of concurrency: which one runs now, and when one ends (private).

A *unit* is an asyncio task or a greenlet (a plain OS thread is its main
greenlet). Every module that needs to know about units imports these names
from here; nothing restates them.

Nothing is bound at import time: the greenlet type, the native thread-local
class and gevent's patch state are looked up when first needed, so importing
this module before ``gevent.monkey.patch_all()`` is safe. Callbacks given to
:func:`watch_unit` and :func:`on_thread_exit` may run in a garbage-collector
or weakref callback, a gevent hub callback, an asyncio done-callback or during
thread teardown: they must do no I/O and take no locks.
"""

from __future__ import annotations

import contextvars
import sys
import typing as t
import weakref

if t.TYPE_CHECKING:
    from greenlet import greenlet as Greenlet

__all__ = [
    "current_unit",
    "getcurrent",
    "greenlet_type",
    "is_unit",
    "native_local_class",
    "on_thread_exit",
    "threading_is_patched",
    "unit_ended",
    "unwatch_unit",
    "watch_unit",
]


def getcurrent() -> t.Callable[[], Greenlet]:
    """Return :func:`greenlet.getcurrent` (never patched by gevent, safe to bind)."""
    from greenlet import getcurrent as _getcurrent

    return t.cast("t.Callable[[], Greenlet]", _getcurrent)


_greenlet_type: t.Any = None  # greenlet.greenlet, bound at first use


def greenlet_type() -> t.Any:
    """Return the :class:`greenlet.greenlet` class."""
    global _greenlet_type
    if _greenlet_type is None:
        from greenlet import greenlet

        _greenlet_type = greenlet
    return _greenlet_type


_getcurrent_fn: t.Any = None  # greenlet.getcurrent, bound at first use


def current_unit() -> object:
    """The asyncio task running now, else the current greenlet."""
    asyncio = sys.modules.get("asyncio")
    if asyncio is not None:
        loop = asyncio.events._get_running_loop()
        if loop is not None:
            task = asyncio.current_task(loop)
            if task is not None:
                return task
    global _getcurrent_fn
    if _getcurrent_fn is None:
        _getcurrent_fn = getcurrent()
    return _getcurrent_fn()


def threading_is_patched() -> bool:
    """True once gevent has patched :mod:`threading` in this process."""
    monkey = sys.modules.get("gevent.monkey")
    if monkey is None:
        return False
    return bool(monkey.is_module_patched("threading"))


def native_local_class() -> type:
    """The OS-thread-local class, even after gevent patched ``threading.local``."""
    monkey = sys.modules.get("gevent.monkey")
    if monkey is not None and monkey.is_module_patched("threading"):
        return t.cast(type, monkey.get_original("_thread", "_local"))
    import _thread

    return _thread._local


def is_unit(key: object) -> bool:
    """``True`` for a greenlet or an asyncio task (or future): a key that can end."""
    if isinstance(key, _greenlet_type or greenlet_type()):
        return True
    asyncio = sys.modules.get("asyncio")
    return asyncio is not None and isinstance(key, asyncio.Future)


def unit_ended(unit: object) -> bool:
    """``True`` once a greenlet is dead or an asyncio task is done."""
    if isinstance(unit, _greenlet_type or greenlet_type()):
        return bool(unit.dead)
    asyncio = sys.modules.get("asyncio")
    if asyncio is not None and isinstance(unit, asyncio.Future):
        return bool(unit.done())
    return False


# A fresh, empty Context for done-callbacks: they then neither run in nor
# hold the Context of the task they watch (see ContextVarScope).
_EMPTY = contextvars.Context()


def watch_unit(unit: object, on_end: t.Callable[[t.Any], None]) -> bool:
    """Call ``on_end(unit)`` when ``unit`` (a greenlet or asyncio task) ends.

    gevent greenlets signal through ``rawlink`` (run by the hub), asyncio
    tasks through ``add_done_callback`` (run by the loop, in an empty
    Context), and an OS thread's main greenlet when the thread exits (see
    :func:`on_thread_exit`). Must be called from within ``unit``. Raw
    greenlets cannot signal: return ``False`` so they are polled with
    :func:`unit_ended`; so is anything else. Exact types, no duck typing: a
    user's token that happens to have a ``rawlink``, ``add_done_callback`` or
    ``parent`` attribute is just a token.

    gevent and asyncio call their link or done-callback with the unit, so
    ``on_end`` itself is registered (no closure is made), and
    :func:`unwatch_unit` can take a task's back.
    """
    if isinstance(unit, _greenlet_type or greenlet_type()):
        rawlink = getattr(unit, "rawlink", None)
        if rawlink is not None:  # gevent.Greenlet
            rawlink(on_end)
            return True
        if unit.parent is None:  # a thread's main greenlet
            on_thread_exit(lambda: on_end(unit))
            return True
        return False
    asyncio = sys.modules.get("asyncio")
    if asyncio is not None and isinstance(unit, asyncio.Future):
        unit.add_done_callback(on_end, context=_EMPTY)
        return True
    return False


def unwatch_unit(unit: object, on_end: t.Callable[[t.Any], None]) -> bool:
    """Take back ``watch_unit(unit, on_end)`` where that can be done.

    ``True`` for an asyncio task whose done-callback was ``on_end``: it will
    not run (the loop saves scheduling it, about 1 µs a task). ``False`` for
    anything else, which stays watched.
    """
    asyncio = sys.modules.get("asyncio")
    if asyncio is not None and isinstance(unit, asyncio.Future):
        return bool(unit.remove_done_callback(on_end))
    return False


class _ThreadMarker:
    __slots__ = ("__weakref__",)


_native_local: t.Any = None  # made at first use, from the unpatched class
_thread_refs: set[weakref.ref[_ThreadMarker]] = set()


def on_thread_exit(callback: t.Callable[[], None]) -> None:
    """Call ``callback()`` when the current OS thread exits.

    A marker lives in a native (never gevent-patched) thread-local; CPython
    drops it while the thread is torn down, before ``Thread.join()`` returns,
    and its weakref callback runs the callbacks. In a child process made by
    ``os.fork()`` this also happens for every thread but the forking one.
    Callbacks must not do I/O, and should hold what they need weakly: the
    list lives as long as the thread.
    """
    global _native_local
    local = _native_local
    if local is None:
        local = _native_local = native_local_class()()
    try:
        callbacks: list[t.Callable[[], None]] = local.callbacks
    except AttributeError:
        callbacks = local.callbacks = []
        marker = local.marker = _ThreadMarker()

        def thread_exited(ref: weakref.ref[_ThreadMarker]) -> None:
            _thread_refs.discard(ref)
            for cb in callbacks:
                try:
                    cb()
                except Exception:  # pragma: no cover - callbacks only queue work
                    exc = sys.exc_info()[1]
                    sys.unraisablehook(t.cast(t.Any, _Unraisable(exc, cb, "thread-exit callback")))

        _thread_refs.add(weakref.ref(marker, thread_exited))
    callbacks.append(callback)


def thread_exit_callbacks() -> int:
    """How many callbacks wait for the current thread's exit (for tests)."""
    local = _native_local
    return len(getattr(local, "callbacks", ())) if local is not None else 0


class _Unraisable:
    __slots__ = ("err_msg", "exc_traceback", "exc_type", "exc_value", "object")

    """The argument ``sys.unraisablehook`` expects, for errors in scoping's callbacks."""

    def __init__(self, exc: BaseException | None, obj: object, where: str) -> None:
        self.exc_type = type(exc)
        self.exc_value = exc
        self.exc_traceback = exc.__traceback__ if exc is not None else None
        self.err_msg = f"Exception ignored in scoping's {where}"
        self.object = obj
