#!/usr/bin/env python3
"""Throughput benchmark: `digest send` against the SMTP floor and limit, on loopback.

    python bench/send_throughput.py --subscribers 100000

Needs Postfix's smtp-sink and smtp-source (Debian: apt-get install postfix). In one run it
measures, over the same number of connections:

1. `digest send` end to end (issue build, ledger, render, personalize, SMTP), as a
   subprocess: messages/s, wall time, peak RSS — at N and at N/10 subscribers, DKIM off
   and on;
2. the floor: a bare aiosmtplib loop handing pre-built bytes of the same size to
   `sendmail` over K connections;
3. the limit: `smtp-source -d` (C, K sessions, connection reuse);

and prints digest/floor and digest/limit. It also times a CSV import of N subscribers and a
`fetch` of 50 feeds served from loopback. Nothing here is part of the test suite.

With ``--postgres URL`` it also runs 1 and then 2 `digest send` processes on one issue in
a PostgreSQL schema of its own (dropped afterwards), each against a floor run made just
before it: total msg/s, duplicates (messages the sink received beyond N: must be 0) and
peak RSS per process. ``--runs K`` repeats the single-process DKIM-off comparisons.
"""

from __future__ import annotations

import argparse
import asyncio
import http.server
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

REGIONS = ["Asia-Pacific", "Europe", "Middle East", "Global Crises"]
# Region preferences of the synthetic list: several editions, most readers take everything.
PREFS: list[list[str] | None] = [
    None,
    None,
    None,
    ["Europe"],
    ["Asia-Pacific", "Middle East"],
    ["Global Crises"],
    ["Europe", "Middle East"],
]
EDITION = "2026-11-27"
ARTICLES = 20  # a realistic round-up: ~20 articles in 5 sections


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def feed_xml(n_items: int, offset: int = 0) -> str:
    base = datetime(2026, 11, 27, 15, tzinfo=UTC)
    items = []
    cats = [*REGIONS, "Opinion"]
    for i in range(n_items):
        cat = cats[i % len(cats)]
        pub = (base - timedelta(hours=7 * i + offset)).strftime("%a, %d %b %Y %H:%M:%S +0000")
        dek = (
            "A realistic standfirst about events in the region, long enough to wrap over "
            "two or three lines in a mail client, with some detail. "
        ) * 2
        items.append(
            f"<item><title>{escape(cat)} analysis {offset}-{i}: what the week's events mean</title>"
            f"<link>https://news.example.org/{offset}/{i}</link><pubDate>{pub}</pubDate>"
            f"<category>{escape(cat)}</category><dc:creator>Correspondent {i}</dc:creator>"
            f"<description>{escape(dek)}</description>"
            f'<media:content url="https://news.example.org/img/{i}.jpg" medium="image"/></item>'
        )
    return (
        '<?xml version="1.0"?><rss version="2.0" xmlns:media="http://search.yahoo.com/mrss/" '
        'xmlns:dc="http://purl.org/dc/elements/1.1/"><channel><title>Bench</title>'
        "<link>https://news.example.org/</link><description>b</description>"
        + "".join(items)
        + "</channel></rss>"
    )


def write_config(
    folder: Path,
    port: int,
    concurrency: int,
    feeds: list[str],
    dkim: bool,
    db_url: str = "sqlite:///digest.db",
) -> Path:
    dkim_section = ""
    if dkim:
        dkim_section = (
            '\n[dkim]\ndomain = "news.example.org"\nselector = "bench"\n'
            'private_key_path = "dkim.pem"\n'
        )
    feed_lines = "".join(f'\n[[feeds]]\nurl = "{f}"\n' for f in feeds)
    text = textwrap.dedent(f"""
        [publication]
        name = "The Bench Desk"
        url = "https://news.example.org"
        postal_address = "1 Bench Street, Benchville"
        [newsletter]
        title = "The Weekly Round-up"
        sender = "The Bench Desk <roundup@news.example.org>"
        regions = {REGIONS!r}
        [database]
        url = "{db_url}"
        [smtp]
        host = "127.0.0.1"
        port = {port}
        concurrency = {concurrency}
        [schedule]
        timezone = "America/New_York"
        [unsubscribe]
        base_url = "https://news.example.org/u"
        secret = "bench-secret-0123456789abcdef"
        """).replace("'", '"')
    path = folder / "config.toml"
    path.write_text(text + dkim_section + feed_lines, encoding="utf-8")
    return path


