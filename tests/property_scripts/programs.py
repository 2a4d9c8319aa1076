"""Generated programs of scoped-Session operations, run by one runtime and checked by a model.

A *program* is a list of steps ``(op, a, b)`` of small integers and names, as hypothesis
draws them. The driver interprets each step against the units that exist at that moment:
``a`` picks the unit (modulo how many qualify), ``b`` picks a token, a spawn kind or a
block. Every unit (thread, raw greenlet, gevent greenlet, asyncio task, ``to_thread``
call) runs the same loop: wait for a command, run it, wait again. Scope blocks are real
``with`` statements nested in that loop, so a kill, a cancel or a ``gevent.Timeout``
unwinds them exactly as it would unwind application code.

The model says, for every strategy, which *scope* the code runs in (a thread, a greenlet,
a task, a :class:`contextvars.Context`, a token block) independently of the library, and
the checks are:

- isolation: a Session is only ever returned in the scope that first got it;
- stability and no use after close: a live scope keeps its Session until ``remove()``, the
  outermost ``scope()`` exit or ``close_all()``, and ``Session()`` never returns a closed
  Session;
- ``remove()`` and the outermost ``scope()`` exit close the scope's Session;
- at the end (every unit ended, then ``gc.collect()`` and ``registry.collect()``): the
  registry and every collection of its bookkeeping are empty, every Session was closed
  exactly once, and the scoped_session itself can be garbage-collected;
- in a forked child: the registry forgets what it inherited and never closes it;
- nothing escapes from a callback (``sys.unraisablehook``, ``threading.excepthook``, the
  asyncio loop's exception handler, gevent's ``hub.handle_error``, warnings logged by
  ``scoping``).

gevent is never imported here unless the runtime is ``"gevent"``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import gc
import itertools
import json
import logging
import os
import queue
import sys
import tempfile
import threading
import traceback
import types
import typing as t
import weakref

import greenlet
from sqlalchemy.orm import Session, sessionmaker

import scoping
from scoping.errors import NoScopeToken, ScopingError

try:
    from scoping.scopes import STRATEGY_NAMES
except ImportError:  # pragma: no cover - until the single list lands in scoping.scopes
    STRATEGY_NAMES = ("thread", "greenlet", "contextvar", "token", "auto")

TOKENS = ("t0", "t1", "t2")
REPLY_TIMEOUT = 20.0  # seconds a driver waits for one unit to answer one command

SPAWN_KINDS: dict[str, tuple[str, ...]] = {
    "greenlets": ("greenlet", "greenlet-copy", "greenlet-shared"),
    "threads": ("thread", "thread-copy"),
    "asyncio": ("task", "task-shared", "to_thread"),
    "gevent": ("spawn", "spawn-copy", "spawn-shared", "thread"),
}
_COMMON_OPS = (
    "get",
    "get",
    "remove",
    "enter",
    "enter",
    "exit",
    "reenter",
    "spawn",
    "spawn",
    "finish",
    "collect",
    "close_all",
    "fork",
)
OPS: dict[str, tuple[str, ...]] = {
    "greenlets": (*_COMMON_OPS, "kill", "abandon", "ctx_run"),
    "threads": (*_COMMON_OPS, "abandon", "ctx_run"),
    "asyncio": (*_COMMON_OPS, "kill", "abandon"),
    "gevent": (*_COMMON_OPS, "kill", "abandon", "ctx_run", "timeout", "catch"),
}
KILLABLE = frozenset(
    {
        "greenlet",
        "greenlet-copy",
        "greenlet-shared",
        "spawn",
        "spawn-copy",
        "spawn-shared",
        "task",
        "task-shared",
    }
)
REFUSALS = (ScopingError, RuntimeError)  # how re-entering a live scope() block may be refused

Step = tuple[str, int, int]
MAX_STEPS = 30


def seed_programs(runtime: str) -> list[list[Step]]:
    """Programs every run tries first (hypothesis ``@example``): the edges of issue 9."""
    kinds = SPAWN_KINDS[runtime]
    copy = kinds.index("task" if runtime == "asyncio" else f"{kinds[0]}-copy")
    shared = next((i for i, k in enumerate(kinds) if k.endswith("-shared")), copy)
    seeds: list[list[Step]] = [
        # a child that copied a token block's context outlives the block
        [("enter", 0, 0), ("spawn", 0, copy), ("exit", 0, 0), ("get", 1, 0)],
        # one block object entered by a second unit while the first is inside it
        [("spawn", 0, 0), ("enter", 0, 0), ("reenter", 1, 0), ("exit", 0, 0), ("get", 1, 0)],
        # two units share one Context; the one that made the Session ends first
        [
            ("spawn", 0, shared),
            ("spawn", 0, shared),
            ("get", 1, 0),
            ("finish", 1, 0),
            ("get", 1, 0),
        ],
        # fork while other units hold Sessions, one of them inside a block
        [("get", 0, 0), ("spawn", 0, 0), ("enter", 1, 0), ("get", 1, 0), ("fork", 0, 0)],
        # close_all() while a block is open, then the block goes on
        [("enter", 0, 0), ("get", 0, 0), ("close_all", 0, 0), ("get", 0, 0), ("exit", 0, 0)],
    ]
    if "abandon" in OPS[runtime]:
        seeds.append([("enter", 0, 0), ("get", 0, 0), ("abandon", 0, 0)])
    if "kill" in OPS[runtime]:
        seeds.append([("spawn", 0, 0), ("enter", 1, 0), ("get", 1, 0), ("kill", 1, 0)])
    if "to_thread" in kinds:
        to_thread = kinds.index("to_thread")
        seeds.append(
            [
                ("enter", 0, 0),
                ("spawn", 0, to_thread),
                ("get", 1, 0),
                ("finish", 1, 0),
                ("get", 0, 0),
            ]
        )
    if "timeout" in OPS[runtime]:
        seeds.append([("enter", 0, 0), ("get", 0, 0), ("timeout", 0, 0), ("get", 0, 0)])
    return seeds


def with_seeds(test: t.Any, runtime: str) -> t.Any:
    """Apply :func:`seed_programs` to a hypothesis test taking ``steps``."""
    from hypothesis import example

    for steps in seed_programs(runtime):
        test = example(steps=steps)(test)
    return test


def step_strategy(runtime: str) -> t.Any:
    """A hypothesis strategy for one step of a program under ``runtime``."""
    from hypothesis import strategies as st

    small = st.integers(min_value=0, max_value=11)
    return st.tuples(st.sampled_from(OPS[runtime]), small, small)


# The model's own copy of the token binding, set and reset next to the library's, so
# that copies of a Context (create_task, to_thread, gr_context) carry it the same way.
MODEL_TOKEN: contextvars.ContextVar[tuple[str, int] | None] = contextvars.ContextVar(
    "properties.model_token", default=None
)
_SCRATCH: contextvars.ContextVar[int] = contextvars.ContextVar("properties.scratch")

WORLD: World | None = None  # the example running now (one at a time per process)


class CountingSession(Session):
    """A Session that tells the running example when it is made and closed."""

    def __init__(self, *args: t.Any, **kw: t.Any) -> None:
        super().__init__(*args, **kw)
        world = WORLD
        self._p_world = world
        self._p_serial = world.session_made() if world is not None else -1

    def close(self) -> None:
        world = self._p_world
        if world is not None:
            world.session_closed(self._p_serial)
            if world.yield_in_close is not None:
                # Like a ROLLBACK under gevent: other greenlets run while it is sent (and
                # it fails loudly if the registry ever closes a Session in the hub).
                world.yield_in_close()
        super().close()


def make_factory() -> sessionmaker[CountingSession]:
    return sessionmaker(class_=CountingSession)


class PropertyFailure(AssertionError):
    pass


class _Level:
    __slots__ = ("blk", "handle", "key", "kind", "scope", "serial", "token")

    def __init__(
        self,
        kind: str,
        blk: t.Any = None,
        token: str | None = None,
        key: t.Any = None,
        handle: t.Any = None,
    ) -> None:
        self.kind = kind
        self.blk = blk
        self.token = token
        self.key = key
        self.scope: tuple[t.Any, ...] | None = None  # the model scope at entry
        self.serial: int | None = None  # the Session __enter__ handed out
        self.handle = handle


class World:
    """The model of one example, and what it saw."""

    def __init__(self, strategy: str, runtime: str, S: t.Any) -> None:
        self.strategy = strategy
        self.runtime = runtime
        self.S = S
        monkey = sys.modules.get("gevent.monkey")
        self.per_greenlet_threads = bool(monkey and monkey.is_module_patched("threading"))
        self.trace: list[str] = []
        self.dropped_greenlets = False  # an abandoned raw greenlet was dropped
        self.violations: list[str] = []
        self.errors: list[str] = []
        self.closes: dict[int, int] = {}
        self.owner: dict[int, tuple[t.Any, ...]] = {}
        self.current: dict[tuple[t.Any, ...], int] = {}
        self.gen: collections.Counter[t.Any] = collections.Counter()
        self.depth: collections.Counter[t.Any] = collections.Counter()
        self.epoch: collections.Counter[str] = collections.Counter()
        self.era = 0
        self.names: dict[t.Any, str] = {}
        self._ids: weakref.WeakKeyDictionary[t.Any, int] = weakref.WeakKeyDictionary()
        self._ctx_ids: dict[int, tuple[weakref.ref[contextvars.Context], int]] = {}
        self._counter = itertools.count(1)
        self._serials = itertools.count(1)
        self.forked_child = False
        self.inherited: frozenset[int] = frozenset()
        self.driver: t.Any = None
        self.yield_in_close: t.Callable[[], None] | None = None

    # -- bookkeeping of Sessions -------------------------------------------------------

    def session_made(self) -> int:
        serial = next(self._serials)
        self.closes[serial] = 0
        return serial

    def session_closed(self, serial: int) -> None:
        n = self.closes.get(serial, 0) + 1
        self.closes[serial] = n
        if self.forked_child and serial in self.inherited:
            self.violation(f"the forked child closed Session #{serial}, inherited from its parent")
        elif n > 1:
            self.violation(f"Session #{serial} was closed {n} times")

    def note(self, line: str) -> None:
        self.trace.append(line)

    def violation(self, text: str) -> None:
        self.violations.append(text)
        self.trace.append(f"  !! {text}")

    def error(self, text: str) -> None:
        self.errors.append(text)
        self.trace.append(f"  !! escaped from a callback: {text.splitlines()[-1]}")

    # -- the model -----------------------------------------------------------------------

    def _oid(self, obj: t.Any, label: str) -> int:
        try:
            return self._ids[obj]
        except KeyError:
            n = self._ids[obj] = next(self._counter)
            self.names[n] = label
            return n

    def _ctx_id(self, ctx: contextvars.Context, label: str) -> int:
        entry = self._ctx_ids.get(id(ctx))
        if entry is not None and entry[0]() is ctx:
            return entry[1]
        n = next(self._counter)
        self._ctx_ids[id(ctx)] = (weakref.ref(ctx), n)
        self.names[n] = label
        return n

    def base(self, unit: Unit) -> tuple[t.Any, ...] | None:
        """The scope ``unit`` runs in now, by the strategy's definition (None: no scope)."""
        strategy = self.strategy
        if strategy == "token":
            bound = MODEL_TOKEN.get()
            if bound is None:
                return None
            token, epoch = bound
            if self.depth[token] > 0 and self.epoch[token] == epoch:
                return ("token", token, epoch)
            return ("orphan", token, unit.uid)
        if strategy in ("contextvar", "auto"):
            # scoping.scopes: the current Context, in every runtime (tasks included)
            ctx = greenlet.getcurrent().gr_context
            if ctx is None:
                return None
            return ("ctx", self._ctx_id(ctx, f"a Context used by {unit.name}"))
        if strategy == "thread" and not self.per_greenlet_threads:
            return ("thread", self._oid(threading.current_thread(), f"the thread of {unit.name}"))
        return ("greenlet", self._oid(greenlet.getcurrent(), f"the greenlet of {unit.name}"))

    def scope_of(self, base: tuple[t.Any, ...]) -> tuple[t.Any, ...]:
        return (base, self.gen[base], self.era)

    def describe(self, scope: tuple[t.Any, ...]) -> str:
        base, gen, era = scope
        kind = base[0]
        if kind == "token":
            text = f"block {base[2]} of token {base[1]!r}"
        elif kind == "orphan":
            text = f"token {base[1]!r} inherited by u{base[2]} after its block ended"
        else:
            text = self.names.get(base[1], repr(base))
        return f"{text} (generation {gen}, era {era})"

    def check_session(self, unit: Unit, session: t.Any, how: str) -> None:
        base = self.base(unit)
        serial = getattr(session, "_p_serial", None)
        if serial is None:
            self.violation(f"{how} in {unit.name} returned {session!r}, not a Session of this run")
            return
        if base is None:
            self.violation(f"{how} in {unit.name} returned Session #{serial} outside any scope")
            return
        scope = self.scope_of(base)
        if self.closes.get(serial, 0):
            self.violation(
                f"{how} in {unit.name} returned Session #{serial}, already closed "
                f"(scope: {self.describe(scope)})"
            )
        expected = self.current.get(scope)
        owner = self.owner.get(serial)
        if owner is not None and owner != scope:
            self.violation(
                f"{how} in {unit.name}, scope {self.describe(scope)}, returned Session "
                f"#{serial} of scope {self.describe(owner)}"
            )
        elif expected is not None and expected != serial:
            self.violation(
                f"{how} in {unit.name}: the Session of live scope {self.describe(scope)} "
                f"changed from #{expected} to #{serial} without remove()"
            )
        elif expected is None:
            self.current[scope] = serial
            self.owner[serial] = scope
        unit.note(f"{how} -> #{serial}")

    def scope_ended(self, base: tuple[t.Any, ...], why: str, unit: Unit) -> None:
        """``remove()`` or the outermost block exit: the scope's Session is closed now."""
        scope = self.scope_of(base)
        serial = self.current.pop(scope, None)
        self.gen[base] += 1
        closes = self.closes.get(serial)
        # An abandoned greenlet's block exits while the collector kills it, after the
        # registry retired its scope: the registry closes that Session just after the
        # exit, and the end check still demands exactly one close().
        retiring = unit.abandoned and not closes
        if serial is not None and closes != 1 and not retiring:
            self.violation(
                f"{why} in {unit.name} left Session #{serial} of {self.describe(scope)} "
                f"with {self.closes.get(serial)} close() calls (expected 1)"
            )

    def after_enter(self, unit: Unit, token: str | None, session: t.Any, how: str) -> _Level:
        handle = None
        if self.strategy == "token":
            assert token is not None
            if self.depth[token] == 0:
                self.epoch[token] += 1
            self.depth[token] += 1
            handle = MODEL_TOKEN.set((token, self.epoch[token]))
            key: t.Any = token
        else:
            key = self.base(unit)
            self.depth[key] += 1
        self.check_session(unit, session, how)
        level = _Level("block", token=token, key=key, handle=handle)
        base = self.base(unit)
        level.scope = self.scope_of(base) if base is not None else None
        level.serial = getattr(session, "_p_serial", None)
        return level

    def before_exit(self, unit: Unit, level: _Level) -> None:
        """The Session ``with ... as session`` handed out is still open, unless removed."""
        serial = level.serial
        if serial is None or level.scope is None or self.current.get(level.scope) != serial:
            return  # remove() or close_all() ended it on purpose
        if self.closes.get(serial):
            self.violation(
                f"Session #{serial}, handed out by scope().__enter__ in {unit.name}, was "
                f"closed while its block was still open ({self.describe(level.scope)})"
            )

    def after_exit(self, unit: Unit, level: _Level) -> None:
        key = level.key
        if self.strategy == "token":
            base: tuple[t.Any, ...] = ("token", key, self.epoch[key])
        else:
            base = key
        self.depth[key] -= 1
        if level.handle is not None:
            MODEL_TOKEN.reset(level.handle)
        if self.depth[key] == 0:
            del self.depth[key]
            self.scope_ended(base, "the outermost scope() exit", unit)

    def after_close_all(self) -> None:
        for scope, serial in list(self.current.items()):
            if self.closes.get(serial) != 1:
                self.violation(
                    f"close_all() left Session #{serial} of {self.describe(scope)} with "
                    f"{self.closes.get(serial)} close() calls"
                )
        self.current.clear()
        self.era += 1

    def failure(self, header: str) -> PropertyFailure:
        lines = [header, f"strategy={self.strategy!r} runtime={self.runtime!r}", "trace:"]
        lines += [f"  {line}" for line in self.trace[-80:]]
        if self.errors:
            lines.append("escaped from callbacks:")
            lines += self.errors
        return PropertyFailure("\n".join(lines))


