"""Tests of digest.subscribers: validation, CSV/TOML import, unsubscribe, export."""

from __future__ import annotations

import csv
import io
import unicodedata
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from email_validator import EmailNotValidError, validate_email
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, event, select
from sqlalchemy.orm import Session, sessionmaker

from digest.errors import UsageError
from digest.models import Subscriber, SubscriberStatus
from digest.store import migrate, open_engine, session_factory
from digest.subscribers import (
    CHUNK_SIZE,
    ImportReport,
    RejectedRow,
    _EmailNormalizer,
    clean_name,
    export_csv,
    import_entries,
    import_path,
    normalize_email,
    unsubscribe,
)

DATA = Path(__file__).parent / "data" / "subscribers"
REGIONS = ["Europe", "Asia", "Americas"]
NOW = datetime(2024, 5, 3, 9, 0, tzinfo=UTC)
LATER = NOW + timedelta(days=1)


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    engine = open_engine(f"sqlite:///{tmp_path / 't.db'}")
    migrate(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def sessions(engine: Engine) -> sessionmaker[Session]:
    return session_factory(engine)


def write_csv(tmp_path: Path, text: str, name: str = "list.csv", bom: bool = False) -> Path:
    path = tmp_path / name
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8"))
    return path


def stored(sessions: sessionmaker[Session]) -> dict[str, Subscriber]:
    with sessions() as session:
        return {s.email: s for s in session.scalars(select(Subscriber))}


def counts(report: ImportReport) -> tuple[int, int, int, int, int]:
    return (
        report.added,
        report.updated,
        report.unchanged,
        report.kept_unsubscribed,
        len(report.rejected),
    )


# --- normalize_email / clean_name -------------------------------------------------------


def test_normalize_email_trims_and_lowercases_everything() -> None:
    assert normalize_email("  Ann.Lee@Example.ORG ") == "ann.lee@example.org"


def test_normalize_email_returns_the_ascii_form_of_idn_domains() -> None:
    assert normalize_email("user@Exämple.org") == "user@xn--exmple-cua.org"


@pytest.mark.parametrize(
    "raw",
    [
        "ann@example.org\r\nBcc: victim@example.org",
        "ann@example.org\n",  # checked before trimming: a trailing newline is not "space"
        "\tann@example.org",
        "ann\x00@example.org",
        "ann@example.org\u2028",
        "ann\u202e@example.org",  # bidi override
        "ann\u200b@example.org",  # zero-width space
    ],
)
def test_normalize_email_rejects_control_and_header_breaking_chars(raw: str) -> None:
    with pytest.raises(ValueError, match="control character"):
        normalize_email(raw)


@pytest.mark.parametrize(
    "raw",
    ["", "   ", "plainaddress", "a@b", "Ann <ann@example.org>", '"a b"@example.org', "ö@x.org"],
)
def test_normalize_email_rejects_invalid_addresses(raw: str) -> None:
    with pytest.raises(ValueError):
        normalize_email(raw)


@given(st.text())
def test_normalize_email_is_safe_and_idempotent(raw: str) -> None:
    try:
        email = normalize_email(raw)
    except ValueError:
        return
    assert email.isascii() and email.isprintable() and " " not in email
    assert email == email.lower()
    assert normalize_email(email) == email


def _reference(raw: str) -> str | None:
    """What email_validator alone says: the normalized address, or None when invalid."""
    try:
        result = validate_email(raw.strip(), check_deliverability=False, allow_smtputf8=False)
    except EmailNotValidError:
        return None
    assert result.ascii_email is not None
    return result.ascii_email.lower()


_DOMAINS = [
    "example.org",
    "Example.ORG",
    "exämple.org",
    "xn--exmple-cua.org",
    "localhost",
    "example.test",
    "-bad.org",
    "a..b.org",
    "example.org.",
    "1.2.3.4",
    "[1.2.3.4]",
    ("d" * 63 + ".") * 3 + "org",  # a 196-character domain: the total length decides
]
_LOCALS = st.one_of(
    st.from_regex(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]{1,70}", fullmatch=True),
    st.text(st.characters(codec="utf-8", exclude_categories=("Cc", "Cs")), max_size=12),
)


@settings(max_examples=300)
@given(st.lists(st.tuples(_LOCALS, st.sampled_from(_DOMAINS)), min_size=1, max_size=20))
def test_email_fast_path_agrees_with_email_validator(pairs: list[tuple[str, str]]) -> None:
    # One normalizer for the whole list, as an import uses it, so the domain memo is hit.
    normalize = _EmailNormalizer()
    for local, domain in pairs:
        raw = f"{local}@{domain}"
        expected = _reference(raw)
        if expected is None:
            with pytest.raises(ValueError):
                normalize(raw)
            with pytest.raises(ValueError):
                normalize_email(raw)
        else:
            assert normalize(raw) == expected
            assert normalize_email(raw) == expected


@pytest.mark.parametrize("domain", [("d" * 63 + ".") * 3 + "org", ("ä" * 20 + ".") * 5 + "org"])
def test_email_fast_path_keeps_the_254_byte_limit(domain: str) -> None:
    normalize = _EmailNormalizer()
    verdicts = set()
    for size in range(1, 130):
        raw = f"{'x' * size}@{domain}"
        expected = _reference(raw)
        verdicts.add(expected is None)
        if expected is None:
            with pytest.raises(ValueError, match="too long"):
                normalize(raw)
        else:
            assert normalize(raw) == expected
    assert verdicts == {True, False}  # the limit was crossed


def test_clean_name_turns_line_breaks_into_spaces_and_drops_controls() -> None:
    assert clean_name("  Ann\r\n\tLee\x00\u202e\u2028Jr. ") == "Ann Lee Jr."
    assert clean_name(None) == ""
    assert clean_name("José Ñúñez") == "José Ñúñez"


def test_clean_name_caps_length_at_200() -> None:
    assert len(clean_name("x" * 500)) == 200
    assert clean_name("a" * 199 + " b") == "a" * 199  # no trailing space after the cut


# --- CSV import -------------------------------------------------------------------------


def test_csv_import_adds_active_subscribers_with_source_and_timestamps(
    tmp_path: Path, sessions: sessionmaker[Session]
) -> None:
    path = write_csv(
        tmp_path,
        "email,name,regions\nann@example.org,Ann Lee,europe\nbob@example.org,,asia;EUROPE\n",
        name="march.csv",
    )
    report = import_path(sessions, path, REGIONS, NOW)
    assert counts(report) == (2, 0, 0, 0, 0)
    subs = stored(sessions)
    ann, bob = subs["ann@example.org"], subs["bob@example.org"]
    assert (ann.name, ann.regions, ann.status) == ("Ann Lee", ["Europe"], SubscriberStatus.ACTIVE)
    # Stored in the config's spelling and order, whatever the file said.
    assert (bob.name, bob.regions) == ("", ["Europe", "Asia"])
    assert ann.source == "csv:march.csv"
    assert ann.created_at == ann.updated_at == NOW
    assert ann.created_at.tzinfo is not None
    assert ann.unsubscribed_at is None


@pytest.mark.parametrize("bom", [False, True])
def test_csv_with_or_without_bom_and_any_header_case(
    tmp_path: Path, sessions: sessionmaker[Session], bom: bool
) -> None:
    path = write_csv(tmp_path, "EMAIL,Name,REGIONS\r\nann@example.org,Ann,Asia\r\n", bom=bom)
    report = import_path(sessions, path, REGIONS, NOW)
    assert counts(report) == (1, 0, 0, 0, 0)
    assert stored(sessions)["ann@example.org"].regions == ["Asia"]


def test_csv_with_only_an_email_column(tmp_path: Path, sessions: sessionmaker[Session]) -> None:
    path = write_csv(tmp_path, "email\nann@example.org\n")
    assert counts(import_path(sessions, path, REGIONS, NOW)) == (1, 0, 0, 0, 0)
    ann = stored(sessions)["ann@example.org"]
    assert (ann.name, ann.regions) == ("", None)


def test_csv_columns_in_another_order(tmp_path: Path, sessions: sessionmaker[Session]) -> None:
    path = write_csv(tmp_path, "regions,email,name\nAsia,ann@example.org,Ann\n")
    import_path(sessions, path, REGIONS, NOW)
    ann = stored(sessions)["ann@example.org"]
    assert (ann.name, ann.regions) == ("Ann", ["Asia"])


@pytest.mark.parametrize("cell", ["", ";", " ; ;"])
def test_empty_regions_mean_every_section(
    tmp_path: Path, sessions: sessionmaker[Session], cell: str
) -> None:
    path = write_csv(tmp_path, f"email,name,regions\nann@example.org,Ann,{cell}\n")
    import_path(sessions, path, REGIONS, NOW)
    assert stored(sessions)["ann@example.org"].regions is None


def test_unknown_region_rejects_the_row_and_names_the_allowed_ones(
    tmp_path: Path, sessions: sessionmaker[Session]
) -> None:
    path = write_csv(
        tmp_path, "email,name,regions\nann@example.org,Ann,Europe;Mars\nbob@example.org,Bob,\n"
    )
    report = import_path(sessions, path, REGIONS, NOW)
    assert counts(report) == (1, 0, 0, 0, 1)
    (rej,) = report.rejected
    assert rej.line == "line 2"
    assert rej.value == "Europe;Mars"
    assert "'Mars'" in rej.reason and "Europe, Asia, Americas" in rej.reason
    assert set(stored(sessions)) == {"bob@example.org"}


def test_rejected_rows_name_the_physical_line_and_escape_the_value(
    tmp_path: Path, sessions: sessionmaker[Session]
) -> None:
    text = (
        "email,name,regions\n"  # line 1
        '"ann@example.org\r\nBcc: x@example.org",Evil,\n'  # lines 2-3: quoted line break
        "\n"  # line 4: blank, skipped
        " , ,\n"  # line 5: empty cells as spreadsheets leave them, skipped
        "bob@example.org,Bob,\n"  # line 6
        f"{'y' * 300}@example.org,Long,\n"  # line 7
        "carol@example.org,Carol,Asia,extra\n"  # line 8: one field too many
    )
    report = import_path(sessions, write_csv(tmp_path, text), REGIONS, NOW)
    assert report.added == 1
    crlf, long, extra = report.rejected
    assert crlf == RejectedRow("line 2", "ann@example.org\\r\\nBcc: x@example.org", crlf.reason)
    assert "control character" in crlf.reason
    assert long.line == "line 7"
    assert len(long.value) <= 81 and long.value.endswith("…")
    assert extra.line == "line 8" and "header has 3" in extra.reason
    assert set(stored(sessions)) == {"bob@example.org"}


def test_duplicate_in_one_file_first_wins(tmp_path: Path, sessions: sessionmaker[Session]) -> None:
    path = write_csv(
        tmp_path,
        "email,name,regions\nann@example.org,First,\nbob@example.org,Bob,\nANN@Example.org,Second,\n",
    )
    report = import_path(sessions, path, REGIONS, NOW)
    assert counts(report) == (2, 0, 0, 0, 1)
    assert report.rejected[0].line == "line 4"
    assert report.rejected[0].reason == "duplicate of line 2"
    assert stored(sessions)["ann@example.org"].name == "First"


def test_many_rows_are_written_in_chunks_with_one_commit_each(
    tmp_path: Path, engine: Engine, sessions: sessionmaker[Session]
) -> None:
    total = 2 * CHUNK_SIZE + 500
    lines = ["email,name,regions"] + [f"user{i}@example.org,User {i},Asia" for i in range(total)]
    # The same address again past a chunk boundary, in another case.
    lines.append("USER3@EXAMPLE.ORG,Again,")
    commits: list[object] = []
    event.listen(engine, "commit", commits.append)
    report = import_path(sessions, write_csv(tmp_path, "\n".join(lines)), REGIONS, NOW)
    assert counts(report) == (total, 0, 0, 0, 1)
    assert report.rejected[0] == RejectedRow(
        f"line {total + 2}", "user3@example.org", "duplicate of line 5"
    )
    assert len(commits) == 3
    assert len(stored(sessions)) == total


def test_importing_the_same_file_twice_changes_nothing(
    tmp_path: Path, sessions: sessionmaker[Session]
) -> None:
    path = write_csv(
        tmp_path,
        "email,name,regions\nann@example.org,Ann,Europe;Asia\nbob@example.org,Bob,\n",
    )
    import_path(sessions, path, REGIONS, NOW)
    before = {e: (s.name, s.regions, s.updated_at) for e, s in stored(sessions).items()}
    report = import_path(sessions, path, REGIONS, LATER)
    assert counts(report) == (0, 0, 2, 0, 0)
    after = {e: (s.name, s.regions, s.updated_at) for e, s in stored(sessions).items()}
    assert after == before


def test_reordered_regions_count_as_unchanged(
    tmp_path: Path, sessions: sessionmaker[Session]
) -> None:
    import_path(
        sessions, write_csv(tmp_path, "email,regions\na@example.org,Asia;Europe\n"), REGIONS, NOW
    )
    again = write_csv(tmp_path, "email,regions\nA@example.org,europe;ASIA\n", name="b.csv")
    assert counts(import_path(sessions, again, REGIONS, LATER)) == (0, 0, 1, 0, 0)


def test_changed_name_or_regions_update_an_active_subscriber(
    tmp_path: Path, sessions: sessionmaker[Session]
) -> None:
    first = write_csv(
        tmp_path, "email,name,regions\nann@example.org,Ann,Europe\nbob@example.org,Bob,\n"
    )
    import_path(sessions, first, REGIONS, NOW)
    second = write_csv(
        tmp_path,
        "email,name,regions\nann@example.org,Ann Lee,Europe\nbob@example.org,Bob,Asia\n",
        name="second.csv",
    )
    report = import_path(sessions, second, REGIONS, LATER)
    assert counts(report) == (0, 2, 0, 0, 0)
    subs = stored(sessions)
    assert (subs["ann@example.org"].name, subs["ann@example.org"].updated_at) == ("Ann Lee", LATER)
    assert subs["bob@example.org"].regions == ["Asia"]
    # created_at and source record the first import, not the latest.
    assert subs["bob@example.org"].created_at == NOW
    assert subs["bob@example.org"].source == "csv:list.csv"


def test_blank_name_or_absent_regions_column_keep_stored_values(
    tmp_path: Path, sessions: sessionmaker[Session]
) -> None:
    first = write_csv(tmp_path, "email,name,regions\nann@example.org,Ann,Europe\n")
    import_path(sessions, first, REGIONS, NOW)
    bare = write_csv(tmp_path, "email,name\nann@example.org,\n", name="bare.csv")
    assert counts(import_path(sessions, bare, REGIONS, LATER)) == (0, 0, 1, 0, 0)
    ann = stored(sessions)["ann@example.org"]
    assert (ann.name, ann.regions) == ("Ann", ["Europe"])


@pytest.mark.parametrize("status", [SubscriberStatus.UNSUBSCRIBED, SubscriberStatus.BOUNCED])
def test_import_never_reactivates_unsubscribed_or_bounced(
    tmp_path: Path, sessions: sessionmaker[Session], status: SubscriberStatus
) -> None:
    import_path(sessions, write_csv(tmp_path, "email,name\nann@example.org,Ann\n"), REGIONS, NOW)
    with sessions.begin() as session:
        sub = session.scalars(select(Subscriber)).one()
        sub.status = status
    again = write_csv(
        tmp_path, "email,name,regions\nANN@example.org,New Name,Asia\n", name="again.csv"
    )
    report = import_path(sessions, again, REGIONS, LATER)
    assert counts(report) == (0, 0, 0, 1, 0)
    ann = stored(sessions)["ann@example.org"]
    assert (ann.status, ann.name, ann.regions, ann.updated_at) == (status, "Ann", None, NOW)


def test_file_that_is_not_utf8_is_refused_before_anything_is_written(
    tmp_path: Path, sessions: sessionmaker[Session]
) -> None:
    # The bad byte comes after more than a chunk of good rows (and past the decoder's
    # first buffer), so only checking the whole file first keeps the import all-or-nothing.
    good = "".join(f"user{i}@example.org,User {i}\n" for i in range(CHUNK_SIZE + 500))
    path = tmp_path / "latin1.csv"
    path.write_bytes(
        b"email,name\n" + good.encode() + b"bob@example.org,Jos\xe9\ncarol@example.org,C\n"
    )
    with pytest.raises(UsageError) as info:
        import_path(sessions, path, REGIONS, NOW)
    message = str(info.value)
    assert str(path) in message
    assert f"line {CHUNK_SIZE + 502} " in message and "0xe9" in message
    assert "save it as UTF-8" in message and "\n" not in message
    assert stored(sessions) == {}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", "empty"),
        ("mail,name\nann@example.org,Ann\n", "header email,name,regions"),
        ("email|name|regions\nann@example.org|Ann|\n", "separated by commas or semicolons"),
        ("name,regions\nAnn,\n", "no 'email' column"),
        ("email,Email\nann@example.org,x\n", "appears twice"),
    ],
)
def test_bad_csv_header_is_a_usage_error_naming_the_file(
    tmp_path: Path, sessions: sessionmaker[Session], text: str, expected: str
) -> None:
    path = write_csv(tmp_path, text)
    with pytest.raises(UsageError, match=expected) as info:
        import_path(sessions, path, REGIONS, NOW)
    assert str(path) in str(info.value)
    assert stored(sessions) == {}


