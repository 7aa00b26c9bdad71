# ruff: noqa: F811  (fixtures imported from tests/webutil.py are test parameters here)
"""Signup with double opt-in, over HTTP, on SQLite and PostgreSQL.

The reader's path (form → confirmation mail through a real SMTP server → confirm →
preferences → the next round-up), the rules that keep the form from being used against
anyone (one mail an hour per address, no enumeration, a per-client limit shared by every
serve process), and the mailer's behaviour when the relay is down.
"""

from __future__ import annotations

import logging
import threading
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller
from sqlalchemy import update

from digest import pipeline, store
from digest.models import SignupMailStatus, SubscriberStatus, Throttle
from digest.signup import MAIL_COOLDOWN
from digest.tokens import TokenSigner
from tests.conftest import Recorder, free_port
from tests.test_postgres import pg_url  # noqa: F401  (fixture used by web_env)
from tests.webutil import (
    PortOnly,
    WebEnv,
    body_text,
    link,
    main_of,
    make_env,
    sqlite_env,  # noqa: F401
    subscribe,
    wait_for,
    web_env,  # noqa: F401
)

SECRET = "test-secret-0123456789abcdef"  # write_config's [unsubscribe] secret
NAME = "Zoë <script>alert(1)</script> & 𝔘🦊"
D = date(2026, 11, 27)


def test_signup_confirm_preferences_and_the_next_round_up(web_env: WebEnv) -> None:
    env = web_env
    with env.client() as client:
        page = client.get("/subscribe")
        assert page.status_code == 200
        for region in env.config.newsletter.regions:
            assert f'name="regions" value="{region}"' in page.text
        assert 'name="website"' in page.text  # the honeypot

        r = subscribe(
            client, " Fox.Reader@Example.ORG ", name=NAME, regions=["Europe", "asia-pacific"]
        )
        assert r.status_code == 200 and "Check your inbox" in r.text
        assert env.subscriber("fox.reader@example.org") is None  # nothing until confirmed

        wait_for(lambda: env.smtp.to("fox.reader@example.org"), "the confirmation mail")
        mail = env.smtp.to("fox.reader@example.org")[0]
        assert "confirm" in mail.message["Subject"].lower()
        assert mail.message["Auto-Submitted"] == "auto-generated"
        text = body_text(mail)
        assert "𝔘🦊" not in text and "script" not in text  # the form's name is not mailed
        confirm = link(text, "confirm")

        shown = client.get(confirm)
        assert shown.status_code == 200
        assert "&lt;script&gt;alert(1)&lt;/script&gt; &amp; 𝔘🦊" in shown.text
        assert "<script>" not in shown.text
        assert "Asia-Pacific, Europe" in shown.text
        assert env.subscriber("fox.reader@example.org") is None  # GET changed nothing

        done = client.post(confirm)
        assert done.status_code == 200 and "You are subscribed" in done.text
        sub = env.subscriber("fox.reader@example.org")
        assert sub is not None and sub.status == SubscriberStatus.ACTIVE
        assert sub.name == NAME and sub.regions == ["Asia-Pacific", "Europe"]
        assert sub.source == "signup" and sub.confirmed_at is not None
        assert sub.subscribed_at is not None and sub.subscribed_at <= sub.confirmed_at

        again = client.post(confirm)  # idempotent
        assert again.status_code == 200
        same = env.subscriber("fox.reader@example.org")
        assert same is not None and same.confirmed_at == sub.confirmed_at

        prefs = "/" + done.text.split('href="../preferences/', 1)[1].split('"', 1)[0]
        prefs = "/preferences/" + prefs[1:]
        assert prefs.startswith("/preferences/")
        p = client.get(prefs)
        assert p.status_code == 200 and "&lt;script&gt;" in p.text
        assert 'value="Europe" checked' in p.text and 'value="Middle East">' in p.text
        saved = client.post(prefs, data={"name": "Fox", "regions": ["Middle East"]})
        assert saved.status_code == 200 and "preferences are saved" in saved.text
        assert 'value="Middle East" checked' in saved.text and 'value="Europe">' in saved.text

    after = env.subscriber("fox.reader@example.org")
    assert after is not None and after.regions == ["Middle East"] and after.name == "Fox"
    # The next preview and send follow the saved choice.
    text = pipeline.preview(env.app, D, "fox.reader@example.org", "text").decode()
    assert "MIDDLE EAST" in text and "EUROPE" not in text and "Hello Fox," in text
    assert (
        "Choose your regions:" in text and f"{env.config.unsubscribe.base_url}/preferences/" in text
    )
    report = pipeline.send(env.app, D)
    assert report.stats.sent == 1
    sent = env.smtp.to("fox.reader@example.org")[-1].message
    html = sent.get_body(("html",)).get_content()
    assert "Choose your regions" in html and "/preferences/" in html
    assert f"{env.config.unsubscribe.base_url}/archive/2026-11-27" in html  # View in browser


