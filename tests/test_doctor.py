"""The doctor: each finding, the CLI, check() and the demo.

Everything that patches gevent runs in a child process (never in pytest's),
which prints the diagnosis as JSON for the test to assert on.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import os
import subprocess
import sys
import textwrap
import typing as t
from pathlib import Path

import pytest

import scoping
import scoping.doctor as doctor
from scoping.errors import ScopingError
from tests._subproc import Background, ChildRuns, selected_tests

if t.TYPE_CHECKING:
    from collections.abc import Iterator

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 90

# Printed by every child: the diagnosis plus what the child's sys.modules holds.
REPORT = """
import json as _json, sys as _sys
import scoping.doctor as _doctor
_d = _doctor.diagnose()
print(_json.dumps({"diagnosis": _d.to_dict(),
                   "gevent_imported": "gevent" in _sys.modules,
                   "psycopg2_imported": "psycopg2" in _sys.modules}))
"""


def run_child(
    tmp_path: Path,
    code: str,
    modules: dict[str, str] | None = None,
    args: t.Sequence[str] = (),
    extra_env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    for name, src in (modules or {}).items():
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(src))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), str(ROOT)])
    env.update(extra_env or {})
    return subprocess.run(
        [sys.executable, *(args or ["-c", textwrap.dedent(code)])],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )


def diagnose_child(
    tmp_path: Path, code: str, modules: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``code`` then print its diagnosis (read it with :func:`report_of`)."""
    return run_child(tmp_path, textwrap.dedent(code) + REPORT, modules)


