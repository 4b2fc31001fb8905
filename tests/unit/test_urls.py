"""redact_url and scrub: every credential a database URL carries is hidden, nothing else."""

from __future__ import annotations

import pytest

from treadle.adapters.urls import redact_url, scrub, url_secrets

CASES = [
    # (given, shown)
    ("postgresql://u:pw@db:5432/app", "postgresql://u:***@db:5432/app"),
    ("postgresql+psycopg://u:pw@db/app", "postgresql+psycopg://u:***@db/app"),
    ("postgresql://u@db/app?password=pw", "postgresql://u@db/app?password=***"),
    (
        "postgresql://u:pw@db/app?password=q&sslmode=require",
        "postgresql://u:***@db/app?password=***&sslmode=require",
    ),
    (
        "postgresql://u@db/app?sslmode=verify-full&sslpassword=kp",
        "postgresql://u@db/app?sslmode=verify-full&sslpassword=***",
    ),
    ("postgresql://u@db/app?PassWord=pw", "postgresql://u@db/app?PassWord=***"),
    ("postgresql://u@db/app?pass%77ord=pw", "postgresql://u@db/app?pass%77ord=***"),
    (
        "postgresql://u@db/app?token=t&api_key=k&access_key=a&client_secret=s&x=1",
        "postgresql://u@db/app?token=***&api_key=***&access_key=***&client_secret=***&x=1",
    ),
    ("postgresql://u@db/app?auth_token=t", "postgresql://u@db/app?auth_token=***"),
    # unescaped @ / : in the password: hidden whole, not cut at the first @
    ("postgresql://u:p@s/s:w@db/app", "postgresql://u:***@db/app"),
    ("postgresql://u:p%40ss@db/app", "postgresql://u:***@db/app"),
    ("postgresql://u:pw@h1:5432,h2:5433/app", "postgresql://u:***@h1:5432,h2:5433/app"),
    # nothing secret: unchanged
    ("postgresql://u@db:5432/app", "postgresql://u@db:5432/app"),
    ("postgresql://u:@db/app", "postgresql://u:@db/app"),
    ("postgresql://db/app?sslmode=require&application_name=w", None),
    ("postgresql://u@db/app?password=", "postgresql://u@db/app?password="),
    ("memory://", None),
    # SQLite paths: unchanged, even with '@', ':' or a secret-looking word in them
    ("sqlite:///treadle.db", None),
    ("sqlite:////var/lib/app@2024/t:1.db", None),
    ("sqlite:///token=x/pass.db", None),
    ("sqlite+aiosqlite:///./data/app.db?mode=ro", None),
    # not URLs
    ("bogus", None),
    ("", None),
    ("treadle.db", None),
    ("/srv/a@b:c/treadle.db", None),
    ("host=db user=u password=pw dbname=app", "host=db user=u password=*** dbname=app"),
    ("host=db password = 'a b' sslmode=require", "host=db password = *** sslmode=require"),
    ("u:pw@db/app", "u:***@db/app"),
]


@pytest.mark.parametrize(("given", "shown"), CASES)
def test_redact_url(given: str, shown: str | None) -> None:
    """Credentials are replaced by ***; every other part of the URL is shown as given."""
    assert redact_url(given) == (given if shown is None else shown)


@pytest.mark.parametrize(
    "given",
    [
        "postgresql://u:Hid%40den1@db/app?password=Hid+den2&sslpassword=Hid%2Fden3",
        "postgresql://u:Hid@den1@db/app?token=Hidden2&x=1&api_key=Hidden3",
        "host=db password='Hid den1' sslpassword=Hidden2",
    ],
)
def test_redact_url_leaves_no_secret(given: str) -> None:
    """No credential of the URL, raw or percent-decoded, survives in the shown form."""
    secrets = url_secrets(given)
    assert len(secrets) >= 2
    for secret in secrets:
        assert secret not in redact_url(given)


def test_redact_url_accepts_a_sqlalchemy_url() -> None:
    """A SQLAlchemy URL object (whose own rendering keeps ?password=) is redacted too."""
    from sqlalchemy.engine import make_url

    url = make_url("postgresql+psycopg://u:pw@db/app?password=q9&sslpassword=s9")
    shown = redact_url(url)
    assert "pw" not in shown
    assert "q9" not in shown
    assert "s9" not in shown
    assert shown.startswith("postgresql+psycopg://u:***@db/app?")


def test_url_secrets_lists_raw_and_decoded_values() -> None:
    """The user-info password and secret parameters, as written and decoded."""
    secrets = url_secrets("postgresql://u:p%40ss@db/app?token=t%2Bk&x=plain")
    assert set(secrets) == {"p%40ss", "p@ss", "t%2Bk", "t+k"}
    assert url_secrets("sqlite:///t.db") == []
    assert url_secrets("host=db password='a b'") == ["a b"]


def test_scrub_removes_credentials_from_any_text() -> None:
    """A driver message that echoes a credential loses it; other text is kept."""
    url = "postgresql://u:hunter2@db/app?sslpassword=k3y%21"
    message = "FATAL: bad password 'hunter2' (sslpassword k3y!) for user u"
    assert scrub(message, url) == "FATAL: bad password '***' (sslpassword ***) for user u"
    assert scrub("nothing to hide", "sqlite:///t.db") == "nothing to hide"


def test_listener_logs_driver_errors_without_credentials() -> None:
    """The LISTEN connection's connect/lost warnings scrub the URL's credentials from the
    driver's error (the listener connects with a full libpq URI of its own)."""
    from treadle.adapters.sql import PgJobListener

    listener = PgJobListener("postgresql+psycopg://u:Pw%2F1a@db/app?sslpassword=Ssl-2b")
    error = RuntimeError('connection to "db" failed: bad "Pw/1a" or "Pw%2F1a" or "Ssl-2b"')
    assert listener._describe(error) == (
        'RuntimeError(\'connection to "db" failed: bad "***" or "***" or "***"\')'
    )