def test_markup_in_a_name_is_escaped_in_the_round_up(web_env: WebEnv) -> None:
    env = web_env
    with env.client() as client:
        subscribe(client, "mark@example.org", name=NAME)
        wait_for(lambda: env.smtp.to("mark@example.org"), "the confirmation mail")
        client.post(link(body_text(env.smtp.to("mark@example.org")[0]), "confirm"))
    html = pipeline.preview(env.app, D, "mark@example.org", "html").decode()
    assert "Hello Zoë &lt;script&gt;alert(1)&lt;/script&gt; &amp; 𝔘🦊," in html
    assert "<script>" not in html


def test_repeated_posts_send_one_mail_an_hour(web_env: WebEnv) -> None:
    env = web_env
    with env.client() as client:
        pages = {subscribe(client, "target@example.org").text for _ in range(8)}
        pages |= {subscribe(client, "TARGET@example.org ", name="x").text for _ in range(2)}
        wait_for(lambda: env.smtp.to("target@example.org"), "the confirmation mail")
        # Give a second mail every chance to appear before counting.
        wait_for(lambda: all(m.status != "pending" for m in env.mails()), "the queue to drain")
    assert len(pages) == 1  # every response identical
    assert len(env.smtp.to("target@example.org")) == 1
    assert len(env.mails()) == 1


def test_the_cooldown_is_shared_by_serve_processes_and_survives_restarts(
    web_env: WebEnv,
) -> None:
    env = web_env
    with env.client() as first:
        assert subscribe(first, "shared@example.org").status_code == 200
        wait_for(lambda: env.smtp.to("shared@example.org"), "the confirmation mail")
    # Another app on the same database (another process, or this one restarted).
    with env.client() as second:
        assert subscribe(second, "shared@example.org").status_code == 200
        assert len(env.mails()) == 1
    assert len(env.smtp.to("shared@example.org")) == 1
    # An hour later the address may be sent another confirmation.
    with env.app.sessions.begin() as session:
        later = datetime.now(UTC) + MAIL_COOLDOWN + timedelta(seconds=1)
        assert store.claim_cooldown(session, "mail:shared@example.org", MAIL_COOLDOWN, later)


def test_no_enumeration_same_page_for_every_kind_of_address(web_env: WebEnv) -> None:
    env = web_env
    env.add("active@example.org", SubscriberStatus.ACTIVE, name="Active")
    env.add("gone@example.org", SubscriberStatus.UNSUBSCRIBED)
    env.add("dead@example.org", SubscriberStatus.BOUNCED)
    pages: dict[str, tuple[int, str]] = {}
    with env.client() as client:
        for email in (
            "new@example.org",
            "active@example.org",
            "gone@example.org",
            "dead@example.org",
        ):
            r = subscribe(client, email)
            pages[email] = (r.status_code, main_of(r.text).replace(email, "ADDRESS"))
        bot = client.post(
            "/subscribe", data={"email": "bot@example.org", "website": "http://spam.example"}
        )
        pages["bot@example.org"] = (
            bot.status_code,
            main_of(bot.text).replace("bot@example.org", "ADDRESS"),
        )
        wait_for(lambda: len(env.smtp.messages) == 4, "four mails")
        wait_for(lambda: all(m.status != "pending" for m in env.mails()), "the queue to drain")
    assert len(set(pages.values())) == 1, pages
    assert next(iter(pages.values()))[0] == 200
    subjects = {m.rcpt_tos[0]: m.message["Subject"] for m in env.smtp.messages}
    assert set(subjects) == {
        "new@example.org",
        "active@example.org",
        "gone@example.org",
        "dead@example.org",
    }  # the honeypot got nothing
    assert "already subscribed" in subjects["active@example.org"]
    for email in ("new@example.org", "gone@example.org", "dead@example.org"):
        assert subjects[email].startswith("Confirm")
    already = body_text(env.smtp.to("active@example.org")[0])
    assert "/preferences/" in already