def report_of(proc: subprocess.CompletedProcess[str]) -> dict[str, t.Any]:
    """What a :func:`diagnose_child` child printed: its diagnosis and sys.modules facts."""
    assert proc.returncode == 0, proc.stderr
    out: dict[str, t.Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


# --------------------------------------------------------------------------
# The child processes of this module's tests run side by side (fixture
# ``children``): each test's child is a function of a fresh directory,
# registered with the tests that read it, and each test waits for its own.

ChildRun = t.Callable[[Path], subprocess.CompletedProcess[str]]
CHILD_RUNS: ChildRuns[ChildRun] = ChildRuns()


@pytest.fixture(scope="module")
def children(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Background[ChildRun, subprocess.CompletedProcess[str]]]:
    """Every selected test's child process, started at once (see ``Background``)."""
    selected = selected_tests(request)
    jobs = {
        run: functools.partial(run, tmp_path_factory.mktemp("child")) for run in CHILD_RUNS.tests
    }
    start = CHILD_RUNS.wanted(selected)
    with Background(jobs, start=start) as background:
        yield background


def by_code(diagnosis: dict[str, t.Any], code: str) -> list[dict[str, t.Any]]:
    return [f for f in diagnosis["findings"] if f["code"] == code]


def one(diagnosis: dict[str, t.Any], code: str, subject: str | None = None) -> dict[str, t.Any]:
    found = [f for f in by_code(diagnosis, code) if subject is None or f["subject"] == subject]
    assert len(found) == 1, (code, subject, diagnosis["findings"])
    return found[0]


def hazard_codes(diagnosis: dict[str, t.Any]) -> list[tuple[str, str | None]]:
    return sorted(
        (f["code"], f["subject"]) for f in diagnosis["findings"] if f["severity"] == "hazard"
    )


# An app module that builds everything at import time, before patch_all().
APP_BEFORE = """
import threading
import greenlet
import sqlalchemy as sa
from sqlalchemy import orm
import scoping

engine = sa.create_engine("sqlite:///unused.db")            # QueuePool, never connects
memory = sa.create_engine("sqlite://")                      # SingletonThreadPool
Session = orm.scoped_session(orm.sessionmaker(bind=engine))  # ThreadLocalRegistry
ByIdent = orm.scoped_session(orm.sessionmaker(), scopefunc=threading.get_ident)
ByGreenlet = orm.scoped_session(orm.sessionmaker(), scopefunc=greenlet.getcurrent)
Good = scoping.scoped_session(orm.sessionmaker(bind=engine), scope="greenlet")

class Holder:
    pass

db = Holder()
db.session = orm.scoped_session(orm.sessionmaker())
"""

APP_AFTER = """
import threading
import sqlalchemy as sa
from sqlalchemy import orm

engine = sa.create_engine("sqlite:///unused.db")
Session = orm.scoped_session(orm.sessionmaker(bind=engine))
ByIdent = orm.scoped_session(orm.sessionmaker(), scopefunc=threading.get_ident)
"""


@CHILD_RUNS.of(
    "test_sa_scoped_session_built_before_patch_is_a_named_hazard",
    "test_sa_scoped_session_built_after_patch_is_ok",
    "test_scoping_session_is_ok_with_its_strategy",
    "test_scopefuncs_under_gevent",
    "test_psycopg2_without_callback_under_gevent_is_a_hazard",
    "test_engine_pool_locks",
    "test_patched_report_hazards_and_recommendation",
)
def patched_child(tmp: Path) -> subprocess.CompletedProcess[str]:
    """appbefore built before patch_all(), appafter after it; psycopg2 without callback."""
    return diagnose_child(
        tmp,
        """
        import appbefore
        import psycopg2
        from gevent import monkey
        monkey.patch_all()
        import appafter
    """,
        {"appbefore": APP_BEFORE, "appafter": APP_AFTER},
    )


@pytest.fixture(scope="module")
def patched_report(children: Background[ChildRun, t.Any]) -> dict[str, t.Any]:
    """The diagnosis of :func:`patched_child`."""
    return report_of(children.result(patched_child))["diagnosis"]


# --------------------------------------------------------------------------
# A process without gevent


@CHILD_RUNS.of("test_clean_process_has_no_hazard_and_doctor_imports_no_gevent")
def clean_child(tmp: Path) -> subprocess.CompletedProcess[str]:
    return diagnose_child(
        tmp,
        """
        import sqlalchemy as sa
        from sqlalchemy import orm
        Session = orm.scoped_session(orm.sessionmaker())
    """,
    )


def test_clean_process_has_no_hazard_and_doctor_imports_no_gevent(
    children: Background[ChildRun, t.Any],
) -> None:
    out = report_of(children.result(clean_child))
    d = out["diagnosis"]
    assert out["gevent_imported"] is False
    assert out["psycopg2_imported"] is False
    assert d["ok"] is True
    assert d["exit_status"] == 0
    assert hazard_codes(d) == []
    assert one(d, "gevent.not_imported")["severity"] == "ok"
    assert one(d, "scoped_session.thread_local", "__main__.Session")["severity"] == "ok"
    assert d["recommended_scope"] == "thread"
    assert d["runtime"]["gevent_patched"] == []


def test_diagnose_in_process_is_reexported_and_serialisable() -> None:
    d = scoping.diagnose()
    assert isinstance(d, doctor.Diagnosis)
    assert d.hazards == ()
    assert json.loads(d.to_json())["counts"]["hazard"] == 0
    assert d.counts() == {s: sum(f.severity == s for f in d.findings) for s in doctor.SEVERITIES}
    assert "Result: 0 hazard(s)" in d.format_text()


def test_a_users_subclass_of_scoped_session_is_recognised_as_scopings() -> None:
    class AppSession(scoping.scoped_session[t.Any]):
        pass

    AppSession.__module__ = "myapp.db"  # defined in the user's package
    from sqlalchemy.orm import sessionmaker

    S = AppSession(sessionmaker(), scope="greenlet")
    mine = [f for f in scoping.diagnose().findings if f.subject and f"{id(S):#x}" in f.subject]
    assert [(f.code, f.severity) for f in mine] == [("scoped_session.scoping", "ok")]


@CHILD_RUNS.of("test_psycopg2_without_gevent_is_ok")
def psycopg2_child(tmp: Path) -> subprocess.CompletedProcess[str]:
    return diagnose_child(tmp, "import psycopg2")


def test_psycopg2_without_gevent_is_ok(children: Background[ChildRun, t.Any]) -> None:
    d = report_of(children.result(psycopg2_child))["diagnosis"]
    assert one(d, "psycopg2.blocking_no_gevent")["severity"] == "ok"
    assert hazard_codes(d) == []


@CHILD_RUNS.of("test_get_ident_scopefunc_without_gevent_is_a_warning")
def get_ident_child(tmp: Path) -> subprocess.CompletedProcess[str]:
    return diagnose_child(
        tmp,
        """
        import threading
        from sqlalchemy import orm
        S = orm.scoped_session(orm.sessionmaker(), scopefunc=threading.get_ident)
        S()
    """,
    )


def test_get_ident_scopefunc_without_gevent_is_a_warning(
    children: Background[ChildRun, t.Any],
) -> None:
    d = report_of(children.result(get_ident_child))["diagnosis"]
    f = one(d, "scoped_session.get_ident_threads", "__main__.S")
    assert f["severity"] == "warning"
    assert "It holds 1 Session(s) now." in f["detail"]
    assert hazard_codes(d) == []


def test_asyncio_running_loop_recommends_contextvar() -> None:
    async def inner() -> doctor.Diagnosis:
        return doctor.diagnose()

    d = asyncio.run(inner())
    assert d.recommended_scope == "contextvar"
    assert d.runtime["asyncio_running"] is True


@CHILD_RUNS.of("test_raw_greenlets_without_gevent_recommend_greenlet")
def raw_greenlets_child(tmp: Path) -> subprocess.CompletedProcess[str]:
    return run_child(
        tmp,
        """
        import json, greenlet
        import scoping.doctor as doctor
        before = doctor.diagnose().recommended_scope
        seen = []
        g = greenlet.greenlet(lambda: seen.append(doctor.diagnose()))
        g.switch()
        print(json.dumps([before, g.dead, seen[0].recommended_scope, seen[0].reason]))
    """,
    )


def test_raw_greenlets_without_gevent_recommend_greenlet(
    children: Background[ChildRun, t.Any],
) -> None:
    # In a child: pytest's own process may hold live greenlets left by other tests.
    proc = children.result(raw_greenlets_child)
    assert proc.returncode == 0, proc.stderr
    before, dead, inside, reason = json.loads(proc.stdout)
    assert (before, dead, inside) == ("thread", True, "greenlet")
    assert reason.startswith("1 live greenlet(s) without gevent patching")


def test_threads_that_inherit_context_are_flagged(monkeypatch: pytest.MonkeyPatch) -> None:
    rt = doctor._runtime()
    assert doctor._check_python(rt)[0].code == "python.version"
    monkeypatch.setattr(doctor, "_threads_inherit_context", lambda: True)
    (f,) = doctor._check_python(rt)
    assert (f.code, f.severity) == ("python.thread_inherit_context", "warning")
    assert 'scope="thread"' in f.fix


def test_old_greenlet_without_contextvars_is_flagged() -> None:
    rt = doctor._runtime()
    old = dataclasses.replace(rt, greenlet_version="0.4.16")
    (f,) = doctor._check_greenlet(old)
    assert f.code == "greenlet.no_contextvars"
    assert f.severity == "warning"
    assert (
        doctor._check_greenlet(dataclasses.replace(rt, greenlet_version="0.4.17"))[0].severity
        == "ok"
    )


# --------------------------------------------------------------------------
# Under gevent (child processes)


@pytest.mark.gevent
def test_sa_scoped_session_built_before_patch_is_a_named_hazard(
    patched_report: dict[str, t.Any],
) -> None:
    f = one(patched_report, "scoped_session.shared", "appbefore.Session")
    assert f["severity"] == "hazard"
    assert 'scope="greenlet"' in f["fix"]
    # An attribute of a module global is named too.
    assert one(patched_report, "scoped_session.shared", "appbefore.db.session")


@pytest.mark.gevent
def test_sa_scoped_session_built_after_patch_is_ok(patched_report: dict[str, t.Any]) -> None:
    assert (
        one(patched_report, "scoped_session.gevent_local", "appafter.Session")["severity"] == "ok"
    )
    assert [
        s for c, s in hazard_codes(patched_report) if s and s.startswith("appafter.Session")
    ] == []


@pytest.mark.gevent
def test_scoping_session_is_ok_with_its_strategy(patched_report: dict[str, t.Any]) -> None:
    f = one(patched_report, "scoped_session.scoping", "appbefore.Good")
    assert f["severity"] == "ok"
    assert f["title"] == 'scoping.scoped_session, scope "greenlet"'


@pytest.mark.gevent
def test_scopefuncs_under_gevent(patched_report: dict[str, t.Any]) -> None:
    # Native get_ident (bound before patching) and gevent's (after): both hazards.
    assert (
        one(patched_report, "scoped_session.get_ident", "appbefore.ByIdent")["severity"] == "hazard"
    )
    assert (
        one(patched_report, "scoped_session.get_ident", "appafter.ByIdent")["severity"] == "hazard"
    )
    f = one(patched_report, "scoped_session.getcurrent", "appbefore.ByGreenlet")
    assert f["severity"] == "warning"
    assert 'scope="greenlet"' in f["fix"]


@pytest.mark.gevent
def test_psycopg2_without_callback_under_gevent_is_a_hazard(
    patched_report: dict[str, t.Any],
) -> None:
    f = one(patched_report, "psycopg2.blocking")
    assert f["severity"] == "hazard"
    assert "scoping.green.patch_psycopg2()" in f["fix"]


@pytest.mark.gevent
def test_engine_pool_locks(patched_report: dict[str, t.Any]) -> None:
    before = one(patched_report, "engine.pool_native_locks", "appbefore.engine")
    assert before["severity"] == "info"
    assert one(patched_report, "engine.pool_gevent_locks", "appafter.engine")["severity"] == "ok"
    shared = one(patched_report, "engine.singleton_pool_shared", "appbefore.memory")
    assert shared["severity"] == "hazard"


@pytest.mark.gevent
def test_patched_report_hazards_and_recommendation(patched_report: dict[str, t.Any]) -> None:
    assert hazard_codes(patched_report) == [
        ("engine.singleton_pool_shared", "appbefore.memory"),
        ("psycopg2.blocking", None),
        ("scoped_session.get_ident", "appafter.ByIdent"),
        ("scoped_session.get_ident", "appbefore.ByIdent"),
        ("scoped_session.shared", "appbefore.Session"),
        ("scoped_session.shared", "appbefore.db.session"),
    ]
    assert patched_report["exit_status"] == 1
    assert patched_report["recommended_scope"] == "greenlet"
    patched = one(patched_report, "gevent.patched")
    assert "threading" in patched["title"]
    assert "socket" in patched["title"]


@CHILD_RUNS.of("test_native_pool_locks_really_do_not_block_the_hub")
def native_pool_locks_child(tmp: Path) -> subprocess.CompletedProcess[str]:
    return run_child(
        tmp,
        """
        import json
        import sqlalchemy as sa
        engine = sa.create_engine("sqlite:///pool.db", pool_size=1, max_overflow=0,
                                  pool_timeout=5)
        from gevent import monkey
        monkey.patch_all()
        import gevent
        log = []
        def holder():
            c = engine.connect(); log.append("a got")
            gevent.sleep(0.05); log.append("a releases"); c.close()
        def waiter():
            gevent.sleep(0); c = engine.connect(); log.append("b got"); c.close()
        def ticker():
            gevent.sleep(0.01); log.append("tick")
        gevent.joinall([gevent.spawn(holder), gevent.spawn(waiter), gevent.spawn(ticker)],
                       timeout=10)
        print(json.dumps([type(engine.pool._pool.mutex).__module__, log]))
    """,
    )


@pytest.mark.gevent
def test_native_pool_locks_really_do_not_block_the_hub(
    children: Background[ChildRun, t.Any],
) -> None:
    """The reason engine.pool_native_locks is info: an engine built before
    patch_all() with one pooled connection still lets a waiting checkout yield."""
    proc = children.result(native_pool_locks_child)
    assert proc.returncode == 0, proc.stderr
    mutex_module, log = json.loads(proc.stdout)
    assert mutex_module == "_thread"  # native, as the doctor reports
    assert log == ["a got", "tick", "a releases", "b got"]


@CHILD_RUNS.of("test_psycogreen_callback_is_a_warning")
def psycogreen_child(tmp: Path) -> subprocess.CompletedProcess[str]:
    return diagnose_child(
        tmp,
        """
        from gevent import monkey
        monkey.patch_all()
        import psycogreen.gevent
        psycogreen.gevent.patch_psycopg()
    """,
    )


@pytest.mark.gevent
def test_psycogreen_callback_is_a_warning(children: Background[ChildRun, t.Any]) -> None:
    d = report_of(children.result(psycogreen_child))["diagnosis"]
    f = one(d, "psycopg2.psycogreen")
    assert f["severity"] == "warning"
    assert f["subject"] == "psycogreen.gevent.gevent_wait_callback"
    assert "scoping.green.patch_psycopg2()" in f["fix"]
    assert hazard_codes(d) == []


@CHILD_RUNS.of("test_scoping_green_callback_is_ok")
def scoping_green_child(tmp: Path) -> subprocess.CompletedProcess[str]:
    return diagnose_child(
        tmp,
        """
        from gevent import monkey
        monkey.patch_all()
        import scoping.green
        scoping.green.patch_psycopg2()
    """,
    )


@pytest.mark.gevent
def test_scoping_green_callback_is_ok(children: Background[ChildRun, t.Any]) -> None:
    d = report_of(children.result(scoping_green_child))["diagnosis"]
    f = one(d, "psycopg2.scoping_green")
    assert f["severity"] == "ok"
    assert f["subject"] == "scoping.green.GeventWaitCallback"
    assert hazard_codes(d) == []


@CHILD_RUNS.of("test_gevent_imported_but_not_patched")
def gevent_imported_child(tmp: Path) -> subprocess.CompletedProcess[str]:
    return diagnose_child(tmp, "import gevent")


@pytest.mark.gevent
def test_gevent_imported_but_not_patched(children: Background[ChildRun, t.Any]) -> None:
    out = report_of(children.result(gevent_imported_child))
    d = out["diagnosis"]
    assert out["gevent_imported"] is True
    assert one(d, "gevent.not_patched")["severity"] == "info"
    assert hazard_codes(d) == []


@CHILD_RUNS.of("test_patch_all_without_threads")
def no_threads_child(tmp: Path) -> subprocess.CompletedProcess[str]:
    return diagnose_child(
        tmp,
        """
        from gevent import monkey
        monkey.patch_all(thread=False)
        from sqlalchemy import orm
        import scoping
        Session = orm.scoped_session(orm.sessionmaker())   # built after, still per OS thread
        ByThread = scoping.scoped_session(orm.sessionmaker(), scope="thread")
    """,
    )


@pytest.mark.gevent
def test_patch_all_without_threads(children: Background[ChildRun, t.Any]) -> None:
    d = report_of(children.result(no_threads_child))["diagnosis"]
    unpatched = one(d, "gevent.threading_unpatched")
    assert unpatched["severity"] == "warning"
    assert "engine.connect().close()" in unpatched["fix"]  # the first-connect deadlock
    assert one(d, "scoped_session.shared", "__main__.Session")["severity"] == "hazard"
    assert (
        one(d, "scoped_session.scoping_thread_unpatched", "__main__.ByThread")["severity"]
        == "warning"
    )


# --------------------------------------------------------------------------
# check(), the CLI and the demo


HAZARD_MAIN = """
import sys
import appbefore
from gevent import monkey
monkey.patch_all()
from scoping.__main__ import main
sys.exit(main(["doctor", *sys.argv[1:]]))
"""


def test_check_returns_the_diagnosis_when_safe() -> None:
    assert doctor.check().ok
    assert issubclass(doctor.UnsafeProcess, ScopingError)


@CHILD_RUNS.of("test_check_raises_naming_the_fix")
def check_raises_child(tmp: Path) -> subprocess.CompletedProcess[str]:
    return run_child(
        tmp,
        """
        from sqlalchemy import orm
        Session = orm.scoped_session(orm.sessionmaker())
        from gevent import monkey
        monkey.patch_all()
        import scoping.doctor
        try:
            scoping.doctor.check()
        except scoping.errors.ScopingError as exc:
            assert isinstance(exc, scoping.doctor.UnsafeProcess)
            assert len(exc.diagnosis.hazards) == 1
            print(exc)
        else:
            raise SystemExit("check() did not raise")
    """,
    )


@pytest.mark.gevent
def test_check_raises_naming_the_fix(children: Background[ChildRun, t.Any]) -> None:
    proc = children.result(check_raises_child)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "1 Session-scoping hazard(s) in this process (scoping.diagnose() gives the full report):",
        "- __main__.Session: SQLAlchemy scoped_session shared by every greenlet; fix: build it "
        'with scoping.scoped_session(factory, scope="greenlet") (or scope="auto"), or build '
        "the scoped_session after gevent.monkey.patch_all()",
    ]


