"""Named locks between digest processes on one SQLite database (lock files beside it).

PostgreSQL needs none: its senders share work through leases and its runners elect a
leader, so on PostgreSQL these locks do nothing.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from contextlib import contextmanager

import filelock
from sqlalchemy import Engine

from digest.errors import SendInProgress

log = logging.getLogger("digest")


@contextmanager
def _lock_file(engine: Engine, name: str, *, wait: bool) -> Iterator[None]:
    """Hold the lock file ``name`` beside a SQLite database file for the block.

    Free: taken at once. Held by another process: waited for (``wait``) or refused with
    :class:`SendInProgress`. PostgreSQL and in-memory databases: nothing to hold.
    """
    db = engine.url.database
    if engine.dialect.name == "postgresql" or not db or db == ":memory:":
        yield
        return
    safe = hashlib.sha1(name.encode()).hexdigest()[:12]
    lock = filelock.FileLock(f"{db}.{safe}.lock")
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        if not wait:
            raise SendInProgress(
                f"another digest process holds '{name}'; try again later"
            ) from None
        log.warning("waiting for another digest process holding '%s' to finish", name)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


@contextmanager
def exclusive_lock(engine: Engine, name: str) -> Iterator[None]:
    """Hold a named lock beside a SQLite database, or raise :class:`SendInProgress` at once.

    SQLite only (one machine is the point of SQLite): a lock file beside the database
    file. It dies with the process, so a crash never leaves it stuck. PostgreSQL needs
    none: its senders share work through leases and its runners elect a leader.
    """
    with _lock_file(engine, name, wait=False):
        yield


@contextmanager
def sqlite_turn(engine: Engine, name: str) -> Iterator[None]:
    """On SQLite, wait for the named lock (senders take turns); on PostgreSQL, nothing.

    SQLite has one writer at a time anyway; taking turns keeps a second ``send`` of the
    same date from racing the first, and it then finds nothing left to send.
    """
    with _lock_file(engine, name, wait=True):
        yield
