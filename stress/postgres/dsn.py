"""DSNs: parse them with the drivers' own parsers, mask them, build URLs from parameters.

Every string that reaches a user (messages, headers, reprs, JSON) goes through
:func:`mask_dsn` or :func:`scrub`. Neither looks for passwords with a pattern of
its own: a DSN is parsed by libpq (``psycopg2.extensions.parse_dsn``, else
``psycopg.conninfo.conninfo_to_dict``) and, when it is a URL, by SQLAlchemy
(``sqlalchemy.engine.make_url``); the masked form is rebuilt from the parsed
parameters, so no byte of a secret can survive by being spelled oddly.

Secrets are the ``password`` and ``sslpassword`` parameters (in the userinfo of a
URL, in its query string, or as ``key=value``) and the ``PGPASSWORD`` environment
variable, which libpq uses when the DSN has no password.

A URL that libpq and SQLAlchemy read differently (``postgresql://u:a/b@h/db``:
libpq sees host ``u`` and port ``a``, SQLAlchemy sees password ``a/b``) is
*ambiguous*: it is masked down to its scheme and refused by the finder, with the
fix (percent-encode the password). A DSN that no parser accepts is masked the
same way.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import re
import shutil
import tempfile
import typing as t
from urllib.parse import quote, urlencode

if t.TYPE_CHECKING:
    from collections.abc import Iterator, Mapping

__all__ = [
    "SECRET_KEYS",
    "Parsed",
    "build_url",
    "mask_dsn",
    "parse",
    "passfile_env",
    "scrub",
    "secrets_in",
    "split_password",
    "to_sqlalchemy_url",
]

#: libpq parameters whose values are secrets.
SECRET_KEYS = ("password", "sslpassword")
_MASK = "***"
_PG_BACKENDS = ("postgresql", "postgres")


@dataclasses.dataclass(frozen=True, repr=False)
class Parsed:
    """What the parsers made of a DSN.

    ``params``: the libpq parameters (None when libpq refused it, ``error`` says why,
    already scrubbed). ``scheme``: the URL scheme as written (``postgresql+psycopg2``)
    or "" for a key=value DSN. ``backend``: SQLAlchemy's backend name for a URL
    (``postgresql``, ``mysql``...). ``disagree``: libpq and SQLAlchemy read user,
    password, host or database differently. ``misplaced``: a parser put a URL
    delimiter in the host or port (an unencoded ``@`` or ``/`` in a password).
    ``secrets``: every secret any parser found.
    """

    params: dict[str, str] | None
    scheme: str
    backend: str
    disagree: bool
    misplaced: bool
    secrets: tuple[str, ...]
    error: str = ""
    sa_params: dict[str, str] | None = None

    def __repr__(self) -> str:  # never the secrets
        keys = sorted((self.params or self.sa_params or {}).keys())
        return (
            f"Parsed(scheme={self.scheme!r}, backend={self.backend!r}, keys={keys!r}, "
            f"disagree={self.disagree}, misplaced={self.misplaced}, "
            f"secrets={len(self.secrets)}, error={self.error!r})"
        )

    @property
    def ambiguous(self) -> bool:
        """Where the secrets are is not certain: show nothing of the DSN."""
        return self.disagree or self.misplaced

    @property
    def is_postgres(self) -> bool:
        return self.scheme == "" or self.backend in _PG_BACKENDS


def _scheme_of(dsn: str) -> str:
    """The scheme of a URL (text before ``://`` made of scheme characters), else ""."""
    head, sep, _ = dsn.partition("://")
    if not sep or not head or not head[0].isalpha():
        return ""
    if all(c.isalnum() or c in "+-." for c in head):
        return head
    return ""


def _libpq_parse(dsn: str) -> dict[str, str]:
    """libpq's reading of ``dsn``; raises ValueError with libpq's message."""
    try:
        import psycopg2.extensions
    except ImportError:
        psycopg2 = None  # type: ignore[assignment]
    if psycopg2 is not None:
        try:
            parsed = psycopg2.extensions.parse_dsn(dsn)
        except psycopg2.ProgrammingError as exc:
            message = str(exc)
        else:
            return {str(k): str(v) for k, v in parsed.items()}
        raise ValueError(message.removeprefix("invalid dsn: ").strip())
    try:
        import psycopg.conninfo
    except ImportError:
        raise ValueError(
            "neither psycopg2 nor psycopg is installed to parse it; "
            "fix: pip install psycopg2-binary"
        ) from None
    try:
        return {str(k): str(v) for k, v in psycopg.conninfo.conninfo_to_dict(dsn).items()}
    except psycopg.ProgrammingError as exc:
        message = str(exc)
    raise ValueError(message.strip())


def _sqlalchemy_parse(dsn: str) -> tuple[str, dict[str, str]] | None:
    """(backend, libpq-like parameters) as SQLAlchemy reads a URL, or None."""
    from sqlalchemy.engine import make_url

    try:
        url = make_url(dsn)
    except Exception:  # ArgumentError, ValueError (bad port): SQLAlchemy cannot read it
        return None
    params: dict[str, str] = {}
    for key, value in url.query.items():
        params[key] = value if isinstance(value, str) else ",".join(value)
    fields: tuple[tuple[str, str | None], ...] = (
        ("user", url.username),
        ("password", url.password),
        ("host", url.host),
        ("port", None if url.port is None else str(url.port)),
        ("dbname", url.database),
    )
    for key, field in fields:
        if field is not None:
            params[key] = field
    return url.get_backend_name(), params


def _libpq_form(dsn: str, scheme: str) -> str:
    """``dsn`` as libpq accepts it: a SQLAlchemy scheme becomes ``postgresql``."""
    if scheme and scheme.split("+", 1)[0] in _PG_BACKENDS:
        return "postgresql://" + dsn.partition("://")[2]
    return dsn


def parse(dsn: str) -> Parsed:
    """Parse ``dsn`` (libpq URL, key=value string or SQLAlchemy URL) with every parser."""
    scheme = _scheme_of(dsn)
    params: dict[str, str] | None = None
    error = ""
    backend = ""
    sa_params: dict[str, str] | None = None
    if scheme:
        read = _sqlalchemy_parse(dsn)
        if read is not None:
            backend, sa_params = read
        else:
            backend = scheme.split("+", 1)[0]
    if not scheme or backend in _PG_BACKENDS:
        try:
            params = _libpq_parse(_libpq_form(dsn, scheme))
        except ValueError as exc:
            error = str(exc)
    found: list[str] = []
    for source in (params, sa_params):
        if source:
            found += [source[k] for k in SECRET_KEYS if source.get(k)]
    disagree = False
    if params is not None and sa_params is not None:
        for key in ("user", "password", "host", "dbname"):
            if (params.get(key) or "") != (sa_params.get(key) or ""):
                disagree = True
    misplaced = bool(scheme) and any(_misplaced(p) for p in (params, sa_params) if p)
    secrets = tuple(sorted(set(found), key=len, reverse=True))
    if error:
        error = _scrub_unparsed(error, dsn, secrets)
    return Parsed(params, scheme, backend, disagree, misplaced, secrets, error, sa_params)


def _misplaced(params: Mapping[str, str]) -> bool:
    """True if a URL's parse put a delimiter where none can be: an unencoded ``@``,
    ``/``, ``?`` or ``#`` of a password that landed in the host or port.

    (A host name never holds ``@?#``, a host from the URL's authority never holds
    ``/``, a port is digits.)
    """
    host = params.get("host", "")
    port = params.get("port", "")
    if any(c in host for c in "@?#") or ("/" in host and not host.startswith("/")):
        return True
    return bool(port) and not all(c.isdigit() or c == "," for c in port)


def secrets_in(dsn: str) -> tuple[str, ...]:
    """Every secret ``dsn`` carries according to any parser, longest first."""
    return parse(dsn).secrets


def build_url(scheme: str, params: Mapping[str, str], *, masked: t.Iterable[str] = ()) -> str:
    """A URL from libpq parameters (percent-encoded, so libpq and SQLAlchemy agree).

    A socket directory or a multi-host list goes into the query string. The
    values of the parameters named in ``masked`` are shown as ``***``.
    """
    masked = [key for key in masked if key in params]
    if masked:
        placeholder = "MASKED" + _random_hex()
        url = build_url(scheme, {k: (placeholder if k in masked else v) for k, v in params.items()})
        return url.replace(placeholder, _MASK)
    params = dict(params)
    user = params.pop("user", "")
    has_password = "password" in params
    password = params.pop("password", "")
    host = params.pop("host", "")
    port = params.pop("port", "")
    dbname = params.pop("dbname", "")
    auth = quote(user, safe="")
    if has_password:
        auth += ":" + quote(password, safe="")
    if auth:
        auth += "@"
    netloc = ""
    if host.startswith("/") or "," in host:
        query = {"host": host, **({"port": port} if port else {}), **params}
    else:
        netloc = f"[{host}]" if ":" in host else host
        if port:
            netloc += f":{port}"
        query = params
    url = f"{scheme}://{auth}{netloc}/{quote(dbname, safe='')}"
    if query:
        url += "?" + urlencode(query, safe="/,*", quote_via=quote)
    return url


def _random_hex() -> str:
    import secrets

    return secrets.token_hex(8)


def _make_kv(params: Mapping[str, str]) -> str:
    try:
        import psycopg2.extensions
    except ImportError:
        import psycopg.conninfo

        return str(psycopg.conninfo.make_conninfo("", **params))
    return str(psycopg2.extensions.make_dsn(**params))


def _masked_params(params: Mapping[str, str]) -> dict[str, str]:
    return {k: (_MASK if k in SECRET_KEYS else v) for k, v in params.items()}


def mask_dsn(dsn: str) -> str:
    """``dsn`` with every secret replaced by ``***``, rebuilt from what the parsers read.

    A URL stays a URL with its scheme (``postgresql+psycopg2://u:***@h/db``); a
    key=value DSN stays key=value (``host=h password=***``). An ambiguous or
    unparseable DSN becomes ``scheme://***`` (or ``***``): when the parsers cannot
    say where the password is, nothing of it is shown.
    """
    parsed = parse(dsn)
    if parsed.ambiguous:
        return f"{parsed.scheme}://{_MASK}" if parsed.scheme else _MASK
    if parsed.params is not None:
        if parsed.scheme:
            return build_url(parsed.scheme, parsed.params, masked=SECRET_KEYS)
        return _make_kv(_masked_params(parsed.params))
    if parsed.scheme and parsed.sa_params is not None:
        return build_url(parsed.scheme, parsed.sa_params, masked=SECRET_KEYS)
    return f"{parsed.scheme}://{_MASK}" if parsed.scheme else _MASK


@functools.lru_cache(maxsize=256)
def _is_keyword(word: str) -> bool:
    """True if libpq knows ``word`` as a connection parameter (asked of libpq itself)."""
    if not word.replace("_", "").isalnum() or not word.isascii():
        return False
    try:
        _libpq_parse(f"{word}=x")
    except ValueError:
        return False
    return True


_QUOTED = re.compile(r'"([^"]*)"')  # a quoted fragment in a libpq *message*, not a DSN


def _scrub_unparsed(message: str, dsn: str, secrets: tuple[str, ...]) -> str:
    """libpq's complaint about a DSN it could not parse, with no fragment of the DSN.

    libpq quotes the offending part (``missing "=" after "mysql://u:pw@h"``); only
    quoted words that are libpq keywords or the ``=`` survive.
    """
    message = _replace_secrets(message.replace(dsn, "***"), secrets)

    def keep(match: re.Match[str]) -> str:
        word = match.group(1)
        harmless = len(word) <= 2 and not any(c.isalnum() for c in word)
        return match.group(0) if harmless or _is_keyword(word) else '"***"'

    return _QUOTED.sub(keep, message)


def _spellings(secret: str) -> set[str]:
    return {secret, quote(secret, safe=""), quote(secret), quote(secret, safe="").lower()}


def _replace_secrets(text: str, secrets: t.Iterable[str]) -> str:
    spelled: set[str] = set()
    for secret in secrets:
        if secret:
            spelled |= _spellings(secret)
    for secret in sorted(spelled, key=len, reverse=True):
        text = text.replace(secret, _MASK)
    return text


def scrub(text: str, *dsns: str) -> str:
    """``text`` with each of ``dsns`` masked and every secret they (or PGPASSWORD) carry
    removed, in any spelling (raw or percent-encoded).

    Use it on anything that may quote a DSN: driver error messages, child stderr.
    """
    secrets: list[str] = []
    for dsn in dsns:
        if not dsn:
            continue
        text = text.replace(dsn, mask_dsn(dsn))
        parsed = parse(dsn)
        secrets += parsed.secrets
        if parsed.params is None and parsed.sa_params is None:
            text = _scrub_unparsed(text, dsn, ())
    env_password = os.environ.get("PGPASSWORD")
    if env_password:
        secrets.append(env_password)
    return _replace_secrets(text, secrets)


def split_password(dsn: str) -> tuple[str, dict[str, str]]:
    """(``dsn`` without its secrets, the secrets removed) for a parseable DSN.

    Raises ValueError (message already masked) when libpq cannot parse ``dsn``.
    """
    parsed = parse(dsn)
    if parsed.params is None or parsed.ambiguous:
        raise ValueError(f"cannot parse {mask_dsn(dsn)}: {parsed.error or 'ambiguous'}")
    public = {k: v for k, v in parsed.params.items() if k not in SECRET_KEYS}
    removed = {k: v for k, v in parsed.params.items() if k in SECRET_KEYS}
    rebuilt = build_url(parsed.scheme, public) if parsed.scheme else _make_kv(public)
    return rebuilt, removed


def to_sqlalchemy_url(params: Mapping[str, str], driver: str = "psycopg2") -> str:
    """A SQLAlchemy URL (``postgresql+<driver>://``) for libpq parameters."""
    return build_url(f"postgresql+{driver}", params)


def _passfile_field(value: str) -> str:
    # libpq's ~/.pgpass syntax: ':' and '\' are escaped with a backslash.
    return value.replace("\\", "\\\\").replace(":", "\\:")


@contextlib.contextmanager
def passfile_env(url: str) -> Iterator[tuple[str, dict[str, str]]]:
    """(``url`` without a password, environment for children) for the ``with`` block.

    When ``url`` carries a password it goes into a libpq password file (mode 0600, in
    a 0700 directory, removed at the end) and the environment names it in
    ``PGPASSFILE``; psycopg2, psycopg and asyncpg all read it. Neither the URL nor
    the environment then holds the secret, so both can be handed to children.
    ``sslpassword`` cannot go into a password file: a URL with one is refused.
    """
    parsed = parse(url)
    if parsed.params is None or parsed.ambiguous:
        raise ValueError(f"cannot parse {mask_dsn(url)}: {parsed.error or 'ambiguous'}")
    public, removed = split_password(url)
    if "sslpassword" in removed:
        raise ValueError(
            f"{mask_dsn(url)} has an sslpassword, which a password file cannot carry; "
            "fix: use a client key without a passphrase for tests"
        )
    if "password" not in removed:
        yield url, {}
        return
    params = parsed.params
    host = params.get("host", "") or "localhost"
    if host.startswith("/") or "," in host:
        host = "*"
    line = ":".join(
        _passfile_field(value)
        for value in (host, params.get("port", "") or "*", "*", params.get("user", "") or "*")
    )
    line += ":" + _passfile_field(removed["password"]) + "\n"
    directory = tempfile.mkdtemp(prefix="scoping-pgpass-")  # 0700
    try:
        path = os.path.join(directory, "pgpass")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(line)
        yield public, {"PGPASSFILE": path}
    finally:
        shutil.rmtree(directory, ignore_errors=True)