@CHILD_RUNS.of("test_cli_clean_process_json_and_exit_0")
def cli_json_child(tmp: Path) -> subprocess.CompletedProcess[str]:
    return run_child(tmp, "", args=["-m", "scoping", "doctor", "--json"])


def test_cli_clean_process_json_and_exit_0(children: Background[ChildRun, t.Any]) -> None:
    proc = children.result(cli_json_child)
    assert proc.returncode == 0, proc.stderr
    d = json.loads(proc.stdout)
    assert set(d) == {
        "ok",
        "exit_status",
        "counts",
        "recommended_scope",
        "reason",
        "runtime",
        "findings",
    }
    assert d["ok"] is True
    assert d["exit_status"] == 0
    assert set(d["counts"]) == {"ok", "info", "warning", "hazard"}
    for f in d["findings"]:
        assert set(f) == {"severity", "code", "title", "detail", "fix", "subject"}
        assert f["severity"] in doctor.SEVERITIES


@CHILD_RUNS.of("test_cli_clean_process_text_and_exit_0")
def cli_text_child(tmp: Path) -> subprocess.CompletedProcess[str]:
    return run_child(tmp, "", args=["-m", "scoping", "doctor"])


def test_cli_clean_process_text_and_exit_0(children: Background[ChildRun, t.Any]) -> None:
    proc = children.result(cli_text_child)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("scoping doctor: pid ")
    assert "Result: 0 hazard(s)" in proc.stdout
    assert len(proc.stdout.splitlines()) <= 24  # one screen