# --- units ----------------------------------------------------------------------------


class Unit:
    """One unit of concurrency that runs commands; subclasses say how it waits."""

    killable = False

    def __init__(self, world: World, uid: int, kind: str, parent: Unit | None) -> None:
        self.world = world
        self.uid = uid
        self.kind = kind
        self.name = f"u{uid}({kind})"
        self.parent_name = parent.name if parent is not None else "driver"
        self.levels: list[_Level] = []
        self.ended = False
        self.busy = False  # waiting for a child (to_thread): takes no command
        self.abandoned = False
        self.shared_ctx: contextvars.Context | None = None

    def note(self, text: str) -> None:
        self.world.note(f"    {self.name}: {text}")

    def open_blocks(self) -> list[_Level]:
        return [level for level in self.levels if level.kind == "block"]

    # -- operations that do not wait ------------------------------------------------------

    def op_get(self) -> None:
        world, S = self.world, self.world.S
        try:
            session = S()
        except NoScopeToken as exc:  # or ScopeEnded, its subclass
            base = world.base(self)
            if base is not None and base[0] != "orphan":
                world.violation(f"Session() in {self.name} raised {exc!r} inside {base}")
            self.note(f"Session() -> {type(exc).__name__}")
            return
        except REFUSALS as exc:
            base = world.base(self)
            if base is None or base[0] != "orphan":
                world.violation(f"Session() in {self.name} raised {exc!r}")
            self.note(f"Session() refused: {type(exc).__name__}")
            return
        world.check_session(self, session, "Session()")
        info = S.info  # through the proxy
        if info is not session.info:
            world.violation(f"the proxy in {self.name} used another Session than Session()")

    def op_remove(self) -> None:
        world = self.world
        try:
            world.S.remove()
        except NoScopeToken as exc:
            base = world.base(self)
            if base is not None and base[0] != "orphan":
                world.violation(f"remove() in {self.name} raised {exc!r} inside {base}")
            self.note(f"remove() -> {type(exc).__name__}")
            return
        base = world.base(self)
        if base is not None:
            world.scope_ended(base, "remove()", self)
        self.note("remove()")

    def child_after_fork(self, write_fd: int) -> None:
        """In a forked child: use the registry, then report what went wrong as JSON."""
        world, S = self.world, self.world.S
        world.forked_child = True
        world.inherited = frozenset(world.closes)
        before = dict(world.closes)
        start = len(world.violations)
        problems: list[str] = []
        try:
            try:
                session = S()
            except (NoScopeToken, *REFUSALS):
                session = None
            serial = getattr(session, "_p_serial", None)
            if serial in world.inherited:
                problems.append(f"Session() in the child returned inherited Session #{serial}")
            S.remove()
            if serial is not None and serial not in world.inherited and world.closes[serial] != 1:
                problems.append(f"remove() in the child did not close Session #{serial}")

            def forgetful() -> None:
                try:
                    S()  # and never remove()
                except NoScopeToken:
                    pass

            th = threading.Thread(target=forgetful)
            th.start()
            th.join()
            gc.collect()
            S.registry.collect()
            if len(S.registry):
                problems.append(
                    f"the child's registry holds {len(S.registry)} Sessions after collect()"
                )
            for serial_, count in world.closes.items():
                if serial_ in world.inherited:
                    if count != before[serial_]:
                        problems.append(f"the child closed inherited Session #{serial_}")
                elif count != 1:
                    problems.append(f"the child's Session #{serial_} was closed {count} times")
        except BaseException:
            problems.append(traceback.format_exc())
        problems += world.violations[start:]
        data = json.dumps(problems).encode()
        while data:
            data = data[os.write(write_fd, data) :]

    def op_fork(self) -> None:
        # The child reports through a file, not a pipe: under gevent the parent's end of
        # a pipe is not reliably at EOF when the child exits.
        with tempfile.TemporaryFile() as report:
            pid = os.fork()
            if pid == 0:  # the child
                code = 0
                try:
                    self.child_after_fork(report.fileno())
                except BaseException:
                    code = 1
                finally:
                    os._exit(code)
            _, status = os.waitpid(pid, 0)
            report.seek(0)
            raw = report.read()
        if status != 0 or not raw:
            self.world.violation(f"the forked child of {self.name} exited with status {status}")
            return
        for problem in json.loads(raw):
            self.world.violation(f"forked child of {self.name}: {problem}")
        self.note("fork() -> child checked")


