"""The same store on PostgreSQL: migrations, the round-up end to end, and claims.

Uses the server on 127.0.0.1:5432 (database ``test``, trust auth) in a schema of its own,
dropped afterwards. Skips with the reason when the server is not reachable, unless
DIGEST_REQUIRE_POSTGRES=1 (set by .ci/run), where an unreachable server is a failure.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from urllib.parse import quote

import pytest
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.exc import OperationalError, ProgrammingError

from digest import ledger, pipeline, store
from digest.config import load_config
from digest.render import Renderer
from tests.conftest import Recorder, write_config
from tests.test_send import D, add_subscribers

PG = os.environ.get("DIGEST_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


@contextmanager
def pg_schema(schema: str | None = None, **settings: str) -> Iterator[str]:
    """A fresh schema on the test server, dropped afterwards; yields a URL that uses it.

    ``settings`` become server settings of every connection of that URL (``-c key=value``
    in libpq's ``options``). Only failing to *reach* the server skips (or fails, under
    DIGEST_REQUIRE_POSTGRES=1); any other error is a bug in the test and is raised.
    """
    schema = schema or f"digest_test_{secrets.token_hex(4)}"
    admin = create_engine(PG, connect_args={"connect_timeout": 3})
    try:
        conn = admin.connect()
    except OperationalError as exc:
        admin.dispose()
        reason = str(exc.orig).strip().splitlines()[0] if exc.orig else type(exc).__name__
        if os.environ.get("DIGEST_REQUIRE_POSTGRES") == "1":
            pytest.fail(f"PostgreSQL required (DIGEST_REQUIRE_POSTGRES=1), unreachable: {reason}")
        pytest.skip(f"PostgreSQL not reachable at {PG}: {reason}")
    try:
        with conn:
            conn.execute(text(f'CREATE SCHEMA "{schema}"'))
            conn.commit()
        options = " ".join(f"-c{k}={v}" for k, v in {"search_path": schema, **settings}.items())
        try:
            yield f"{PG}?options={quote(options, safe='')}"
        finally:
            with admin.begin() as c:
                c.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
    finally:
        admin.dispose()


@contextmanager
def migrated_engine(backend: str, sqlite_file: Path | None = None) -> Iterator[Engine]:
    """A migrated engine: on ``sqlite_file`` ("sqlite"), or on a schema of its own on the
    test server ("postgresql", see :func:`pg_schema`)."""
    if backend == "sqlite":
        assert sqlite_file is not None, "a SQLite engine needs its file"
    where = nullcontext(f"sqlite:///{sqlite_file}") if backend == "sqlite" else pg_schema()
    with where as url:
        engine = store.open_engine(url)
        store.migrate(engine)
        try:
            yield engine
        finally:
            engine.dispose()


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A schema of its own on the shared server (see :func:`pg_schema`)."""
    with pg_schema() as url:
        yield url


@pytest.fixture
def pg_app(
    tmp_path: Path, feed_file: Path, smtp_server: tuple[object, Recorder], pg_url: str
) -> Iterator[pipeline.App]:
    controller, _ = smtp_server
    path = write_config(tmp_path, port=controller.port)  # type: ignore[attr-defined]
    text_ = path.read_text(encoding="utf-8").replace(
        'url = "sqlite:///digest.db"', f'url = "{pg_url}"'
    )
    path.write_text(text_, encoding="utf-8")
    config = load_config(path)
    assert config.database.url.startswith("postgresql")
    pipeline.init_db(config)
    pipeline.init_db(config)  # idempotent
    app = pipeline.open_app(config)
    assert pipeline.fetch(app).new == 10
    yield app
    app.engine.dispose()


def test_round_up_on_postgres(pg_app: pipeline.App, smtp_server: tuple[object, Recorder]) -> None:
    _, server = smtp_server
    emails = add_subscribers(pg_app, 25)
    report = pipeline.send(pg_app, D)
    assert report.stats.sent == 25 and report.counts["sent"] == 25
    assert sorted(r for m in server.messages for r in m.rcpt_tos) == sorted(emails)
    assert pipeline.send(pg_app, D).stats.sent == 0
    status = pipeline.status(pg_app)
    assert status.issues[0].status == "sent" and status.subscribers["active"] == 25


def test_claims_are_disjoint_across_sessions(pg_app: pipeline.App) -> None:
    add_subscribers(pg_app, 30)
    renderer_issue = pipeline.build_issue(pg_app, Renderer(pg_app.config), D)[0]
    with pg_app.sessions() as s:
        store.create_deliveries(s, renderer_issue.id)
        s.commit()
    with pg_app.engine.connect() as a, pg_app.engine.connect() as b:
        first = ledger.claim(a, renderer_issue.id, 0, 20, "a:1:x", "t1", 60).rows
        second = ledger.claim(b, renderer_issue.id, 0, 20, "b:2:y", "t2", 60).rows
    ids_a = {c.delivery_id for c in first}
    ids_b = {c.delivery_id for c in second}
    assert len(ids_a) == 20 and len(ids_b) == 10 and not ids_a & ids_b


def test_a_bug_in_the_schema_fixture_fails_instead_of_skipping() -> None:
    with pg_schema():
        pass  # reachable (otherwise this skips, as it should)
    try:
        with pg_schema(schema='not"a"name'):
            pytest.fail("the server accepted a broken CREATE SCHEMA")
    except pytest.skip.Exception:
        pytest.fail("a broken statement in the fixture was reported as a skip")
    except ProgrammingError:
        pass
    else:
        pytest.fail("a broken CREATE SCHEMA raised nothing")
