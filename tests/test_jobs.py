"""The scheduler's jobs: each run leaves no database connection behind."""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from digest import jobs, pipeline
from digest.config import load_config
from tests.conftest import write_config
from tests.test_postgres import PG, pg_schema


def every_job(config_path: Path) -> list[tuple[str, Callable[[], object]]]:
    path = str(config_path)
    return [
        ("fetch", lambda: jobs.scheduled_fetch(path)),
        ("send", lambda: jobs.scheduled_send(path)),
        ("resume", lambda: jobs.scheduled_resume(path)),
        ("approval wait", lambda: jobs.scheduled_approval_wait(path)),
        ("draft", lambda: jobs.scheduled_draft(path)),
        ("missed", lambda: jobs.record_missed(path, datetime.now(UTC))),
    ]


def test_jobs_close_their_postgres_connections(tmp_path: Path, feed_file: Path) -> None:
    tag = f"digest_test_{secrets.token_hex(4)}"
    with pg_schema(application_name=tag) as url:
        path = write_config(tmp_path)
        path.write_text(path.read_text().replace("sqlite:///digest.db", url), encoding="utf-8")
        pipeline.init_db(load_config(path))
        monitor = create_engine(PG)
        try:

            def backends() -> int:
                with monitor.connect() as conn:
                    return int(
                        conn.execute(
                            text(
                                "SELECT count(*) FROM pg_stat_activity WHERE application_name = :t"
                            ),
                            {"t": tag},
                        ).scalar_one()
                    )

            for _ in range(2):  # a long-running `digest run` repeats them for months
                for name, job in every_job(path):
                    job()
                    # A closed connection's backend leaves pg_stat_activity a moment later.
                    deadline = time.monotonic() + 10
                    while backends() and time.monotonic() < deadline:
                        time.sleep(0.02)
                    assert backends() == 0, f"{name} left a connection open"
        finally:
            monitor.dispose()


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to list open files")
def test_jobs_close_their_sqlite_files(config_path: Path, feed_file: Path) -> None:
    pipeline.init_db(load_config(config_path))
    db = config_path.parent / "digest.db"

    def open_files() -> int:
        fds = Path("/proc/self/fd")
        targets = []
        for fd in os.listdir(fds):
            try:
                targets.append(os.readlink(fds / fd))
            except OSError:
                continue  # closed while listing
        return sum(1 for t in targets if t.startswith(str(db)))

    for _ in range(2):
        for name, job in every_job(config_path):
            job()
            assert open_files() == 0, f"{name} left {db} open"