def test_unknown_extension_missing_file_and_folder_are_usage_errors(
    tmp_path: Path, sessions: sessionmaker[Session]
) -> None:
    xlsx = tmp_path / "list.xlsx"
    xlsx.write_bytes(b"PK")
    with pytest.raises(UsageError, match=r"list\.xlsx.*\.csv.*\.toml"):
        import_path(sessions, xlsx, REGIONS, NOW)
    with pytest.raises(UsageError, match=r"nope\.csv: no such file"):
        import_path(sessions, tmp_path / "nope.csv", REGIONS, NOW)
    (tmp_path / "dir.csv").mkdir()
    with pytest.raises(UsageError, match=r"dir\.csv: is a folder"):
        import_path(sessions, tmp_path / "dir.csv", REGIONS, NOW)


def test_sample_excel_export(sessions: sessionmaker[Session]) -> None:
    """A BOM, CRLF line ends, a quoted comma, a bad address, a duplicate, a bad region."""
    report = import_path(sessions, DATA / "excel_export.csv", REGIONS, NOW)
    assert counts(report) == (3, 0, 0, 0, 3)
    assert [(r.line, r.value) for r in report.rejected] == [
        ("line 5", "not-an-address"),
        ("line 6", "ann@example.org"),
        ("line 7", "Mars"),
    ]
    assert report.rejected[1].reason == "duplicate of line 2"
    subs = stored(sessions)
    assert subs["bob@example.org"].name == "Bob, Jr."
    assert subs["bob@example.org"].regions == ["Europe", "Asia"]
    assert subs["carol@example.org"].regions is None


