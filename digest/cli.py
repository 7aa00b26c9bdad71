"""The ``digest`` command line: parse, call one function, print.

Results go to stdout, errors and progress to stderr. Every :class:`DigestError` is caught
once, in :class:`DigestGroup`, printed as one line, and turned into its exit code:
0 success, 1 the work partly failed (a feed, a row, a delivery), 2 usage or config error.
"""

from __future__ import annotations

import logging
import sys
from datetime import UTC, date, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from sqlalchemy.exc import SQLAlchemyError

from digest import pipeline
from digest.cli_editorial import parse_date
from digest.config import Config, default_config_path, load_config
from digest.errors import DigestError, UsageError
from digest.ratelimit import pause_line
from digest.send import SendStats

if TYPE_CHECKING:
    from digest.ingest import FeedReport, FetchReport
    from digest.subscribers import ImportReport


def _usage_error(exc: click.UsageError) -> click.exceptions.Exit:
    """Print click's usage error as one line, like every other error; exit 2."""
    where = exc.ctx.command_path if exc.ctx is not None else "digest"
    click.echo(f"digest: error: {exc.format_message()} (see `{where} --help`)", err=True)
    return click.exceptions.Exit(exc.exit_code)


class DigestGroup(click.Group):
    """A click group that turns DigestError into a one-line message and an exit code.

    click's own usage errors (bad option, bad value, unknown command) are printed on one
    line too, instead of click's usage block.
    """

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except click.exceptions.NoArgsIsHelpError:
            raise
        except click.UsageError as exc:
            raise _usage_error(exc) from None

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.exceptions.NoArgsIsHelpError:
            raise
        except click.UsageError as exc:
            raise _usage_error(exc) from None
        except DigestError as exc:
            click.echo(f"digest: error: {exc}", err=True)
            ctx.exit(exc.exit_code)
        except SQLAlchemyError as exc:
            # Not a user mistake but still no traceback: a locked or vanished database,
            # a concurrent writer. The ledger keeps what was committed; re-run the command.
            reason = str(getattr(exc, "orig", None) or exc).splitlines()[0]
            click.echo(f"digest: error: database error: {reason}; re-run the command", err=True)
            ctx.exit(1)


