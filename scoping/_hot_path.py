"""The hot path of :class:`scoping.scoped_session`: proxies with the key inline (private).

Unit of isolation: unchanged, the strategy's. This module is only about cost.
SQLAlchemy's proxies (``Session.add``, ``Session.execute``, ``Session.info``:
32 methods and 11 attributes on 2.1) each read the ``_proxied`` property,
which asks the registry: two Python calls before the Session is reached. For
each key shape a strategy declares (:data:`scoping.scopes.FastKeyKind`), the
lookup is written here once, as source (:func:`lookup_source`), and
:func:`hot_path_class` makes a subclass whose ``_proxied``, ``__call__``,
``remove()`` (for the inlined shapes) and every SQLAlchemy proxy run that
lookup in their own body: a proxied use is one Python call (two where the
key is a function to call: ``"exact"``, ``"fast"``), against three for
SQLAlchemy's thread-local proxy.

Rules:

- only SQLAlchemy's own proxies are replaced; a name that the user's subclass
  (or :class:`scoping.scoped_session`) defines keeps that code. A class that
  defines ``_proxied`` or ``__call__`` gets no generated subclass at all: its
  ``_proxied`` has to see every proxied use;
- each generated method has SQLAlchemy's signature, defaults, annotations and
  docstring (``tests/test_parity.py``, ``tests/test_hot_path.py``); property
  setters stay SQLAlchemy's (they are rare and go through ``_proxied``);
- the subclass keeps the class's name and module, and is made once per
  (class, shape) at the first ``scoped_session`` of that class (8 ms of
  ``inspect.signature`` and ``exec`` on the 2-core machine of
  docs/benchmarks.md), then cached for the life of the process.

Measured by ``python -m stress.bench --only proxy`` (docs/benchmarks.md) and
counted by ``tests/test_call_budget.py``.
"""

from __future__ import annotations

import inspect
import typing as t

from sqlalchemy.orm import scoped_session as _sa_scoped_session

from . import _units

__all__ = ["hot_path_class", "lookup_source", "sqlalchemy_proxies"]

# The key expressions the hot path can write inline, per FastKeyKind. Each is
# evaluated twice on a miss and once on a hit: a local for the key costs every
# hit (3 % of one), a second evaluation costs only misses.
# - "greenlet": the running greenlet is the key, or (a raw greenlet of an
#   unpatched thread, under "thread") not a key at all: the miss asks the
#   strategy, and remove() falls back to it.
# - "context": the running Context's id. gr_context is None until the greenlet
#   has a Context; id(None) is never a key, so that case misses and the
#   strategy makes the Context (and no Session can exist there to remove).
_INLINE_KEYS: dict[str, str] = {
    "greenlet": "_getcurrent()",
    "context": "_id(_getcurrent().gr_context)",
}

# Keys computed before the lookup, into a local (outside the try, so that a
# scopefunc's own KeyError propagates):
# - "exact" and "fast": the strategy's key function (a scopefunc, a token
#   lookup), called once;
# - "token": a scope(token) block's live binding, read inline (one C call);
#   without one, the strategy's key function decides (its error, or a scopefunc).
_COMPUTED_KEYS: dict[str, str] = {
    "exact": "    key = self._fast()\n",
    "token": """\
    binding = self._read_binding()
    if binding is not None and binding.live:
        key = binding.token
    else:
        key = self._fast()
""",
}

_LOCAL_KEY_LOOKUP = """\
    try:
        session = self._sessions[key]
    except KeyError:
        session = self._miss(key)
{after_miss}\
    except TypeError:
        session = self.registry()  # raises the unhashable-key error
"""

_INLINE_KEY_LOOKUP = """\
    try:
        session = self._sessions[{key}]
    except KeyError:
        session = self._miss({key})
{after_miss}"""