class SyncUnit(Unit):
    """A unit whose code runs synchronously: greenlets, threads, to_thread calls."""

    timeout_type: tuple[type[BaseException], ...] = ()

    def wait_command(self) -> tuple[str, int]:
        raise NotImplementedError

    def spawn(self, kind: str) -> None:
        self.world.driver.spawn(kind, self)

    def run(self) -> str:
        world = self.world
        try:
            self.body()
        except greenlet.GreenletExit:
            pass
        except BaseException as exc:
            if not self.expected_end(exc):
                world.violation(f"{self.name} died: {traceback.format_exc()}")
        finally:
            self.ended = True
            self.levels.clear()
        return "ended"

    def expected_end(self, exc: BaseException) -> bool:
        return False

    def body(self) -> None:
        while True:
            try:
                result = self.loop()
            except self.timeout_type:
                self.note("gevent.Timeout caught at the top")
                continue
            if result == "finish":
                return

    def loop(self) -> str:
        while True:
            op, arg = self.wait_command()
            if op in ("finish", "exit"):
                return op
            result = self.run_op(op, arg)
            if result == "finish":
                return result

    def run_op(self, op: str, arg: int) -> str | None:
        world = self.world
        if op == "get":
            self.op_get()
        elif op == "remove":
            self.op_remove()
        elif op == "enter":
            token = TOKENS[arg % len(TOKENS)] if world.strategy == "token" else None
            return self.block(world.S.scope(token), token, "scope().__enter__")
        elif op == "reenter":
            blocks = world.driver.open_blocks()
            if not blocks:
                return None
            level = blocks[arg % len(blocks)]
            return self.block(level.blk, level.token, "re-entered scope().__enter__")
        elif op == "ctx_run":
            self.note("copy_context().run(...)")
            result = contextvars.copy_context().run(self.nested, "ctx")
            return result
        elif op == "catch":
            self.note("try: ... except gevent.Timeout")
            try:
                return self.nested("catch")
            except self.timeout_type:
                self.note("gevent.Timeout caught")
                return None
        elif op == "timeout":
            self.fire_timeout()
        elif op == "spawn":
            self.spawn(world.driver.kinds[arg % len(world.driver.kinds)])
        elif op == "fork":
            self.op_fork()
        else:  # pragma: no cover - the driver sends only these
            raise AssertionError(op)
        return None

    def fire_timeout(self) -> None:
        raise NotImplementedError

    def nested(self, kind: str) -> str:
        level = _Level(kind)
        self.levels.append(level)
        try:
            return self.loop()
        finally:
            self.levels.remove(level)

    def block(self, blk: t.Any, token: str | None, how: str) -> str | None:
        world = self.world
        try:
            session = blk.__enter__()
        except REFUSALS as exc:
            if how.startswith("re-entered"):
                self.note(f"{how} refused: {type(exc).__name__}: {exc}")
                return None
            world.violation(f"{how} in {self.name} raised {exc!r}")
            return None
        except NoScopeToken as exc:  # pragma: no cover - a token is always given
            world.violation(f"{how} in {self.name} raised {exc!r}")
            return None
        level = world.after_enter(self, token, session, how)
        level.blk = blk
        self.levels.append(level)
        exc_info: tuple[t.Any, t.Any, t.Any] = (None, None, None)
        try:
            return self.loop()
        except BaseException:
            exc_info = sys.exc_info()
            raise
        finally:
            self.levels.remove(level)
            world.before_exit(self, level)
            try:
                blk.__exit__(*exc_info)
            except BaseException as exc:
                world.violation(f"scope().__exit__ in {self.name} raised {exc!r}")
            exc_info = (None, None, None)
            world.after_exit(self, level)
            self.note(f"scope() exited ({level.token or level.key!r})")


