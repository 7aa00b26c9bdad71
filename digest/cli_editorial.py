"""The editor's commands: ``digest draft`` and ``digest issue …``, plus test copies.

Registered on ``main`` in ``cli.py``; like every command here they parse, call one
function of :mod:`digest.editorial` and print. Errors are DigestErrors, printed once by
``DigestGroup``.
"""

from __future__ import annotations

import getpass
import json
import sys
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING

import click

from digest import editorial
from digest.errors import UsageError

if TYPE_CHECKING:
    from digest.cli import Obj

DATE_HELP = "Edition date, YYYY-MM-DD (default: the next issue not yet sent)."
# Article ids are INTEGER columns: anything beyond fails in the database, not as a usage error.
ARTICLE_ID = click.IntRange(1, 2**31 - 1)


def parse_date(value: str) -> date:
    """A ``--date`` value as a date; a usage error naming the option otherwise."""
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise click.BadParameter(
            f"{value!r} is not a date; use YYYY-MM-DD", param_hint="--date"
        ) from None


def _issue_date(obj: Obj, value: str | None) -> date:
    return parse_date(value) if value else editorial.default_date(obj.app())


def _print_view(view: editorial.IssueView, as_json: bool, approval: str) -> None:
    if as_json:
        click.echo(json.dumps(view.as_json(), ensure_ascii=False))
        return
    d = view.edition_date
    status = str(view.status)
    if view.status == editorial.EditorialStatus.APPROVED:
        status += f" by {view.approved_by} at {view.approved_at:%Y-%m-%d %H:%M} UTC"
    elif view.status == editorial.EditorialStatus.DRAFT and approval == "required":
        status += f", awaiting approval: digest issue approve --date {d}"
    click.echo(f"issue    {d}  {status}")
    click.echo(f"subject  {view.subject}")
    if view.lead is not None and view.opening is not None:
        click.echo(f"lead     {view.lead}  {view.opening.title}")
    elif view.opening is not None:
        click.echo(f"lead     none chosen; the rules open with {view.opening.id}")
    if view.note:
        click.echo("note")
        for line in view.note.splitlines():
            click.echo(f"  | {line}")
    else:
        click.echo("note     none")
    for section in view.sections:
        click.echo(f"\n{section.name}")
        for article in section.articles:
            mark = "  [lead]" if article.id == view.lead else ""
            click.echo(f"  {article.id:>6}  {article.title}{mark}")
            click.echo(f"          {article.link}")


def _print_edit(result: editorial.EditResult) -> None:
    click.echo(result.message)
    for note in result.notes:
        click.echo(f"digest: note: {note}", err=True)
    if result.withdrew_approval:
        d = result.view.edition_date
        click.echo(
            f"approval withdrawn by this change: `digest issue approve --date {d}` approves "
            "it again",
            err=True,
        )


