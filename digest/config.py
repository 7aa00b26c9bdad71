"""The typed configuration, loaded once at the edge.

``load_config(path)`` is the only place that reads the config file or the environment
(``DIGEST_CONFIG``, ``password_env``, ``secret_env``, ``old_secrets_env``); every other
module receives a :class:`Config`. Every error names the file and the key, and says how to fix it.
"""

from __future__ import annotations

import difflib
import os
import re
import tomllib
from datetime import tzinfo
from pathlib import Path
from typing import Any, Literal, get_args
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from digest.crontab import CrontabTrigger, check_crontab
from digest.errors import ConfigError

DEFAULT_CONFIG_NAME = "config.toml"
CONFIG_ENV = "DIGEST_CONFIG"


class _Section(BaseModel):
    # extra="forbid" turns a misspelt key into an error instead of a silently ignored setting.
    model_config = ConfigDict(extra="forbid", frozen=True)


class Publication(_Section):
    name: str
    url: str
    postal_address: str


class Newsletter(_Section):
    title: str
    sender: str
    reply_to: str | None = None
    regions: list[str] = Field(min_length=1)
    catch_all: str = "Also this week"
    lookback_days: int = Field(default=7, ge=1, le=366)
    max_per_region: int = Field(default=5, ge=1, le=100)
    subject: str | None = None
    templates_dir: Path | None = None

    @field_validator("regions")
    @classmethod
    def _unique_regions(cls, regions: list[str]) -> list[str]:
        seen: set[str] = set()
        for region in regions:
            key = region.strip().casefold()
            if not key:
                raise ValueError("region names must not be empty")
            if key in seen:
                raise ValueError(f"region {region!r} is listed twice")
            seen.add(key)
        return [r.strip() for r in regions]

    @field_validator("sender", "reply_to")
    @classmethod
    def _address(cls, value: str | None) -> str | None:
        if value is None:
            return None
        from email.utils import parseaddr

        _, addr = parseaddr(value)
        if "@" not in addr or any(c in value for c in "\r\n"):
            raise ValueError(f"{value!r} is not an address; write it as 'Name <user@example.org>'")
        return value


class Database(_Section):
    url: str = "sqlite:///digest.db"


class SMTP(_Section):
    host: str = "localhost"
    port: int = Field(default=25, ge=1, le=65535)
    security: Literal["none", "starttls", "tls"] = "none"
    username: str | None = None
    password_env: str | None = None
    concurrency: int = Field(default=4, ge=1, le=100)
    timeout_seconds: float = Field(default=30.0, gt=0)
    # RFC 5321 4.5.3.2.6: a client should wait 10 minutes for the reply to the final ".";
    # giving up earlier is what turns a slow server into duplicate deliveries.
    data_timeout_seconds: float = Field(default=600.0, gt=0)
    max_attempts: int = Field(default=4, ge=1, le=20)
    retry_base_seconds: float = Field(default=2.0, ge=0)
    # The relay's quotas, shared by every worker on the database (0 = unlimited).
    max_per_second: int = 0
    max_per_hour: int = 0
    max_per_day: int = 0

    @field_validator("max_per_second", "max_per_hour", "max_per_day", mode="before")
    @classmethod
    def _limit(cls, value: Any) -> Any:
        # Strict: 100.5 or "100" is a mistake to point at, not a number to round.
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(
                f"must be a whole number of messages, 0 or more (0 = unlimited); got {value!r}"
            )
        return value


class Send(_Section):
    # A worker's claim on its deliveries lasts this long without a renewal; the heartbeat
    # renews it every third of it, so a dead worker's rows return to the pool this fast.
    lease_seconds: int = 60

    @field_validator("lease_seconds", mode="before")
    @classmethod
    def _lease(cls, value: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, int) or value < 5:
            raise ValueError(f"must be a whole number of seconds, 5 or more; got {value!r}")
        return value


class Outbox(_Section):
    # A Maildir folder (relative paths: beside the config file) instead of an SMTP relay.
    path: Path