def test_a_confirmed_signup_reactivates_an_unsubscribed_address(web_env: WebEnv) -> None:
    env = web_env
    env.add("back@example.org", SubscriberStatus.UNSUBSCRIBED, name="Old Name")
    with env.client() as client:
        subscribe(client, "back@example.org", regions=["Europe"])
        wait_for(lambda: env.smtp.to("back@example.org"), "the confirmation mail")
        r = client.post(link(body_text(env.smtp.to("back@example.org")[0]), "confirm"))
        assert r.status_code == 200
    sub = env.subscriber("back@example.org")
    assert sub is not None and sub.status == SubscriberStatus.ACTIVE
    assert sub.source == "signup" and sub.regions == ["Europe"] and sub.name == "Old Name"
    assert sub.unsubscribed_at is None


def _end_cooldown(env: WebEnv, email: str) -> None:
    """Let the next signup of ``email`` be mailed now (as an hour later)."""
    with env.app.sessions.begin() as session:
        session.execute(
            update(Throttle)
            .where(Throttle.key == f"mail:{email}")
            .values(until=datetime.now(UTC) - timedelta(seconds=1))
        )


def test_a_used_confirmation_link_never_undoes_an_unsubscribe_or_a_bounce(
    web_env: WebEnv,
) -> None:
    """Replaying the link after the reader withdrew (unsubscribe, or a bounce) changes
    nothing and says the link was superseded; only a fresh signup re-activates."""
    env = web_env
    unsubscribe = TokenSigner(SECRET)
    with env.client() as client:
        subscribe(client, "replay@example.org", name="Zoë & 𝔘", regions=["Europe"])
        wait_for(lambda: env.smtp.to("replay@example.org"), "the confirmation mail")
        first = link(body_text(env.smtp.to("replay@example.org")[0]), "confirm")
        assert "You are subscribed" in client.post(first).text
        confirmed = env.subscriber("replay@example.org")
        assert confirmed is not None and confirmed.status == SubscriberStatus.ACTIVE
        # Used, and still in force: the same page again, nothing changes.
        again = client.post(first)
        assert again.status_code == 200 and "You are subscribed" in again.text
        same = env.subscriber("replay@example.org")
        assert same is not None and same.confirmed_at == confirmed.confirmed_at

        # One-click unsubscribe (the preference centre's button posts the same).
        token = unsubscribe.token(confirmed.id, "replay@example.org")
        assert client.post(f"/unsubscribe/{token}").status_code == 200
        before = env.snapshot()
        for r in (client.post(first), client.get(first)):
            assert r.status_code == 410 and "superseded" in r.text, r.text
            assert 'href="../subscribe"' in main_of(r.text) and "You are subscribed" not in r.text
            assert 'method="post"' not in r.text  # no button that would do nothing
        assert env.snapshot() == before
        gone = env.subscriber("replay@example.org")
        assert gone is not None and gone.status == SubscriberStatus.UNSUBSCRIBED

        # A fresh signup is fresh consent: its link re-activates.
        _end_cooldown(env, "replay@example.org")
        subscribe(client, "replay@example.org", regions=["Middle East"])
        wait_for(lambda: len(env.smtp.to("replay@example.org")) == 2, "the second mail")
        second = link(body_text(env.smtp.to("replay@example.org")[1]), "confirm")
        assert second != first
        assert "You are subscribed" in client.post(second).text
        back = env.subscriber("replay@example.org")
        assert back is not None and back.status == SubscriberStatus.ACTIVE
        assert back.regions == ["Middle East"] and back.unsubscribed_at is None
        before = env.snapshot()
        assert "You are subscribed" in client.post(first).text  # older than the consent in force
        assert env.snapshot() == before

        # Bounced since: neither link revives the address.
        with env.app.sessions.begin() as session:
            store.raise_hard_bounces(session, back.id, 3, 3)
        for old in (first, second):
            r = client.post(old)
            assert r.status_code == 410 and "superseded" in r.text
        dead = env.subscriber("replay@example.org")
        assert dead is not None and dead.status == SubscriberStatus.BOUNCED
        assert dead.regions == ["Middle East"]