def digest_cmd(config: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "digest", "--config", str(config), *args]


def run_isolated(cmd: list[str]) -> tuple[float, float, str]:
    """Run ``cmd`` through a tiny wrapper so its peak RSS is measured alone."""
    wrapper = (
        "import os,resource,subprocess,sys,time,json;"
        "t=time.perf_counter();p=subprocess.run(sys.argv[1:],capture_output=True,text=True);"
        "w=time.perf_counter()-t;"
        "print(json.dumps({'rc':p.returncode,'wall':w,'out':p.stdout,'err':p.stderr,"
        "'rss':resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss/1024}))"
    )
    import json

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    res = subprocess.run(
        [sys.executable, "-c", wrapper, *cmd], capture_output=True, text=True, env=env
    )
    data = json.loads(res.stdout)
    if data["rc"] != 0:
        sys.exit(f"command failed ({data['rc']}): {' '.join(cmd)}\n{data['err']}")
    return data["wall"], data["rss"], data["out"]


class Sink:
    """Postfix's smtp-sink on a loopback port, counting the messages it accepts."""

    def __init__(self) -> None:
        exe = shutil.which("smtp-sink") or "/usr/sbin/smtp-sink"
        if not Path(exe).exists():
            sys.exit(
                "smtp-sink not found: install Postfix's tools (Debian: apt-get install postfix)"
            )
        self.port = free_port()
        # -c: a running counter ("… mesg=N") on stdout; 1000: listen backlog.
        fd, name = tempfile.mkstemp(prefix="digest-bench-sink-")
        self.counter = Path(name)
        self.proc = subprocess.Popen(
            [exe, "-c", "-u", "nobody", f"127.0.0.1:{self.port}", "1000"],
            stdout=fd,
            stderr=subprocess.PIPE,
        )
        os.close(fd)
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.1).close()
                return
            except OSError:
                time.sleep(0.05)
        sys.exit("smtp-sink did not start")

    def count(self) -> int:
        """Messages accepted so far."""
        tail = self.counter.read_bytes()[-200:].decode("ascii", "replace")
        found = re.findall(r"mesg=(\d+)", tail)
        return int(found[-1]) if found else 0

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(5)
        self.counter.unlink()


async def floor_loop(port: int, messages: list[bytes], n: int, k: int) -> float:
    """The bare aiosmtplib loop: pre-built bytes, K long-lived connections."""
    import aiosmtplib

    counter = iter(range(n))

    async def worker() -> None:
        smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=port)
        await smtp.connect()
        for i in counter:
            message = messages[i % len(messages)]
            await smtp.sendmail("roundup@news.example.org", [f"r{i}@example.org"], message)
        await smtp.quit()

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(k)))
    return time.perf_counter() - t0


