"""The editor's week under `digest run`: the draft ahead of the send, test copies to the
editors, and the approval gate, with the scheduler's clock driven (the job functions are
called with the `now` APScheduler would give them; nothing sleeps)."""

from __future__ import annotations

import pickle
import re
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller

from digest import jobs, pipeline, store
from digest.config import load_config
from digest.schedule import APPROVAL_JOB, DRAFT_JOB, AheadTrigger, build_scheduler, sync_jobs
from tests.conftest import Recorder
from tests.test_editorial import NY, SEND_TIME, STRICT, D, deliveries, make_desk, run, shown

READERS = ["ada@example.org", "kofi@example.org", "lin@example.org"]


@pytest.fixture
def desk(tmp_path: Path, smtp_server: tuple[Controller, Recorder]) -> Path:
    return make_desk(tmp_path, smtp_server[0].port)


@pytest.fixture
def strict_desk(tmp_path: Path, smtp_server: tuple[Controller, Recorder]) -> Path:
    return make_desk(tmp_path, smtp_server[0].port, STRICT)


def received(server: Recorder) -> list[str]:
    return sorted(r for m in server.messages for r in m.rcpt_tos)


def test_run_waits_for_the_approval_then_sends_at_once(
    strict_desk: Path, smtp_server: tuple[object, Recorder]
) -> None:
    _, server = smtp_server
    path = str(strict_desk)
    jobs.scheduled_send(path, now=SEND_TIME)  # the cron firing: builds the draft, sends nothing
    assert server.messages == [] and shown(strict_desk)["status"] == "draft"
    assert sum((deliveries(strict_desk) or {}).values()) == 0
    status = run(strict_desk, "status").stdout
    assert re.search(rf"^{D}  awaiting approval ", status, re.M), status
    for minutes in (1, 60, 11 * 60 + 59):  # the minutely retries, within the grace
        jobs.scheduled_approval_wait(path, now=SEND_TIME + timedelta(minutes=minutes))
        jobs.scheduled_resume(path, now=SEND_TIME + timedelta(minutes=minutes))
    assert server.messages == []
    run(strict_desk, "issue", "approve", "--date", D)
    jobs.scheduled_approval_wait(path, now=SEND_TIME + timedelta(hours=11, minutes=59))
    assert received(server) == READERS
    jobs.scheduled_approval_wait(path, now=SEND_TIME + timedelta(hours=12))
    jobs.scheduled_resume(path, now=SEND_TIME + timedelta(hours=12))
    assert received(server) == READERS  # once
    assert re.search(rf"^{D}  sent ", run(strict_desk, "status").stdout, re.M)


def test_run_records_a_missed_send_after_the_grace(
    strict_desk: Path, smtp_server: tuple[object, Recorder]
) -> None:
    _, server = smtp_server
    path = str(strict_desk)
    jobs.scheduled_send(path, now=SEND_TIME)
    jobs.scheduled_approval_wait(path, now=SEND_TIME + timedelta(hours=12))  # grace: 12 h
    assert "missed" not in run(strict_desk, "status").stdout
    jobs.scheduled_approval_wait(path, now=SEND_TIME + timedelta(hours=12, minutes=1))
    status = run(strict_desk, "status").stdout
    assert re.search(rf"^{D}  missed ", status, re.M), status
    # An approval after that does not make the scheduler send it late...
    run(strict_desk, "issue", "approve", "--date", D)
    for hours in (13, 30):
        jobs.scheduled_approval_wait(path, now=SEND_TIME + timedelta(hours=hours))
        jobs.scheduled_resume(path, now=SEND_TIME + timedelta(hours=hours))
    assert server.messages == []
    # ...an operator still can, deliberately.
    assert run(strict_desk, "send", "--date", D).exit_code == 0
    assert received(server) == READERS


def test_the_resume_job_also_gives_up_after_the_grace(
    strict_desk: Path, smtp_server: tuple[object, Recorder]
) -> None:
    path = str(strict_desk)
    jobs.scheduled_send(path, now=SEND_TIME)
    jobs.scheduled_resume(path, now=SEND_TIME + timedelta(hours=12, minutes=15))
    app = pipeline.open_app(load_config(strict_desk))
    with app.sessions() as session:
        assert [m.edition_date.isoformat() for m in store.missed_sends(session)] == [D]