def test_exported_file_reimports_unchanged(tmp_path: Path, sessions: sessionmaker[Session]) -> None:
    import_path(sessions, DATA / "excel_export.csv", REGIONS, NOW)
    with sessions.begin() as session:
        assert unsubscribe(session, "carol@example.org", NOW)
    out = tmp_path / "export.csv"
    with sessions() as session, out.open("w", encoding="utf-8", newline="") as f:
        assert export_csv(session, f) == 3
    report = import_path(sessions, out, REGIONS, LATER)
    assert counts(report) == (0, 0, 2, 1, 0)


# --- TOML import ------------------------------------------------------------------------


def test_toml_import(sessions: sessionmaker[Session]) -> None:
    report = import_path(sessions, DATA / "list.toml", REGIONS, NOW)
    assert counts(report) == (2, 0, 0, 0, 2)
    unknown_key, not_text = report.rejected
    assert (unknown_key.line, unknown_key.value) == ("subscribers[2]", "region")
    assert "unknown key 'region'" in unknown_key.reason
    assert (not_text.line, not_text.value, not_text.reason) == (
        "subscribers[3]",
        "42",
        "email must be text",
    )
    subs = stored(sessions)
    assert subs["ann@example.org"].regions == ["Europe"]
    assert subs["bob@example.org"].regions is None
    assert subs["bob@example.org"].source == "toml:list.toml"