class Schedule(_Section):
    send_cron: str = "0 9 * * fri"
    timezone: str = "UTC"
    fetch_interval_minutes: int = Field(default=60, ge=1)
    misfire_grace_hours: float = Field(default=12, ge=0)

    @field_validator("timezone")
    @classmethod
    def _zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(
                f"unknown time zone {value!r}; use an IANA name such as 'Europe/London'"
            ) from None
        return value

    @field_validator("send_cron")
    @classmethod
    def _cron(cls, value: str) -> str:
        try:
            check_crontab(value)
        except ValueError as exc:
            raise ValueError(
                f"{value!r} is not a cron expression ({exc}); write five fields, "
                "e.g. '0 9 * * fri' for Fridays at 09:00"
            ) from None
        return value

    @property
    def tz(self) -> tzinfo:
        """The schedule's time zone."""
        return ZoneInfo(self.timezone)

    def cron_trigger(self) -> CrontabTrigger:
        """The APScheduler trigger for ``send_cron`` in ``timezone`` (crontab meaning)."""
        return CrontabTrigger(self.send_cron, self.tz)


class Unsubscribe(_Section):
    base_url: str
    secret: str | None = None
    secret_env: str | None = None
    # Secrets used before: links signed with them keep working (rotation).
    old_secrets: list[str] = []
    old_secrets_env: str | None = None
    mailto: str | None = None

    @field_validator("base_url")
    @classmethod
    def _http(cls, value: str) -> str:
        if not re.match(r"^https?://[^\s/]+", value):
            raise ValueError(f"{value!r} must be an http(s) URL where `digest serve` is reachable")
        if len(value) > 500:
            # The link (plus a ~100-character token) goes on a List-Unsubscribe header
            # line, which must stay within 998 octets.
            raise ValueError("must be at most 500 characters (it is part of a mail header line)")
        return value.rstrip("/")


class Signup(_Section):
    """``[signup]``: the public signup form of ``digest serve`` (double opt-in)."""

    enabled: bool = True
    confirm_ttl_hours: int = Field(default=72, ge=1, le=24 * 30)
    max_per_ip_per_hour: int = Field(default=20, ge=1, le=100_000)
    # Peers whose X-Forwarded-For is believed (addresses or networks, e.g. "10.0.0.0/8").
    trusted_proxies: list[str] = []

    @field_validator("trusted_proxies")
    @classmethod
    def _networks(cls, values: list[str]) -> list[str]:
        import ipaddress

        for value in values:
            try:
                ipaddress.ip_network(value.strip(), strict=False)
            except ValueError:
                raise ValueError(
                    f"{value!r} is not an IP address or network; write e.g. '127.0.0.1' "
                    "or '10.0.0.0/8'"
                ) from None
        return [v.strip() for v in values]


class Archive(_Section):
    """``[archive]``: the public web archive of sent round-ups."""

    enabled: bool = True


class Feed(_Section):
    url: str
    name: str | None = None

    @property
    def label(self) -> str:
        """How messages name this feed."""
        return self.name or self.url


class SubscriberEntry(_Section):
    email: str
    name: str | None = None
    regions: list[str] | None = None


class DKIM(_Section):
    domain: str
    selector: str
    private_key_path: Path | None = None
    private_key_env: str | None = None


class Editorial(_Section):
    """The editor's week: drafts ahead of the send, approval and test copies."""

    approval: Literal["auto", "required"] = "auto"
    draft_ahead_hours: float = Field(default=24, ge=0, le=24 * 6)
    editors: list[str] = Field(default=[], max_length=10)

    @field_validator("editors")
    @classmethod
    def _addresses(cls, editors: list[str]) -> list[str]:
        from digest.addresses import unique_addresses

        return unique_addresses(editors)