class GreenletUnit(SyncUnit):
    """A raw greenlet, switched to by whoever sends it a command."""

    killable = True

    def start(self, driver_glet: greenlet.greenlet, parent: Unit | None) -> None:
        g = greenlet.greenlet(self.run, parent=driver_glet)
        if self.kind == "greenlet-copy":
            g.gr_context = contextvars.copy_context()
        elif self.kind == "greenlet-shared":
            g.gr_context = shared_context(parent)
        self.g: greenlet.greenlet | None = g
        self._waiter: greenlet.greenlet | None = greenlet.getcurrent()
        g.switch()

    def wait_command(self) -> tuple[str, int]:
        waiter, self._waiter = self._waiter, None
        assert waiter is not None
        return t.cast("tuple[str, int]", waiter.switch("idle"))

    def send(self, op: str, arg: int) -> None:
        assert self.g is not None
        self._waiter = greenlet.getcurrent()
        self.g.switch((op, arg))
        if self.ended:
            self.g = None  # as applications do: nothing holds a finished greenlet

    def kill(self) -> None:
        assert self.g is not None
        self._waiter = greenlet.getcurrent()
        self.g.throw()
        self.g = None


def shared_context(parent: Unit | None) -> contextvars.Context:
    """One Context that every "shared" child of ``parent`` runs in."""
    if parent is None:
        return contextvars.copy_context()
    if parent.shared_ctx is None:
        parent.shared_ctx = contextvars.copy_context()
    return parent.shared_ctx