def test_toml_regions_types_and_empty_list(tmp_path: Path, sessions: sessionmaker[Session]) -> None:
    path = tmp_path / "s.toml"
    path.write_text(
        '[[subscribers]]\nemail = "a@example.org"\nregions = []\n'
        '[[subscribers]]\nemail = "b@example.org"\nregions = [1]\n'
        '[[subscribers]]\nemail = "c@example.org"\nname = ["x"]\n'
        '[[subscribers]]\nname = "No Address"\n',
        encoding="utf-8",
    )
    report = import_path(sessions, path, REGIONS, NOW)
    assert counts(report) == (1, 0, 0, 0, 3)
    assert [r.reason for r in report.rejected] == [
        "regions must be a list of region names",
        "name must be text",
        "missing email",
    ]
    assert stored(sessions)["a@example.org"].regions is None


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b'[[subscribers]]\nemail = "a@example.org\n', "not valid TOML"),
        (b"[newsletter]\ntitle = 'x'\n", r"no \[\[subscribers\]\] tables"),
        (b'[[subscribers]]\nname = "Jos\xe9"\n', "line 2 is not valid UTF-8.*save it as UTF-8"),
    ],
)
def test_bad_toml_is_a_usage_error_naming_the_file(
    tmp_path: Path, sessions: sessionmaker[Session], content: bytes, expected: str
) -> None:
    path = tmp_path / "subs.toml"
    path.write_bytes(content)
    with pytest.raises(UsageError, match=expected) as info:
        import_path(sessions, path, REGIONS, NOW)
    assert str(path) in str(info.value)