def _cli_hazard(tmp: Path, as_json: bool) -> subprocess.CompletedProcess[str]:
    (tmp / "appbefore.py").write_text(APP_BEFORE)
    (tmp / "run.py").write_text(HAZARD_MAIN)
    return run_child(tmp, "", args=["run.py", *(["--json"] if as_json else [])])


CLI_HAZARD = {
    as_json: CHILD_RUNS.of("test_cli_hazard_exits_1")(
        functools.partial(_cli_hazard, as_json=as_json)
    )
    for as_json in (False, True)
}


@pytest.mark.gevent
@pytest.mark.parametrize("as_json", [False, True])
def test_cli_hazard_exits_1(children: Background[ChildRun, t.Any], as_json: bool) -> None:
    proc = children.result(CLI_HAZARD[as_json])
    assert proc.returncode == 1, proc.stderr
    if as_json:
        d = json.loads(proc.stdout)
        assert d["exit_status"] == 1
        assert d["ok"] is False
        assert d["counts"]["hazard"] == 4
    else:
        assert (
            "HAZARD   appbefore.Session: SQLAlchemy scoped_session shared by every greenlet"
            in proc.stdout
        )
        assert "Result: 4 hazard(s)" in proc.stdout


def test_cli_requires_a_command(capsys: pytest.CaptureFixture[str]) -> None:
    from scoping.__main__ import main

    with pytest.raises(SystemExit) as exc:
        main([])
    assert exc.value.code == 2
    assert "doctor" in capsys.readouterr().err


