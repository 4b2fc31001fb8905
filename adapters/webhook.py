"""``WebhookEventSink``: POST each committed event, signed, to an HTTP endpoint.

The sink is called by ``outbox.flush``, so ordering, retries and the dead-letter
queue are the outbox's: events go out in per-run sequence order, a failed POST
raises (the run's later events wait for the next flush), and after
``outbox_max_attempts`` failures the event is dead-lettered until
``plugin.replayDLQ`` (``treadle`` or ``kernel.dispatch``) puts it back.

Every request is signed the Standard Webhooks way (https://www.standardwebhooks.com):

- ``webhook-id``: the message id, stable across retries and replays
  (``evt_<run id>_<sequence>``), so a receiver can drop duplicates;
- ``webhook-timestamp``: Unix seconds when this attempt was sent;
- ``webhook-signature``: ``v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">``,
  one per secret, space-separated (two secrets while rotating).

A secret is ``whsec_<base64>`` (the base64 part is the key) or any other string
(its UTF-8 bytes are the key). ``verify_webhook`` checks a request on the receiving
side and rejects a timestamp outside the tolerance (a replay).

Safety: redirects are never followed (a 3xx is a failed delivery), a request times
out after ``timeout`` seconds, and the destination must pass the allow-list: the
host is resolved and every address checked; private, loopback, link-local,
multicast and reserved addresses are refused unless ``allow`` names the host or a
network holding the address. The request then goes to the address that was checked
(the Host header and TLS server name stay the host's), so a DNS answer that changes
between the check and the connection cannot redirect it.

``batch=True`` sends each flush's events (at most ``outbox.flush``'s ``max_events``,
100 by default) as one JSON array per POST, in per-run order; a failed POST fails
every run it carried, and the whole array is sent again on the next flush.

httpx is imported on first delivery (``pip install 'treadle[webhook]'``); this
module's signing and verifying need only the standard library.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import ipaddress
import json
import os
import socket
import ssl
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from treadle.kernel.errors import (
    WebhookDeliveryError,
    WebhookDestinationError,
    WebhookVerificationError,
)
from treadle.kernel.events import EventBase

__all__ = [
    "WEBHOOK_ALLOW_ENV",
    "WEBHOOK_BATCH_ENV",
    "WEBHOOK_SECRET_ENV",
    "WEBHOOK_TIMEOUT_ENV",
    "WEBHOOK_URL_ENV",
    "WebhookEventSink",
    "sign_webhook",
    "verify_webhook",
]

WEBHOOK_URL_ENV = "TREADLE_WEBHOOK_URL"
WEBHOOK_SECRET_ENV = "TREADLE_WEBHOOK_SECRET"
WEBHOOK_ALLOW_ENV = "TREADLE_WEBHOOK_ALLOW"
"""Comma-separated hosts and networks the webhook may reach (see ``allow``)."""
WEBHOOK_TIMEOUT_ENV = "TREADLE_WEBHOOK_TIMEOUT"
WEBHOOK_BATCH_ENV = "TREADLE_WEBHOOK_BATCH"

DEFAULT_TOLERANCE = 300.0
"""``verify_webhook``: a request older or newer than 5 minutes is refused."""

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], Sequence[str]]
"""``(host, port) -> addresses``: how the sink resolves a host (tests may pin one)."""


# -- signing --------------------------------------------------------------------------
def _secret_key(secret: str) -> bytes:
    given: object = secret  # checked at runtime: secrets come from env vars and config
    if not isinstance(given, str) or not secret:
        raise ValueError("webhook secret must be a non-empty string")
    if secret.startswith("whsec_"):
        try:
            return base64.b64decode(secret.removeprefix("whsec_"), validate=True)
        except ValueError:
            raise ValueError("webhook secret 'whsec_...' must be base64 after the prefix") from None
    return secret.encode()


def _secrets(secret: str | Sequence[str]) -> list[bytes]:
    given = [secret] if isinstance(secret, str) else list(secret)
    if not given:
        raise ValueError("webhook secret must be a non-empty string")
    return [_secret_key(one) for one in given]


def _signature(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    signed = f"{msg_id}.{timestamp}.".encode() + body
    digest = hmac.new(key, signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def sign_webhook(
    secret: str | Sequence[str], msg_id: str, timestamp: int, body: bytes
) -> dict[str, str]:
    """The three Standard Webhooks headers for ``body`` (one signature per secret)."""
    signatures = " ".join(_signature(key, msg_id, timestamp, body) for key in _secrets(secret))
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": signatures,
    }


def verify_webhook(
    body: bytes | str,
    headers: Mapping[str, str],
    secret: str | Sequence[str],
    *,
    tolerance: float = DEFAULT_TOLERANCE,
    now: float | None = None,
) -> Any:
    """Check a webhook request and return its JSON body (an event, or a list of events
    for a batching sink). ``headers`` is the request's headers (any case); ``secret``
    the sink's (several while rotating). Raises ``WebhookVerificationError`` when a
    header is missing, the timestamp is further than ``tolerance`` seconds from ``now``
    (a replay, or a clock far off), or no signature matches."""
    lowered = {str(k).lower(): str(v) for k, v in headers.items()}
    missing = [
        h for h in ("webhook-id", "webhook-timestamp", "webhook-signature") if h not in lowered
    ]
    if missing:
        raise WebhookVerificationError(f"missing header(s): {', '.join(missing)}")
    msg_id = lowered["webhook-id"]
    try:
        timestamp = int(lowered["webhook-timestamp"])
    except ValueError:
        raise WebhookVerificationError("webhook-timestamp is not an integer") from None
    current = time.time() if now is None else now
    if abs(current - timestamp) > tolerance:
        raise WebhookVerificationError(
            f"webhook-timestamp {timestamp} is {current - timestamp:+.0f}s from now, "
            f"outside the {tolerance:g}s tolerance (a replayed or delayed request)"
        )
    raw = body.encode() if isinstance(body, str) else bytes(body)
    given = [part for part in lowered["webhook-signature"].split(" ") if part]
    expected = [_signature(key, msg_id, timestamp, raw) for key in _secrets(secret)]
    if not any(hmac.compare_digest(g, e) for g in given for e in expected):
        raise WebhookVerificationError("no webhook-signature matches the secret")
    try:
        return json.loads(raw)
    except ValueError:
        raise WebhookVerificationError("the body is not JSON") from None


# -- destinations ---------------------------------------------------------------------
def _parse_allow(allow: Sequence[str] | str) -> tuple[frozenset[str], tuple[Network, ...]]:
    entries = [part.strip() for part in allow.split(",")] if isinstance(allow, str) else allow
    hosts: set[str] = set()
    networks: list[Network] = []
    for entry in entries:
        given: object = entry
        if not isinstance(given, str) or not entry.strip():
            continue
        text = entry.strip()
        try:
            networks.append(ipaddress.ip_network(text, strict=False))
        except ValueError:
            if "/" in text or ":" in text:
                raise WebhookDestinationError(
                    f"allow entry {text!r} is neither a host name nor an address or network"
                ) from None
            hosts.add(text.lower().rstrip("."))
    return frozenset(hosts), tuple(networks)


def _host_allowed(host: str, hosts: frozenset[str]) -> bool:
    host = host.lower().rstrip(".")
    return any(
        host == entry or (entry.startswith("*.") and host.endswith(entry[1:])) for entry in hosts
    )


def _public(address: Address) -> bool:
    return address.is_global and not address.is_multicast


def _system_resolver(host: str, port: int) -> list[str]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


class WebhookEventSink:
    """The EventSink port over signed HTTP POSTs (see the module docstring).

    - ``url``: ``https://`` (or ``http://``) endpoint; ``secret``: ``whsec_...`` or a
      list of secrets (each signs; receivers accept any).
    - ``timeout``: seconds for connecting, sending and reading the answer.
    - ``allow``: host names (``hooks.example.com``, ``*.example.com``), addresses and
      networks (``10.0.0.0/8``) the webhook may reach. Empty (default): any public
      address. Non-empty: only these; an internal address must be listed (its host
      name or a network holding it) to be reached.
    - ``batch``: send each flush's events as one JSON array per POST.
    - ``include_payloads``: send ``output``, ``payload`` and ``attributes`` fields
      (default True; False sends the events without user data).
    - ``headers``: extra headers on every request (an ``Authorization`` for a gateway).
    - ``verify``: TLS verification as httpx takes it: True (the system's CAs), a CA
      bundle's path or an ``ssl.SSLContext`` (a private CA). The certificate is checked
      against the URL's host name, though the connection goes to the checked address.

    Proxies (``HTTPS_PROXY``) are not used: the request must reach the address that
    passed the allow-list.
    """

    def __init__(
        self,
        url: str,
        secret: str | Sequence[str],
        *,
        timeout: float = 10.0,
        allow: Sequence[str] | str = (),
        batch: bool = False,
        include_payloads: bool = True,
        headers: Mapping[str, str] | None = None,
        verify: ssl.SSLContext | str | bool = True,
        resolver: Resolver | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        given: tuple[object, object] = (url, timeout)  # checked at runtime (env, config)
        parts = urlsplit(url) if isinstance(given[0], str) else None
        if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
            raise WebhookDestinationError(
                f"webhook url must be an http:// or https:// URL with a host, got {url!r}"
            )
        if parts.username or parts.password:
            raise WebhookDestinationError(
                "webhook url must not carry credentials; pass headers={'Authorization': ...}"
            )
        _secrets(secret)  # a bad secret fails here, not at the first delivery
        if isinstance(given[1], bool) or not isinstance(given[1], int | float) or timeout <= 0:
            raise ValueError(
                f"webhook timeout must be a positive number of seconds, got {timeout!r}"
            )
        self.url = url
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self._parts = parts
        self._secret = secret
        self.timeout = float(timeout)
        self.allowed_hosts, self.allowed_networks = _parse_allow(allow)
        self.batch = batch
        self.include_payloads = include_payloads
        self.headers = dict(headers or {})
        self.verify = verify
        self._resolver = resolver
        self._clock = clock
        self._clients: dict[int, Any] = {}
        self.delivered = 0
        """Events delivered by this sink (2xx answers), for logs and tests."""
        self._check_literal()

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> WebhookEventSink | None:
        """The sink ``TREADLE_WEBHOOK_URL``, ``TREADLE_WEBHOOK_SECRET`` (several
        comma-separated while rotating), ``TREADLE_WEBHOOK_ALLOW``,
        ``TREADLE_WEBHOOK_TIMEOUT`` (seconds) and ``TREADLE_WEBHOOK_BATCH`` (``1``)
        describe, or None when no URL is set."""
        env = os.environ if environ is None else environ
        url = env.get(WEBHOOK_URL_ENV, "").strip()
        if not url:
            return None
        secrets = [part.strip() for part in env.get(WEBHOOK_SECRET_ENV, "").split(",")]
        secrets = [part for part in secrets if part]
        if not secrets:
            raise WebhookDestinationError(
                f"{WEBHOOK_URL_ENV} is set but {WEBHOOK_SECRET_ENV} is not: webhooks are "
                "always signed"
            )
        timeout_text = env.get(WEBHOOK_TIMEOUT_ENV, "").strip() or "10"
        try:
            timeout = float(timeout_text)
        except ValueError:
            raise ValueError(
                f"{WEBHOOK_TIMEOUT_ENV} must be a number of seconds, got {timeout_text!r}"
            ) from None
        batch_text = env.get(WEBHOOK_BATCH_ENV, "").strip().lower()
        if batch_text not in ("", "0", "1", "false", "true", "no", "yes"):
            raise ValueError(f"{WEBHOOK_BATCH_ENV} must be 1 or 0, got {batch_text!r}")
        return cls(
            url,
            secrets if len(secrets) > 1 else secrets[0],
            allow=env.get(WEBHOOK_ALLOW_ENV, ""),
            timeout=timeout,
            batch=batch_text in ("1", "true", "yes"),
        )

    def __repr__(self) -> str:
        return f"WebhookEventSink({self._shown_url()})"

    def _shown_url(self) -> str:
        """The URL without its query (which may carry a token) for messages."""
        return urlunsplit((self._parts.scheme, self._parts.netloc, self._parts.path, "", ""))

    # -- destination check ----------------------------------------------------------
    def _check_literal(self) -> None:
        """Refuse at construction what needs no DNS: a host off the allow-list, or a
        literal internal address that is not allowed."""
        try:
            literal: Address | None = ipaddress.ip_address(self.host)
        except ValueError:
            literal = None
        if literal is not None:
            self._check_address(literal)
        elif (
            self.allowed_hosts
            and not self.allowed_networks
            and not _host_allowed(self.host, self.allowed_hosts)
        ):
            raise WebhookDestinationError(
                f"webhook host {self.host!r} is not on the allow-list "
                f"({', '.join(sorted(self.allowed_hosts))})"
            )

    @property
    def _restricted(self) -> bool:
        return bool(self.allowed_hosts or self.allowed_networks)

    def _check_address(self, address: Address) -> None:
        if any(address in network for network in self.allowed_networks):
            return
        if _host_allowed(self.host, self.allowed_hosts):
            return
        if self._restricted:
            raise WebhookDestinationError(
                f"webhook host {self.host!r} ({address}) is not on the allow-list: add the host "
                "or a network holding the address to allow= (TREADLE_WEBHOOK_ALLOW)"
            )
        if not _public(address):
            raise WebhookDestinationError(
                f"webhook host {self.host!r} resolves to {address}, a private, loopback, "
                "link-local or reserved address: refused unless allow= (TREADLE_WEBHOOK_ALLOW) "
                "names the host or a network holding it"
            )

    async def resolve(self) -> str:
        """The checked address the next request goes to first (see ``addresses``)."""
        return (await self.addresses())[0]

    async def addresses(self) -> list[str]:
        """The host's addresses, each checked against the allow-list, in the resolver's
        order: ``WebhookDestinationError`` when the host does not resolve or any
        address is refused (the system would connect to any of them)."""
        try:
            literal = ipaddress.ip_address(self.host)
        except ValueError:
            pass
        else:
            self._check_address(literal)
            return [str(literal)]
        resolver = self._resolver or _system_resolver
        try:
            found = await asyncio.to_thread(resolver, self.host, self.port)
        except OSError as exc:
            raise WebhookDestinationError(
                f"webhook host {self.host!r} does not resolve: {exc}"
            ) from exc
        if not found:
            raise WebhookDestinationError(f"webhook host {self.host!r} does not resolve")
        addresses = [ipaddress.ip_address(one) for one in found]
        for address in addresses:  # every answer must pass: a retry may use any of them
            self._check_address(address)
        return [str(address) for address in addresses]

    # -- delivery -------------------------------------------------------------------
    @staticmethod
    def _httpx() -> Any:
        try:
            import httpx
        except ImportError as exc:
            raise WebhookDeliveryError(
                "the webhook sink needs httpx: pip install 'treadle[webhook]'"
            ) from exc
        return httpx

    def _client(self) -> Any:
        httpx = self._httpx()
        loop_id = id(asyncio.get_running_loop())
        client = self._clients.get(loop_id)
        if client is None:
            # One client per event loop (an AsyncClient is bound to the loop it ran on).
            client = httpx.AsyncClient(
                follow_redirects=False,
                timeout=httpx.Timeout(self.timeout),
                trust_env=False,
                verify=self.verify,
            )
            self._clients[loop_id] = client
        return client

    def _body(self, events: Sequence[EventBase]) -> bytes:
        exclude = None if self.include_payloads else {"output", "payload", "attributes"}
        dumped = [event.model_dump(mode="json", exclude=exclude) for event in events]
        value: Any = dumped if self.batch else dumped[0]
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()

    @staticmethod
    def message_id(events: Sequence[EventBase]) -> str:
        """``evt_<run id>_<sequence>`` for one event; for a batch, a digest of its
        events' ids (the same batch retried keeps its id)."""
        ids = [f"evt_{e.workflow_run_id}_{e.sequence}" for e in events]
        if len(ids) == 1:
            return ids[0]
        return "batch_" + hashlib.sha256("\n".join(ids).encode()).hexdigest()[:32]

    def _target(self, address: str) -> str:
        """The URL with its host replaced by ``address`` (the one that was checked)."""
        netloc = f"[{address}]" if ":" in address else address
        if self._parts.port:
            netloc += f":{self._parts.port}"
        return urlunsplit(
            (self._parts.scheme, netloc, self._parts.path or "/", self._parts.query, "")
        )

    async def _post(self, events: Sequence[EventBase]) -> None:
        addresses = await self.addresses()
        body = self._body(events)
        msg_id = self.message_id(events)
        headers = {
            **self.headers,
            **sign_webhook(self._secret, msg_id, int(self._clock()), body),
            "content-type": "application/json",
            "user-agent": "treadle-webhook",
            "host": self._parts.netloc.rpartition("@")[2],
        }
        extensions = {"sni_hostname": self.host} if self._parts.scheme == "https" else {}
        httpx = self._httpx()
        client = self._client()
        try:
            for index, address in enumerate(addresses):
                try:
                    response = await client.post(
                        self._target(address), content=body, headers=headers, extensions=extensions
                    )
                    break
                except httpx.ConnectError:
                    if index == len(addresses) - 1:
                        raise  # nothing sent yet: the next address may answer (IPv6 vs 4)
        except httpx.TimeoutException as exc:
            raise WebhookDeliveryError(
                f"POST {self._shown_url()} timed out after {self.timeout:g}s"
            ) from exc
        except httpx.HTTPError as exc:
            raise WebhookDeliveryError(
                f"POST {self._shown_url()} failed: {type(exc).__name__}: {exc}"
            ) from exc
        status = response.status_code
        if 300 <= status < 400:
            raise WebhookDeliveryError(
                f"POST {self._shown_url()} answered {status} redirecting to "
                f"{response.headers.get('location', '?')!r}: redirects are not followed"
            )
        if not 200 <= status < 300:
            raise WebhookDeliveryError(
                f"POST {self._shown_url()} answered {status}: {response.text[:200]!r}"
            )
        self.delivered += len(events)

    async def publish(self, event: EventBase) -> None:
        """POST one event; raises ``WebhookDeliveryError`` or ``WebhookDestinationError``
        unless the receiver answered 2xx (the outbox retries, then dead-letters)."""
        await self._post([event])

    async def publish_batch(self, events: Sequence[EventBase]) -> None:
        """POST ``events`` (already in per-run order) as one JSON array; ``outbox.flush``
        calls it once per flush when ``batch`` is on. Raises as ``publish`` does."""
        if not self.batch:
            for event in events:
                await self._post([event])
        elif events:
            await self._post(events)

    @property
    def batches(self) -> bool:
        """Whether ``outbox.flush`` should hand this sink whole batches."""
        return self.batch

    async def probe(self) -> None:
        """Check the destination without sending an event: the host resolves, every
        address passes the allow-list, and a TCP connection opens within ``timeout``
        (``treadle doctor``). Raises ``WebhookDestinationError`` or
        ``WebhookDeliveryError``."""
        addresses = await self.addresses()
        for index, address in enumerate(addresses):
            try:
                _, writer = await asyncio.wait_for(
                    asyncio.open_connection(address, self.port), self.timeout
                )
                break
            except (OSError, TimeoutError) as exc:
                if index == len(addresses) - 1:
                    raise WebhookDeliveryError(
                        f"cannot connect to {self.host}:{self.port} ({address}): "
                        f"{type(exc).__name__}: {exc}"
                    ) from exc
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()

    async def aclose(self) -> None:
        """Close the HTTP clients this sink opened on the running loop."""
        loop_id = id(asyncio.get_running_loop())
        client = self._clients.pop(loop_id, None)
        if client is not None:
            await client.aclose()
