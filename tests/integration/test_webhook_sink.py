"""WebhookEventSink against a real HTTP receiver on 127.0.0.1 (the standard library's
``http.server`` in a thread): signatures a receiver verifies, per-run order across many
runs (one event per POST and batched), a receiver that fails then recovers (the outbox
retries, dead-letters, and ``plugin.replayDLQ`` re-delivers), a timeout, a redirect
that is not followed, and destinations the allow-list refuses."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from pydantic import BaseModel

from treadle import Engine, WorkflowBuilder, define_stage
from treadle.adapters.webhook import WebhookEventSink, sign_webhook, verify_webhook
from treadle.kernel.deps import KernelSettings
from treadle.kernel.errors import (
    WebhookDeliveryError,
    WebhookDestinationError,
    WebhookVerificationError,
)
from treadle.kernel.events import WorkflowCreated

pytest.importorskip("httpx")

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"

EVERY_FLUSH = KernelSettings(outbox_retry_delay=timedelta(0))
"""No backoff between attempts, so a test's consecutive flushes each retry (the outbox's
backoff is tested in tests/scenario/test_outbox.py)."""


@dataclass
class Receiver:
    """What the receiver saw and how it answers: ``mode`` is ``ok`` (204), ``fail``
    (500), ``redirect`` (302 to /elsewhere) or ``hang`` (no answer until released)."""

    url: str = ""
    mode: str = "ok"
    requests: list[dict[str, Any]] = field(default_factory=list)
    """Accepted requests: path, headers, body (bytes), verified JSON."""
    refused: int = 0
    paths: list[str] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)

    def events(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for request in self.requests:
            body = request["json"]
            out.extend(body if isinstance(body, list) else [body])
        return out


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    state = Receiver()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["content-length"]))
            state.paths.append(self.path)
            if state.mode == "hang":
                state.release.wait(10)
                return
            if state.mode == "redirect":
                self.send_response(302)
                self.send_header("location", "/elsewhere")
                self.end_headers()
                return
            if state.mode == "fail":
                state.refused += 1
                self.send_response(500)
                self.end_headers()
                self.wfile.write(b"receiver down")
                return
            verified = verify_webhook(body, dict(self.headers), SECRET)
            state.requests.append(
                {"path": self.path, "headers": dict(self.headers), "body": body, "json": verified}
            )
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}/hooks/treadle"
    try:
        yield state
    finally:
        state.release.set()
        server.shutdown()
        server.server_close()


def _sink(receiver: Receiver, **options: Any) -> WebhookEventSink:
    return WebhookEventSink(receiver.url, SECRET, allow=["127.0.0.1"], **options)


def _event(run_id: str = "run-1", sequence: int = 1) -> WorkflowCreated:
    return WorkflowCreated(
        workflow_run_id=run_id,
        sequence=sequence,
        timestamp=datetime(2026, 1, 2, tzinfo=UTC),
        workflow_id="wf",
        priority=5,
    )


# -- signatures -------------------------------------------------------------------------
def test_verify_webhook_accepts_a_signed_request_and_rejects_tampering() -> None:
    """A body signed with the secret verifies and parses; a changed body, another
    secret, a missing header or a malformed timestamp is refused."""
    body = b'{"type":"workflow:created"}'
    headers = sign_webhook(SECRET, "evt_r_1", 1_700_000_000, body)
    assert headers["webhook-signature"].startswith("v1,")
    now = 1_700_000_010.0
    assert verify_webhook(body, headers, SECRET, now=now) == {"type": "workflow:created"}
    assert verify_webhook(
        body.decode(), {k.upper(): v for k, v in headers.items()}, SECRET, now=now
    )
    with pytest.raises(WebhookVerificationError, match="no webhook-signature matches"):
        verify_webhook(body.replace(b"created", b"deleted"), headers, SECRET, now=now)
    with pytest.raises(WebhookVerificationError, match="no webhook-signature matches"):
        verify_webhook(body, headers, "whsec_b3RoZXIgc2VjcmV0", now=now)
    with pytest.raises(WebhookVerificationError, match="webhook-signature"):
        verify_webhook(body, {**headers, "webhook-signature": ""} | {}, SECRET, now=now)
    missing = {k: v for k, v in headers.items() if k != "webhook-id"}
    with pytest.raises(WebhookVerificationError, match=r"missing header.*webhook-id"):
        verify_webhook(body, missing, SECRET, now=now)
    with pytest.raises(WebhookVerificationError, match="not an integer"):
        verify_webhook(body, {**headers, "webhook-timestamp": "soon"}, SECRET, now=now)


def test_verify_webhook_rejects_old_and_future_timestamps() -> None:
    """A request signed more than the tolerance ago (a replay) or ahead is refused, even
    with a valid signature; inside the tolerance it passes."""
    body = b"{}"
    headers = sign_webhook(SECRET, "evt_r_1", 1_700_000_000, body)
    with pytest.raises(WebhookVerificationError, match="replayed"):
        verify_webhook(body, headers, SECRET, now=1_700_000_000 + 301)
    with pytest.raises(WebhookVerificationError, match="tolerance"):
        verify_webhook(body, headers, SECRET, now=1_700_000_000 - 301)
    assert verify_webhook(body, headers, SECRET, now=1_700_000_000 + 299) == {}
    with pytest.raises(WebhookVerificationError, match="replayed"):
        verify_webhook(body, headers, SECRET, now=1_700_000_000 + 61, tolerance=60)


def test_rotation_signs_with_every_secret() -> None:
    """With two secrets (rotation) the header carries two signatures; a receiver that
    knows either one accepts the request. A plain-string secret is its own key."""
    body = b"[]"
    headers = sign_webhook([SECRET, "plain-secret"], "m", 100, body)
    assert len(headers["webhook-signature"].split(" ")) == 2
    assert verify_webhook(body, headers, SECRET, now=100) == []
    assert verify_webhook(body, headers, "plain-secret", now=100) == []
    with pytest.raises(ValueError, match="base64"):
        sign_webhook("whsec_not base64!", "m", 100, body)


async def test_each_post_is_signed_and_carries_a_stable_id(receiver: Receiver) -> None:
    """The receiver verifies every POST with the shared secret; the webhook-id is
    ``evt_<run>_<sequence>`` and the body the event's JSON."""
    sink = _sink(receiver)
    await sink.publish(_event("run-a", 3))
    await sink.aclose()
    (request,) = receiver.requests
    assert request["path"] == "/hooks/treadle"
    assert request["headers"]["webhook-id"] == "evt_run-a_3"
    assert request["headers"]["content-type"] == "application/json"
    assert request["json"]["type"] == "workflow:created"
    assert request["json"]["workflow_run_id"] == "run-a"
    assert request["json"]["sequence"] == 3