_CALL = """\
def __call__(self, **kw):
    if kw:
        return _base_call(self, **kw)
{lookup}\
    return session
"""
# Session() of an AsyncSession gets SQLAlchemy's deprecation warning, checked
# where the Session is made: the attribute read costs a hit 10 % (35 ns), and
# Python shows the warning once per call site anyway.
_ASYNCIO_WARNING = """\
        if session._is_asyncio:
            return _sa_call(self)
"""

_REMOVE = """\
def remove(self):
    session = self.registry._discard({key})
{fallback}\
    if session is not None:
        session.close()
"""
# Where the inlined key may not be the key ("greenlet" under "thread"), a
# remove() that found nothing asks the strategy.
_REMOVE_FALLBACK = """\
    if session is None:
        session = self.registry._pop_current()
"""

_GLOBALS: dict[str, t.Any] = {
    "_getcurrent": _units.getcurrent(),  # never patched by gevent: safe to bind
    "_id": id,  # a global is found one dict sooner than a builtin
    "_sa_call": _sa_scoped_session.__call__,
}


def lookup_source(kind: str, after_miss: str = "") -> str:
    """Return the statements that bind ``session`` to the current scope's Session.

    :param kind: the strategy's :data:`~scoping.scopes.FastKeyKind`.
    :param after_miss: statements (indented 8) run once a miss made the Session.
    """
    key = _INLINE_KEYS.get(kind)
    if key is not None:
        return _INLINE_KEY_LOOKUP.format(key=key, after_miss=after_miss)
    computed = _COMPUTED_KEYS.get(kind, _COMPUTED_KEYS["exact"])  # "fast" calls it too
    return computed + _LOCAL_KEY_LOOKUP.format(after_miss=after_miss)


def sqlalchemy_proxies() -> tuple[list[str], list[str]]:
    """Return SQLAlchemy's proxied (method, attribute) names on ``scoped_session``.

    Read from the installed SQLAlchemy, 2.0 or 2.1: every function or
    property getter of its ``scoped_session`` that goes through ``_proxied``.
    """
    methods: list[str] = []
    attributes: list[str] = []
    for name, value in vars(_sa_scoped_session).items():
        if name == "_proxied":
            continue
        if isinstance(value, property):
            if value.fget is not None and "_proxied" in value.fget.__code__.co_names:
                attributes.append(name)
        elif inspect.isfunction(value) and "_proxied" in value.__code__.co_names:
            methods.append(name)
    return methods, attributes


def _forwarding_method(name: str, proxy: t.Any, lookup: str, namespace: dict[str, t.Any]) -> t.Any:
    """SQLAlchemy's proxy ``name`` rewritten to run ``lookup`` inline.

    Same parameters (names, kinds, defaults), forwarded as SQLAlchemy's own
    proxy forwards them to the Session's method of the same name.
    """
    params = list(inspect.signature(proxy).parameters.values())[1:]  # self
    head, args = ["self"], []
    star = False
    for param in params:
        if not param.name.isidentifier():  # pragma: no cover - SQLAlchemy's own names
            raise TypeError(f"cannot forward parameter {param.name!r} of {name}")
        if param.kind is param.VAR_POSITIONAL:
            head.append(f"*{param.name}")
            args.append(f"*{param.name}")
            star = True
        elif param.kind is param.KEYWORD_ONLY:
            if not star:
                head.append("*")
                star = True
            head.append(param.name)
            args.append(f"{param.name}={param.name}")
        elif param.kind is param.VAR_KEYWORD:
            head.append(f"**{param.name}")
            args.append(f"**{param.name}")
        else:  # positional: forwarded by position, as the Session's own layout
            head.append(param.name)
            args.append(param.name)
    positional_only = [p for p in params if p.kind is p.POSITIONAL_ONLY]
    if positional_only:
        head.insert(len(positional_only) + 1, "/")
    source = (
        f"def {name}({', '.join(head)}):\n{lookup}    return session.{name}({', '.join(args)})\n"
    )
    exec(source, namespace)  # built from SQLAlchemy's own parameter names only
    method = namespace.pop(name)
    method.__defaults__ = proxy.__defaults__
    method.__kwdefaults__ = proxy.__kwdefaults__
    method.__annotations__ = dict(proxy.__annotations__)
    method.__doc__ = proxy.__doc__
    return method


