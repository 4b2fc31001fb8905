"""No credential of the database URL reaches the CLI's output, a worker's logs or an error
message: the user-info password and ``?password=``-style parameters alike are shown as
``***`` (``adapters.urls.redact_url``), on success and on failure."""

from __future__ import annotations

import logging
import os
import signal
import subprocess

import pytest
from sqlalchemy.engine import make_url

from treadle.tests.cli.cliapp import APP
from treadle.tests.cli.helpers import Invoke, started, wait_terminal
from treadle.tests.cli.test_processes import TREADLE

pytestmark = pytest.mark.postgres

SECRETS = {
    "password": "QueryPw-5b2c1e",
    "sslpassword": "SslPw-9d8e4f",
    "user-info": "UserPw-7f3a9d",
    "token": "Token-3c7a2b",
}


def _with_secrets(url: str, *, port: int | None = None, token: bool = False) -> str:
    """``url`` carrying a password in the user-info part and in the query (PostgreSQL's
    trust authentication accepts any password, so the URL still connects)."""
    query = {"password": SECRETS["password"], "sslpassword": SECRETS["sslpassword"]}
    if token:  # libpq refuses unknown options, so only a failing URL carries one
        query["token"] = SECRETS["token"]
    parsed = make_url(url).set(password=SECRETS["user-info"], query=query)
    if port is not None:
        parsed = parsed.set(port=port)
    return parsed.render_as_string(hide_password=False)


def _assert_no_secret(outputs: dict[str, str]) -> None:
    leaks = []
    for name, text in outputs.items():
        squeezed = "".join(text.split())  # a secret a table wrapped over two lines, joined
        for kind, secret in SECRETS.items():
            if secret in squeezed:
                line = next((ln for ln in text.splitlines() if secret in ln), "(wrapped)")
                leaks.append(f"{name} shows the {kind} secret: {line.strip()[:200]!r}")
    assert not leaks, "\n".join(leaks)


class Outputs:
    """Runs CLI commands in-process and keeps everything each one printed."""

    def __init__(self, invoke: Invoke) -> None:
        self.invoke = invoke
        self.texts: dict[str, str] = {}

    def run(self, name: str, *args: str, db: str, ok: bool = True) -> str:
        result = self.invoke(*args, db=db)
        self.texts[name] = result.stdout + result.stderr
        assert (result.exit_code == 0) is ok, (name, result.output)
        return result.stdout


@pytest.fixture
def outputs(invoke: Invoke, caplog: pytest.LogCaptureFixture) -> Outputs:
    caplog.set_level(logging.DEBUG)
    return Outputs(invoke)


def test_commands_print_no_credential_of_the_url(
    postgres_url: str, outputs: Outputs, caplog: pytest.LogCaptureFixture
) -> None:
    """migrate, start, runs list/show, events, tick and doctor on a URL with passwords in
    the user-info and the query print none of them (nor log them); doctor's header shows
    the URL redacted."""
    url = _with_secrets(postgres_url)
    outputs.run("migrate", "migrate", db=url)
    run_id = started(outputs.invoke("start", "greeter", '{"name": "s"}', db=url))
    waited = ("start", "greeter", '{"name": "t"}', "--wait", "--local-worker")
    outputs.run("start --wait", *waited, db=url)
    outputs.run("runs list", "runs", "list", db=url)
    outputs.run("runs show", "runs", "show", run_id, db=url)
    outputs.run("events", "events", run_id, db=url)
    outputs.run("tick", "tick", db=url)
    doctor = outputs.run("doctor", "doctor", db=url)
    outputs.run("doctor --json", "doctor", "--json", db=url)
    outputs.texts["logs"] = caplog.text
    _assert_no_secret(outputs.texts)
    assert ":***@" in doctor
    assert "?password=***&sslpassword=***" in doctor


def test_worker_logs_the_url_redacted(postgres_url: str, invoke: Invoke) -> None:
    """`treadle worker` serving a run logs worker.ready with the URL, its passwords shown
    as ***, and no secret anywhere in its output (DEBUG logs included)."""
    url = _with_secrets(postgres_url)
    assert invoke("migrate", db=url).exit_code == 0
    run_id = started(invoke("start", "greeter", '{"name": "s"}', db=url))
    worker = subprocess.Popen(
        [
            TREADLE, "--db", url, "--app", APP, "worker",
            "--orchestration-interval", "0.05", "--job-poll-interval", "0.02",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "TREADLE_LOG_LEVEL": "DEBUG"},
    )  # fmt: skip
    try:
        assert wait_terminal(postgres_url, run_id)["text"].startswith("HELLO S!")
    finally:
        worker.send_signal(signal.SIGTERM)
        stdout, stderr = worker.communicate(timeout=30)
    assert worker.returncode == 0, stderr
    _assert_no_secret({"worker": stdout + stderr})
    ready = [line for line in stderr.splitlines() if "worker.ready" in line]
    assert len(ready) == 1, stderr
    assert ":***@" in ready[0]
    assert "?password=***&sslpassword=***" in ready[0]


def test_errors_show_no_credential_of_the_url(
    postgres_url: str, outputs: Outputs, caplog: pytest.LogCaptureFixture
) -> None:
    """The errors of an unreachable server, an option libpq refuses, an unsupported
    scheme, a libpq conninfo string and a worker that cannot start name the URL without
    its credentials."""
    unreachable = _with_secrets(postgres_url, port=1, token=True)
    for args in (("runs", "list"), ("migrate",), ("doctor",), ("start", "greeter", "{}")):
        outputs.run(f"unreachable: {' '.join(args)}", *args, db=unreachable, ok=False)
    refused = _with_secrets(postgres_url, token=True)  # libpq: invalid option "token"
    outputs.run("invalid option: runs list", "runs", "list", db=refused, ok=False)
    outputs.run("invalid option: doctor", "doctor", db=refused, ok=False)
    mysql = "mysql" + unreachable[unreachable.index(":") :]
    outputs.run("unsupported scheme", "runs", "list", db=mysql, ok=False)
    conninfo = f"host=127.0.0.1 user=postgres password={SECRETS['password']} dbname=x"
    outputs.run("conninfo", "runs", "list", db=conninfo, ok=False)
    failed = subprocess.run(
        [TREADLE, "--db", unreachable, "--app", APP, "worker"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert failed.returncode == 1, failed.stderr
    assert "treadle worker:" in failed.stderr
    outputs.texts["worker: unreachable"] = failed.stdout + failed.stderr
    outputs.texts["logs"] = caplog.text
    _assert_no_secret(outputs.texts)
    assert ":***@127.0.0.1:1/" in outputs.texts["unreachable: runs list"]
