"""Progress: a bar on a terminal (a real pseudo-terminal), plain flushed lines elsewhere,
nothing but a short summary with --quiet."""

from __future__ import annotations

import contextlib
import fcntl
import os
import select
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from digest.cli import main
from digest.progress import LineMeter, meter
from tests.test_outbox import outbox_config

DIGEST = str(Path(sys.executable).with_name("digest"))
ESC = "\x1b"


def on_terminal(*args: str, cwd: Path, timeout: float = 120) -> tuple[int, str]:
    """Run digest with stdin, stdout and stderr on a pseudo-terminal; (exit code, output)."""
    leader, follower = os.openpty()
    # 120 columns, so rich draws every column of the bar.
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    env = {k: v for k, v in os.environ.items() if k not in ("DIGEST_CONFIG", "NO_COLOR")}
    env["TERM"] = "xterm-256color"
    proc = subprocess.Popen(
        [DIGEST, *args], stdin=follower, stdout=follower, stderr=follower, cwd=cwd, env=env
    )
    os.close(follower)
    out = b""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([leader], [], [], 1.0)
            if not ready:
                if proc.poll() is not None:
                    break
                continue
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: the child closed its side of the terminal
                break
            if not chunk:
                break
            out += chunk
        code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        os.close(leader)
        if proc.poll() is None:
            proc.kill()
    return code, out.decode("utf-8", "replace")