# --- import_entries ---------------------------------------------------------------------


def test_import_entries_accepts_lists_strings_and_none(sessions: sessionmaker[Session]) -> None:
    report = import_entries(
        sessions,
        [
            ("config[0]", "a@example.org", "A", ["ASIA", "europe"]),
            ("config[1]", "b@example.org", None, "americas"),
            ("config[2]", "c@example.org", None, None),
        ],
        REGIONS,
        "config",
        NOW,
    )
    assert counts(report) == (3, 0, 0, 0, 0)
    subs = stored(sessions)
    assert subs["a@example.org"].regions == ["Europe", "Asia"]
    assert subs["b@example.org"].regions == ["Americas"]
    assert subs["c@example.org"].regions is None
    assert subs["c@example.org"].source == "config"


def test_import_requires_an_aware_now(sessions: sessionmaker[Session]) -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        import_entries(sessions, [], REGIONS, "x", datetime(2024, 1, 1))


def _is_clean(text: str) -> bool:
    return not any(
        unicodedata.category(ch)[0] == "C" or unicodedata.category(ch) in ("Zl", "Zp")
        for ch in text
    )


def test_arbitrary_text_is_rejected_or_stored_clean(tmp_path: Path) -> None:
    # One database for all examples: migrating per example would dominate the run time.
    engine = open_engine(f"sqlite:///{tmp_path / 'prop.db'}")
    migrate(engine)
    sessions = session_factory(engine)
    # Every code point, surrogates included: SQLite cannot even encode a lone surrogate.
    anything = st.text(st.characters(codec=None, exclude_categories=()), max_size=60)
    addressish = st.one_of(
        st.emails(),
        st.builds(lambda local, domain: f"{local}@{domain}.org", anything, anything),
        # A valid address with arbitrary text around it (spaces, CRLF, header lines...).
        st.builds(lambda a, e, b: a + e + b, anything, st.emails(), anything),
    )
    region_names = st.sampled_from([*REGIONS, "europe", "ASIA", "", " ", "Mars"])
    regions_value = st.one_of(
        st.none(),
        anything,
        st.lists(st.one_of(region_names, anything), max_size=3),
        st.lists(region_names, max_size=4).map(";".join),
    )

    @settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(
        email=st.one_of(anything, addressish),
        name=st.one_of(st.none(), anything),
        regions=regions_value,
        source=anything,
    )
    def check(email: str, name: str | None, regions: str | list[str] | None, source: str) -> None:
        report = import_entries(sessions, [("row", email, name, regions)], REGIONS, source, NOW)
        assert sum(counts(report)) == 1
        for rejected in report.rejected:
            assert rejected.value.isprintable() and rejected.reason.isprintable()

    check()
    subs = stored(sessions)
    assert subs, "the strategies should produce some valid rows"
    for sub in subs.values():
        assert sub.email.isascii() and sub.email.isprintable() and " " not in sub.email
        assert _is_clean(sub.name) and _is_clean(sub.source)
        assert len(sub.name) <= 200 and len(sub.source) <= 200
        assert all(region in REGIONS for region in sub.regions or [])
    engine.dispose()