# -- through the outbox ------------------------------------------------------------------
class Num(BaseModel):
    n: int


@define_stage(id="one", input=Num, output=Num)
async def one(ctx):  # type: ignore[no-untyped-def]
    return Num(n=ctx.input.n + 1)


@define_stage(id="two", input=Num, output=Num)
async def two(ctx):  # type: ignore[no-untyped-def]
    return Num(n=ctx.input.n * 2)


WF = WorkflowBuilder("hooked", input=Num).pipe(one).pipe(two).build()


async def _flush(engine: Engine) -> Any:
    return await engine.kernel.dispatch({"type": "outbox.flush", "max_events": 1000})


async def _run_all(engine: Engine, count: int) -> list[str]:
    async with engine.worker(concurrency=4):
        handles = [await engine.start("hooked", {"n": i}) for i in range(count)]
        for handle in handles:
            await handle.result(timeout=30)
    return [handle.run_id for handle in handles]


async def _expected(engine: Engine, run_ids: list[str]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for run_id in run_ids:
        out[run_id] = [e.sequence async for e in engine.events(run_id, follow=False)]
    return out


def _received(receiver: Receiver) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for event in receiver.events():
        out.setdefault(event["workflow_run_id"], []).append(event["sequence"])
    return out


@pytest.mark.parametrize("batch", [False, True], ids=["per-event", "batched"])
async def test_events_of_many_runs_arrive_in_per_run_order(
    receiver: Receiver, treadle_database_url: str, batch: bool
) -> None:
    """Eight runs' events (SQLite and PostgreSQL, one POST per event or one JSON array per
    flush) reach the receiver verified, every run's sequence complete and in order."""
    sink = _sink(receiver, batch=batch)
    async with await Engine.open(treadle_database_url, workflows=[WF], event_sink=sink) as engine:
        run_ids = await _run_all(engine, 8)
        while (await _flush(engine)).published:
            pass
        expected = await _expected(engine, run_ids)
    received = _received(receiver)
    for run_id in run_ids:
        assert received[run_id] == expected[run_id]
        assert expected[run_id] == list(range(1, len(expected[run_id]) + 1))
    if batch:
        assert any(isinstance(r["json"], list) and len(r["json"]) > 1 for r in receiver.requests)
        assert all(r["headers"]["webhook-id"].startswith("batch_") for r in receiver.requests)
    else:
        assert len(receiver.requests) == sum(len(seqs) for seqs in expected.values())


async def _pending(engine: Engine) -> list[Any]:
    async with engine.kernel.deps.persistence.transaction() as tx:
        return list(await tx.outbox.unpublished(1000))


async def test_a_failing_receiver_gets_the_events_once_it_recovers(
    receiver: Receiver, treadle_database_url: str
) -> None:
    """While the receiver answers 500 nothing counts as published: each run's first event
    records the failure and its later events wait. Once the receiver answers again,
    every event arrives, in order."""
    sink = _sink(receiver)
    settings = KernelSettings(outbox_max_attempts=20, outbox_retry_delay=timedelta(0))
    async with await Engine.open(
        treadle_database_url, workflows=[WF], event_sink=sink, settings=settings
    ) as engine:
        receiver.mode = "fail"
        run_ids = await _run_all(engine, 2)  # the worker's own flushes fail too
        result = await _flush(engine)
        assert (result.published, result.failed, result.dead_lettered) == (0, 2, 0)
        pending = await _pending(engine)
        failing = {r.event.workflow_run_id: r.event.sequence for r in pending if r.attempts}
        assert failing == dict.fromkeys(run_ids, 1)
        assert all("answered 500" in (r.last_error or "") for r in pending if r.attempts)
        assert receiver.requests == []
        receiver.mode = "ok"
        while (await _flush(engine)).published:
            pass
        expected = await _expected(engine, run_ids)
        assert await _pending(engine) == []
    assert _received(receiver) == expected


async def test_retries_exhausted_go_to_the_dlq_and_replay_redelivers(
    receiver: Receiver, treadle_database_url: str
) -> None:
    """A receiver down for three attempts: the run's first event is dead-lettered (its
    later events then flow once the receiver is back); ``plugin.replayDLQ`` puts it back
    and the next flush delivers it."""
    sink = _sink(receiver)
    async with await Engine.open(
        treadle_database_url, workflows=[WF], event_sink=sink, settings=EVERY_FLUSH
    ) as engine:
        receiver.mode = "fail"
        (run_id,) = await _run_all(engine, 1)
        for _ in range(3):
            if (await _flush(engine)).dead_lettered:
                break
        async with engine.kernel.deps.persistence.transaction() as tx:
            (dead,) = await tx.outbox.dead_lettered(10)
        assert (dead.event.sequence, dead.attempts) == (1, 3)
        assert "answered 500" in (dead.last_error or "")
        receiver.mode = "ok"
        while (await _flush(engine)).published:
            pass
        delivered = _received(receiver)[run_id]
        assert delivered == sorted(delivered)
        assert 1 not in delivered
        replay = await engine.kernel.dispatch({"type": "plugin.replayDLQ"})
        assert replay.replayed == 1
        assert (await _flush(engine)).published == 1
        assert _received(receiver)[run_id] == [*delivered, 1]
        assert len(delivered) + 1 == len((await _expected(engine, [run_id]))[run_id])


async def test_a_receiver_that_does_not_answer_times_out(receiver: Receiver) -> None:
    """A receiver that never answers fails the POST after ``timeout`` seconds with an
    error saying so (the outbox then retries it)."""
    receiver.mode = "hang"
    sink = _sink(receiver, timeout=0.3)
    with pytest.raises(WebhookDeliveryError, match=r"timed out after 0.3s"):
        await sink.publish(_event())
    await sink.aclose()


async def test_a_redirect_is_a_failure_and_is_not_followed(receiver: Receiver) -> None:
    """A 302 answer fails the delivery, naming the Location; no request goes there."""
    receiver.mode = "redirect"
    sink = _sink(receiver)
    with pytest.raises(WebhookDeliveryError, match=r"302.*/elsewhere.*not followed"):
        await sink.publish(_event())
    await sink.aclose()
    assert receiver.paths == ["/hooks/treadle"]


# -- destinations ------------------------------------------------------------------------
def _resolving_to(*addresses: str) -> Any:
    return lambda host, port: list(addresses)


async def test_internal_destinations_are_refused_unless_allowed(receiver: Receiver) -> None:
    """Loopback, private and link-local (cloud metadata) addresses are refused with an
    error naming the address, at construction for a literal, at delivery after DNS; the
    allow-list lets a named host or network through."""
    with pytest.raises(WebhookDestinationError, match=r"127.0.0.1.*allow="):
        WebhookEventSink(receiver.url, SECRET)
    with pytest.raises(WebhookDestinationError, match=r"169.254.169.254"):
        WebhookEventSink("http://169.254.169.254/latest/meta-data", SECRET)
    internal = WebhookEventSink(
        "https://hooks.internal.test/x", SECRET, resolver=_resolving_to("10.1.2.3")
    )
    with pytest.raises(WebhookDestinationError, match=r"resolves to 10.1.2.3"):
        await internal.publish(_event())
    allowed = WebhookEventSink(
        "https://hooks.internal.test/x",
        SECRET,
        allow=["10.0.0.0/8"],
        resolver=_resolving_to("10.1.2.3"),
    )
    assert await allowed.resolve() == "10.1.2.3"
    by_name = WebhookEventSink(
        "https://hooks.internal.test/x",
        SECRET,
        allow="hooks.internal.test",
        resolver=_resolving_to("10.1.2.3"),
    )
    assert await by_name.resolve() == "10.1.2.3"
    mixed = WebhookEventSink(
        "https://hooks.example.test/x", SECRET, resolver=_resolving_to("93.184.216.34", "::1")
    )
    with pytest.raises(WebhookDestinationError, match="::1"):
        await mixed.resolve()  # every answer must pass, not just the first
    public = WebhookEventSink(
        "https://hooks.example.test/x", SECRET, resolver=_resolving_to("93.184.216.34")
    )
    assert await public.resolve() == "93.184.216.34"


def test_a_host_off_the_allow_list_is_refused_at_construction() -> None:
    """With an allow-list, a URL whose host is not on it fails at once; a bad URL,
    credentials in the URL or a bad allow entry are refused naming the problem."""
    with pytest.raises(WebhookDestinationError, match="not on the allow-list"):
        WebhookEventSink("https://evil.example/x", SECRET, allow=["hooks.example.com"])
    assert WebhookEventSink("https://a.hooks.example.com/x", SECRET, allow=["*.example.com"])
    with pytest.raises(WebhookDestinationError, match="http:// or https://"):
        WebhookEventSink("ftp://hooks.example.com/x", SECRET)
    with pytest.raises(WebhookDestinationError, match="credentials"):
        WebhookEventSink("https://u:p@hooks.example.com/x", SECRET)
    with pytest.raises(WebhookDestinationError, match="allow entry"):
        WebhookEventSink("https://hooks.example.com/x", SECRET, allow=["10.0.0.0/99"])
    with pytest.raises(ValueError, match="secret"):
        WebhookEventSink("https://hooks.example.com/x", "")


async def test_a_refused_destination_fails_the_flush_with_its_reason(
    treadle_sqlite_url: str,
) -> None:
    """A webhook pointed at an internal address by mistake: the flush records the
    refusal as the event's error (visible in the DLQ), and nothing is sent."""
    sink = WebhookEventSink(
        "http://metadata.internal.test/hook", SECRET, resolver=_resolving_to("169.254.169.254")
    )
    async with await Engine.open(
        treadle_sqlite_url, workflows=[WF], event_sink=sink, settings=EVERY_FLUSH
    ) as engine:
        await _run_all(engine, 1)
        for _ in range(3):
            await _flush(engine)
        async with engine.kernel.deps.persistence.transaction() as tx:
            dead = await tx.outbox.dead_lettered(10)
    assert dead
    assert "WebhookDestinationError" in (dead[0].last_error or "")
    assert "169.254.169.254" in (dead[0].last_error or "")


# -- configuration -----------------------------------------------------------------------
async def test_the_environment_configures_the_webhook(
    receiver: Receiver, treadle_sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``TREADLE_WEBHOOK_URL``, ``_SECRET`` and ``_ALLOW`` make every engine and worker
    publish to the webhook; a URL without a secret is refused."""
    monkeypatch.setenv("TREADLE_WEBHOOK_URL", receiver.url)
    monkeypatch.setenv("TREADLE_WEBHOOK_ALLOW", "127.0.0.1/32")
    monkeypatch.delenv("TREADLE_WEBHOOK_SECRET", raising=False)
    with pytest.raises(WebhookDestinationError, match="TREADLE_WEBHOOK_SECRET"):
        await Engine.open(treadle_sqlite_url, workflows=[WF])
    monkeypatch.setenv("TREADLE_WEBHOOK_SECRET", SECRET)
    async with await Engine.open(treadle_sqlite_url, workflows=[WF]) as engine:
        assert isinstance(engine.kernel.deps.event_sink, WebhookEventSink)
        (run_id,) = await _run_all(engine, 1)
        while (await _flush(engine)).published:
            pass
        expected = await _expected(engine, [run_id])
    assert _received(receiver) == expected
    assert json.loads(receiver.requests[-1]["body"])["type"] == "workflow:completed"


async def test_a_named_host_is_reached_at_its_checked_address(receiver: Receiver) -> None:
    """A host name is resolved once per delivery and the request goes to a checked
    address, with the Host header of the URL; an address that refuses the connection is
    skipped for the next one."""
    port = receiver.url.split(":")[2].split("/")[0]
    sink = WebhookEventSink(
        f"http://receiver.test:{port}/hooks/treadle",
        SECRET,
        allow=["127.0.0.0/8"],
        resolver=_resolving_to("127.0.0.2", "127.0.0.1"),  # nothing listens on .2
    )
    await sink.publish(_event("run-b", 1))
    await sink.aclose()
    (request,) = receiver.requests
    assert {k.lower(): v for k, v in request["headers"].items()}["host"] == f"receiver.test:{port}"
    assert request["json"]["workflow_run_id"] == "run-b"


def _self_signed(tmp_path: Any, host: str) -> tuple[str, str]:
    """A certificate for ``host`` (its own CA) and its key, as PEM files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(host)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return str(cert_path), str(key_path)


async def test_https_checks_the_certificate_against_the_url_host(
    receiver: Receiver, tmp_path: Any
) -> None:
    """Over HTTPS the connection goes to the checked address, and the certificate is
    verified for the URL's host name (TLS SNI): a certificate for that name is accepted,
    the same server under another name is refused."""
    pytest.importorskip("cryptography")
    import ssl

    cert, key = _self_signed(tmp_path, "hooks.test")
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert, key)

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["content-length"]))
            receiver.requests.append({"json": verify_webhook(body, dict(self.headers), SECRET)})
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.socket = server_ctx.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    port = server.server_address[1]
    client_ctx = ssl.create_default_context(cafile=cert)
    try:
        good = WebhookEventSink(
            f"https://hooks.test:{port}/in",
            SECRET,
            allow="127.0.0.1/32",
            verify=client_ctx,
            resolver=_resolving_to("127.0.0.1"),
        )
        await good.publish(_event("run-tls", 1))
        await good.aclose()
        assert [r["json"]["workflow_run_id"] for r in receiver.requests] == ["run-tls"]
        wrong = WebhookEventSink(
            f"https://other.test:{port}/in",
            SECRET,
            allow="127.0.0.1/32",
            verify=client_ctx,
            resolver=_resolving_to("127.0.0.1"),
        )
        with pytest.raises(WebhookDeliveryError, match=r"(?i)certificate|hostname"):
            await wrong.publish(_event("run-tls", 2))
        await wrong.aclose()
    finally:
        server.shutdown()
        server.server_close()


