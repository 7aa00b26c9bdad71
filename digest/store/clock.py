"""The database's clock, and who we are in leases.

Leases and rate windows are judged by the database's clock: hosts' clocks drift, and a
lease is only as good as the clock both its holder and its taker read.
"""

from __future__ import annotations

import os
import secrets
import socket
from datetime import datetime

from sqlalchemy import ColumnElement, Float, func, literal, type_coerce

from digest.models import UTCDateTime


def db_now(dialect: str) -> ColumnElement[datetime]:
    """The database's current time as a UTC timestamp (a :class:`UTCDateTime` value)."""
    if dialect == "postgresql":
        # clock_timestamp(), not now(): now() is frozen at the start of the transaction.
        return type_coerce(func.timezone("UTC", func.clock_timestamp()), UTCDateTime)
    return type_coerce(func.strftime("%Y-%m-%d %H:%M:%f000", "now"), UTCDateTime)


def db_after(dialect: str, seconds: float) -> ColumnElement[datetime]:
    """The database's current time plus ``seconds`` (a :class:`UTCDateTime` value)."""
    if dialect == "postgresql":
        later = func.timezone("UTC", func.clock_timestamp()) + func.make_interval(
            0, 0, 0, 0, 0, 0, literal(float(seconds), Float)
        )
        return type_coerce(later, UTCDateTime)
    # SQLite stores these as text in the same format, which sorts like the times.
    return type_coerce(
        func.strftime("%Y-%m-%d %H:%M:%f000", "now", f"{seconds:+.3f} seconds"), UTCDateTime
    )


def db_epoch(dialect: str) -> ColumnElement[float]:
    """The database's current time in seconds since the epoch."""
    if dialect == "postgresql":
        return type_coerce(func.extract("epoch", func.clock_timestamp()), Float)
    return type_coerce((func.julianday("now") - 2440587.5) * 86400.0, Float)


def new_worker_id() -> str:
    """A process's identity in leases: ``host:pid:random``.

    The random part keeps two processes apart even when hostnames repeat (containers)
    and pids are reused: sharing an id is how two nodes each end up "the leader".
    """
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