# --- unsubscribe ------------------------------------------------------------------------


@pytest.fixture
def ann_and_bob(sessions: sessionmaker[Session]) -> dict[str, int]:
    import_entries(
        sessions,
        [("1", "ann@example.org", "Ann", None), ("2", "bob@example.org", "Bob", None)],
        REGIONS,
        "test",
        NOW,
    )
    return {e: s.id for e, s in stored(sessions).items()}


def test_unsubscribe_by_email_in_any_case_is_idempotent(
    sessions: sessionmaker[Session], ann_and_bob: dict[str, int]
) -> None:
    with sessions.begin() as session:
        assert unsubscribe(session, " ANN@Example.org ", LATER) is True
    with sessions.begin() as session:
        assert unsubscribe(session, "ann@example.org", LATER + timedelta(hours=1)) is False
    ann = stored(sessions)["ann@example.org"]
    assert ann.status == SubscriberStatus.UNSUBSCRIBED
    assert ann.unsubscribed_at == LATER  # the repeat did not move it
    assert stored(sessions)["bob@example.org"].status == SubscriberStatus.ACTIVE


def test_unsubscribe_by_id(sessions: sessionmaker[Session], ann_and_bob: dict[str, int]) -> None:
    with sessions.begin() as session:
        assert unsubscribe(session, ann_and_bob["ann@example.org"], LATER) is True
        assert unsubscribe(session, str(ann_and_bob["bob@example.org"]), LATER) is True
        assert unsubscribe(session, ann_and_bob["ann@example.org"], LATER) is False
    assert {s.status for s in stored(sessions).values()} == {SubscriberStatus.UNSUBSCRIBED}