def _forwarding_property(
    name: str, proxy: property, lookup: str, namespace: dict[str, t.Any]
) -> property:
    """SQLAlchemy's proxied attribute ``name``, read with ``lookup`` inline."""
    exec(f"def {name}(self):\n{lookup}    return session.{name}\n", namespace)
    getter = namespace.pop(name)
    getter.__annotations__ = dict(getattr(proxy.fget, "__annotations__", {}))
    return property(getter, proxy.fset, proxy.fdel, proxy.__doc__)


_made: dict[tuple[type[t.Any], str], type[t.Any]] = {}


def hot_path_class(cls: type[t.Any], kind: str, base: type[t.Any]) -> type[t.Any] | None:
    """Return the subclass of ``cls`` whose proxies run the ``kind`` lookup inline.

    :param cls: ``base`` or a subclass of it; a generated class stands for
      the class it was made from.
    :param kind: the strategy's :data:`~scoping.scopes.FastKeyKind`.
    :param base: :class:`scoping.scoped_session`, whose generic ``_proxied``
      and ``__call__`` the generated ones replace.

    None when ``cls`` (or a class between it and ``base``) defines
    ``_proxied`` or ``__call__`` itself: its own code then runs as written.
    A ``remove()`` or proxy that such a class defines is likewise kept, and
    the generated class inlines only the names it leaves to ``base``.
    Made once per (cls, kind) and cached; it has ``cls``'s name, module and
    qualified name, and ``isinstance`` with ``cls`` holds.
    """
    while "_hot_path_kind" in vars(cls):  # a generated class: start from its own
        cls = cls.__bases__[0]
    made = _made.get((cls, kind))
    if made is not None:
        return made
    for klass in cls.__mro__:
        if klass is base:
            break
        if "_proxied" in vars(klass) or "__call__" in vars(klass):
            return None
    lookup = lookup_source(kind)
    namespace = dict(_GLOBALS, _base_call=cls.__call__)
    body: dict[str, t.Any] = {
        "__module__": cls.__module__,
        "__qualname__": cls.__qualname__,
        "__doc__": cls.__doc__,
        "__slots__": (),
        "_hot_path_kind": kind,
    }
    exec(f"def _proxied(self):\n{lookup}    return session\n", namespace)
    body["_proxied"] = property(namespace.pop("_proxied"))
    exec(_CALL.format(lookup=lookup_source(kind, _ASYNCIO_WARNING)), namespace)
    body["__call__"] = namespace.pop("__call__")
    body["__call__"].__doc__ = cls.__call__.__doc__
    key = _INLINE_KEYS.get(kind)
    if key is not None and inspect.getattr_static(cls, "remove") is vars(base)["remove"]:
        fallback = _REMOVE_FALLBACK if kind == "greenlet" else ""
        exec(_REMOVE.format(key=key, fallback=fallback), namespace)
        body["remove"] = namespace.pop("remove")
        body["remove"].__doc__ = cls.remove.__doc__
    methods, attributes = sqlalchemy_proxies()
    for name in methods + attributes:
        proxy = vars(_sa_scoped_session)[name]
        if inspect.getattr_static(cls, name) is not proxy:
            continue  # a subclass defines it: its code runs as written
        if isinstance(proxy, property):
            body[name] = _forwarding_property(name, proxy, lookup, namespace)
        else:
            body[name] = _forwarding_method(name, proxy, lookup, namespace)
    for value in body.values():
        function = value.fget if isinstance(value, property) else value
        if inspect.isfunction(function):
            function.__module__ = cls.__module__
            function.__qualname__ = f"{cls.__qualname__}.{function.__name__}"
    made = type(cls.__name__, (cls,), body)
    _made[(cls, kind)] = made
    return made