class ThreadUnit(SyncUnit):
    """A thread (or a gevent greenlet) that waits on a queue."""

    def make_queues(self) -> None:
        self.commands: t.Any = queue.Queue()
        self.replies: t.Any = queue.Queue()

    def start(self, driver_glet: t.Any, parent: Unit | None) -> None:
        self.make_queues()
        target: t.Callable[[], t.Any] = self.run
        if self.kind.endswith("-copy"):
            target = _bind(contextvars.copy_context().run, self.run)
        th = threading.Thread(target=target, name=self.name, daemon=True)
        self.thread = th
        th.start()
        self.reply()

    def reply(self) -> None:
        try:
            self.replies.get(timeout=REPLY_TIMEOUT)
        except queue.Empty:
            raise PropertyFailure(f"{self.name} did not answer for {REPLY_TIMEOUT} s") from None

    def wait_command(self) -> tuple[str, int]:
        self.replies.put("idle")
        return t.cast("tuple[str, int]", self.commands.get())

    def run(self) -> str:
        try:
            return super().run()
        finally:
            self.replies.put("ended")

    def send(self, op: str, arg: int) -> None:
        self.commands.put((op, arg))
        self.reply()

    def join(self) -> None:
        self.thread.join(REPLY_TIMEOUT)


def _bind(run: t.Callable[..., t.Any], fn: t.Callable[[], t.Any]) -> t.Callable[[], t.Any]:
    return lambda: run(fn)


# --- drivers --------------------------------------------------------------------------


class Driver:
    """Interprets a program: picks units, sends them commands, waits for each answer."""

    runtime = ""

    def __init__(self, world: World, steps: t.Sequence[Step]) -> None:
        self.world = world
        self.steps = steps
        self.kinds = SPAWN_KINDS[self.runtime]
        self.units: list[Unit] = []
        self._uids = itertools.count()
        world.driver = self

    def open_blocks(self) -> list[_Level]:
        return [lv for u in self.units if not u.ended for lv in u.open_blocks()]

    def ready(self) -> list[Unit]:
        return [u for u in self.units if not (u.ended or u.busy or u.abandoned)]

    def candidates(self, op: str) -> list[Unit]:
        ready = self.ready()
        if op == "exit":
            return [u for u in ready if u.levels]
        if op == "kill":
            return [u for u in ready if u.killable]
        if op == "timeout":
            return ready
        return ready

    def new_unit(self, kind: str, parent: Unit | None) -> Unit:
        raise NotImplementedError

    def driver_op(self, op: str) -> bool:
        """Run ``collect()`` or ``close_all()`` from the driver; False for other ops."""
        if op not in ("collect", "close_all"):
            return False
        world = self.world
        world.note(f"driver: registry.{op}()")
        if op == "collect":
            world.S.registry.collect()
        else:
            world.S.registry.close_all()
            world.after_close_all()
        return True

    def describe_step(self, op: str, unit: Unit | None, b: int) -> str:
        if op == "spawn":
            return f"{unit.name if unit else 'driver'}: spawn {self.kinds[b % len(self.kinds)]}"
        if op in ("enter",) and self.world.strategy == "token":
            return f"{unit.name if unit else '?'}: enter scope({TOKENS[b % len(TOKENS)]!r})"
        return f"{unit.name if unit else 'driver'}: {op}"


class SyncDriver(Driver):
    """Drives units from a plain thread or greenlet (raw greenlets, threads, gevent)."""

    def spawn(self, kind: str, parent: Unit | None) -> Unit:
        unit = self.new_unit(kind, parent)
        self.units.append(unit)
        self.world.note(f"    {unit.name} started by {unit.parent_name}")
        unit.start(self.driver_glet, parent)  # type: ignore[attr-defined]
        return unit

    def run(self) -> None:
        world = self.world
        self.driver_glet = greenlet.getcurrent()
        for op, a, b in self.steps:
            if world.violations:
                break
            if self.driver_op(op):
                continue
            if not self.ready():
                self.spawn(self.kinds[b % len(self.kinds)], None)
            units = self.candidates(op)
            if not units:
                continue
            unit = units[a % len(units)]
            world.note(self.describe_step(op, unit, b))
            if op == "kill":
                self.kill(unit)
            elif op == "abandon":
                unit.abandoned = True
            else:
                unit.send(op, b)  # type: ignore[attr-defined]
        self.finish_all()

    def kill(self, unit: Unit) -> None:
        unit.kill()  # type: ignore[attr-defined]

    def finish_all(self) -> None:
        for unit in reversed(self.units):
            if not unit.ended and not unit.abandoned:
                self.world.note(f"{unit.name}: finish (end of program)")
                unit.send("finish", 0)  # type: ignore[attr-defined]


class GreenletDriver(SyncDriver):
    runtime = "greenlets"

    def new_unit(self, kind: str, parent: Unit | None) -> Unit:
        return GreenletUnit(self.world, next(self._uids), kind, parent)

    def finish_all(self) -> None:
        super().finish_all()
        # Abandoned greenlets: drop them; the collector kills them (GreenletExit).
        for unit in self.units:
            if not unit.ended:
                self.world.note(f"{unit.name}: dropped, left to the garbage collector")
                self.world.dropped_greenlets = True
            unit.g = None  # type: ignore[attr-defined]
        self.units.clear()
        gc.collect()
        # The registry's poll (the reaper's, once a second) lets an abandoned greenlet go
        # while its thread still lives, so it is killed there and its finally blocks run.
        # Model that poll now: once the thread has exited, greenlet can no longer run the
        # greenlet's finally blocks and keeps its frame (tests/test_lifecycle.py shows it).
        self.world.S.registry.collect()
        gc.collect()