@CHILD_RUNS.of("test_demo_catches_the_planted_hazards")
def demo_child(tmp: Path) -> subprocess.CompletedProcess[str]:
    return run_child(tmp, "", args=["-m", "scoping", "doctor", "--demo"])


@pytest.mark.gevent
def test_demo_catches_the_planted_hazards(children: Background[ChildRun, t.Any]) -> None:
    proc = children.result(demo_child)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (
        "HAZARD   demo_app.Session: SQLAlchemy scoped_session shared by every greenlet"
        in proc.stdout
    )
    assert "scoping.doctor.check() raised UnsafeProcess:" in proc.stdout
    assert proc.stdout.rstrip().endswith(
        "Demo passed: the doctor caught every planted hazard "
        "(scoped_session.shared, psycopg2.blocking)."
    )


@CHILD_RUNS.of("test_demo_json")
def demo_json_child(tmp: Path) -> subprocess.CompletedProcess[str]:
    return run_child(tmp, "", args=["-m", "scoping", "doctor", "--demo", "--json"])


@pytest.mark.gevent
def test_demo_json(children: Background[ChildRun, t.Any]) -> None:
    proc = children.result(demo_json_child)
    assert proc.returncode == 0, proc.stderr
    d = json.loads(proc.stdout)
    assert d["caught"] is True
    assert d["missing"] == []
    assert d["child_exit_status"] == 1
    assert ("scoped_session.shared", "demo_app.Session") in hazard_codes(d["diagnosis"])