class Config(_Section):
    """The whole configuration; see ``config.example.toml`` for every key."""

    publication: Publication
    newsletter: Newsletter
    database: Database = Database()
    smtp: SMTP = SMTP()
    send: Send = Send()
    schedule: Schedule = Schedule()
    unsubscribe: Unsubscribe
    signup: Signup = Signup()
    archive: Archive = Archive()
    feeds: list[Feed] = []
    subscribers: list[SubscriberEntry] = []
    dkim: DKIM | None = None
    outbox: Outbox | None = None
    editorial: Editorial = Editorial()
    # Set by load_config, not by the file: where relative paths were resolved and secrets
    # read from the environment at load time.
    path: Path | None = None
    smtp_password: str | None = None
    unsubscribe_secret: str | None = None
    unsubscribe_old_secrets: tuple[str, ...] = ()

    @model_validator(mode="after")
    def _subscriber_regions(self) -> Config:
        known = {r.casefold() for r in self.newsletter.regions}
        for i, sub in enumerate(self.subscribers):
            for region in sub.regions or []:
                if region.strip().casefold() not in known:
                    raise ValueError(
                        f"subscribers[{i}].regions: {region!r} is not in newsletter.regions "
                        f"({', '.join(self.newsletter.regions)})"
                    )
        return self

    @model_validator(mode="after")
    def _one_transport(self) -> Config:
        # model_fields_set holds the sections the file gave, not the defaulted ones: an
        # [outbox] with the built-in SMTP defaults is fine, with an [smtp] table it is not.
        if self.outbox is not None and "smtp" in self.model_fields_set:
            raise ValueError(
                "both [smtp] and [outbox] are set: keep [outbox] to write messages into a "
                "folder, or [smtp] to send them through a mail server, and remove the other"
            )
        return self

    @property
    def base_dir(self) -> Path:
        """The folder relative paths resolve against."""
        return self.path.parent if self.path else Path.cwd()


# --- loading -----------------------------------------------------------------------------


def default_config_path() -> Path:
    """``$DIGEST_CONFIG`` if set, else ``./config.toml``."""
    return Path(os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG_NAME)