class ThreadDriver(SyncDriver):
    runtime = "threads"

    def new_unit(self, kind: str, parent: Unit | None) -> Unit:
        return ThreadUnit(self.world, next(self._uids), kind, parent)

    def finish_all(self) -> None:
        for unit in self.units:
            unit.abandoned = False
        super().finish_all()
        for unit in self.units:
            unit.join()  # type: ignore[attr-defined]


# --- asyncio ----------------------------------------------------------------------------


class TaskUnit(Unit):
    """An asyncio task; its loop mirrors SyncUnit's with awaits."""

    killable = True

    async def start(self, driver: AsyncDriver, parent: Unit | None) -> None:
        self.commands: asyncio.Queue[tuple[str, int]] = asyncio.Queue()
        self.replies: asyncio.Queue[str] = asyncio.Queue()
        self.skip_reply = False
        context = shared_context(parent) if self.kind == "task-shared" else None
        self.task: asyncio.Task[None] | None = asyncio.get_running_loop().create_task(
            self.run(), context=context
        )
        await self.reply()

    async def reply(self) -> None:
        try:
            await asyncio.wait_for(self.replies.get(), REPLY_TIMEOUT)
        except asyncio.TimeoutError:
            raise PropertyFailure(f"{self.name} did not answer for {REPLY_TIMEOUT} s") from None

    async def send(self, op: str, arg: int) -> None:
        self.commands.put_nowait((op, arg))
        await self.reply()

    async def wait_command(self) -> tuple[str, int]:
        if self.skip_reply:
            self.skip_reply = False  # back from a to_thread call: nobody waits for a reply
        else:
            self.replies.put_nowait("idle")
        return await self.commands.get()

    async def run(self) -> None:
        try:
            while True:
                if await self.loop() == "finish":
                    return
        except asyncio.CancelledError:
            pass
        except BaseException:
            self.world.violation(f"{self.name} died: {traceback.format_exc()}")
        finally:
            self.ended = True
            self.levels.clear()
            self.replies.put_nowait("ended")

    async def loop(self) -> str:
        world = self.world
        while True:
            op, arg = await self.wait_command()
            if op in ("finish", "exit"):
                return op
            result: str | None = None
            if op == "get":
                self.op_get()
            elif op == "remove":
                self.op_remove()
            elif op == "enter":
                token = TOKENS[arg % len(TOKENS)] if world.strategy == "token" else None
                result = await self.block(world.S.scope(token), token, "scope().__enter__")
            elif op == "reenter":
                blocks = world.driver.open_blocks()
                if blocks:
                    level = blocks[arg % len(blocks)]
                    result = await self.block(level.blk, level.token, "re-entered scope()")
            elif op == "spawn":
                kind = world.driver.kinds[arg % len(world.driver.kinds)]
                if kind == "to_thread" and world.driver.may_start_to_thread():
                    await self.call_to_thread()
                else:
                    await world.driver.spawn("task" if kind == "to_thread" else kind, self)
            elif op == "fork":
                self.op_fork()
            if result == "finish":
                return result

    async def call_to_thread(self) -> None:
        """``await asyncio.to_thread(...)``: this task is busy until the call ends."""
        driver = self.world.driver
        child = ToThreadUnit(self.world, next(driver._uids), "to_thread", self)
        driver.units.append(child)
        self.world.note(f"    {child.name} started by {self.name}")
        loop = asyncio.get_running_loop()
        child.loop_ = loop
        child.waiting = loop.create_future()
        child.returned = loop.create_future()
        self.busy = True
        self.replies.put_nowait("idle")  # the driver now waits for the child's first answer
        try:
            await asyncio.to_thread(child.run)
        finally:
            self.busy = False
            self.skip_reply = True
            child.returned.set_result(None)

    async def block(self, blk: t.Any, token: str | None, how: str) -> str | None:
        world = self.world
        try:
            session = blk.__enter__()
        except REFUSALS as exc:
            if how.startswith("re-entered"):
                self.note(f"{how} refused: {type(exc).__name__}: {exc}")
            else:
                world.violation(f"{how} in {self.name} raised {exc!r}")
            return None
        level = world.after_enter(self, token, session, how)
        level.blk = blk
        self.levels.append(level)
        exc_info: tuple[t.Any, t.Any, t.Any] = (None, None, None)
        try:
            return await self.loop()
        except BaseException:
            exc_info = sys.exc_info()
            raise
        finally:
            self.levels.remove(level)
            world.before_exit(self, level)
            try:
                blk.__exit__(*exc_info)
            except BaseException as exc:
                world.violation(f"scope().__exit__ in {self.name} raised {exc!r}")
            exc_info = (None, None, None)
            world.after_exit(self, level)
            self.note(f"scope() exited ({level.token or level.key!r})")


class ToThreadUnit(SyncUnit):
    """Work run by ``asyncio.to_thread`` on behalf of a task that awaits it."""

    def __init__(self, world: World, uid: int, kind: str, parent: Unit | None) -> None:
        super().__init__(world, uid, kind, parent)
        self.commands: queue.Queue[tuple[str, int]] = queue.Queue()
        self.loop_: asyncio.AbstractEventLoop | None = None
        self.waiting: asyncio.Future[str] | None = None
        self.returned: asyncio.Future[None] | None = None
        self.started = False

    def spawn(self, kind: str) -> None:
        self.note("spawn ignored: no event loop in a to_thread call")

    def _answer(self, state: str) -> None:
        fut = self.waiting
        if fut is not None and not fut.done():
            fut.set_result(state)

    def wait_command(self) -> tuple[str, int]:
        assert self.loop_ is not None
        self.loop_.call_soon_threadsafe(self._answer, "idle")
        return self.commands.get()

    def run(self) -> str:
        try:
            return super().run()
        finally:
            assert self.loop_ is not None
            self.loop_.call_soon_threadsafe(self._answer, "ended")

    async def answer(self) -> None:
        assert self.waiting is not None
        try:
            await asyncio.wait_for(asyncio.shield(self.waiting), REPLY_TIMEOUT)
        except asyncio.TimeoutError:
            raise PropertyFailure(f"{self.name} did not answer for {REPLY_TIMEOUT} s") from None
        if self.ended:
            assert self.returned is not None
            await self.returned  # the awaiting task is ready again

    async def send(self, op: str, arg: int) -> None:
        self.waiting = asyncio.get_running_loop().create_future()
        self.commands.put((op, arg))
        await self.answer()