@click.command()
@click.option("--date", "date_str", metavar="YYYY-MM-DD", help="Edition date (default: next send).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.pass_obj
def draft(obj: Obj, date_str: str | None, as_json: bool) -> None:
    """Build (freeze) the issue of a date now, by the rules, and print it.

    An issue that exists is only printed. Default date: the next `send_cron` firing.

    Example: digest draft --date 2026-11-27
    """
    app = obj.app()
    edition = parse_date(date_str) if date_str else editorial.next_send_date(obj.config)
    view, built = editorial.build_draft(app, edition)
    if not as_json:
        click.echo(f"draft of {edition} {'built' if built else 'already built'}", err=True)
    _print_view(view, as_json, obj.config.editorial.approval)


@click.group()
def issue() -> None:
    """Inspect and edit an issue before it is sent: lead, note, articles, approval.

    Every command takes --date (default: the next issue not yet sent). Once a message
    of the issue has been sent, every edit is refused.
    """


@issue.command("show")
@click.option("--date", "date_str", metavar="YYYY-MM-DD", help=DATE_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.pass_obj
def issue_show(obj: Obj, date_str: str | None, as_json: bool) -> None:
    """Status, subject, lead, note and the sections with each article's id.

    Example: digest issue show --date 2026-11-27 --json
    """
    view = editorial.show(obj.app(), _issue_date(obj, date_str))
    _print_view(view, as_json, obj.config.editorial.approval)


@issue.command("lead")
@click.argument("article_id", metavar="ID", type=ARTICLE_ID, required=False)
@click.option("--clear", is_flag=True, help="Let the rules choose again.")
@click.option("--date", "date_str", metavar="YYYY-MM-DD", help=DATE_HELP)
@click.pass_obj
def issue_lead(obj: Obj, article_id: int | None, clear: bool, date_str: str | None) -> None:
    """Open the round-up with article ID (large image, above the sections).

    It must be in the issue; it leads the editions that include its section.

    Example: digest issue lead 42
    """
    if (article_id is None) == (not clear):
        raise UsageError("give an article ID or --clear (one of them)")
    result = editorial.set_lead(obj.app(), _issue_date(obj, date_str), article_id)
    _print_edit(result)


@issue.command("exclude")
@click.argument("article_id", metavar="ID", type=ARTICLE_ID)
@click.option("--date", "date_str", metavar="YYYY-MM-DD", help=DATE_HELP)
@click.pass_obj
def issue_exclude(obj: Obj, article_id: int, date_str: str | None) -> None:
    """Take article ID out of the issue.

    Example: digest issue exclude 42
    """
    _print_edit(editorial.exclude(obj.app(), _issue_date(obj, date_str), article_id))


@issue.command("include")
@click.argument("article_id", metavar="ID", type=ARTICLE_ID)
@click.option("--region", help="Section to add it to (default: its own region's).")
@click.option("--date", "date_str", metavar="YYYY-MM-DD", help=DATE_HELP)
@click.pass_obj
def issue_include(obj: Obj, article_id: int, region: str | None, date_str: str | None) -> None:
    """Add any stored article (older ones too), last in its section.

    Example: digest issue include 17 --region Europe
    """
    result = editorial.include(obj.app(), _issue_date(obj, date_str), article_id, region)
    _print_edit(result)


@issue.command("move")
@click.argument("article_id", metavar="ID", type=ARTICLE_ID)
@click.option("--region", required=True, help="Section to move it to.")
@click.option("--position", type=int, help="Place in the section, from 1 (default: last).")
@click.option("--date", "date_str", metavar="YYYY-MM-DD", help=DATE_HELP)
@click.pass_obj
def issue_move(
    obj: Obj, article_id: int, region: str, position: int | None, date_str: str | None
) -> None:
    """Move article ID to another section or place.

    Example: digest issue move 42 --region "Middle East" --position 1
    """
    result = editorial.move(obj.app(), _issue_date(obj, date_str), article_id, region, position)
    _print_edit(result)


@issue.command("note")
@click.option("--text", help="The note, in Markdown (paragraphs, *emphasis*, [links](https://…)).")
@click.option(
    "--file",
    "file_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Read the note from a UTF-8 file ('-' for stdin).",
)
@click.option("--clear", is_flag=True, help="Remove the note.")
@click.option("--date", "date_str", metavar="YYYY-MM-DD", help=DATE_HELP)
@click.pass_obj
def issue_note(
    obj: Obj, text: str | None, file_path: Path | None, clear: bool, date_str: str | None
) -> None:
    """Set the editor's note, shown after the greeting (Markdown; no HTML).

    At most 5,000 characters.

    Example: digest issue note --file note.md
    """
    if (text is not None) + (file_path is not None) + clear != 1:
        raise UsageError("give exactly one of --text, --file or --clear")
    if file_path is not None:
        text = _read_note(file_path)
    result = editorial.set_note(obj.app(), _issue_date(obj, date_str), None if clear else text)
    _print_edit(result)


def _read_note(path: Path) -> str:
    from digest.note import MAX_NOTE_CHARS

    # Read a bounded amount: enough to tell the length of a note that is too long
    # (4 bytes a character at most) without loading a huge file.
    limit = MAX_NOTE_CHARS * 4 + 1
    try:
        if str(path) == "-":
            data = sys.stdin.buffer.read(limit)
        else:
            with path.open("rb") as handle:
                data = handle.read(limit)
    except FileNotFoundError:
        raise UsageError(f"--file {path}: no such file") from None
    except OSError as exc:
        raise UsageError(f"--file {path}: cannot read it: {exc.strerror}") from None
    if len(data) >= limit:
        raise UsageError(
            f"--file {path}: the note is over {MAX_NOTE_CHARS:,} characters; shorten it"
        )
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UsageError(f"--file {path}: not UTF-8 (byte {exc.start}); save it as UTF-8") from None


@issue.command("reset")
@click.option("--date", "date_str", metavar="YYYY-MM-DD", help=DATE_HELP)
@click.pass_obj
def issue_reset(obj: Obj, date_str: str | None) -> None:
    """Select the articles again by the rules, dropping exclusions, inclusions, moves and
    the lead (the note is kept); picks up articles fetched since the draft.

    Example: digest issue reset --date 2026-11-27
    """
    _print_edit(editorial.reset(obj.app(), _issue_date(obj, date_str)))


def _who() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no login name in some containers
        return "unknown"


@issue.command("approve")
@click.option("--by", help="Who approves (default: your login name).")
@click.option("--date", "date_str", metavar="YYYY-MM-DD", help=DATE_HELP)
@click.pass_obj
def issue_approve(obj: Obj, by: str | None, date_str: str | None) -> None:
    """Approve the issue as it stands; with approval = "required" it may then be sent.

    Any later edit withdraws the approval.

    Example: digest issue approve --date 2026-11-27
    """
    name = " ".join((by or _who()).split())[:320] or "unknown"
    _print_edit(editorial.approve(obj.app(), _issue_date(obj, date_str), name))


@issue.command("unapprove")
@click.option("--date", "date_str", metavar="YYYY-MM-DD", help=DATE_HELP)
@click.pass_obj
def issue_unapprove(obj: Obj, date_str: str | None) -> None:
    """Withdraw the approval.

    Example: digest issue unapprove --date 2026-11-27
    """
    result = editorial.unapprove(obj.app(), _issue_date(obj, date_str))
    click.echo(result.message)


def send_tests(obj: Obj, edition: date, addresses: tuple[str, ...]) -> None:
    """``digest send --test``: send test copies and print one line per address."""
    copies = editorial.send_test_copies(obj.app(), edition, addresses)
    for copy in copies:
        state = "sent" if copy.ok else "FAILED"
        click.echo(f"test copy of {edition} to {copy.address}: {state} ({copy.reply})")
    if not all(c.ok for c in copies):
        sys.exit(1)


def register(main: click.Group) -> None:
    """Add the editor's commands to the ``digest`` group."""
    main.add_command(draft)
    main.add_command(issue)
