"""Every database query of digest, as named functions (``store.delivery_counts(session, id)``).

Stages never build ``select()`` statements themselves: they call these, so the queries
(and their indexes) can be read, tuned and tested in one place. Callers import the
package (``from digest import store``) and never its modules; the modules group the
queries by what they hold:

- :mod:`~digest.store.database`: the engine, migrations, sessions, dialect-portable statements;
- :mod:`~digest.store.clock`: the database's clock (leases are judged by it), worker ids;
- :mod:`~digest.store.locks`: SQLite's named locks between processes;
- :mod:`~digest.store.articles`: feeds' validators and the article store;
- :mod:`~digest.store.issues`: issues, their frozen sections, status and the archive;
- :mod:`~digest.store.firings`: the scheduler's firings and missed sends;
- :mod:`~digest.store.subscribers`: the subscriber list;
- :mod:`~digest.store.deliveries`: the delivery ledger as a whole (a worker's claims and
  leases are :mod:`digest.ledger`'s);
- :mod:`~digest.store.bounces`: hard bounces and the subscriptions they end;
- :mod:`~digest.store.signup`: signup's throttles and queued mails.

SQLAlchemy errors are translated to :class:`~digest.errors.DatabaseError` at
:func:`open_engine` and :func:`check_schema`; the rest run inside a session the caller owns.
"""

from __future__ import annotations

from digest.store.articles import (
    article_by_id,
    article_count,
    candidate_articles,
    feed_state,
    find_article,
)
from digest.store.bounces import (
    count_hard_bounce,
    delivery_for,
    failed_run_length,
    mark_delivery_bounced,
    raise_hard_bounces,
)
from digest.store.clock import (
    db_after,
    db_epoch,
    db_now,
    new_worker_id,
)
from digest.store.database import (
    MIGRATIONS,
    check_schema,
    current_revision,
    delete_all,
    drop_if_silent,
    head_revision,
    insert_ignore,
    migrate,
    open_engine,
    session_factory,
)

# Tests migrate to an older revision with it.
from digest.store.database import _alembic_config as _alembic_config
from digest.store.deliveries import (
    count_sendable,
    create_deliveries,
    delivery_counts,
    failed_deliveries,
    refresh_statistics,
    release_orphans,
    skip_unsubscribed,
    unsent_subscribers,
)
from digest.store.firings import (
    fires,
    is_missed,
    missed_sends,
    record_fire,
    record_missed_send,
)
from digest.store.issues import (
    advance_issue,
    create_issue,
    issue_for_date,
    issue_sections,
    issues_with_article,
    lock_issue,
    messages_out,
    next_unsent_issue,
    open_issues,
    published_issue,
    published_issues,
    recent_issues,
    replace_issue_articles,
    set_issue_status,
)
from digest.store.locks import (
    exclusive_lock,
    sqlite_turn,
)
from digest.store.signup import (
    claim_cooldown,
    claim_signup_mail,
    due_signup_mails,
    finish_signup_mail,
    hit_counter,
    prune_signup_mails,
    prune_throttles,
    queue_signup_mail,
    signup_mails,
    throttle_until,
)
from digest.store.subscribers import (
    active_subscribers,
    add_subscriber_if_absent,
    add_subscribers,
    iter_active_regions,
    iter_subscribers,
    subscriber_by_email,
    subscriber_by_id,
    subscriber_counts,
    subscribers_by_email,
)

__all__ = [
    "MIGRATIONS",
    "active_subscribers",
    "add_subscriber_if_absent",
    "add_subscribers",
    "advance_issue",
    "article_by_id",
    "article_count",
    "candidate_articles",
    "check_schema",
    "claim_cooldown",
    "claim_signup_mail",
    "count_hard_bounce",
    "count_sendable",
    "create_deliveries",
    "create_issue",
    "current_revision",
    "db_after",
    "db_epoch",
    "db_now",
    "delete_all",
    "delivery_counts",
    "delivery_for",
    "drop_if_silent",
    "due_signup_mails",
    "exclusive_lock",
    "failed_deliveries",
    "failed_run_length",
    "feed_state",
    "find_article",
    "finish_signup_mail",
    "fires",
    "head_revision",
    "hit_counter",
    "insert_ignore",
    "is_missed",
    "issue_for_date",
    "issue_sections",
    "issues_with_article",
    "iter_active_regions",
    "iter_subscribers",
    "lock_issue",
    "mark_delivery_bounced",
    "messages_out",
    "migrate",
    "missed_sends",
    "new_worker_id",
    "next_unsent_issue",
    "open_engine",
    "open_issues",
    "prune_signup_mails",
    "prune_throttles",
    "published_issue",
    "published_issues",
    "queue_signup_mail",
    "raise_hard_bounces",
    "recent_issues",
    "record_fire",
    "record_missed_send",
    "refresh_statistics",
    "release_orphans",
    "replace_issue_articles",
    "session_factory",
    "set_issue_status",
    "signup_mails",
    "skip_unsubscribed",
    "sqlite_turn",
    "subscriber_by_email",
    "subscriber_by_id",
    "subscriber_counts",
    "subscribers_by_email",
    "throttle_until",
    "unsent_subscribers",
]