class AsyncDriver(Driver):
    runtime = "asyncio"
    MAX_TO_THREAD = 3  # the default executor has min(32, cpus + 4) threads

    def may_start_to_thread(self) -> bool:
        return sum(1 for u in self.units if u.busy) < self.MAX_TO_THREAD

    async def spawn(self, kind: str, parent: Unit | None) -> None:
        unit = TaskUnit(self.world, next(self._uids), kind, parent)
        self.units.append(unit)
        self.world.note(f"    {unit.name} started by {unit.parent_name}")
        await unit.start(self, parent)

    async def started_to_thread(self) -> None:
        for unit in self.units:
            if isinstance(unit, ToThreadUnit) and not unit.started:
                unit.started = True
                await unit.answer()

    async def run(self) -> None:
        world = self.world
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(
            lambda _loop, context: world.error(f"asyncio loop exception: {context!r}")
        )
        for op, a, b in self.steps:
            if world.violations:
                break
            if not self.driver_op(op):
                await self.step(op, a, b)
        # Children first: a to_thread call keeps its task busy until it ends. Abandoned
        # tasks are left to asyncio.run(), which cancels them.
        for unit in reversed(self.units):
            if not unit.ended and not unit.abandoned:
                world.note(f"{unit.name}: finish (end of program)")
                await unit.send("finish", 0)  # type: ignore[attr-defined]
        for unit in self.units:
            unit.task = None  # type: ignore[attr-defined]

    async def step(self, op: str, a: int, b: int) -> None:
        if not self.ready():
            await self.spawn("task", None)
        units = self.candidates(op)
        if op in ("kill", "abandon"):
            units = [u for u in units if isinstance(u, TaskUnit)]
        if not units:
            return
        unit = units[a % len(units)]
        self.world.note(self.describe_step(op, unit, b))
        if op == "kill":
            task = unit.task  # type: ignore[attr-defined]
            task.cancel()
            await asyncio.wait({task}, timeout=REPLY_TIMEOUT)
        elif op == "abandon":
            unit.abandoned = True
        else:
            await unit.send(op, b)  # type: ignore[attr-defined]
            await self.started_to_thread()


# --- gevent (only imported in a child that patched, or will patch, everything) ----------


class GeventUnit(ThreadUnit):
    """A gevent greenlet (or a patched thread) that waits on a gevent queue."""

    def __init__(self, world: World, uid: int, kind: str, parent: Unit | None) -> None:
        super().__init__(world, uid, kind, parent)
        import gevent

        self.timeout_type = (gevent.Timeout,)
        self.killable = kind != "thread"
        self.g: t.Any = None

    def make_queues(self) -> None:
        import gevent.queue

        self.commands = gevent.queue.Queue()
        self.replies = gevent.queue.Queue()

    def start(self, driver_glet: t.Any, parent: Unit | None) -> None:
        import gevent

        if self.kind == "thread":
            super().start(driver_glet, parent)
            return
        self.make_queues()
        g = gevent.Greenlet(self.run)
        if self.kind == "spawn-copy":
            g.gr_context = contextvars.copy_context()
        elif self.kind == "spawn-shared":
            g.gr_context = shared_context(parent)
        self.g = g
        g.start()
        self.reply()

    def reply(self) -> None:
        try:
            self.replies.get(timeout=REPLY_TIMEOUT)
        except Exception:
            raise PropertyFailure(f"{self.name} did not answer for {REPLY_TIMEOUT} s") from None

    def kill(self) -> None:
        self.g.kill(block=True, timeout=REPLY_TIMEOUT)
        self.reply()  # "idle" or "ended", whichever it queued last
        while not self.replies.empty():
            self.replies.get()

    def fire_timeout(self) -> None:
        import gevent

        self.note("gevent.Timeout fires")
        timer = gevent.Timeout(0.0005)
        timer.start()
        try:
            gevent.sleep(0.05)
        finally:
            timer.cancel()

    def join(self) -> None:
        if self.g is not None:
            self.g.join(REPLY_TIMEOUT)
            self.g = None
        else:
            super().join()


class GeventDriver(SyncDriver):
    runtime = "gevent"

    def new_unit(self, kind: str, parent: Unit | None) -> Unit:
        return GeventUnit(self.world, next(self._uids), kind, parent)

    def finish_all(self) -> None:
        for unit in self.units:
            if unit.abandoned and not unit.ended:
                if unit.killable:
                    self.world.note(f"{unit.name}: killed at the end (abandoned)")
                    unit.kill()  # type: ignore[attr-defined]
                else:
                    unit.abandoned = False
        super().finish_all()
        for unit in self.units:
            unit.join()  # type: ignore[attr-defined]


def run_gevent(world: World, steps: t.Sequence[Step]) -> None:
    import gevent

    hub = gevent.get_hub()

    def handle_error(context: object, type_: t.Any, value: t.Any, tb: t.Any) -> None:
        text = "".join(traceback.format_exception(type_, value, tb))
        world.error(f"gevent hub error in {context!r}: {text}")

    hub.handle_error = handle_error
    world.yield_in_close = gevent.sleep
    try:
        driver = GeventDriver(world, steps)
        g = gevent.spawn(driver.run)
        g.join(REPLY_TIMEOUT * 3)
        if not g.dead:
            g.kill(block=False)
            raise world.failure("the gevent driver did not end")
        if g.exception is not None:
            exc = g.exception
            world.note("driver raised: " + "".join(traceback.format_exception(exc)))
            raise world.failure(f"the driver raised {exc!r}")
        del g, driver
        for _ in range(3):
            gevent.sleep(0)  # hub cycles: links and cleanup greenlets run
    finally:
        del hub.handle_error


# --- one example ---------------------------------------------------------------------------


class _LogCatcher(logging.Handler):
    def __init__(self, world: World) -> None:
        super().__init__(logging.WARNING)
        self.world = world

    def emit(self, record: logging.LogRecord) -> None:
        self.world.error(f"logged by scoping: {record.getMessage()} {record.exc_text or ''}")


def leftovers(*objects: t.Any) -> list[str]:
    """Non-empty collections held by the registry, the scoped_session and the strategy."""
    found = []
    for obj in objects:
        names: set[str] = set(getattr(obj, "__dict__", {}))
        for cls in type(obj).__mro__:
            names.update(getattr(cls, "__slots__", ()))
        for name in sorted(names):
            if name in ("__weakref__", "__dict__"):
                continue
            try:
                value = getattr(obj, name)
            except AttributeError:
                continue
            # Mutable collections only: a frozenset is configuration (the
            # registry's endless key types), it cannot grow with the program.
            if isinstance(value, (dict, list, set, collections.deque)) and value:
                found.append(f"{type(obj).__name__}.{name} = {_short(value)}")
    return found