def smtp_source(port: int, n: int, k: int, size: int) -> float | None:
    exe = shutil.which("smtp-source") or "/usr/sbin/smtp-source"
    if not Path(exe).exists():
        return None
    t0 = time.perf_counter()
    subprocess.run(
        [
            exe,
            "-d",
            "-s",
            str(k),
            "-m",
            str(n),
            "-l",
            str(size),
            "-f",
            "roundup@news.example.org",
            "-t",
            "r@example.org",
            f"127.0.0.1:{port}",
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return time.perf_counter() - t0


def prepare_db(folder: Path, config: Path, n: int) -> None:
    """Schema, articles and N subscribers (bulk insert; the CSV import is timed apart)."""
    from digest import pipeline, store
    from digest.config import load_config
    from digest.models import SubscriberStatus

    cfg = load_config(config)
    pipeline.init_db(cfg)
    app = pipeline.open_app(cfg)
    assert pipeline.fetch(app).ok
    now = datetime.now(UTC)
    with app.sessions() as session:
        for start in range(0, n, 10_000):
            store.add_subscribers(
                session,
                [
                    {
                        "email": f"reader{i}@example.org",
                        "name": f"Reader {i}",
                        "regions": PREFS[i % len(PREFS)],
                        "status": SubscriberStatus.ACTIVE,
                        "source": "bench",
                        "created_at": now,
                        "updated_at": now,
                        "hard_bounces": 0,
                    }
                    for i in range(start, min(n, start + 10_000))
                ],
            )
        session.commit()
    app.engine.dispose()


def bench_digest(n: int, k: int, port: int, dkim: bool) -> dict[str, float]:
    folder = Path(tempfile.mkdtemp(prefix="digest-bench-"))
    (folder / "feed.xml").write_text(feed_xml(ARTICLES), encoding="utf-8")
    config = write_config(folder, port, k, ["feed.xml"], dkim)
    if dkim:
        from digest.dkimsign import keygen

        keygen(folder / "dkim.pem")
    prepare_db(folder, config, n)
    wall, rss, out = run_isolated(digest_cmd(config, "send", "--date", EDITION))
    sent = int(out.split("this run: ")[1].split(" sent")[0])
    if sent != n:
        sys.exit(f"digest sent {sent} of {n}:\n{out}")
    shutil.rmtree(folder)
    return {"wall": wall, "rate": n / wall, "rss": rss}


def sample_messages(port: int, k: int) -> list[bytes]:
    """Real personalized round-ups, one per region preference in PREFS (same mix as the list).

    The floor and the limit send these, so all three move the same bytes per message.
    """
    folder = Path(tempfile.mkdtemp(prefix="digest-bench-"))
    (folder / "feed.xml").write_text(feed_xml(ARTICLES), encoding="utf-8")
    config = write_config(folder, port, k, ["feed.xml"], dkim=False)
    prepare_db(folder, config, len(PREFS))
    out = []
    for i in range(len(PREFS)):
        path = folder / f"m{i}.eml"
        run_isolated(
            digest_cmd(
                config,
                "preview",
                "--date",
                EDITION,
                "--format",
                "eml",
                "--subscriber",
                f"reader{i}@example.org",
                "--out",
                str(path),
            )
        )
        out.append(path.read_bytes())
    shutil.rmtree(folder)
    return out


def bench_import(n: int) -> float:
    folder = Path(tempfile.mkdtemp(prefix="digest-bench-"))
    (folder / "feed.xml").write_text(feed_xml(5), encoding="utf-8")
    config = write_config(folder, 25, 1, ["feed.xml"], dkim=False)
    from digest import pipeline
    from digest.config import load_config

    pipeline.init_db(load_config(config))
    with (folder / "list.csv").open("w", encoding="utf-8") as f:
        f.write("email,name,regions\n")
        for i in range(n):
            prefs = PREFS[i % len(PREFS)]
            f.write(f"reader{i}@example{i % 500}.org,Reader {i},{';'.join(prefs or [])}\n")
    wall, _, out = run_isolated(
        digest_cmd(config, "subscribers", "import", str(folder / "list.csv"))
    )
    assert f"{n} added" in out, out
    shutil.rmtree(folder)
    return wall


def bench_fetch(n_feeds: int) -> float:
    folder = Path(tempfile.mkdtemp(prefix="digest-bench-"))
    feeds = folder / "feeds"
    feeds.mkdir()
    for i in range(n_feeds):
        (feeds / f"f{i}.xml").write_text(feed_xml(30, offset=i * 1000), encoding="utf-8")

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), lambda *a: Quiet(*a, directory=str(feeds))
    )
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    urls = [f"http://127.0.0.1:{port}/f{i}.xml" for i in range(n_feeds)]
    config = write_config(folder, 25, 1, urls, dkim=False)
    from digest import pipeline
    from digest.config import load_config

    pipeline.init_db(load_config(config))
    wall, _, out = run_isolated(digest_cmd(config, "fetch"))
    server.shutdown()
    assert f"total: {n_feeds * 30} new" in out, out
    shutil.rmtree(folder)
    return wall


