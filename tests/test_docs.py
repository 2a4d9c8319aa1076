"""Every fenced code block in README.md and docs/*.md runs, or is checked, here.

- ``python``: the page's python blocks run in order, in one fresh interpreter per
  page (they share one namespace, as a reader's session would), from a temporary
  directory, with the repository on ``PYTHONPATH`` and ``SCOPING_TEST_DSN`` set to
  a PostgreSQL URL (``postgresql+psycopg2://...``, the ``pg_url`` fixture) when
  the page uses it. Deprecation warnings are errors. A failure names the page and
  the line of the block, and tracebacks carry the page's own line numbers.
- ``bash``, ``sh``, ``shell`` and ``console`` (``$ `` lines): every command is
  checked, never run. ``python -m MOD`` needs an importable ``MOD``, a script
  path must exist, a tool (``ruff``, ``mkdocs``, ...) must be installed next to
  this Python or be a known system tool, and every ``--flag`` must appear in the
  ``--help`` of the command (and its subcommand). ``pip install`` lines may only
  name extras and dependency groups that pyproject.toml defines.
- ``text`` and data languages (``toml``, ``yaml``, ``json``, ...) are not run.
  A block with no language fails: say what it is.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
import textwrap
import typing as t
from pathlib import Path

import pytest

from tests._subproc import Background, selected_params

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
PAGES = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md")])

PYTHON = frozenset({"python", "py", "python3"})
SHELL = frozenset({"bash", "sh", "shell", "console"})
NOT_RUN = frozenset(
    {
        "text",
        "txt",
        "toml",
        "yaml",
        "yml",
        "json",
        "ini",
        "cfg",
        "sql",
        "diff",
        "dockerfile",
        "mermaid",
        "csv",
        "output",
        "pycon",
    }
)

#: Commands that are not Python tools of this project's environment: only their
#: presence in this list is checked (they may not exist on the test machine).
SYSTEM_TOOLS = frozenset(
    {
        "apt-get",
        "brew",
        "cat",
        "cd",
        "chmod",
        "cp",
        "curl",
        "docker",
        "echo",
        "env",
        "export",
        "git",
        "kill",
        "ls",
        "mkdir",
        "pg_ctl",
        "pg_isready",
        "pg_ctlcluster",
        "pre-commit",
        "ps",
        "psql",
        "py-spy",
        "rm",
        "runuser",
        "sleep",
        "sudo",
        "tail",
        "time",
        "timeout",
        "uv",
        "wget",
        "which",
    }
)

#: Console scripts installed next to ``sys.executable`` by the dev group.
VENV_TOOLS = frozenset(
    {"celery", "gunicorn", "locust", "mkdocs", "mypy", "pytest", "ruff", "scoping", "uvicorn"}
)

#: Shell commands whose flags are not checked: pip's flags depend on pip's version.
NO_FLAG_CHECK = frozenset({"pip", "venv"})

PY_OPTIONS_WITH_VALUE = frozenset({"-W", "-X"})
PY_BARE_OPTIONS = frozenset({"-u", "-I", "-E", "-B", "-O", "-OO", "-q", "-s", "-S", "-P"})


@dataclasses.dataclass(frozen=True)
class Block:
    """One fenced block: its page, the line of its opening fence, language, code."""

    page: Path
    line: int
    lang: str
    code: str

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def parse_blocks(page: Path, text: str | None = None) -> list[Block]:
    """The fenced blocks of a Markdown page (``` or ~~~ fences, indented ones too)."""
    lines = (page.read_text() if text is None else text).splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        m = re.match(r"^( *)(`{3,}|~{3,})\s*([^`\s]*)", lines[i])
        if not m:
            i += 1
            continue
        indent, fence, lang = len(m.group(1)), m.group(2), m.group(3).lower()
        start, body = i + 1, []
        i += 1
        while i < len(lines) and not re.match(rf"^ *{fence[0]}{{{len(fence)},}}\s*$", lines[i]):
            line = lines[i]
            body.append(line[indent:] if line[:indent].strip() == "" else line.lstrip())
            i += 1
        blocks.append(Block(page, start, lang, "\n".join(body) + "\n"))
        i += 1
    return blocks


# --------------------------------------------------------------------------
# python blocks

DRIVER = textwrap.dedent(
    """\
    import json as _json, sys as _sys, traceback as _traceback
    _spec = _json.load(_sys.stdin)
    # The blocks run in __main__ itself, so that what they define can be pickled
    # by reference (multiprocessing, Celery) as in a reader's script.
    for _line, _code in _spec["blocks"]:
        try:
            # Padded so that tracebacks show the page's own line numbers.
            exec(compile("\\n" * _line + _code, _spec["page"], "exec"), globals())
        except SystemExit as _exc:
            if _exc.code not in (None, 0):
                print(f"DOCS-BLOCK-FAILED {_line}: SystemExit({_exc.code!r})", file=_sys.stderr)
                _sys.exit(1)
        except BaseException:
            _traceback.print_exc()
            print(f"DOCS-BLOCK-FAILED {_line}", file=_sys.stderr)
            _sys.exit(1)
    """
)


def _python_pages() -> list[Path]:
    return [p for p in PAGES if any(b.lang in PYTHON for b in parse_blocks(p))]


def run_python_blocks(
    page: Path, blocks: list[Block], cwd: Path, dsn: str | None, timeout: float = 300.0
) -> None:
    """Run ``blocks`` in order in one fresh interpreter; fail naming the page and line."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.pop("PYTHONWARNINGS", None)
    if dsn is not None:
        env["SCOPING_TEST_DSN"] = dsn
    spec = json.dumps({"page": str(page), "blocks": [(b.line, b.code) for b in blocks]})
    name = page.relative_to(ROOT) if page.is_relative_to(ROOT) else page
    try:
        proc = subprocess.run(
            [sys.executable, "-W", "error::DeprecationWarning", "-c", DRIVER],
            input=spec,
            capture_output=True,
            text=True,
            cwd=cwd,
            env=env,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"{name}: its python blocks did not finish within {timeout:.0f} s")
    if proc.returncode != 0:
        m = re.search(r"DOCS-BLOCK-FAILED (\d+)", proc.stderr)
        where = f"the python block at line {m.group(1)}" if m else "a python block"
        pytest.fail(
            f"{name}: {where} failed (exit status {proc.returncode}).\n"
            f"--- stderr (tail) ---\n{proc.stderr[-4000:]}\n"
            f"--- stdout (tail) ---\n{proc.stdout[-1500:]}",
            pytrace=False,
        )


def _run_page(page: Path, cwd: Path, dsn: str | BaseException | None) -> None:
    """Run ``page``'s python blocks; ``dsn`` is what getting ``pg_url`` raised, if it did."""
    blocks = [b for b in parse_blocks(page) if b.lang in PYTHON]
    if not any("SCOPING_TEST_DSN" in b.code for b in blocks):
        dsn = None
    elif isinstance(dsn, BaseException):
        raise dsn  # no server: the page's test skips (or fails under CI) as pg_url says
    run_python_blocks(page, blocks, cwd, dsn)


@pytest.fixture(scope="module")
def page_runs(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> t.Iterator[Background[tuple[str, Path], t.Any]]:
    """The pages' checks that wait for child processes, side by side; each test waits
    for its own page. ``("python", page)``: its python blocks, in their own interpreter
    and directory (pages share nothing). ``("shell", page)``: the problems of its shell
    commands (the ``--help`` texts they need, cached once for all pages)."""
    start = [
        ("python", page) for page in selected_params(request, "test_python_blocks_run", "page")
    ]
    start += [("shell", page) for page in selected_params(request, SHELL_TEST, "page")]
    dsn: str | BaseException | None = None
    if any(
        "SCOPING_TEST_DSN" in b.code
        for kind, page in start
        if kind == "python"
        for b in parse_blocks(page)
        if b.lang in PYTHON
    ):
        try:
            dsn = request.getfixturevalue("pg_url")
        except (pytest.skip.Exception, pytest.fail.Exception) as exc:
            dsn = exc
    jobs: dict[tuple[str, Path], t.Callable[[], t.Any]] = {
        ("python", page): functools.partial(_run_page, page, tmp_path_factory.mktemp("page"), dsn)
        for page in _python_pages()
    }
    jobs.update({("shell", page): functools.partial(_shell_page, page) for page in _shell_pages()})
    with Background(jobs, start=start) as background:
        yield background


@pytest.mark.parametrize("page", _python_pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_python_blocks_run(page: Path, page_runs: Background[tuple[str, Path], t.Any]) -> None:
    page_runs.result(("python", page))


# --------------------------------------------------------------------------
# shell blocks


def commands_of(block: Block) -> list[list[str]]:
    """The simple commands of a shell or console block, as token lists."""
    raw = block.code.splitlines()
    if block.lang == "console":
        # `$ ` starts a command, a trailing backslash continues it; the rest is output.
        kept, continued = [], False
        for ln in raw:
            if continued or ln.startswith("$ "):
                kept.append(ln if continued else ln[2:])
                continued = ln.rstrip().endswith("\\")
        raw = kept
    joined = re.sub(r"\\\n", " ", "\n".join(raw))
    commands: list[list[str]] = []
    for line in joined.splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        lexer.commenters = "#"
        current: list[str] = []
        skip_next = False
        for token in lexer:
            if skip_next:
                skip_next = False
                continue
            if token in ("&&", "||", ";", "|", "&", "(", ")"):
                if current:
                    commands.append(current)
                current = []
            elif token and set(token) <= set("<>&"):
                skip_next = True  # a redirection and its target
            elif current or token:
                current.append(token)
        if current:
            commands.append(current)
    return commands


@functools.cache
def _help(command: tuple[str, ...]) -> str | None:
    """``command --help`` output, or None when it fails."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["COLUMNS"] = "200"
    try:
        proc = subprocess.run(
            [*command, "--help"],
            capture_output=True,
            text=True,
            cwd=ROOT,
            env=env,
            timeout=120,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout + proc.stderr if proc.returncode == 0 else None


@functools.cache
def _pyproject() -> dict[str, object]:
    with (ROOT / "pyproject.toml").open("rb") as fh:
        return tomllib.load(fh)


def _check_pip(args: list[str]) -> list[str]:
    """Extras and groups named by ``pip install`` exist; the distribution name is right."""
    data = _pyproject()
    project = _as_dict(data.get("project"))
    extras = set(_as_dict(project.get("optional-dependencies")))
    groups = set(_as_dict(data.get("dependency-groups")))
    problems = []
    for i, arg in enumerate(args):
        if arg == "--group" and i + 1 < len(args):
            group = args[i + 1].rsplit(":", 1)[-1]
            if group not in groups:
                problems.append(f"dependency group {group!r} is not in pyproject.toml")
        m = re.fullmatch(r"([\w.-]+)\[([\w,-]+)\](.*)", arg)
        if m and m.group(1) in (".", "sqlalchemy-scoping"):
            problems += [
                f"extra {e!r} is not in pyproject.toml"
                for e in m.group(2).split(",")
                if e not in extras
            ]
        if re.fullmatch(r"scoping(\[.*\])?([<>=!~].*)?", arg):
            problems.append(f"{arg!r}: the distribution is named sqlalchemy-scoping")
    return problems


def _as_dict(value: object) -> dict[str, object]:
    return value if isinstance(value, dict) else {}


def _subcommand_help(base: tuple[str, ...], args: list[str]) -> str | None:
    """Help of the deepest subcommand named by the leading word-like arguments."""
    words = []
    for arg in args:
        if arg.startswith("-") or not re.fullmatch(r"[a-z][a-z0-9-]*", arg):
            break
        words.append(arg)
    for n in range(len(words), -1, -1):
        text = _help((*base, *words[:n]))
        if text is not None:
            return text
    return None


def _check_flags(base: tuple[str, ...], args: list[str]) -> list[str]:
    flags = []
    for arg in args:
        if arg == "--":
            break
        if arg.startswith("--") and len(arg) > 2:
            flags.append(arg.split("=", 1)[0])
    if not flags:
        return []
    text = _subcommand_help(base, args)
    if text is None:
        return [f"`{' '.join(base)} --help` failed"]
    return [
        f"{flag} is not in `{' '.join(base)} --help`"
        for flag in flags
        if not re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text)
    ]


def check_command(tokens: list[str]) -> list[str]:
    """Problems with one simple command (an empty list when it looks right)."""
    while tokens and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", tokens[0]):
        tokens = tokens[1:]  # VAR=value prefixes
    if not tokens:
        return []
    cmd, args = tokens[0], tokens[1:]
    name = os.path.basename(cmd)
    if name in ("sudo", "time", "timeout", "env"):
        rest = [a for a in args if not a.startswith("-")]
        if name == "timeout" and rest:
            rest = rest[1:]
        return check_command(rest) if rest else []
    if name in ("source", "."):
        return []
    if re.fullmatch(r"python(3(\.\d+)?)?", name):
        return _check_python(args)
    if name in ("pip", "pip3"):
        return _check_pip(args) if args[:1] == ["install"] else []
    if name == "bash" and args and not args[0].startswith("-"):
        return [] if (ROOT / args[0]).exists() else [f"{args[0]} does not exist"]
    if name in VENV_TOOLS:
        exe = Path(sys.executable).with_name(name)
        if not exe.exists():
            return [f"{name} is not installed next to {sys.executable} (the dev group has it?)"]
        return _check_flags((str(exe),), args)
    if name in SYSTEM_TOOLS:
        return []
    if cmd.startswith(("./", "examples/", "stress/", "tests/", ".ci/")):
        return [] if (ROOT / cmd).exists() else [f"{cmd} does not exist"]
    return [f"unknown command {cmd!r}: a typo, or add it to SYSTEM_TOOLS in tests/test_docs.py"]


def _check_python(args: list[str]) -> list[str]:
    i = 0
    while i < len(args) and args[i] in PY_BARE_OPTIONS | PY_OPTIONS_WITH_VALUE:
        i += 2 if args[i] in PY_OPTIONS_WITH_VALUE else 1
    args = args[i:]
    if not args or args[0] == "-c":
        return []
    if args[0] == "-m":
        if len(args) < 2:
            return ["python -m without a module"]
        module, rest = args[1], args[2:]
        if module == "pip":
            return _check_pip(rest) if rest[:1] == ["install"] else []
        if module in NO_FLAG_CHECK:
            return []
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found and not (ROOT / Path(*module.split("."))).exists():
            return [f"module {module!r} cannot be imported"]
        return _check_flags((sys.executable, "-m", module), rest)
    script = args[0]
    if script.startswith("-"):
        return [f"unknown python option {script}"]
    if not (ROOT / script).exists() and not Path(script).is_absolute():
        return [f"script {script} does not exist"]
    return []


def shell_problems(block: Block) -> list[str]:
    return [
        f"{block.where}: `{' '.join(cmd)}`: {problem}"
        for cmd in commands_of(block)
        for problem in check_command(cmd)
    ]


def _shell_pages() -> list[Path]:
    return [p for p in PAGES if any(b.lang in SHELL for b in parse_blocks(p))]


def _shell_page(page: Path) -> list[str]:
    return [p for b in parse_blocks(page) if b.lang in SHELL for p in shell_problems(b)]


SHELL_TEST = "test_shell_commands_exist_and_accept_their_flags"


@pytest.mark.parametrize("page", _shell_pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_shell_commands_exist_and_accept_their_flags(
    page: Path, page_runs: Background[tuple[str, Path], t.Any]
) -> None:
    problems = page_runs.result(("shell", page))
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_block_has_a_known_language(page: Path) -> None:
    bad = [
        f"{b.where}: "
        + (
            f"unknown language {b.lang!r}"
            if b.lang
            else "no language: use python, bash, console or text"
        )
        for b in parse_blocks(page)
        if b.lang not in PYTHON | SHELL | NOT_RUN
    ]
    assert not bad, "\n".join(bad)


# --------------------------------------------------------------------------
# the checker itself

SAMPLE = """\
# A page

```python
x = 1
```

- a list item:

  ```python
  assert x == 1
  y = x + 1
  ```

~~~console
$ python -m scoping --version
sqlalchemy-scoping 0.1.0
$ python -m scoping doctor \\
    --json
  {"indented": "output, not a command --nope"}
~~~
"""


def test_parse_blocks_finds_indented_and_tilde_fences(tmp_path: Path) -> None:
    blocks = parse_blocks(tmp_path / "page.md", SAMPLE)
    assert [(b.line, b.lang) for b in blocks] == [(3, "python"), (9, "python"), (14, "console")]
    assert blocks[1].code == "assert x == 1\ny = x + 1\n"
    assert commands_of(blocks[2]) == [
        ["python", "-m", "scoping", "--version"],
        ["python", "-m", "scoping", "doctor", "--json"],
    ]


def test_python_blocks_share_a_namespace_and_failures_name_the_line(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(SAMPLE + "\n```python\nassert y == 3, 'wrong'\n```\n")
    blocks = [b for b in parse_blocks(page) if b.lang in PYTHON]
    with pytest.raises(pytest.fail.Exception) as exc:
        run_python_blocks(page, blocks, tmp_path, None)
    message = str(exc.value)
    assert "the python block at line 22 failed" in message
    assert f'File "{page}", line 23' in message  # the page's own line number
    run_python_blocks(page, blocks[:2], tmp_path, None)  # the first two pass


def test_a_syntax_error_names_its_block(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("```python\nx = 1\n```\n\n```python\nx = = 2\n```\n")
    with pytest.raises(pytest.fail.Exception, match="the python block at line 5 failed"):
        run_python_blocks(page, parse_blocks(page), tmp_path, None)


@pytest.mark.parametrize(
    ("command", "problem"),
    [
        ("python -m scoping doctor --json", None),
        ("python -m scoping doctor --jsn", "--jsn is not in"),
        ("python -m no_such_module --x", "module 'no_such_module' cannot be imported"),
        ("python examples/no_such_script.py", "does not exist"),
        ("pip install 'sqlalchemy-scoping[gevent,postgres]'", None),
        ("pip install 'sqlalchemy-scoping[stress]'", "extra 'stress' is not in"),
        ("pip install scoping", "the distribution is named sqlalchemy-scoping"),
        ("python -m pip install -e . --group dev", None),
        ("python -m pip install -e . --group nope", "group 'nope' is not in"),
        ("CI=true bash .ci/run", None),
        ("frobnicate --now", "unknown command 'frobnicate'"),
    ],
)
def test_shell_checker(command: str, problem: str | None) -> None:
    block = Block(ROOT / "README.md", 1, "bash", command + "\n")
    problems = shell_problems(block)
    if problem is None:
        assert problems == []
    else:
        assert len(problems) == 1
        assert problem in problems[0]


# --------------------------------------------------------------------------
# links and the mkdocs site


def _slug(heading: str) -> str:
    """GitHub's (and mkdocs' toc's) anchor for a heading, for plain-text headings."""
    text = heading.strip().lower().replace("`", "").replace("*", "")
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _prose(text: str, keep_code: bool = False) -> str:
    """The page without fenced blocks, and without inline code unless ``keep_code``."""
    out, fence = [], None
    for line in text.splitlines():
        m = re.match(r"^ *(`{3,}|~{3,})", line)
        if fence is None and m:
            fence = m.group(1)
            out.append("")
        elif fence is not None:
            if re.match(rf"^ *{fence[0]}{{{len(fence)},}}\s*$", line):
                fence = None
            out.append("")
        else:
            out.append(line if keep_code else re.sub(r"`[^`]*`", "", line))
    return "\n".join(out)


def anchors_of(page: Path) -> set[str]:
    prose = _prose(page.read_text(), keep_code=True)
    return {_slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.*?)\s*#*$", prose, re.M)}


def link_problems(page: Path) -> list[str]:
    """Relative links (and #anchors into Markdown pages) that do not resolve."""
    problems = []
    prose = _prose(page.read_text())
    for lineno, line in enumerate(prose.splitlines(), 1):
        for m in re.finditer(r"\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)", line):
            target = m.group(1)
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            where = f"{page.relative_to(ROOT)}:{lineno}"
            if not dest.exists():
                problems.append(f"{where}: {target} does not exist")
            elif anchor and dest.suffix == ".md" and anchor not in anchors_of(dest):
                problems.append(f"{where}: {target}: no heading with the anchor #{anchor}")
    return problems


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page: Path) -> None:
    problems = link_problems(page)
    assert not problems, "\n".join(problems)


def _nav_pages(nav: object) -> list[str]:
    if isinstance(nav, str):
        return [nav]
    if isinstance(nav, list):
        return [p for item in nav for p in _nav_pages(item)]
    if isinstance(nav, dict):
        return [p for value in nav.values() for p in _nav_pages(value)]
    return []


def test_mkdocs_nav_lists_every_page_once() -> None:
    yaml = pytest.importorskip("yaml")
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    nav = _nav_pages(config["nav"])
    pages = sorted(p.name for p in (ROOT / "docs").glob("*.md"))
    assert sorted(nav) == pages, (
        f"in nav, no page: {sorted(set(nav) - set(pages))}; "
        f"pages not in nav: {sorted(set(pages) - set(nav))}"
    )
    readme = (ROOT / "README.md").read_text()
    missing = [p for p in pages if f"](docs/{p})" not in readme]
    assert not missing, f"the README's Documentation list lacks {missing}"


def test_mkdocs_build_strict(tmp_path: Path) -> None:
    mkdocs = Path(sys.executable).with_name("mkdocs")
    if not mkdocs.exists():
        pytest.skip("mkdocs is not installed (python -m pip install -e . --group docs)")
    proc = subprocess.run(
        [str(mkdocs), "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_link_checker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.md").write_text("# Title\n\n## The `scope()` block\n")
    page = docs / "b.md"
    page.write_text(
        "[ok](a.md#the-scope-block) [web](https://example.org/x) [self](#here)\n"
        "## Here\n"
        "[gone](missing.md) [bad anchor](a.md#nope)\n"
        "```text\n[in a block](nowhere.md)\n```\n"
    )
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert link_problems(page) == [
        "docs/b.md:3: missing.md does not exist",
        "docs/b.md:3: a.md#nope: no heading with the anchor #nope",
    ]
