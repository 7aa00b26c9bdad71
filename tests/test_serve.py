"""The unsubscribe app through its ASGI interface (Starlette's TestClient, no network)."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from pathlib import Path

import itsdangerous
import pytest
from sqlalchemy import delete
from starlette.testclient import TestClient

from digest import pipeline, store
from digest.models import Subscriber, SubscriberStatus
from digest.serve import create_app
from digest.subscribers import import_path
from digest.tokens import TokenSigner

READER = "reader@example.org"


def legacy_token(secret: str | None, subscriber_id: int) -> str:
    """An unsubscribe token exactly as digest made them before tokens named the address."""
    serializer = itsdangerous.URLSafeSerializer(
        secret, salt="digest.unsubscribe.v1", signer_kwargs={"digest_method": hashlib.sha256}
    )
    return str(serializer.dumps(subscriber_id))


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
    token = TokenSigner(app.config.unsubscribe_secret).token(reader, READER)
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
    token = TokenSigner(app.config.unsubscribe_secret).token(reader, READER)
    r = client.get(f"/unsubscribe/{token}")
    assert r.status_code == 200
    assert '<form method="post"' in r.text and f'action="/unsubscribe/{token}"' in r.text
    assert status_of(app, "reader@example.org") == SubscriberStatus.ACTIVE


@pytest.mark.parametrize(
    "kind",
    ["tampered", "foreign", "garbage", "other-address", "other-purpose", "legacy-tampered"],
)
def test_bad_tokens_do_nothing_and_reveal_nothing(
    app: pipeline.App, client: TestClient, reader: int, kind: str
) -> None:
    signer = TokenSigner(app.config.unsubscribe_secret)
    good = signer.token(reader, READER)
    token = {
        "tampered": signer.token(reader + 1, READER)[:-3] + good[-3:],
        "foreign": TokenSigner("another-secret-0123456789").token(reader, READER),
        "garbage": "not-a-token",
        "other-address": signer.token(reader, "other@example.org"),
        "other-purpose": TokenSigner(app.config.unsubscribe_secret, purpose="preferences").token(
            reader, READER
        ),
        "legacy-tampered": legacy_token(app.config.unsubscribe_secret, reader + 1)[:-3]
        + legacy_token(app.config.unsubscribe_secret, reader)[-3:],
    }[kind]
    for r in (client.get(f"/unsubscribe/{token}"), client.post(f"/unsubscribe/{token}")):
        assert r.status_code == 400
        assert "reader@example.org" not in r.text and "does not work" in r.text
    assert status_of(app, "reader@example.org") == SubscriberStatus.ACTIVE
    assert status_of(app, "other@example.org") == SubscriberStatus.ACTIVE


def test_reimport_never_resubscribes(
    app: pipeline.App, client: TestClient, reader: int, tmp_path: Path
) -> None:
    token = TokenSigner(app.config.unsubscribe_secret).token(reader, READER)
    client.post(f"/unsubscribe/{token}")
    report = import_path(
        app.sessions, tmp_path / "r.csv", app.config.newsletter.regions, datetime.now(UTC)
    )
    assert report.kept_unsubscribed == 1
    assert status_of(app, "reader@example.org") == SubscriberStatus.UNSUBSCRIBED


def test_healthz(client: TestClient) -> None:
    r = client.get("/healthz")
    assert r.status_code == 200 and r.text == "ok"


def test_links_signed_before_address_binding_still_unsubscribe(
    app: pipeline.App, client: TestClient, reader: int
) -> None:
    token = legacy_token(app.config.unsubscribe_secret, reader)
    assert client.get(f"/unsubscribe/{token}").status_code == 200
    r = client.post(f"/unsubscribe/{token}", data={"List-Unsubscribe": "One-Click"})
    assert r.status_code == 200 and "unsubscribed" in r.text
    assert status_of(app, READER) == SubscriberStatus.UNSUBSCRIBED
    assert status_of(app, "other@example.org") == SubscriberStatus.ACTIVE


def test_links_keep_working_after_the_secret_is_rotated(
    app: pipeline.App, reader: int, tmp_path: Path
) -> None:
    old = app.config.unsubscribe_secret
    assert old is not None
    before = TokenSigner(old).token(reader, READER)
    older = legacy_token(old, reader)
    retired = TokenSigner("retired-secret-0123456789").token(reader, READER)
    rotated = app.config.model_copy(
        update={
            "unsubscribe_secret": "brand-new-secret-0123456789",
            "unsubscribe_old_secrets": (old,),
        }
    )
    client = TestClient(create_app(rotated, app.sessions))
    assert client.post(f"/unsubscribe/{retired}").status_code == 400  # not listed: dead
    assert client.get(f"/unsubscribe/{before}").status_code == 200
    assert client.get(f"/unsubscribe/{older}").status_code == 200
    assert client.post(f"/unsubscribe/{before}").status_code == 200
    assert status_of(app, READER) == SubscriberStatus.UNSUBSCRIBED
    # Dropping the old secret from the list retires its links.
    dropped = TestClient(
        create_app(rotated.model_copy(update={"unsubscribe_old_secrets": ()}), app.sessions)
    )
    assert dropped.get(f"/unsubscribe/{before}").status_code == 400
    assert dropped.get(f"/unsubscribe/{older}").status_code == 400


def test_a_link_of_a_deleted_subscriber_never_unsubscribes_a_newcomer(
    app: pipeline.App, client: TestClient, tmp_path: Path
) -> None:
    """SQLite hands out the highest id again after a delete unless AUTOINCREMENT is on."""
    now = datetime.now(UTC)
    first = tmp_path / "first.csv"
    first.write_text("email,name,regions\nleaver@example.org,Leaver,\n", encoding="utf-8")
    import_path(app.sessions, first, app.config.newsletter.regions, now)
    with app.sessions() as session:
        leaver = store.subscriber_by_email(session, "leaver@example.org")
        assert leaver is not None
        leaver_id = leaver.id
        # Erased on request (no deliveries yet): the row is gone for good.
        session.execute(delete(Subscriber).where(Subscriber.id == leaver_id))
        session.commit()
    secret = app.config.unsubscribe_secret
    old_link = legacy_token(secret, leaver_id)
    new_link = TokenSigner(secret).token(leaver_id, "leaver@example.org")
    second = tmp_path / "second.csv"
    second.write_text("email,name,regions\nnewcomer@example.org,New,\n", encoding="utf-8")
    import_path(app.sessions, second, app.config.newsletter.regions, now)
    for token in (old_link, new_link):
        for r in (client.get(f"/unsubscribe/{token}"), client.post(f"/unsubscribe/{token}")):
            assert r.status_code == 400 and "does not work" in r.text
    assert status_of(app, "newcomer@example.org") == SubscriberStatus.ACTIVE
    with app.sessions() as session:
        newcomer = store.subscriber_by_email(session, "newcomer@example.org")
        assert newcomer is not None and newcomer.id > leaver_id
