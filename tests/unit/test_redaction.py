"""Credentials in storage URLs are masked before they are logged or shown."""

from __future__ import annotations

import pytest

from cvops_dagster.core.redaction import redact_url


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("postgresql://cvops:s3cr%40t@db.local:5432/optuna", "postgresql://cvops:***@db.local:5432/optuna"),
        ("postgresql+psycopg2://u:p@h/db?sslmode=require", "postgresql+psycopg2://u:***@h/db?sslmode=require"),
        ("postgresql://h/db?user=u&password=hunter2", "postgresql://h/db?user=u&password=***"),
        ("mysql://root@localhost/db", "mysql://root@localhost/db"),
        ("sqlite:////tmp/optuna.db", "sqlite:////tmp/optuna.db"),
        ("/var/lib/optuna/journal.log", "/var/lib/optuna/journal.log"),
        (None, None),
    ],
)
def test_redact_url(url: str | None, expected: str | None) -> None:
    assert redact_url(url) == expected


def test_redacted_url_never_contains_the_password() -> None:
    for secret in ("hunter2", "p@ss:word", "a/b"):
        from urllib.parse import quote

        url = f"postgresql://user:{quote(secret, safe='')}@host/db"
        assert quote(secret, safe="") not in redact_url(url)  # type: ignore[operator]