class Obj:
    """Lazily loaded config, so ``--help`` works without one."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._config: Config | None = None

    @property
    def config(self) -> Config:
        if self._config is None:
            self._config = load_config(self.path)
        return self._config

    def app(self) -> pipeline.App:
        return pipeline.open_app(self.config)


pass_obj = click.make_pass_decorator(Obj)

json_option = click.option(
    "--json", "as_json", is_flag=True, help="One JSON document on stdout (keys: see README)."
)

quiet_option = click.option(
    "--quiet",
    "-q",
    is_flag=True,
    help="No progress while running; a summary of at most four lines (and errors) at the end.",
)


def _date(value: str | None, config: Config) -> date:
    if value is None:
        return pipeline.today(config)
    return parse_date(value)


@click.group(cls=DigestGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help=f"Config file (default: $DIGEST_CONFIG, then ./{default_config_path().name}).",
)
@click.version_option(package_name="digest")
@click.pass_context
def main(ctx: click.Context, config_path: Path | None) -> None:
    """digest: the weekly round-up newsletter.

    \b
    Typical week:
      digest init                      # once: create the database
      digest subscribers import        # [[subscribers]] from the config, or a CSV
      digest fetch                     # pull the feeds (the scheduler does this hourly)
      digest preview --out issue.html  # look before you send
      digest send                      # send today's round-up (safe to re-run)
      digest run                       # or let the scheduler do all of it
      digest run --once                # or all of it now, once (from cron)
    """
    ctx.obj = Obj(config_path)
    # psycopg reports a dropped connection's clean-up as a warning of its own; the one
    # line digest prints about it says everything the operator needs.
    logging.getLogger("psycopg").setLevel(logging.ERROR)


@main.command()
@pass_obj
def init(obj: Obj) -> None:
    """Create or upgrade the database schema (safe to run again).

    Example: digest --config config.toml init
    """
    rev = pipeline.init_db(obj.config)
    click.echo(f"database ready at schema revision {rev}: {_db_label(obj.config)}")


def _db_label(config: Config) -> str:
    from sqlalchemy.engine import make_url

    return make_url(config.database.url).render_as_string(hide_password=True)


@main.command()
@quiet_option
@pass_obj
def fetch(obj: Obj, quiet: bool) -> None:
    """Fetch every [[feeds]] entry into the article store.

    Exit 1 when a feed could not be fetched or parsed (the others are still stored).

    Example: digest fetch
    """
    from digest.progress import meter

    app = obj.app()
    done = []
    with meter("fetch", "feeds", len(app.config.feeds), quiet=quiet) as m:

        def feed_done(r: FeedReport) -> None:
            _feed_problems(r)
            done.append(r)
            m.update(len(done))

        report = pipeline.fetch(app, progress=feed_done)
    _print_fetch(report, quiet=quiet)
    if not report.ok:
        sys.exit(1)


def _feed_problems(r: FeedReport) -> None:
    if r.error:
        click.echo(f"digest: feed {r.feed}: {r.error}", err=True)
    for rej in r.rejected:
        click.echo(f"digest: feed {r.feed}: rejected {rej.item}: {rej.reason}", err=True)


def _print_fetch(report: FetchReport, total: str = "total", quiet: bool = False) -> None:
    for r in [] if quiet else report.feeds:
        state = "error" if r.error else ("not modified" if r.not_modified else "ok")
        click.echo(
            f"{r.feed}: {state}, {r.new} new, {r.updated} updated, {len(r.rejected)} rejected"
        )
    click.echo(f"{total}: {report.new} new, {report.updated} updated, {report.rejected} rejected")


@main.group()
def subscribers() -> None:
    """Import, list and export subscribers."""


@subscribers.command("import")
@click.argument("path", required=False, type=click.Path(dir_okay=False, path_type=Path))
@quiet_option
@pass_obj
def subscribers_import(obj: Obj, path: Path | None, quiet: bool) -> None:
    """Import subscribers from a .toml ([[subscribers]]) or .csv (email,name,regions) file.

    Without PATH, imports the config file's own [[subscribers]]. Idempotent; never
    re-subscribes someone who unsubscribed. Exit 1 when some rows were rejected (the
    valid ones are still imported).

    Example: digest subscribers import readers.csv
    """
    from digest.progress import meter
    from digest.subscribers import import_path

    config = obj.config
    app = obj.app()
    source = path if path is not None else config.path
    assert source is not None
    with meter("import", "rows", quiet=quiet) as m:
        report = import_path(
            app.sessions, source, config.newsletter.regions, datetime.now(UTC), m.update
        )
    _print_import(report, source.name)
    if report.rejected:
        sys.exit(1)


def _print_import(report: ImportReport, source: str, prefix: str = "") -> None:
    for row in report.rejected:
        click.echo(f"digest: {source}: {row.line}: rejected {row.value}: {row.reason}", err=True)
    click.echo(
        f"{prefix}{report.added} added, {report.updated} updated, {report.unchanged} unchanged, "
        f"{report.kept_unsubscribed} kept unsubscribed, {len(report.rejected)} rejected"
    )


@subscribers.command("list")
@json_option
@pass_obj
def subscribers_list(obj: Obj, as_json: bool) -> None:
    """List subscribers: email, status, regions, name and the consent record (source
    import/signup, subscribed at, confirmed at; UTC). --json: every field.

    Example: digest subscribers list --json
    """
    from digest import store, tables

    with obj.app().sessions() as session:
        subs = store.iter_subscribers(session)
        if as_json:
            rows = tables.records(tables.SUBSCRIBER_COLUMNS, subs)
            tables.write_json_list("subscribers", rows, sys.stdout)
        else:
            for line in tables.table(tables.SUBSCRIBER_COLUMNS, subs):
                click.echo(line)


@subscribers.command("export")
@pass_obj
def subscribers_export(obj: Obj) -> None:
    """Write every subscriber as CSV to stdout: email,name,regions,status and the consent
    record source,subscribed_at,confirmed_at.

    Example: digest subscribers export > backup.csv
    """
    from digest.subscribers import export_csv

    with obj.app().sessions() as session:
        export_csv(session, sys.stdout)


@main.command()
@click.argument("email")
@pass_obj
def unsubscribe(obj: Obj, email: str) -> None:
    """Unsubscribe EMAIL (idempotent).

    Example: digest unsubscribe reader@example.org
    """
    from digest.addresses import normalize_email
    from digest.errors import UsageError
    from digest.subscribers import unsubscribe as do_unsubscribe

    try:
        addr = normalize_email(email)
    except ValueError as exc:
        raise UsageError(f"{email!r} is not an email address: {exc}") from None
    with obj.app().sessions() as session:
        changed = do_unsubscribe(session, addr, datetime.now(UTC))
        session.commit()
    click.echo(
        f"{addr}: unsubscribed" if changed else f"{addr}: already unsubscribed or not on the list"
    )


@main.command()
@click.option(
    "--date",
    "date_str",
    metavar="YYYY-MM-DD",
    help="Edition date (default: the next issue not yet sent, else today).",
)
@click.option("--subscriber", metavar="EMAIL", help="Render that subscriber's edition.")
@click.option(
    "--format", "fmt", type=click.Choice(["html", "text", "eml"]), default="html", show_default=True
)
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write to FILE instead of stdout.",
)
@click.option("--serve", is_flag=True, help="Open a live preview page on 127.0.0.1 instead.")
@click.option("--port", default=8090, show_default=True, help="Port of the --serve page.")
@pass_obj
def preview(
    obj: Obj,
    date_str: str | None,
    subscriber: str | None,
    fmt: str,
    out: Path | None,
    serve: bool,
    port: int,
) -> None:
    """Render exactly what `send` would send for a date; sends and records nothing.

    --serve opens a local page instead: each edition and subscriber, desktop and mobile
    widths, the plain text, reloading when a template or the issue changes.

    Example: digest preview --date 2026-11-27 --out roundup.html
    """
    from digest import editorial

    config = obj.config
    if serve:
        from digest.web.preview import serve_preview

        click.echo(f"digest preview: http://127.0.0.1:{port}/  (Ctrl-C to stop)", err=True)
        serve_preview(obj.app(), _date(date_str, config) if date_str else None, port)
        return
    edition = parse_date(date_str) if date_str else editorial.working_date(obj.app())
    data = pipeline.preview(obj.app(), edition, subscriber, fmt)  # type: ignore[arg-type]
    if out is None:
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
    else:
        try:
            out.write_bytes(data)
        except OSError as exc:
            raise UsageError(
                f"--out {out}: cannot write it ({exc.strerror or exc}); check that the "
                "folder exists and is writable"
            ) from None
        click.echo(f"wrote {out} ({len(data)} bytes)", err=True)


@main.command()
@click.option("--date", "date_str", metavar="YYYY-MM-DD", help="Edition date (default: today).")
@click.option("--dry-run", is_flag=True, help="Count what would be sent; send and record nothing.")
@quiet_option
@click.option(
    "--test",
    is_flag=True,
    help="Send test copies to ADDRESS… only (at most 10); default date: the next issue "
    "not yet sent.",
)
@click.argument("addresses", nargs=-1, metavar="[ADDRESS]...")
@pass_obj
def send(
    obj: Obj,
    date_str: str | None,
    dry_run: bool,
    quiet: bool,
    test: bool,
    addresses: tuple[str, ...],
) -> None:
    """Build (once) and send a date's round-up to every active subscriber not yet served.

    Safe to re-run: the delivery ledger sends nothing twice. Exit 1 when a delivery
    failed permanently or the SMTP server could not be used. With [editorial]
    approval = "required", an issue nobody approved is not sent (exit 1).

    --test ADDRESS…: a copy of the issue (draft or approved) to those addresses, as a
    subscriber of every region gets it, subject prefixed "[TEST] "; no ledger rows.

    Example: digest send --date 2026-11-27
    """
    from digest import cli_editorial, editorial
    from digest.errors import AwaitingApproval, UsageError
    from digest.progress import meter

    config = obj.config
    edition = _date(date_str, config)
    if test:
        if date_str is None:  # the draft being worked on, as `digest issue` commands
            edition = editorial.working_date(obj.app())
        cli_editorial.send_tests(obj, edition, addresses)
        return
    if addresses:
        raise UsageError(f"unexpected {addresses[0]!r}: addresses are for `digest send --test`")
    app = obj.app()
    try:
        with meter("send", "messages", quiet=quiet or dry_run) as m:

            def progress(stats: SendStats) -> None:
                m.update(stats.done, stats.total)

            report = pipeline.send(app, edition, dry_run=dry_run, progress=progress)
    except AwaitingApproval as exc:
        click.echo(str(exc), err=True)  # the whole instruction, as it stands
        sys.exit(1)
    if report.dry_run:
        click.echo(f"round-up {report.edition_date}: {report.subject}")
        click.echo(
            f"dry run: would send {report.would_send} messages in {report.editions} editions, "
            f"skip {report.stats.skipped} (empty edition); nothing sent"
        )
        return
    sys.exit(_print_send(report, config))


def _print_send(report: pipeline.SendReport, config: Config, brief: bool = False) -> int:
    """Print what a send did (``brief``: two lines); return its exit code."""
    edition = report.edition_date
    click.echo(f"round-up {edition}: {report.subject}")
    if report.already_fired:
        click.echo("this firing was made already by another digest process; nothing to do")
        return 0
    s, c = report.stats, report.counts
    taken = f", {s.lost} taken over by another worker" if s.lost else ""
    click.echo(
        f"this run: {s.sent} sent, {s.failed} failed, {s.deferred} deferred, {s.skipped} skipped, "
        f"{s.retries} retries, {report.editions} editions rendered{taken}"
    )
    if not brief:
        click.echo(
            f"ledger: {c['sent']} sent, {c['failed']} failed, {c['deferred']} deferred, "
            f"{c['skipped']} skipped, {c['pending'] + c['sending']} pending"
        )
    if config.outbox is not None and s.sent and not brief:
        click.echo(f"written to the outbox {config.outbox.path / 'new'} (Maildir)")
    if s.paused is not None:
        # Not a failure: the relay's quota is used up; the rest waits for the window.
        pending = c["pending"] + c["sending"]
        p = s.paused
        click.echo(pause_line(p.window, p.limit, pending, p.resumes_at, config.schedule.tz))
        return 1 if c["failed"] else 0
    if s.interrupted or c["pending"] + c["sending"]:
        why = "send stopped early" if s.interrupted else "send did not finish"
        click.echo(
            f"digest: {why}; {c['pending'] + c['sending']} still pending: run "
            f"`digest send --date {edition}` again to finish",
            err=True,
        )
        return 1
    if c["deferred"]:
        click.echo(
            f"digest: {c['deferred']} deliveries deferred; run `digest send --date {edition}` "
            "again later (the scheduler retries on its own)",
            err=True,
        )
    if c["failed"]:
        click.echo(
            f"digest: {c['failed']} deliveries failed permanently; see "
            f"`digest deliveries --failed --date {edition}`",
            err=True,
        )
        return 1
    return 0


@main.command()
@click.option("--limit", default=10, show_default=True, help="How many recent issues.")
@json_option
@pass_obj
def status(obj: Obj, limit: int, as_json: bool) -> None:
    """Recent issues with sent/deferred/failed/skipped/pending counts, and subscribers.

    Example: digest status --json
    """
    from digest import tables

    report = pipeline.status(obj.app(), limit)
    if as_json:
        tables.write_json(tables.status_document(report), sys.stdout)
        return
    for line in tables.status_lines(report):
        click.echo(line)


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8080, show_default=True, help="Port to listen on.")
@pass_obj
def serve(obj: Obj, host: str, port: int) -> None:
    """Serve the reader pages ([unsubscribe] base_url must reach this).

    Unsubscribe (one-click POST, RFC 8058), signup with double opt-in (/subscribe), the
    preference centre, the archive (/archive) and GET /healthz; sends the signup mails.
    Put it behind your HTTPS reverse proxy ([signup] trusted_proxies).

    Example: digest serve --host 127.0.0.1 --port 8080
    """
    import logging

    import uvicorn

    from digest.serve import create_app

    app = obj.app()
    web_app = create_app(obj.config, app.sessions)
    logging.basicConfig(level=logging.INFO, format="digest serve: %(levelname)s %(message)s")
    uvicorn.run(
        web_app,
        host=host,
        port=port,
        log_level="info",
        # digest decides whose X-Forwarded-For to believe ([signup] trusted_proxies);
        # uvicorn's own handling would believe it from 127.0.0.1 by default.
        proxy_headers=False,
        server_header=False,
    )


@main.group()
def dkim() -> None:
    """DKIM keys."""


@dkim.command("keygen")
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Where to write the private key (default: [dkim] private_key_path).",
)
@click.option("--selector", help="DKIM selector (default: [dkim] selector).")
@click.option("--domain", help="Signing domain (default: [dkim] domain).")
@click.option(
    "--bits", default="2048", show_default=True, type=click.Choice(["2048", "3072", "4096"])
)
@pass_obj
def dkim_keygen(
    obj: Obj, out: Path | None, selector: str | None, domain: str | None, bits: int
) -> None:
    """Write an RSA key pair for DKIM and print the DNS TXT record to publish.

    Example: digest dkim keygen --out dkim.pem --selector digest --domain example.org
    """
    from digest.dkimsign import keygen
    from digest.errors import UsageError

    cfg = None
    if out is None or selector is None or domain is None:
        cfg = obj.config.dkim
        if cfg is None:
            raise UsageError("no [dkim] section in the config: pass --out, --selector and --domain")
    out = out or (cfg.private_key_path if cfg else None)
    selector = selector or (cfg.selector if cfg else None)
    domain = domain or (cfg.domain if cfg else None)
    if out is None or selector is None or domain is None:
        raise UsageError("set [dkim] private_key_path, or pass --out")
    if out.exists():
        raise UsageError(f"{out} exists; refusing to overwrite a key (move it away first)")
    record = keygen(out, int(bits))
    click.echo(f"wrote private key {out} (keep it secret; mode 0600)", err=True)
    click.echo("Publish this DNS TXT record:")
    click.echo(f'{selector}._domainkey.{domain}. IN TXT "{record}"')


@main.command()
@click.option("--failed", is_flag=True, help="Only failed deliveries (the default, for now).")
@click.option("--date", "date_str", metavar="YYYY-MM-DD", help="Only this edition.")
@json_option
@pass_obj
def deliveries(obj: Obj, failed: bool, date_str: str | None, as_json: bool) -> None:
    """List failed deliveries with the SMTP server's reply.

    Example: digest deliveries --failed --date 2026-11-27
    """
    from digest import tables

    edition = _date(date_str, obj.config) if date_str else None
    rows = pipeline.failed_deliveries(obj.app(), edition)
    if as_json:
        records = tables.records(tables.FAILED_COLUMNS, rows)
        tables.write_json_list("deliveries", records, sys.stdout)
        return
    if rows:
        for line in tables.table(tables.FAILED_COLUMNS, rows):
            click.echo(line)
    click.echo(f"{len(rows)} failed deliveries", err=True)


@main.group()
def bounces() -> None:
    """Process bounce reports from the mail server."""


@bounces.command("import")
@click.argument("path", type=click.Path(path_type=Path))
@pass_obj
def bounces_import(obj: Obj, path: Path) -> None:
    """Record hard bounces from the DSNs in PATH (an mbox file or a Maildir folder).

    A hard bounce (5.x.x) marks its delivery failed; after 3 in a row the subscriber is
    set to bounced and gets no further issues. Only reports quoting the tagged
    Message-ID of a message digest sent count; others (possibly forged) are ignored.
    Soft bounces and other mail are counted and left alone. Safe to run again on the
    same mailbox; the mailbox is only read.

    Example: digest bounces import /var/mail/bounces
    """
    from digest.bounces import import_bounces

    report = import_bounces(
        obj.app().sessions,
        path,
        pipeline.BOUNCE_THRESHOLD,
        tags=pipeline.message_tags(obj.config),
    )
    click.echo(
        f"{report.hard} hard bounces recorded, {report.already_recorded} already recorded, "
        f"{report.soft_ignored} soft ignored, {report.unmatched} unmatched, "
        f"{report.unrelated} unrelated, {report.ignored} ignored (not about a message "
        "carrying our tag)"
    )


@main.command()
@click.option("--once", is_flag=True, help="Do the weekly job now and exit (for cron).")
@click.option(
    "--date", "date_str", metavar="YYYY-MM-DD", help="With --once: the edition (default: today)."
)
@quiet_option
@pass_obj
def run(obj: Obj, once: bool, date_str: str | None, quiet: bool) -> None:
    """Run the scheduler in the foreground: fetch every N minutes, send on the cron.

    Stops cleanly on Ctrl-C or SIGTERM. With --once: create or upgrade the schema, fetch
    the feeds, import the config's [[subscribers]], send the round-up of --date, print
    what was done and exit (1 if a feed, a subscriber row or a delivery failed). With
    --quiet the scheduler logs only warnings and errors.

    \b
    Example: digest --config /etc/digest/config.toml run
    Example: digest --config config.example.toml run --once --date 2026-11-27
    """
    config = obj.config
    if once:
        _run_once(config, _date(date_str, config), quiet)
        return
    if date_str is not None:
        raise click.UsageError("--date needs --once (the scheduler picks its own dates)")
    from digest.schedule import run_scheduler

    obj.app()  # fail now, not at 09:00 on Friday, if the database is not initialised
    if quiet:
        import logging

        # Configured first, so the scheduler's own basicConfig (INFO) changes nothing.
        logging.basicConfig(
            level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s"
        )
    run_scheduler(config, log=lambda m: click.echo(m, err=True))


def _run_once(config: Config, edition: date, quiet: bool) -> None:
    from digest.progress import meter
    from digest.weekly import Hooks, run_once

    def migrated(rev: str) -> None:
        if not quiet:
            click.echo(f"database ready at schema revision {rev}: {_db_label(config)}")

    def imported(report: ImportReport | None) -> None:
        if report is None:
            click.echo("subscribers: the config has no [[subscribers]]; none imported")
        else:
            source = config.path.name if config.path else "config"
            _print_import(report, source, prefix=f"subscribers from {source}: ")

    # --quiet: four lines at most (feeds, subscribers, round-up, this run), errors aside.
    hooks = Hooks(
        migrated=migrated,
        feed_done=_feed_problems,
        fetched=lambda report: _print_fetch(report, total="feeds", quiet=quiet),
        imported=imported,
        meter=lambda label, unit, total: meter(label, unit, total, quiet=quiet),
    )
    report = run_once(config, edition, hooks)
    code = _print_send(report.send, config, brief=quiet)
    sys.exit(code or (0 if report.ok else 1))


def _register_commands() -> None:
    from digest import cli_editorial

    cli_editorial.register(main)


_register_commands()

if __name__ == "__main__":
    main()
