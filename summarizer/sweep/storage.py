"""Where a study lives: its database URL (`hydra.sweeper.storage`), checked before the sweep starts,
and the lock that every sweeper process of one study shares through that database.

sqlite (a file in multirun/ by default) serves the processes of one machine; PostgreSQL serves
several machines. Optuna opens its own connection pool; the lock and the check use the engine here.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import logging
import zlib
from collections.abc import Iterator
from pathlib import Path

from summarizer.errors import UserError, first_line

log = logging.getLogger(__name__)


def resolve_storage(url: str, base: Path) -> str:
    """A relative sqlite path taken against `base` (the launch folder), its folder created."""
    if url.startswith("sqlite:///") and not url.startswith("sqlite:////"):
        path = (base / url[len("sqlite:///") :]).resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{path}"
    return url


def shown(url: str) -> str:
    """The URL as it may be logged: any password masked."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL at all: nothing to hide
        return url


def engine_kwargs(url: str) -> dict:
    """SQLAlchemy engine settings for `url`, for Optuna's RDBStorage and for the engine here."""
    if url.startswith("sqlite"):
        return {"connect_args": {"timeout": 60}}
    # A server: fail in seconds when it is unreachable, and survive its restarts in a long sweep.
    connect = {"connect_timeout": 10} if url.startswith("postgresql") else {}
    return {"pool_pre_ping": True, "connect_args": connect}


@functools.cache
def _engine(url: str):
    """The engine of the sweeper's own lock and checks (Optuna keeps its own)."""
    import sqlalchemy

    return sqlalchemy.create_engine(url, **engine_kwargs(url))


def check_storage(url: str) -> None:
    """One line naming `hydra.sweeper.storage` instead of a driver's traceback when the study's
    database cannot be used: a bad URL, a driver that is not installed, a server that is down."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError, OperationalError

    key = f"hydra.sweeper.storage={shown(url)}"
    try:
        parsed = make_url(url)
        dialect = parsed.get_dialect()
    except (ArgumentError, NoSuchModuleError, ValueError) as e:
        raise UserError(
            f"{key}: not a database URL Optuna can use ({first_line(e)}); e.g. "
            "sqlite:///multirun/optuna.db or postgresql+psycopg://user@host:5432/optuna"
        ) from None
    if url.startswith("sqlite"):
        return
    try:
        dialect.import_dbapi()
    except ImportError as e:
        hint = (
            "use postgresql+psycopg://... with psycopg installed (pip install 'psycopg[binary]', "
            "or make install)"
            if parsed.get_backend_name() == "postgresql"
            else "install it"
        )
        raise UserError(
            f"{key}: its driver {parsed.get_driver_name()} is not installed ({e}); {hint}"
        ) from None
    try:
        with _engine(url).connect():
            pass
    except OperationalError as e:
        where = f"{parsed.host or 'localhost'}:{parsed.port or dialect.default_port or ''}"
        reason = first_line(e.orig if e.orig is not None else e)
        hint = "start it (make services-up prints the URL) or fix the URL"
        if "password" in reason:
            hint = "export PGPASSWORD (make services-up prints it) or fix the user"
        raise UserError(f"{key}: cannot connect to {where} ({reason}); {hint}") from None


_warned_unlocked: set[str] = set()


@contextlib.contextmanager
def storage_lock(url: str, study: str) -> Iterator[None]:
    """A lock shared by every sweeper process of `study`, held by its storage: a PostgreSQL advisory
    lock (per database; released at the end of its transaction, or by the server when a killed
    worker's connection drops), or an flock beside a sqlite file (one machine, as sqlite itself).
    Optuna has no lock across processes: its storages serialise single writes only."""
    if url.startswith("sqlite:///"):
        with open(url[len("sqlite:///") :] + ".lock", "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)  # released when the file closes, or its process dies
            yield
        return
    if url.startswith("postgresql"):
        import sqlalchemy

        key = zlib.crc32(f"summarizer-sweep:{study}".encode())
        with _engine(url).begin() as conn:
            conn.execute(sqlalchemy.text("SELECT pg_advisory_xact_lock(:key)"), {"key": key})
            yield
        return
    if url not in _warned_unlocked:
        _warned_unlocked.add(url)
        log.warning(
            "hydra.sweeper.storage=%s: several sweeper processes are coordinated on sqlite and "
            "PostgreSQL only; run one sweeper on this storage",
            shown(url),
        )
    yield