def test_from_env_reads_every_setting_and_refuses_bad_ones() -> None:
    """``from_env``: no URL means no sink; the secret (two while rotating), allow-list,
    timeout and batch switch are read; a bad timeout or batch value names the variable."""
    assert WebhookEventSink.from_env({}) is None
    env = {
        "TREADLE_WEBHOOK_URL": "https://hooks.example.com/x",
        "TREADLE_WEBHOOK_SECRET": f"{SECRET}, whsec_b2xkIHNlY3JldA==",
        "TREADLE_WEBHOOK_ALLOW": "hooks.example.com, 10.0.0.0/8",
        "TREADLE_WEBHOOK_TIMEOUT": "2.5",
        "TREADLE_WEBHOOK_BATCH": "1",
    }
    sink = WebhookEventSink.from_env(env)
    assert sink is not None
    assert (sink.timeout, sink.batch) == (2.5, True)
    assert sink.allowed_hosts == {"hooks.example.com"}
    assert [str(n) for n in sink.allowed_networks] == ["10.0.0.0/8"]
    signed = sign_webhook([SECRET, "whsec_b2xkIHNlY3JldA=="], "m", 1, b"{}")
    assert verify_webhook(b"{}", signed, "whsec_b2xkIHNlY3JldA==", now=1) == {}
    assert sink.message_id([_event("r", 2)]) == "evt_r_2"
    with pytest.raises(ValueError, match="TREADLE_WEBHOOK_TIMEOUT"):
        WebhookEventSink.from_env({**env, "TREADLE_WEBHOOK_TIMEOUT": "soon"})
    with pytest.raises(ValueError, match="TREADLE_WEBHOOK_BATCH"):
        WebhookEventSink.from_env({**env, "TREADLE_WEBHOOK_BATCH": "maybe"})