def test_already_subscribed_mail_at_most_once_a_day(sqlite_env: WebEnv) -> None:
    env = sqlite_env
    env.add("daily@example.org", SubscriberStatus.ACTIVE)
    with env.client() as client:
        subscribe(client, "daily@example.org")
        wait_for(lambda: env.smtp.to("daily@example.org"), "the first mail")
    # Two hours later the hourly cooldown is over, the daily one is not.
    with env.app.sessions.begin() as session:
        from digest.signup import SignupRequest, request_signup

        later = datetime.now(UTC) + timedelta(hours=2)
        outcome = request_signup(session, SignupRequest("daily@example.org", "", None), later)
        assert outcome == "cooldown"
        tomorrow = datetime.now(UTC) + timedelta(days=1, minutes=1)
        outcome = request_signup(session, SignupRequest("daily@example.org", "", None), tomorrow)
        assert outcome == "already-queued"


def test_concurrent_cooldown_claims_have_one_winner(web_env: WebEnv) -> None:
    env = web_env
    now = datetime.now(UTC)
    results: list[bool] = []
    barrier = threading.Barrier(6)

    def claim() -> None:
        barrier.wait()
        with env.app.sessions.begin() as session:
            results.append(
                store.claim_cooldown(session, "mail:race@example.org", MAIL_COOLDOWN, now)
            )

    threads = [threading.Thread(target=claim) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(results) == [False] * 5 + [True]


def test_per_client_limit_is_shared_and_answers_429(web_env: WebEnv) -> None:
    env = web_env
    limit = env.config.signup.max_per_ip_per_hour
    with env.client() as one, env.client() as two:  # two serve processes, one database
        for i in range(limit):
            client = one if i % 2 else two
            assert subscribe(client, f"r{i}@example.org").status_code == 200
        blocked = subscribe(one, "late@example.org")
        assert blocked.status_code == 429 and "Too many requests" in blocked.text
        assert int(blocked.headers["retry-after"]) > 0
        assert subscribe(two, "late@example.org").status_code == 429
    # Another client is not affected.
    with env.client(peer=("198.51.100.20", 1)) as other:
        assert subscribe(other, "late@example.org").status_code == 200
    assert sum(1 for m in env.mails() if m.email == "late@example.org") == 1


# --- the mailer ---------------------------------------------------------------------------


def test_a_relay_that_is_down_loses_nothing(
    tmp_path: Path, feed_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()  # nothing listens here yet
    recorder = Recorder()
    env = make_env(tmp_path, (PortOnly(port), recorder), None)  # type: ignore[arg-type]
    caplog.set_level(logging.WARNING, logger="digest.serve")
    controller = None
    try:
        with env.client() as client:
            assert subscribe(client, "patient@example.org").status_code == 200
            wait_for(lambda: env.mails()[0].attempts >= 2, "two failed tries")
            assert env.mails()[0].status == SignupMailStatus.PENDING
            assert any(
                "patient@example.org" in r.message and "retrying in" in r.message
                for r in caplog.records
            ), [r.message for r in caplog.records]
            controller = Controller(recorder, hostname="127.0.0.1", port=port)
            controller.start()
            wait_for(lambda: recorder.to("patient@example.org"), "the mail after the relay is back")
        assert env.mails()[0].status == SignupMailStatus.SENT
        assert len(recorder.to("patient@example.org")) == 1
    finally:
        if controller is not None:
            controller.stop()
        env.app.engine.dispose()


def test_a_mail_queued_while_no_mailer_runs_is_sent_by_the_next_one(sqlite_env: WebEnv) -> None:
    env = sqlite_env
    # A TestClient outside `with` runs no lifespan: like a process that died after
    # queueing. The next process to start sends it.
    assert subscribe(env.client(), "later@example.org").status_code == 200
    assert env.mails()[0].status == SignupMailStatus.PENDING and not env.smtp.messages
    with env.client():
        wait_for(lambda: env.smtp.to("later@example.org"), "the mail from the next process")


def test_a_permanent_refusal_is_not_retried(sqlite_env: WebEnv) -> None:
    env = sqlite_env
    env.smtp.rcpt_replies["nobody@example.org"] = "550 5.1.1 no such user"
    with env.client() as client:
        subscribe(client, "nobody@example.org")
        wait_for(lambda: env.mails()[0].status == SignupMailStatus.FAILED, "the refusal")
    mail = env.mails()[0]
    assert mail.attempts == 1 and "550" in (mail.last_error or "")


def test_a_mail_is_taken_by_one_process_only(sqlite_env: WebEnv) -> None:
    env = sqlite_env
    assert subscribe(env.client(), "once@example.org").status_code == 200
    mail_id = env.mails()[0].id
    now = datetime.now(UTC)
    with env.app.sessions.begin() as session:
        assert store.claim_signup_mail(session, mail_id, now, timedelta(minutes=5)) is not None
    with env.app.sessions.begin() as session:
        assert store.claim_signup_mail(session, mail_id, now, timedelta(minutes=5)) is None
        assert store.due_signup_mails(session, now, 10) == []
    # A holder that died: its lease runs out and the mail is due again.
    later = now + timedelta(minutes=6)
    with env.app.sessions.begin() as session:
        assert store.due_signup_mails(session, later, 10) == [mail_id]


def test_signup_mails_are_dkim_signed_and_plain(
    tmp_path: Path, feed_file: Path, smtp_server: tuple[Controller, Recorder]
) -> None:
    import dkim

    from digest.dkimsign import keygen

    key = tmp_path / "dkim.pem"
    txt = keygen(key).encode()
    extra = (
        f'\n[dkim]\ndomain = "news.example.org"\nselector = "s1"\nprivate_key_path = "{key.name}"\n'
    )
    env = make_env(tmp_path, smtp_server, None, extra)
    try:
        with env.client() as client:
            subscribe(client, "signed@example.org", name="Ann <i>")
            wait_for(lambda: env.smtp.to("signed@example.org"), "the confirmation mail")
        received = env.smtp.to("signed@example.org")[0]
        assert dkim.verify(received.data, dnsfunc=lambda _name, timeout=5: txt)
        msg = received.message
        assert msg["To"] == "signed@example.org"  # the unconfirmed name stays out of headers
        assert msg.get_content_type() == "text/plain" and msg.get_content_charset() == "utf-8"
        assert b"Ann" not in received.data
    finally:
        env.app.engine.dispose()


def test_signup_disabled_means_no_form_and_no_links(
    tmp_path: Path, feed_file: Path, smtp_server: tuple[Controller, Recorder]
) -> None:
    env = make_env(tmp_path, smtp_server, None, "\n[signup]\nenabled = false\n")
    try:
        with env.client() as client:
            assert client.get("/subscribe").status_code == 404
            assert subscribe(client, "a@example.org").status_code == 404
            archive = client.get("/archive")
            assert archive.status_code == 200 and "subscribe" not in archive.text.lower()
        assert env.mails() == []
    finally:
        env.app.engine.dispose()


def test_with_an_outbox_signup_mails_land_in_the_maildir(tmp_path: Path, feed_file: Path) -> None:
    from starlette.testclient import TestClient

    from digest.config import load_config
    from digest.web import create_app
    from tests.test_outbox import maildir_files, outbox_config
    from tests.webutil import FAST_MAILER, PEER

    config = load_config(outbox_config(tmp_path))
    pipeline.init_db(config)
    app = pipeline.open_app(config)
    try:
        web = create_app(config, app.sessions, mailer_options=FAST_MAILER)
        with TestClient(web, client=PEER) as client:
            assert subscribe(client, "boxed@example.org").status_code == 200
            wait_for(
                lambda: (
                    (tmp_path / "outbox" / "new").is_dir()
                    and any((tmp_path / "outbox" / "new").iterdir())
                ),
                "the mail in the outbox",
            )
        files = maildir_files(tmp_path / "outbox")
        assert len(files) == 1
        data = files[0].read_bytes()
        assert b"To: boxed@example.org" in data and b"/confirm/" in data
    finally:
        app.engine.dispose()