def piped(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "DIGEST_CONFIG"}
    return subprocess.run(
        [DIGEST, *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=120
    )


@pytest.fixture
def ready(tmp_path: Path, feed_file: Path) -> Path:
    """An outbox config, initialised and fetched, with 1,200 subscribers in a CSV beside it."""
    path = outbox_config(tmp_path)
    rows = "".join(f"reader{i}@example.org,Reader 🦊 {i},\n" for i in range(1200))
    (tmp_path / "readers.csv").write_text("email,name,regions\n" + rows, encoding="utf-8")
    for args in (["init"], ["fetch"]):
        assert CliRunner().invoke(main, ["--config", str(path), *args]).exit_code == 0
    return path


def test_a_terminal_gets_bars_with_count_total_rate_and_time_left(ready: Path) -> None:
    cwd = ready.parent
    code, out = on_terminal("--config", ready.name, "subscribers", "import", "readers.csv", cwd=cwd)
    assert code == 0, out
    assert "import" in out and "1200/1200" in out and "rows/s" in out and "100%" in out
    assert ESC + "[" in out and "━" in out  # drawn in place, in colour
    assert "1200 added" in out

    code, out = on_terminal("--config", ready.name, "send", "--date", "2026-11-27", cwd=cwd)
    assert code == 0, out
    # The total is known from the start (claimable deliveries): never "0/?" once counting.
    assert "1200/1200" in out and "messages/s" in out and "0:00:00" in out
    assert "this run: 1200 sent" in out
    assert len(os.listdir(cwd / "outbox" / "new")) == 1200

    code, out = on_terminal("--config", ready.name, "fetch", cwd=cwd)
    assert code == 0 and "1/1" in out and "feeds/s" in out


def test_quiet_on_a_terminal_prints_only_a_short_summary(ready: Path) -> None:
    cwd = ready.parent
    for args in (
        ["subscribers", "import", "readers.csv", "--quiet"],
        ["fetch", "--quiet"],
        ["send", "--date", "2026-11-27", "--quiet"],
    ):
        code, out = on_terminal("--config", ready.name, *args, cwd=cwd)
        assert code == 0, out
        assert ESC not in out and "━" not in out
        lines = out.strip().splitlines()
        assert 1 <= len(lines) <= 4, out
    assert lines[0].startswith("round-up 2026-11-27:") and "this run: 1200 sent" in out


def test_run_once_quiet_is_four_lines(tmp_path: Path, feed_file: Path) -> None:
    path = outbox_config(
        tmp_path,
        '\n[[subscribers]]\nemail = "a@example.org"\n[[subscribers]]\nemail = "b@example.org"\n',
    )
    code, out = on_terminal(
        "--config", path.name, "run", "--once", "--date", "2026-11-27", "--quiet", cwd=tmp_path
    )
    assert code == 0, out
    assert ESC not in out
    assert out.replace("\r\n", "\n").strip().split("\n") == [
        "feeds: 10 new, 0 updated, 0 rejected",
        "subscribers from config.toml: 2 added, 0 updated, 0 unchanged, "
        "0 kept unsubscribed, 0 rejected",
        out.split("\n")[2].rstrip("\r"),
        "this run: 2 sent, 0 failed, 0 deferred, 0 skipped, 0 retries, 1 editions rendered",
    ]
    assert out.split("\n")[2].startswith("round-up 2026-11-27: The Weekly Round-up: ")


def test_not_a_terminal_gets_no_bar_no_colour_no_carriage_return(ready: Path) -> None:
    cwd = ready.parent
    for args in (
        ["subscribers", "import", "readers.csv"],
        ["fetch"],
        ["send", "--date", "2026-11-27"],
        ["run", "--once", "--date", "2026-11-27"],
    ):
        proc = piped("--config", ready.name, *args, cwd=cwd)
        assert proc.returncode == 0, proc.stderr
        for text in (proc.stdout, proc.stderr):
            assert ESC not in text and "\r" not in text and "━" not in text
    assert "this run: 0 sent" in proc.stdout  # the send before took everyone


@pytest.fixture
def pipe() -> Iterator[tuple[int, int]]:
    r, w = os.pipe()
    os.set_blocking(r, False)
    yield r, w
    os.close(r)


def readable(fd: int) -> str:
    try:
        return os.read(fd, 65536).decode()
    except BlockingIOError:
        return ""


def test_plain_lines_come_every_ten_seconds_and_are_flushed_at_once(
    pipe: tuple[int, int],
) -> None:
    r, w = pipe
    now = [1000.0]
    # A buffered text stream, as stderr is when it is a file or a pipe under systemd.
    with os.fdopen(w, "w", buffering=8192) as stream:
        m = LineMeter("send", "messages", stream, clock=lambda: now[0])
        for t, done in [(0, 0), (3, 10), (9.9, 39)]:
            now[0] = 1000 + t
            m.update(done, 100)
        assert readable(r) == ""  # nothing before ten seconds
        now[0] = 1010.0
        m.update(40, 100)
        # Readable now, without the stream being closed: it was flushed when written.
        assert readable(r) == "digest send: 40/100 messages (40%), 4.0/s, about 15s left\n"
        now[0] = 1015.0
        m.update(60, 100)
        assert readable(r) == ""
        now[0] = 1400.0
        m.update(99, None)  # the total stays what it was
        line = readable(r)
        assert line == "digest send: 99/100 messages (99%), 0.2/s, about 4s left\n"
        assert "\r" not in line and ESC not in line


def test_unknown_totals_and_long_waits_read_well(pipe: tuple[int, int]) -> None:
    r, w = pipe
    now = [0.0]
    with os.fdopen(w, "w") as stream:
        m = LineMeter("import", "rows", stream, clock=lambda: now[0])
        now[0] = 10.0
        m.update(5000)
        assert readable(r) == "digest import: 5000 rows, 500.0/s\n"
        m2 = LineMeter("send", "messages", stream, total=100_000, clock=lambda: now[0])
        now[0] = 20.0
        m2.update(100)
        assert readable(r) == ("digest send: 100/100000 messages (0%), 10.0/s, about 2h46m left\n")


def drained_until(leader: int, marker: bytes, timeout: float = 60) -> str:
    """What the terminal showed before ``marker``, read from the pty's ``leader`` side.

    The marker is written after the output we wait for; a pty keeps order, so when the
    marker arrives everything before it has (no "wait a while and look"). Bytes are
    collected and decoded once at the end: a pty hands writes over in pieces of at most
    4095 bytes, cut anywhere, even inside a character such as the bar's "━" -- and a
    bar that lives a second or two (a loaded machine) has rich's refresh thread draw it
    10 times a second, well past 4 KB.
    """
    out = b""
    deadline = time.monotonic() + timeout
    while marker not in out:
        left = deadline - time.monotonic()
        if left <= 0:
            pytest.fail(f"the terminal never showed {marker!r}; last bytes: {out[-200:]!r}")
        select.select([leader], [], [], min(left, 1.0))
        with contextlib.suppress(BlockingIOError):  # select said readable; be sure anyway
            out += os.read(leader, 65536)
    return out[: out.index(marker)].decode("utf-8")


def test_quiet_meter_writes_nothing_even_on_a_terminal() -> None:
    leader, follower = os.openpty()
    os.set_blocking(leader, False)
    shown: dict[bool, str] = {}
    try:
        with os.fdopen(follower, "w") as tty:
            assert tty.isatty()
            for quiet in (True, False):
                with meter("send", "messages", 10, quiet=quiet, stream=tty) as m:
                    for i in range(11):
                        m.update(i)
                marker = f"[end of quiet={quiet}]"
                tty.write(marker)
                tty.flush()
                shown[quiet] = drained_until(leader, marker.encode())
    finally:
        os.close(leader)
    assert shown[True] == ""  # not a byte before the marker
    # The same meter without --quiet draws its bar, in place, to the end.
    assert "10/10" in shown[False] and ESC + "[" in shown[False] and "━" in shown[False]
