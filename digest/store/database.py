"""Opening the database and keeping its schema: the engine (SQLite's pragmas, PostgreSQL's
connection settings), Alembic migrations, session factories, and the statements both
dialects spell differently (``INSERT … ON CONFLICT DO NOTHING``).

SQLAlchemy errors met while opening are translated to :class:`~digest.errors.DatabaseError`
here (:func:`open_engine`, :func:`migrate`, :func:`check_schema`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, delete, event, inspect, literal, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from digest.errors import DatabaseError
from digest.models import (
    Article,
    Base,
    Delivery,
    FeedState,
    Issue,
    IssueArticle,
    SignupMail,
    Subscriber,
    Throttle,
)

# The migrations ship beside the package: digest/migrations.
MIGRATIONS = Path(__file__).parent.parent / "migrations"


def open_engine(url: str) -> Engine:
    """Create an engine; SQLite gets WAL, foreign keys and a busy timeout.

    WAL lets ``digest serve`` unsubscribe readers while ``send`` writes the ledger, and the
    busy timeout turns short lock contention into a wait instead of an error.
    """
    try:
        parsed = make_url(url)
        if parsed.get_backend_name() == "sqlite":
            db = parsed.database
            if db and db != ":memory:" and not Path(db).parent.exists():
                raise DatabaseError(
                    f"database.url: folder {Path(db).parent} does not exist; create it "
                    "or point database.url elsewhere"
                )
            engine = create_engine(url, connect_args={"timeout": 30})

            @event.listens_for(engine, "connect")
            def _pragmas(dbapi_conn: Any, _record: Any) -> None:
                cur = dbapi_conn.cursor()
                cur.execute("PRAGMA journal_mode=WAL")
                cur.execute("PRAGMA synchronous=NORMAL")
                cur.execute("PRAGMA foreign_keys=ON")
                cur.close()

            return engine
        # application_name shows which process a backend serves (pg_stat_activity), so
        # an operator, or a test, can tell digest's connections apart.
        # (unless the URL names one itself).
        named = "application_name" in url
        # No server-side prepared statements (psycopg prepares a query after 5 runs):
        # behind PgBouncer in transaction mode the next transaction may get another
        # server connection, which does not have them.
        args: dict[str, Any] = {"prepare_threshold": None}
        if not named:
            args["application_name"] = f"digest:{os.getpid()}"
        return create_engine(url, pool_pre_ping=True, connect_args=args)
    except ArgumentError as exc:
        raise DatabaseError(f"database.url: {url!r} is not a database URL ({exc})") from None
    except ModuleNotFoundError as exc:
        raise DatabaseError(
            f"database.url: driver {exc.name!r} is not installed; for PostgreSQL run "
            "pip install 'digest[postgres]'"
        ) from None


def _alembic_config(engine: Engine) -> Any:
    from alembic.config import Config as AlembicConfig

    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["engine"] = engine
    return cfg


def migrate(engine: Engine) -> str:
    """Upgrade the schema to the newest migration (idempotent); return the revision."""
    from alembic import command

    try:
        command.upgrade(_alembic_config(engine), "head")
        return current_revision(engine) or "?"
    except OperationalError as exc:
        raise DatabaseError(f"cannot open database {engine.url!r}: {exc.orig}") from None


def current_revision(engine: Engine) -> str | None:
    """The schema revision the database is at, or None when it was never initialised."""
    with engine.connect() as conn:
        if not inspect(conn).has_table("alembic_version"):
            return None
        return conn.execute(text("SELECT version_num FROM alembic_version")).scalar()


def head_revision() -> str:
    """The newest migration shipped with this version of digest."""
    from alembic.script import ScriptDirectory

    script = ScriptDirectory(str(MIGRATIONS))
    head = script.get_current_head()
    assert head is not None
    return head


def check_schema(engine: Engine) -> None:
    """Raise a clear error unless the database is initialised and up to date."""
    try:
        rev = current_revision(engine)
    except OperationalError as exc:
        raise DatabaseError(f"cannot open database {engine.url!r}: {exc.orig}") from None
    if rev is None:
        raise DatabaseError(
            f"database {engine.url.render_as_string(hide_password=True)} is not initialised; "
            "run `digest init` first"
        )
    if rev != head_revision():
        raise DatabaseError(
            f"database schema is at {rev}, this digest needs {head_revision()}; "
            "run `digest init` to upgrade"
        )


def session_factory(engine: Engine) -> sessionmaker[Session]:
    """Sessions that keep loaded objects usable after commit."""
    return sessionmaker(engine, expire_on_commit=False)


def drop_if_silent(conn: Connection, seconds: float) -> None:
    """PostgreSQL: end this transaction if its client goes silent for ``seconds`` in it.

    For the short transactions that lock rows every worker needs (the relay's limit row,
    the leader's lease, a claim): a host cut off from the database in the middle of one
    (a partition: no error, no closed connection) would otherwise keep its locks until the
    server's TCP keepalive gives up, two hours by default, and everyone else would wait.
    Its own statements follow each other within milliseconds. ``SET LOCAL``: nothing is
    left on a pooled connection (PgBouncer in transaction mode is fine).
    """
    if conn.dialect.name == "postgresql":
        ms = max(1, int(seconds * 1000))
        conn.execute(text(f"SET LOCAL idle_in_transaction_session_timeout = {ms}"))


def insert_ignore(dialect: str, model: type[Base], values: dict[str, Any]) -> Any:
    """``INSERT … ON CONFLICT DO NOTHING`` on either dialect (a statement to execute)."""
    if dialect == "postgresql":
        return postgresql.insert(model).values(values).on_conflict_do_nothing()
    return sqlite.insert(model).values(values).on_conflict_do_nothing()


def delete_all(session: Session) -> None:
    """Empty every table (tests and benchmarks only)."""
    for model in (
        Delivery,
        IssueArticle,
        Issue,
        Subscriber,
        Article,
        FeedState,
        SignupMail,
        Throttle,
    ):
        session.execute(delete(model))
    session.commit()


def _insert_ignoring_conflict(session: Session, model: type[Base], values: dict[str, Any]) -> bool:
    """INSERT … ON CONFLICT DO NOTHING; True when the row was inserted.

    Both SQLite and PostgreSQL have it; it needs no savepoint (pysqlite's are unreliable)
    and, unlike catching IntegrityError, leaves the transaction usable.
    """
    stmt = insert_ignore(session.get_bind().dialect.name, model, values)
    # RETURNING, not rowcount: through the ORM, psycopg reports -1 for this statement.
    return session.execute(stmt.returning(literal(1))).first() is not None
