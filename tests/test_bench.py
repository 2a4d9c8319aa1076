"""``python -m stress.bench`` runs and writes the JSON it documents.

These tests check that the benchmark runs and what its report contains, never
how fast anything is: timings only have to be numbers. Each run is a
subprocess (the memory and e2e sections patch gevent in their own workers).
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import typing as t
from pathlib import Path

import pytest

from stress import bench
from tests._subproc import Background, selected_tests

if t.TYPE_CHECKING:
    from collections.abc import Iterator

    from stress.postgres import Server

ROOT = Path(__file__).resolve().parent.parent
STRATEGIES = ["thread", "greenlet", "contextvar", "token", "auto"]
PROXY_VARIANTS = ["direct", "sqlalchemy", *STRATEGIES, *(f"{s}+guard" for s in STRATEGIES)]


def _run_bench(tmp_path: Path, *args: str, timeout: float = 180) -> tuple[dict[str, t.Any], str]:
    out = tmp_path / "bench.json"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, "-m", "stress.bench", "--quick", "--json", str(out), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env=env,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, t.Any], str]:
    """One quick run of every section that needs no PostgreSQL."""
    return _run_bench(tmp_path_factory.mktemp("bench"), "--only", "proxy,calls,scale,memory")


@pytest.mark.slow
def test_report_has_meta_and_only_the_sections_asked_for(
    quick: tuple[dict[str, t.Any], str],
) -> None:
    report, _ = quick
    assert report["quick"] is True
    assert report["sections"] == ["proxy", "calls", "scale", "memory"]
    assert "e2e" not in report
    meta = report["meta"]
    assert set(meta) == {
        "command",
        "date",
        "python",
        "sqlalchemy",
        "greenlet",
        "gevent",
        "cpus",
        "machine",
    }
    assert meta["command"].startswith("python -m stress.bench --quick")
    assert isinstance(report["seconds"], float)


@pytest.mark.slow
def test_proxy_section_covers_every_variant_and_op(quick: tuple[dict[str, t.Any], str]) -> None:
    proxy = quick[0]["proxy"]
    assert set(proxy["ops"]) == {"info", "method", "call"}
    assert proxy["ops"]["method"] == "Session.get_bind()"
    assert list(proxy["results"]) == PROXY_VARIANTS
    for name, ops in proxy["results"].items():
        expected = {"info", "method"} if name == "direct" else {"info", "method", "call"}
        assert set(ops) == expected, name
        for cell in ops.values():
            assert isinstance(cell["ns"], float)
            assert isinstance(cell["ratio"], float)
    assert all(cell["ratio"] == 1.0 for cell in proxy["results"]["sqlalchemy"].values())


@pytest.mark.slow
def test_calls_section_counts_every_hot_path(quick: tuple[dict[str, t.Any], str]) -> None:
    calls = quick[0]["calls"]["results"]
    assert list(calls) == PROXY_VARIANTS
    assert calls["direct"] == {"info": {"python": 0, "c": 0}}
    for name in PROXY_VARIANTS[1:]:
        # The cycle section's request is counted for the variants it times.
        cycled = name == "sqlalchemy" or name in STRATEGIES
        assert set(calls[name]) == {"info", "call", "miss"} | ({"cycle"} if cycled else set())
        for cell in calls[name].values():
            assert isinstance(cell["python"], int)
            assert isinstance(cell["c"], int)


@pytest.mark.slow
def test_scale_section_holds_the_number_of_scopes_it_claims(
    quick: tuple[dict[str, t.Any], str],
) -> None:
    scale = quick[0]["scale"]
    assert scale["sizes"] == [1, 100, 1_000]
    assert list(scale["results"]) == ["greenlet", "contextvar", "token", "auto", "sqlalchemy"]
    for res in scale["results"].values():
        assert [p["scopes"] for p in res["points"]] == [1, 100, 1_000]
        # Every parked greenlet (and the timing one) holds a Session while timed.
        assert [p["live"] for p in res["points"]] == [1, 100, 1_000]
        # The spread is over the ratios to the same rounds' reference proxy.
        ratios = [p["ratio"] for p in res["points"]]
        assert all(r > 0 for r in ratios)
        assert res["spread"] == round(max(ratios) / min(ratios), 3)


@pytest.mark.slow
def test_memory_section_reports_sessions_connections_and_rss(
    quick: tuple[dict[str, t.Any], str],
) -> None:
    memory = quick[0]["memory"]
    assert memory["greenlets"] == 2_000
    results = memory["results"]
    assert list(results) == [*STRATEGIES, "sqlalchemy"]
    for name in STRATEGIES:
        res = results[name]
        assert res["greenlets"] == 2_000
        assert res["executes"] is True
        # What the benchmark measures: scoping cleans up after greenlets that never
        # call remove(), so nothing is left once the hub has run.
        assert (res["sessions"], res["checked_out"]) == (0, 0), name
        assert isinstance(res["rss_growth_mb"], float)
    reference = results["sqlalchemy"]
    assert reference["executes"] is False
    # Warm-up (2,000) plus the measured 2,000: SQLAlchemy's registry keeps them all.
    assert reference["sessions"] == 4_000
    assert reference["probe_executes_before_pool_timeout"] == 5
    assert reference["probe_checked_out"] == 5


@pytest.mark.slow
def test_goals_and_table(quick: tuple[dict[str, t.Any], str]) -> None:
    report, stdout = quick
    goals = report["goals"]
    assert goals, "every section run yields goals"
    for goal in goals:
        assert set(goal) == {"goal", "measured", "met", "judged"}
        assert isinstance(goal["met"], bool)
    kinds = {goal["goal"].split()[0] for goal in goals}
    assert kinds == {"proxy", "scale", "memory"}
    # A 3-round smoke run judges exact counts only, never timings.
    judged = {g["goal"] for g in goals if g["judged"]}
    assert judged == {g["goal"] for g in goals if "0 sessions, 0 connections" in g["goal"]}
    assert "not judged (--quick)" in stdout
    assert all(g["met"] for g in goals if g["judged"])
    assert "**MISSED**" not in stdout
    for title in (
        "### Proxy overhead per call",
        "### Function calls on the hot path",
        "### Lookup cost as scopes grow",
        "### Memory without remove(): 2,000 greenlets",
        "### Goals",
    ):
        assert title in stdout
    assert stdout == bench.render(report)


@pytest.mark.slow
@pytest.mark.postgres
def test_e2e_section_against_postgres(pg_server: Server, tmp_path: Path) -> None:
    report, stdout = _run_bench(tmp_path, "--only", "e2e", "--dsn", pg_server.dsn)
    e2e = report["e2e"]
    assert (e2e["concurrency"], e2e["requests"], e2e["repeats"]) == (200, 400, 1)
    assert list(e2e["results"]) == ["baseline", *STRATEGIES]
    for res in e2e["results"].values():
        assert len(res["runs"]) == 1
        for key in ("rps", "p50_ms", "p99_ms", "cpu_us", "ratio", "best_ratio"):
            assert isinstance(res[key], float), key
    assert e2e["results"]["baseline"]["ratio"] == 1.0
    assert [g["goal"].split()[:2] for g in report["goals"]] == [["e2e", s] for s in STRATEGIES]
    assert "### End to end under gevent" in stdout
    assert report["meta"]["command"].endswith("--dsn <dsn>")  # the DSN may hold a password


def test_unknown_section_is_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        bench.main(["--only", "proxy,nope"])
    assert exc.value.code == 2
    assert "unknown section(s) nope" in capsys.readouterr().err


def test_count_calls_wants_a_python_function() -> None:
    with pytest.raises(TypeError, match="wrap the call in a lambda"):
        bench.count_calls(len)  # type: ignore[arg-type]
    # A function that calls nothing but one builtin.
    assert bench.count_calls(lambda: len(())) == (0, 1)


#: The default tests' bench runs: the sections of one run -> the test that reads it.
RUNS = {
    "cycle": "test_cycle_section_compares_every_registry_with_an_explicit_session",
    "aproxy,acycle": "test_async_sections_compare_with_sqlalchemys_async_scoped_session",
}


@pytest.fixture(scope="module")
def runs(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Background[str, tuple[dict[str, t.Any], str]]]:
    """The default tests' bench runs side by side, each in its own directory (--quick
    judges no timing, so sharing the machine changes nothing they assert)."""
    selected = selected_tests(request)
    jobs = {
        only: functools.partial(_run_bench, tmp_path_factory.mktemp("bench"), "--only", only)
        for only in RUNS
    }
    with Background(jobs, start=[only for only, test in RUNS.items() if test in selected]) as bg:
        yield bg


def test_cycle_section_compares_every_registry_with_an_explicit_session(
    runs: Background[str, tuple[dict[str, t.Any], str]],
) -> None:
    report, stdout = runs.result("cycle")
    assert report["sections"] == ["cycle"]
    results = report["cycle"]["results"]
    # token keys by a scopefunc (Session()/use/remove(), as the others); the
    # Session.scope(token) block is its own row, shown and not judged.
    assert list(results) == ["explicit", "sqlalchemy", *STRATEGIES, "token scope()"]
    assert results["explicit"]["extra_us"] == 0.0
    for cell in results.values():
        assert cell["us"] > 0
        assert isinstance(cell["extra_us"], float)
    assert "### Per-request cost of the registry" in stdout
    assert [g["goal"].split()[:2] for g in report["goals"]] == [["cycle", s] for s in STRATEGIES]
    assert not any(g["judged"] for g in report["goals"])  # --quick judges no timing


def test_async_sections_compare_with_sqlalchemys_async_scoped_session(
    runs: Background[str, tuple[dict[str, t.Any], str]],
) -> None:
    report, stdout = runs.result("aproxy,acycle")
    assert report["sections"] == ["aproxy", "acycle"]
    aproxy = report["aproxy"]["results"]
    assert list(aproxy) == [
        "direct",
        "sqlalchemy",
        "auto",
        "contextvar",
        "token",
        "request",
        "auto+guard",
    ]
    assert all(cell["ratio"] == 1.0 for cell in aproxy["sqlalchemy"].values())
    for name, ops in aproxy.items():
        assert set(ops) == ({"info", "method"} if name == "direct" else {"info", "method", "call"})
    acycle = report["acycle"]["results"]
    assert list(acycle) == [
        "explicit",
        "sqlalchemy",
        "auto",
        "auto scope()",
        "contextvar",
        "auto no-remove",
    ]
    assert acycle["sqlalchemy"]["ratio"] == 1.0
    assert "### asyncio: proxy overhead per call, inside a task" in stdout
    assert "### asyncio: per-request cycle" in stdout
    kinds = {g["goal"].split()[0] for g in report["goals"]}
    assert kinds == {"aproxy", "acycle"}
    assert not any(g["judged"] for g in report["goals"])
    assert "**MISSED**" not in stdout


def test_children_get_their_arguments_on_stdin_never_in_argv(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    secret = "postgresql+psycopg2://u:s3cr3t@127.0.0.1/db"
    seen: list[tuple[list[str], str | None]] = []

    def fake_run(cmd: list[str], **kw: t.Any) -> subprocess.CompletedProcess[str]:
        seen.append((cmd, kw.get("input")))
        return subprocess.CompletedProcess(cmd, 0, stdout='{"ok": 1}\n', stderr="")

    monkeypatch.setattr(bench.subprocess, "run", fake_run)
    assert bench._worker("memory", {"url": secret}, timeout=5) == {"ok": 1}
    ((cmd, given),) = seen
    assert cmd[-3:] == ["-m", "stress.bench.worker", "memory"]
    assert not any("s3cr3t" in arg for arg in cmd)
    assert given is not None
    assert json.loads(given) == {"url": secret}

    class FakePopen:
        def __init__(self, cmd: list[str], **kw: t.Any) -> None:
            import io

            self.cmd = cmd
            self.stdin = io.StringIO()
            seen.append((cmd, None))

    monkeypatch.setattr(bench.subprocess, "Popen", FakePopen)
    worker = bench._E2EWorker("auto", {"url": secret})
    assert not any("s3cr3t" in arg for arg in worker.proc.cmd)  # type: ignore[attr-defined]
    assert json.loads(worker.proc.stdin.getvalue()) == {"url": secret}  # type: ignore[union-attr]


def test_dsn_is_masked_in_the_recorded_command() -> None:
    masked = bench._masked_argv(["--only", "e2e", "--dsn", "host=x password=p", "--dsn=y"])
    assert masked == ["--only", "e2e", "--dsn", "<dsn>", "--dsn=<dsn>"]


@pytest.mark.slow  # 3.4 s: two bench children and a git archive
def test_against_runs_the_proxy_section_with_another_revisions_scoping(tmp_path: Path) -> None:
    # HEAD exists in every clone, shallow ones included; the docs compare with c06080a.
    report, stdout = _run_bench(tmp_path, "--only", "calls", "--against", "HEAD")
    against = report["against"]
    assert against["rev"] == "HEAD"
    # Each side imported the scoping of its own tree (a relative path inside it).
    assert against["scoping_files"] == {"now": "scoping/__init__.py", "HEAD": "scoping/__init__.py"}
    results = against["results"]
    assert list(results) == ["direct", "sqlalchemy", *STRATEGIES]  # no guard variants
    for ops in results.values():
        for sides in ops.values():
            assert set(sides) == {"now", "HEAD"}
    assert results["sqlalchemy"]["info"]["now"]["ratio"] == 1.0
    goals = [g for g in report["goals"] if "no worse than HEAD" in g["goal"]]
    assert len(goals) == len(STRATEGIES) * 2  # Session.info and Session(), each strategy
    assert not any(g["judged"] for g in goals)  # --quick judges no timing
    assert "### Proxy overhead against HEAD" in stdout


def test_against_an_unknown_revision_names_the_fix(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "stress.bench", "--quick", "--only", "calls", "--against", "nope"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        check=False,
    )
    assert proc.returncode != 0
    assert "--against nope: git archive failed" in proc.stderr
    assert "pass a commit or tag of this repository" in proc.stderr


def test_cycle_extra_is_the_median_of_same_round_differences(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # us per cycle, round by round. Round 1 caught explicit on a quiet moment and
    # sqlalchemy on a busy one; rounds 2 and 3 are slower for everything. The
    # old statistic (best minus best explicit) said +6 us; the same-round
    # differences say +2.
    table = {
        "explicit": [8.0, 12.0, 12.0],
        "sqlalchemy": [15.0, 14.0, 14.0],
        "auto": [9.0, 13.5, 13.0],
    }
    calls: list[str] = []

    class FakeTimer:
        def __init__(self, fn: t.Callable[[], None]) -> None:
            self.name = fn.__name__

        def timeit(self, number: int) -> float:
            calls.append(self.name)
            return table[self.name][calls.count(self.name) - 1] * number / 1e6

    def named(name: str) -> t.Callable[[], None]:
        def fn() -> None:
            pass

        fn.__name__ = name
        return fn

    monkeypatch.setattr(bench, "cycle_variants", lambda: [(n, named(n)) for n in table])
    monkeypatch.setattr(bench.timeit, "Timer", FakeTimer)
    results = bench.bench_cycle(number=1000, rounds=3)["results"]
    assert calls == ["explicit", "sqlalchemy", "auto"] * 3  # interleaved rounds
    assert results["explicit"] == {"us": 8.0, "extra_us": 0.0}
    assert results["sqlalchemy"] == {"us": 14.0, "extra_us": 2.0}
    assert results["auto"] == {"us": 9.0, "extra_us": 1.0}
