"""The composed pieces one command needs (:class:`App`), opened from the config, and
the schema set up or upgraded (:func:`init_db`).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from digest import store
from digest.config import Config


@dataclass
class App:
    """The composed pieces one command needs."""

    config: Config
    engine: Engine
    sessions: sessionmaker[Session]


def open_app(config: Config, *, check_schema: bool = True) -> App:
    """Open the database named by the config (checking it is initialised)."""
    engine = store.open_engine(config.database.url)
    if check_schema:
        store.check_schema(engine)
    return App(config, engine, store.session_factory(engine))


def init_db(config: Config) -> str:
    """Create or upgrade the schema; return the revision now in place."""
    engine = store.open_engine(config.database.url)
    try:
        return store.migrate(engine)
    finally:
        engine.dispose()


def today(config: Config) -> date:
    """Today's date in the schedule's time zone (the default edition date)."""
    return datetime.now(config.schedule.tz).date()