@pytest.mark.parametrize("who", ["carol@example.org", "not an address", "a@b.org\r\n", 999, "999"])
def test_unsubscribe_unknown_returns_false(
    sessions: sessionmaker[Session], ann_and_bob: dict[str, int], who: str | int
) -> None:
    with sessions.begin() as session:
        assert unsubscribe(session, who, LATER) is False


def test_unsubscribe_a_bounced_subscriber_records_their_wish(
    sessions: sessionmaker[Session], ann_and_bob: dict[str, int]
) -> None:
    with sessions.begin() as session:
        sub = session.get(Subscriber, ann_and_bob["ann@example.org"])
        assert sub is not None
        sub.status = SubscriberStatus.BOUNCED
    with sessions.begin() as session:
        assert unsubscribe(session, "ann@example.org", LATER) is True
    assert stored(sessions)["ann@example.org"].status == SubscriberStatus.UNSUBSCRIBED


# --- export -----------------------------------------------------------------------------


def test_export_csv(sessions: sessionmaker[Session]) -> None:
    import_entries(
        sessions,
        [
            ("1", "ann@example.org", "Lee, Ann", ["Asia", "Europe"]),
            ("2", "bob@example.org", None, None),
        ],
        REGIONS,
        "test",
        NOW,
    )
    with sessions.begin() as session:
        unsubscribe(session, "bob@example.org", NOW)
    out = io.StringIO()
    with sessions() as session:
        assert export_csv(session, out) == 2
    # The first four columns stay as they were; the consent record follows.
    stamp = NOW.astimezone(UTC).isoformat(timespec="seconds")
    assert out.getvalue().splitlines() == [
        "email,name,regions,status,source,subscribed_at,confirmed_at",
        f'ann@example.org,"Lee, Ann",Europe;Asia,active,import,{stamp},',
        f"bob@example.org,,,unsubscribed,import,{stamp},",
    ]
    rows = list(csv.DictReader(io.StringIO(out.getvalue())))
    assert rows[0]["name"] == "Lee, Ann"