def test_auto_approval_run_sends_at_the_firing(
    desk: Path, smtp_server: tuple[object, Recorder]
) -> None:
    jobs.scheduled_send(str(desk), now=SEND_TIME)
    assert received(smtp_server[1]) == READERS


def test_the_draft_job_builds_the_draft_and_mails_the_editors(
    strict_desk: Path, smtp_server: tuple[object, Recorder]
) -> None:
    _, server = smtp_server
    jobs.scheduled_draft(str(strict_desk), now=SEND_TIME - timedelta(hours=24))
    assert shown(strict_desk)["status"] == "draft"  # the issue of the next send, frozen
    assert received(server) == ["desk@example.org", "editor@news.example.org"]
    subjects = {m.message["Subject"] for m in server.messages}
    assert subjects == {"[TEST] The Weekly Round-up: Asia-Pacific story 0"}
    assert sum((deliveries(strict_desk) or {}).values()) == 0  # no ledger rows


def test_no_editors_no_copies(desk: Path, smtp_server: tuple[object, Recorder]) -> None:
    jobs.scheduled_draft(str(desk), now=SEND_TIME - timedelta(hours=24))
    assert shown(desk)["status"] == "draft" and smtp_server[1].messages == []


def test_the_draft_trigger_fires_ahead_of_each_send() -> None:
    config = load_config(Path(__file__).parent.parent / "config.example.toml")
    cron = config.schedule.cron_trigger()  # Fridays 09:00 New York
    ahead = AheadTrigger(cron, timedelta(hours=24))
    wednesday = datetime(2026, 11, 25, 12, 0, tzinfo=NY)
    first = ahead.get_next_fire_time(None, wednesday)
    assert first == datetime(2026, 11, 26, 9, 0, tzinfo=NY)
    second = ahead.get_next_fire_time(first, first + timedelta(seconds=1))
    assert second == datetime(2026, 12, 3, 9, 0, tzinfo=NY)
    # Thursday after 09:00: this week's draft time has passed; next week's comes next.
    assert ahead.get_next_fire_time(None, datetime(2026, 11, 26, 10, tzinfo=NY)) == second
    # The job store pickles triggers; a copy fires the same and reads the same.
    copy = pickle.loads(pickle.dumps(ahead))
    assert copy.get_next_fire_time(None, wednesday) == first and str(copy) == str(ahead)


def test_sync_jobs_adds_the_editorial_jobs_only_when_asked(tmp_path: Path) -> None:
    auto = make_desk(tmp_path, port=2525)
    config = load_config(auto)
    scheduler = build_scheduler(config)
    scheduler.start(paused=True)
    try:
        sync_jobs(scheduler, config)
        assert scheduler.get_job(DRAFT_JOB) is None and scheduler.get_job(APPROVAL_JOB) is None
        auto.write_text(
            auto.read_text() + '\n[editorial]\napproval = "required"\ndraft_ahead_hours = 30\n'
        )
        strict = load_config(auto)
        sync_jobs(scheduler, strict)
        draft, wait = scheduler.get_job(DRAFT_JOB), scheduler.get_job(APPROVAL_JOB)
        assert draft.func_ref == "digest.jobs:scheduled_draft"
        assert wait.func_ref == "digest.jobs:scheduled_approval_wait"
        assert str(draft.trigger).startswith("ahead[1 day, 6:00:00 before crontab[0 9 * * fri,")
        send = scheduler.get_job("digest-weekly-send")
        gap = (send.next_run_time - draft.next_run_time) % timedelta(days=7)
        assert gap in (timedelta(hours=30), timedelta(hours=29), timedelta(hours=31))  # DST
        sync_jobs(scheduler, config)  # back to auto: both go
        assert scheduler.get_job(DRAFT_JOB) is None and scheduler.get_job(APPROVAL_JOB) is None
    finally:
        scheduler.shutdown(wait=False)