def test_demo_fails_when_a_hazard_is_not_caught(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(doctor, "DEMO_EXPECTED", (("no.such.code", None),))
    monkeypatch.setattr(doctor, "DEMO_MAIN", "import sys; sys.exit(1)")
    assert doctor.run_demo() == doctor.DEMO_MISSED == 1
    assert "Demo FAILED: child exit status 1, not caught: no.such.code" in capsys.readouterr().out


GUNICORN_APP = """
from sqlalchemy import orm
Session = orm.scoped_session(orm.sessionmaker())   # built in the master with --preload

def app(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"ok"]
"""

GUNICORN_CONF = """
import scoping.doctor

def post_fork(server, worker):
    # Too early for -k gevent: the worker patches after this hook.
    print("post_fork hazards:", len(scoping.doctor.diagnose().hazards), flush=True)

def post_worker_init(worker):
    scoping.doctor.check()
"""


@pytest.mark.gevent
@pytest.mark.slow
def test_gunicorn_post_worker_init_check_stops_the_boot(tmp_path: Path) -> None:
    gunicorn = Path(sys.executable).with_name("gunicorn")
    if not gunicorn.exists():
        pytest.skip("gunicorn is not installed next to this Python")
    (tmp_path / "wsgiapp.py").write_text(GUNICORN_APP)
    (tmp_path / "gconf.py").write_text(GUNICORN_CONF)
    proc = run_child(
        tmp_path,
        "",
        args=[
            "-m",
            "gunicorn",
            "--preload",
            "-k",
            "gevent",
            "-w",
            "1",
            "-b",
            "127.0.0.1:0",
            "-c",
            "gconf.py",
            "wsgiapp:app",
        ],
        # gunicorn 27 opens a control socket there: keep it private to this test.
        extra_env={"XDG_RUNTIME_DIR": str(tmp_path)},
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 3, log  # gunicorn's "Worker failed to boot"
    assert "post_fork hazards: 0" in log
    assert "scoping.doctor.UnsafeProcess: 1 Session-scoping hazard(s)" in log
    assert "- wsgiapp.Session: SQLAlchemy scoped_session shared by every greenlet" in log
    assert "Reason: Worker failed to boot." in log


# A package that is "not installed": importing it fails the way a missing one does.
MISSING_PSYCOPG2 = """
raise ModuleNotFoundError("No module named 'psycopg2'", name="psycopg2")
"""


def _demo_without_psycopg2(tmp: Path, as_json: bool) -> subprocess.CompletedProcess[str]:
    blocked = tmp / "blocked"
    (blocked / "psycopg2").mkdir(parents=True)
    (blocked / "psycopg2" / "__init__.py").write_text(MISSING_PSYCOPG2)
    return run_child(
        tmp,
        "",
        args=["-m", "scoping", "doctor", "--demo", *(["--json"] if as_json else [])],
        extra_env={"PYTHONPATH": os.pathsep.join([str(blocked), str(ROOT)])},
    )


DEMO_WITHOUT_PSYCOPG2 = {
    as_json: CHILD_RUNS.of("test_demo_without_psycopg2_could_not_run")(
        functools.partial(_demo_without_psycopg2, as_json=as_json)
    )
    for as_json in (False, True)
}


@pytest.mark.parametrize("as_json", [False, True])
def test_demo_without_psycopg2_could_not_run(
    children: Background[ChildRun, t.Any], as_json: bool
) -> None:
    """Issue 10, item 10: a missing prerequisite is not a missed hazard."""
    proc = children.result(DEMO_WITHOUT_PSYCOPG2[as_json])
    assert proc.returncode == doctor.DEMO_UNAVAILABLE == 2, proc.stdout + proc.stderr
    assert "FAILED" not in proc.stdout
    if as_json:
        d = json.loads(proc.stdout)
        assert d["ran"] is False
        assert d["caught"] is None
        assert (d["missing_module"], d["fix"]) == ("psycopg2", "pip install psycopg2-binary")
    else:
        assert proc.stdout.startswith(
            "The demo could not run: psycopg2 is not installed, and the planted process needs "
            "gevent, psycopg2 and SQLAlchemy. Fix: pip install psycopg2-binary."
        )


def test_diagnosis_has_no_unused_warnings_property() -> None:
    assert not hasattr(doctor.Diagnosis, "warnings")


def test_doctor_asks_the_units_layer_instead_of_gevent(monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 13: "is threading patched" and the native local live in scoping._units only."""
    import inspect

    from scoping import _units

    source = inspect.getsource(doctor)
    assert "get_original" not in source
    assert "_thread._local" not in source
    monkeypatch.setattr(_units, "threading_is_patched", lambda: True)
    assert doctor._runtime().threading_patched is True


INHERITED = """
import os, json, sys
import sqlalchemy as sa
import scoping.doctor

engine = sa.create_engine("sqlite:///inherited.db")      # QueuePool
with engine.connect() as conn:                            # the parent's warm-up query
    conn.exec_driver_sql("select 1")
before = [f.code for f in scoping.doctor.diagnose().hazards]
r, w = os.pipe()
pid = os.fork()
if pid == 0:
    d = scoping.doctor.diagnose()
    found = [(f.code, f.subject, f.title) for f in d.hazards]
    import scoping.fork
    scoping.fork.dispose_engines(engine)
    after = [f.code for f in scoping.doctor.diagnose().hazards]
    os.write(w, json.dumps({"child": found, "after_dispose": after}).encode())
    os._exit(0)
os.close(w)
data = b""
while chunk := os.read(r, 65536):
    data += chunk
os.waitpid(pid, 0)
print(json.dumps({"parent": before, **json.loads(data)}))
"""


@CHILD_RUNS.of("test_pooled_connection_opened_before_fork_is_a_hazard")
def inherited_child(tmp: Path) -> subprocess.CompletedProcess[str]:
    return run_child(tmp, INHERITED)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_pooled_connection_opened_before_fork_is_a_hazard(
    children: Background[ChildRun, t.Any],
) -> None:
    """Issue 9, item 1: the doctor flags a pool connection opened by another process."""
    proc = children.result(inherited_child)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["parent"] == []  # its own connection: fine
    assert out["child"] == [
        [
            "engine.inherited_connections",
            "__main__.engine",
            "1 pooled connection(s) were opened by another process",
        ]
    ]
    assert out["after_dispose"] == []  # the fix the finding names


# No registry before the fork, and the fork right after the warm-up query: the
# connection is opened within /proc's 10 ms start-time tick of the fork, so
# only the exact fork time (scoping.fork's hook, registered at import) tells
# it from one the child opened itself. Five forks: each is such a case.
INHERITED_WITHIN_A_TICK = """
import os, json
import sqlalchemy as sa
import scoping.doctor

flagged = []
for i in range(5):
    engine = sa.create_engine(f"sqlite:///tick{i}.db")
    with engine.connect() as conn:
        conn.exec_driver_sql("select 1")
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        codes = [f.code for f in scoping.doctor.diagnose().hazards]
        os.write(w, json.dumps("engine.inherited_connections" in codes).encode())
        os._exit(0)
    os.close(w)
    flagged.append(json.loads(os.read(r, 100)))
    os.close(r)
    os.waitpid(pid, 0)
    engine.dispose()
print(json.dumps(flagged))
"""


@CHILD_RUNS.of("test_a_connection_opened_just_before_the_fork_is_inherited")
def inherited_within_a_tick_child(tmp: Path) -> subprocess.CompletedProcess[str]:
    return run_child(tmp, INHERITED_WITHIN_A_TICK)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_connection_opened_just_before_the_fork_is_inherited(
    children: Background[ChildRun, t.Any],
) -> None:
    proc = children.result(inherited_within_a_tick_child)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == [True] * 5


def test_process_start_time_is_before_now_and_after_boot() -> None:
    import time

    started = doctor._process_started_at()
    if started is None:
        pytest.skip("no /proc and scoping.fork saw no fork")
    assert 0 < started <= time.time()
