# ruff: noqa: F811  (fixtures imported from tests/webutil.py are test parameters here)
"""The consent record: source (import/signup), subscribed and confirmed times, in
``subscribers export`` (extra columns at the end) and ``subscribers list``."""

from __future__ import annotations

import csv
import io
import json
from datetime import datetime

from click.testing import CliRunner, Result

from digest.cli import main
from tests.webutil import (
    WebEnv,
    body_text,
    link,
    sqlite_env,  # noqa: F401
    subscribe,
    wait_for,
)


def run(env: WebEnv, *args: str) -> Result:
    return CliRunner().invoke(main, ["--config", str(env.config_path), *args])


def test_export_and_list_show_how_and_when_each_subscriber_consented(
    sqlite_env: WebEnv,
) -> None:
    env = sqlite_env
    csv_path = env.config_path.parent / "list.csv"
    csv_path.write_text("email,name,regions\nimported@example.org,Imp,\n", encoding="utf-8")
    imported = run(env, "subscribers", "import", str(csv_path))
    assert imported.exit_code == 0, imported.output
    with env.client() as client:
        subscribe(client, "signed@example.org", name="Sig", regions=["Europe"])
        wait_for(lambda: env.smtp.to("signed@example.org"), "the confirmation mail")
        client.post(link(body_text(env.smtp.to("signed@example.org")[0]), "confirm"))

    exported = run(env, "subscribers", "export")
    assert exported.exit_code == 0 and exported.exception is None
    lines = exported.stdout.splitlines()
    assert lines[0] == "email,name,regions,status,source,subscribed_at,confirmed_at"
    rows = {r["email"]: r for r in csv.DictReader(io.StringIO(exported.stdout))}
    imp, sig = rows["imported@example.org"], rows["signed@example.org"]
    assert (imp["name"], imp["regions"], imp["status"], imp["source"]) == (
        "Imp",
        "",
        "active",
        "import",
    )
    assert datetime.fromisoformat(imp["subscribed_at"]).tzinfo is not None
    assert imp["confirmed_at"] == ""
    assert (sig["regions"], sig["source"]) == ("Europe", "signup")
    assert datetime.fromisoformat(sig["subscribed_at"]) <= datetime.fromisoformat(
        sig["confirmed_at"]
    )

    listed = run(env, "subscribers", "list")
    assert listed.exit_code == 0
    line = next(x for x in listed.stdout.splitlines() if x.startswith("signed@example.org"))
    assert line.split()[:5] == ["signed@example.org", "active", "Europe", "Sig", "signup"]
    assert line.split()[6] == sig["confirmed_at"]
    line = next(x for x in listed.stdout.splitlines() if x.startswith("imported@example.org"))
    assert line.endswith("  -")  # never confirmed
    as_json = json.loads(run(env, "subscribers", "list", "--json").stdout)["subscribers"]
    by_email = {s["email"]: s for s in as_json}
    assert by_email["signed@example.org"]["confirmed_at"] == sig["confirmed_at"]
    assert by_email["signed@example.org"]["source"] == "signup"
    assert by_email["imported@example.org"]["confirmed_at"] is None

    # The export re-imports as it is: the consent columns are accepted and ignored.
    backup = env.config_path.parent / "backup.csv"
    backup.write_text(exported.stdout, encoding="utf-8")
    again = run(env, "subscribers", "import", str(backup))
    assert again.exit_code == 0 and "0 added, 0 updated, 2 unchanged" in again.stdout