def _short(value: t.Any) -> str:
    text = repr(value)
    return text if len(text) < 300 else text[:300] + "..."


_FROZEN = False


def freeze_heap() -> None:
    """Leave what exists now out of every later ``gc.collect()`` (once per process).

    The examples collect garbage several times each; the modules loaded before them
    never become garbage that matters here. Call it before making anything an example
    must be able to free (a frozen object in a reference cycle is never freed).
    """
    global _FROZEN
    if not _FROZEN:
        gc.collect()
        gc.freeze()
        _FROZEN = True


def _thread_exit_callbacks() -> int:
    """Callbacks waiting for the exit of the thread that runs the checks."""
    units = sys.modules.get("scoping._units")
    count = getattr(units, "thread_exit_callbacks", None)
    return int(count()) if count is not None else 0


def run_example(
    strategy: str,
    runtime: str,
    steps: t.Sequence[Step],
    make_session: t.Callable[[], t.Any] | None = None,
) -> None:
    """Run one program; raise :class:`PropertyFailure` with the trace if a property fails.

    Called from an ordinary thread (the pytest one, or the gevent child's main greenlet).
    In-process runtimes run in a fresh thread, so that every unit, that thread
    included, has ended when the checks run. ``make_session`` returns the
    scoped_session to test (default: a new one); the caller must keep no reference
    to it, or the check that it can be garbage-collected fails.
    """
    global WORLD
    freeze_heap()
    if make_session is None:
        S = scoping.scoped_session(make_factory(), scope=strategy)
    else:
        S = make_session()
    world = World(strategy, runtime, S)
    WORLD = world
    callbacks_before = _thread_exit_callbacks()
    try:
        with _catch_escapes(world):
            if runtime == "gevent":
                run_gevent(world, steps)
            else:
                _run_in_thread(world, steps)
            world.driver = None
            if world.violations:
                raise world.failure(world.violations[0])
            gc.collect()
            S.registry.collect()
            check_end(world, S)
        added = _thread_exit_callbacks() - callbacks_before
        if added:
            raise world.failure(f"the example left {added} thread-exit callbacks on this thread")
    finally:
        WORLD = None
    ref = weakref.ref(S)
    world.S = None
    del S
    gc.collect()
    kept = ref()
    if kept is not None and not (world.dropped_greenlets and _only_in_leaked_frames(kept)):
        holders = [type(r).__name__ for r in gc.get_referrers(kept)][:10]
        second = [
            [type(h).__name__ for h in gc.get_referrers(r)][:6] for r in gc.get_referrers(kept)
        ][:4]
        raise world.failure(
            f"the scoped_session outlived the example (held by {holders}, held by {second})"
        )


def _only_in_leaked_frames(S: t.Any) -> bool:
    """Is ``S`` held only by scope() blocks that only frames reference?

    The registry (its reaper thread's poll, or a collect() in another thread) may let
    an abandoned raw greenlet go from a thread other than its own. greenlet can only
    kill a greenlet in its own thread, so it defers that; if the greenlet's thread
    exits first, greenlet keeps the frame (with the block in it) and its finally blocks
    never run. Its Session was retired and closed all the same: the end checks above
    say so. Only this leak of greenlet's is tolerated here (the frame itself is not
    visible to gc: what shows is the block's bound ``__exit__`` that ``with`` pushed).
    """
    blocks = gc.get_referrers(S)
    if not blocks or any(type(b).__name__ != "ScopeBlock" for b in blocks):
        return False
    for block in blocks:
        for holder in gc.get_referrers(block):
            if holder is blocks:
                continue
            # A suspended frame, the block's bound __exit__ that `with` left on it, or
            # this model's record of the block (a _Level, kept in that same frame).
            leaked = isinstance(holder, (types.FrameType, _Level)) or (
                isinstance(holder, types.MethodType) and holder.__self__ is block
            )
            if not leaked:
                return False
    return True


@contextlib.contextmanager
def _catch_escapes(world: World) -> t.Iterator[None]:
    """Record what reaches ``sys.unraisablehook``, ``threading.excepthook`` or the log."""
    catcher = _LogCatcher(world)
    logger = logging.getLogger("scoping")
    logger.addHandler(catcher)
    old_unraisable, old_excepthook = sys.unraisablehook, threading.excepthook
    sys.unraisablehook = lambda u: world.error(
        f"unraisable in {u.object!r}: {''.join(traceback.format_exception(u.exc_value))}"
    )
    threading.excepthook = lambda a: world.error(
        f"thread {a.thread}: {''.join(traceback.format_exception(a.exc_value))}"
    )
    try:
        yield
    finally:
        logger.removeHandler(catcher)
        sys.unraisablehook, threading.excepthook = old_unraisable, old_excepthook


def _run_in_thread(world: World, steps: t.Sequence[Step]) -> None:
    """Drive an in-process runtime from a fresh thread and wait for it to end."""
    failure: list[BaseException] = []
    runtime = world.runtime

    def example() -> None:
        try:
            if runtime == "greenlets":
                GreenletDriver(world, steps).run()
            elif runtime == "threads":
                ThreadDriver(world, steps).run()
            else:
                asyncio.run(AsyncDriver(world, steps).run())
        except BaseException as exc:
            failure.append(exc)

    th = threading.Thread(target=example, name="example")
    th.start()
    th.join(REPLY_TIMEOUT * 3)
    if th.is_alive():
        raise world.failure("the example thread did not end")
    if failure:
        exc = failure[0]
        world.note("driver raised: " + "".join(traceback.format_exception(exc)))
        raise world.failure(f"the driver raised {exc!r}")


def check_end(world: World, S: t.Any) -> None:
    problems: list[str] = []
    if len(S.registry):
        problems.append(
            f"len(registry) == {len(S.registry)} after every unit ended: "
            f"{_short(S.registry.registry)}"
        )
    problems += leftovers(S.registry, S, S.strategy)
    for serial, count in sorted(world.closes.items()):
        if count != 1:
            problems.append(f"Session #{serial} was closed {count} times (expected once)")
    if world.errors:
        problems.append(f"{len(world.errors)} exceptions escaped from callbacks")
    if problems:
        world.note("end of run: " + "; ".join(problems))
        raise world.failure(problems[0])