def pg_schema(base_url: str) -> tuple[str, Any]:
    """A fresh schema on ``base_url``'s database: its URL and a function dropping it."""
    import secrets

    from sqlalchemy import create_engine, text

    schema = f"digest_bench_{secrets.token_hex(4)}"
    admin = create_engine(base_url)
    with admin.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))

    def drop() -> None:
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()

    sep = "&" if "?" in base_url else "?"
    return f"{base_url}{sep}options=-csearch_path%3D{schema}", drop


def bench_digest_pg(n: int, k: int, sink: Sink, base_url: str, procs: int) -> dict[str, Any]:
    """``procs`` `digest send` processes at once on one issue in PostgreSQL."""
    import json

    folder = Path(tempfile.mkdtemp(prefix="digest-bench-"))
    (folder / "feed.xml").write_text(feed_xml(ARTICLES), encoding="utf-8")
    url, drop = pg_schema(base_url)
    try:
        config = write_config(folder, sink.port, k, ["feed.xml"], dkim=False, db_url=url)
        prepare_db(folder, config, n)
        # Build the issue and its ledger first, so the processes start on equal terms.
        run_isolated(digest_cmd(config, "send", "--date", EDITION, "--dry-run"))
        before = sink.count()
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        wrapper = (
            "import resource,subprocess,sys,time,json;"
            "t=time.perf_counter();p=subprocess.run(sys.argv[1:],capture_output=True,text=True);"
            "w=time.perf_counter()-t;"
            "u=resource.getrusage(resource.RUSAGE_CHILDREN);"
            "print(json.dumps({'rc':p.returncode,'wall':w,'out':p.stdout,'err':p.stderr,"
            "'rss':u.ru_maxrss/1024,'cpu':u.ru_utime+u.ru_stime}))"
        )
        cmd = digest_cmd(config, "send", "--date", EDITION)
        t0 = time.perf_counter()
        running = [
            subprocess.Popen(
                [sys.executable, "-c", wrapper, *cmd], stdout=subprocess.PIPE, text=True, env=env
            )
            for _ in range(procs)
        ]
        results = [json.loads(p.communicate()[0]) for p in running]
        wall = time.perf_counter() - t0
        received = sink.count() - before
    finally:
        drop()
        shutil.rmtree(folder)
    sent = []
    for r in results:
        if r["rc"] != 0:
            sys.exit(f"digest send failed ({r['rc']}):\n{r['err']}")
        sent.append(int(r["out"].split("this run: ")[1].split(" sent")[0]))
    if sum(sent) != n:
        sys.exit(f"the processes sent {sent}, not {n} in all")
    return {
        "wall": wall,
        "rate": n / wall,
        "dups": received - n,
        "rss": [r["rss"] for r in results],
        "cpu": [r["cpu"] for r in results],
        "sent": sent,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--subscribers", type=int, default=100_000)
    parser.add_argument("--connections", type=int, default=20)
    parser.add_argument("--skip-dkim", action="store_true")
    parser.add_argument(
        "--skip-extras", action="store_true", help="skip the import and fetch timings"
    )
    parser.add_argument(
        "--postgres",
        metavar="URL",
        help="also run 1 and 2 processes on PostgreSQL (a schema of their own), e.g. "
        "postgresql+psycopg://postgres@127.0.0.1:5432/test",
    )
    parser.add_argument(
        "--skip-sqlite", action="store_true", help="only the PostgreSQL runs (with --postgres)"
    )
    parser.add_argument(
        "--runs", type=int, default=1, help="repeat the single-process DKIM-off runs"
    )
    args = parser.parse_args()
    n, k = args.subscribers, args.connections
    print(f"machine: {os.cpu_count()} cores; N = {n:,} subscribers; {k} connections")
    print(f"load average at the start: {os.getloadavg()[0]:.2f}")
    sink = Sink()
    try:
        messages = sample_messages(sink.port, k)
        size = sum(len(m) for m in messages) // len(messages)
        print(
            f"message size: {size:,} bytes on average over {len(messages)} editions "
            f"(full edition {len(messages[0]):,})"
        )
        limit_wall = smtp_source(sink.port, n, k, size)
        limit = n / limit_wall if limit_wall else float("nan")
        # Each digest run is compared with a floor run made just before it: on a small
        # shared machine the speed drifts over minutes more than the gap being measured.
        rows = []
        small = None
        if not args.skip_sqlite:
            small = bench_digest(max(1, n // 10), k, sink.port, dkim=False)
            runs = [("digest send (DKIM off)", False)] * args.runs
            if not args.skip_dkim:
                runs.append(("digest send (DKIM on)", True))
            for name, dkim in runs:
                floor = n / asyncio.run(floor_loop(sink.port, messages, n, k))
                result = bench_digest(n, k, sink.port, dkim=dkim)
                result["floor"] = floor
                rows.append((name, result))
        pg_rows = []
        if args.postgres:
            for procs in [1] * args.runs + [2]:
                floor = n / asyncio.run(floor_loop(sink.port, messages, n, k))
                result = bench_digest_pg(n, k, sink, args.postgres, procs)
                result["floor"] = floor
                pg_rows.append((procs, result))
    finally:
        sink.stop()
    print()
    print(f"{'':34} {'msg/s':>9} {'wall s':>8} {'peak RSS MB':>12} {'/floor':>7} {'/limit':>7}")
    print(f"{'smtp-source -d (limit)':34} {limit:9.0f} {limit_wall or 0:8.1f}")
    for name, r in rows:
        print(f"{'aiosmtplib sendmail (floor)':34} {r['floor']:9.0f} {n / r['floor']:8.1f}")
        print(
            f"{name + ', SQLite':34} {r['rate']:9.0f} {r['wall']:8.1f} {r['rss']:12.1f} "
            f"{r['rate'] / r['floor']:7.2f} {r['rate'] / limit:7.2f}"
        )
    for procs, r in pg_rows:
        rss = " + ".join(f"{x:.1f}" for x in r["rss"])
        print(f"{'aiosmtplib sendmail (floor)':34} {r['floor']:9.0f} {n / r['floor']:8.1f}")
        print(
            f"{f'digest send x{procs}, PostgreSQL':34} {r['rate']:9.0f} {r['wall']:8.1f} "
            f"{rss:>12} {r['rate'] / r['floor']:7.2f} {r['rate'] / limit:7.2f}"
            f"   duplicates {r['dups']}, sent per process {r['sent']}, "
            f"CPU s per process {[round(c, 1) for c in r['cpu']]}"
        )
    print(f"load average at the end: {os.getloadavg()[0]:.2f}")
    ones = [r["rate"] for p, r in pg_rows if p == 1]
    twos = [r["rate"] for p, r in pg_rows if p == 2]
    if ones and twos:
        print(f"PostgreSQL: 2 processes / 1 process = {twos[0] / ones[-1]:.2f}")
    if rows and small is not None:
        full = rows[0][1]
        print(
            f"peak RSS of digest send: {small['rss']:.1f} MB at N={max(1, n // 10):,}, "
            f"{full['rss']:.1f} MB at N={n:,} (+{full['rss'] - small['rss']:.1f} MB)"
        )
    if not args.skip_extras:
        print(f"CSV import of {n:,} subscribers: {bench_import(n):.1f} s")
        print(f"fetch of 50 feeds from loopback: {bench_fetch(50):.1f} s")


if __name__ == "__main__":
    main()
