"""The unsubscribe app through its ASGI interface (Starlette's TestClient, no network)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from digest import pipeline, store
from digest.models import SubscriberStatus
from digest.serve import create_app
from digest.subscribers import import_path
from digest.tokens import TokenSigner


@pytest.fixture
def reader(app: pipeline.App, tmp_path: Path) -> int:
    csv = tmp_path / "r.csv"
    csv.write_text(
        "email,name,regions\nreader@example.org,Reader,\nother@example.org,,\n", encoding="utf-8"
    )
    import_path(app.sessions, csv, app.config.newsletter.regions, datetime.now(UTC))
    with app.sessions() as session:
        sub = store.subscriber_by_email(session, "reader@example.org")
        assert sub is not None
        return sub.id


def status_of(app: pipeline.App, email: str) -> str:
    with app.sessions() as session:
        sub = store.subscriber_by_email(session, email)
        assert sub is not None
        return str(sub.status)


@pytest.fixture
def client(app: pipeline.App) -> TestClient:
    return TestClient(create_app(app.config, app.sessions))


def test_one_click_post_unsubscribes_at_once(
    app: pipeline.App, client: TestClient, reader: int
) -> None:
    token = TokenSigner(app.config.unsubscribe_secret).token(reader)
    r = client.post(
        f"/unsubscribe/{token}",
        content=b"List-Unsubscribe=One-Click",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert r.status_code == 200 and "unsubscribed" in r.text
    assert "set-cookie" not in r.headers
    assert status_of(app, "reader@example.org") == SubscriberStatus.UNSUBSCRIBED
    assert status_of(app, "other@example.org") == SubscriberStatus.ACTIVE
    # Idempotent.
    assert (
        client.post(f"/unsubscribe/{token}", data={"List-Unsubscribe": "One-Click"}).status_code
        == 200
    )


def test_get_only_asks(app: pipeline.App, client: TestClient, reader: int) -> None:
    token = TokenSigner(app.config.unsubscribe_secret).token(reader)
    r = client.get(f"/unsubscribe/{token}")
    assert r.status_code == 200
    assert '<form method="post"' in r.text and f'action="/unsubscribe/{token}"' in r.text
    assert status_of(app, "reader@example.org") == SubscriberStatus.ACTIVE


@pytest.mark.parametrize("kind", ["tampered", "foreign", "garbage"])
def test_bad_tokens_do_nothing_and_reveal_nothing(
    app: pipeline.App, client: TestClient, reader: int, kind: str
) -> None:
    good = TokenSigner(app.config.unsubscribe_secret).token(reader)
    token = {
        "tampered": TokenSigner(app.config.unsubscribe_secret).token(reader + 1)[:-3] + good[-3:],
        "foreign": TokenSigner("another-secret-0123456789").token(reader),
        "garbage": "not-a-token",
    }[kind]
    for r in (client.get(f"/unsubscribe/{token}"), client.post(f"/unsubscribe/{token}")):
        assert r.status_code == 400
        assert "reader@example.org" not in r.text and "does not work" in r.text
    assert status_of(app, "reader@example.org") == SubscriberStatus.ACTIVE
    assert status_of(app, "other@example.org") == SubscriberStatus.ACTIVE


def test_reimport_never_resubscribes(
    app: pipeline.App, client: TestClient, reader: int, tmp_path: Path
) -> None:
    token = TokenSigner(app.config.unsubscribe_secret).token(reader)
    client.post(f"/unsubscribe/{token}")
    report = import_path(
        app.sessions, tmp_path / "r.csv", app.config.newsletter.regions, datetime.now(UTC)
    )
    assert report.kept_unsubscribed == 1
    assert status_of(app, "reader@example.org") == SubscriberStatus.UNSUBSCRIBED


def test_healthz(client: TestClient) -> None:
    r = client.get("/healthz")
    assert r.status_code == 200 and r.text == "ok"