_PRIVATE_KEYS = ("path", "smtp_password", "unsubscribe_secret", "unsubscribe_old_secrets")


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The section model that holds the key at ``loc`` (``("feeds", 0, "nmae")`` → Feed)."""
    model: type[BaseModel] = Config
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(str(part))
        if field is None:
            return None
        inner = [field.annotation, *get_args(field.annotation)]
        inner += [a for t in inner for a in get_args(t)]  # list[Feed] | None, …
        found = [t for t in inner if isinstance(t, type) and issubclass(t, BaseModel)]
        if not found:
            return None
        model = found[0]
    return model


def _suggestion(loc: tuple[Any, ...]) -> str | None:
    """The valid key nearest to a misspelt one, if any is near enough."""
    model = _model_at(loc)
    if model is None:
        return None
    valid = [k for k in model.model_fields if model is not Config or k not in _PRIVATE_KEYS]
    close = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.6)
    if not close:
        # Case slips ("Title") are typos too, whatever difflib's ratio says.
        close = [k for k in valid if k.casefold() == str(loc[-1]).casefold()]
    return close[0] if close else None


def _key_name(loc: tuple[Any, ...]) -> str:
    # Lists appear as ("feeds", 0, "url"); show them as feeds[0].url.
    key = ""
    for part in (str(p) for p in loc):
        key += f"[{part}]" if part.isdigit() else (f".{part}" if key else part)
    return key


def _describe(error: dict[str, Any]) -> str:
    loc = tuple(error["loc"])
    key = _key_name(loc)
    kind = error["type"]
    if kind == "extra_forbidden":
        section = key.rsplit(".", 1)[0] if "." in key else "the top level"
        near = _suggestion(loc)
        if near is not None:
            return f"unknown key '{key}' — did you mean '{near}'?"
        return f"unknown key '{key}': remove it or check its spelling in [{section}]"
    if kind == "missing":
        return f"missing key '{key}': add it (see config.example.toml)"
    msg = str(error["msg"]).removeprefix("Value error, ")
    if "input" in error and kind not in ("value_error",) and not isinstance(error["input"], dict):
        return f"key '{key}': {msg} (got {error['input']!r})" if key else msg
    return f"key '{key}': {msg}" if key else msg


def _explain(errors: list[dict[str, Any]]) -> str:
    """One line for all that is wrong: misspelt keys first (a typo is usually also the
    reason a key is missing, and then both are said together), then missing keys, then
    the first other problem."""
    typos = [e for e in errors if e["type"] == "extra_forbidden"]
    missing = {tuple(e["loc"]): e for e in errors if e["type"] == "missing"}
    if not typos and not missing:
        return _describe(errors[0])
    parts = []
    for error in typos:
        text = _describe(error)
        loc = tuple(error["loc"])
        near = _suggestion(loc)
        if near is not None and missing.pop((*loc[:-1], near), None) is not None:
            text += f" ('{_key_name((*loc[:-1], near))}' is required and missing)"
        parts.append(text)
    parts += [_describe(e) for e in missing.values()]
    return "; ".join(parts[:4])


def load_config(path: Path | str | None = None) -> Config:
    """Read, validate and resolve the configuration file.

    Relative file paths (feeds, SQLite databases, DKIM keys, templates) resolve against
    the config file's folder; ``password_env``, ``secret_env`` and ``old_secrets_env``
    are read here.
    """
    cfg_path = Path(path) if path is not None else default_config_path()
    try:
        raw = cfg_path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(
            f"{cfg_path}: no such config file; copy config.example.toml to {cfg_path} "
            f"or pass --config PATH (or set ${CONFIG_ENV})"
        ) from None
    except OSError as exc:
        raise ConfigError(f"{cfg_path}: cannot read config file: {exc.strerror}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8-sig"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{cfg_path}: not UTF-8 (byte {exc.start}); save it as UTF-8") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{cfg_path}: not valid TOML: {exc}") from None
    for private in _PRIVATE_KEYS:
        if private in data:
            raise ConfigError(f"{cfg_path}: unknown key '{private}': remove it")
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{cfg_path}: {_explain([dict(e) for e in exc.errors()])}") from None
    return _resolve(config, cfg_path.resolve())


def _resolve(config: Config, path: Path) -> Config:
    base = path.parent

    def rel(p: Path | None) -> Path | None:
        return None if p is None else (p if p.is_absolute() else base / p)

    feeds = [
        f
        if re.match(r"^https?://", f.url, re.I)
        else f.model_copy(update={"url": str(rel(Path(f.url)))})
        for f in config.feeds
    ]
    db_url = config.database.url
    m = re.match(r"^(sqlite(?:\+\w+)?:///)(?!/)(.+)$", db_url)
    if m and m.group(2) != ":memory:":
        db_url = m.group(1) + str(base / m.group(2))
    newsletter = config.newsletter.model_copy(
        update={"templates_dir": rel(config.newsletter.templates_dir)}
    )
    dkim = config.dkim
    if dkim is not None:
        dkim = dkim.model_copy(update={"private_key_path": rel(dkim.private_key_path)})

    outbox = config.outbox
    if outbox is not None:
        outbox = outbox.model_copy(update={"path": rel(outbox.path)})

    password = None
    if config.smtp.password_env:
        password = os.environ.get(config.smtp.password_env)
    secret = config.unsubscribe.secret
    if config.unsubscribe.secret_env:
        secret = os.environ.get(config.unsubscribe.secret_env) or secret
    old_secrets = list(config.unsubscribe.old_secrets)
    if config.unsubscribe.old_secrets_env:
        # Several old secrets in one variable: separated by commas or whitespace (neither
        # occurs in a secret made by secrets.token_urlsafe).
        env = os.environ.get(config.unsubscribe.old_secrets_env, "")
        old_secrets += [s for s in re.split(r"[,\s]+", env) if s]
    return config.model_copy(
        update={
            "path": path,
            "feeds": feeds,
            "database": Database(url=db_url),
            "newsletter": newsletter,
            "dkim": dkim,
            "outbox": outbox,
            "smtp_password": password,
            "unsubscribe_secret": secret or None,
            "unsubscribe_old_secrets": tuple(old_secrets),
        }
    )