def test_export_of_an_empty_list_writes_the_header(sessions: sessionmaker[Session]) -> None:
    out = io.StringIO()
    with sessions() as session:
        assert export_csv(session, out) == 0
    assert out.getvalue() == "email,name,regions,status,source,subscribed_at,confirmed_at\n"


def test_a_100k_row_file_is_imported_whole(sessions: sessionmaker[Session], tmp_path: Path) -> None:
    path = tmp_path / "big.csv"
    with path.open("w", encoding="utf-8", newline="") as f:
        f.write("email,name,regions\n")
        for i in range(100_000):
            f.write(
                f"reader{i}@example{i % 300}.org,Reader {i},{REGIONS[i % 3] if i % 2 else ''}\n"
            )
        f.write("broken-address,Nobody,\n")
    report = import_path(sessions, path, REGIONS, NOW)
    assert report.added == 100_000
    assert [(r.line, r.value) for r in report.rejected] == [("line 100002", "broken-address")]
    with sessions() as session:
        assert session.query(Subscriber).count() == 100_000
        last = session.scalars(
            select(Subscriber).where(Subscriber.email == "reader99999@example99.org")
        ).one()
        assert last.regions == ["Europe"] and last.name == "Reader 99999"


@pytest.mark.parametrize("delimiter", [";", "\t"])
def test_semicolon_and_tab_separated_files_are_detected(
    tmp_path: Path, sessions: sessionmaker[Session], delimiter: str
) -> None:
    """Excel in locales with a decimal comma saves "CSV" with ';' between fields."""
    rows = [
        ["Email", "Name", "Regions", "Status"],
        ["ann@example.org", "Lovelace, Ada", "Europe;Asia", "active"],
        ["bo@example.org", "Bö 🦊 & Co", "", ""],
        ["bad-address", "X", "", ""],
        ["cy@example.org", "Cy", "Atlantis", ""],
    ]
    lines = []
    for row in rows:
        cells = [f'"{c}"' if (";" in c or delimiter in c or "," in c) else c for c in row]
        lines.append(delimiter.join(cells))
    path = write_csv(tmp_path, "\r\n".join(lines) + "\r\n", bom=True)
    report = import_path(sessions, path, REGIONS, NOW)
    subs = stored(sessions)
    assert sorted(subs) == ["ann@example.org", "bo@example.org"]
    assert subs["ann@example.org"].name == "Lovelace, Ada"
    assert subs["ann@example.org"].regions == ["Europe", "Asia"]
    assert subs["bo@example.org"].name == "Bö 🦊 & Co" and subs["bo@example.org"].regions is None
    assert [(r.line, r.value) for r in report.rejected] == [
        ("line 4", "bad-address"),
        ("line 5", "Atlantis"),
    ]
