"""Who may call the HTTP API: bearer tokens with scopes, and the browser session.

Decision (issue 15, item 5): there are two ways to present a token.

- **API clients** send ``Authorization: Bearer <token>`` on every request. A browser
  cannot attach that header to a cross-site request, so bearer requests need no CSRF
  token.
- **Browsers** (the dashboard) type the token once into the ``/login`` form. The server
  answers with a *session cookie* (``treadle_session``: ``HttpOnly``,
  ``SameSite=Strict``, ``Secure`` when served over HTTPS, ``Path=/``) that holds no
  token, only the token's fingerprint, an expiry and an HMAC under the app's secret.
  Every state-changing request authenticated by that cookie must also carry the CSRF
  token of ``treadle.hosts.http.csrf`` (header ``X-CSRF-Token`` or form field
  ``csrf_token``). Removing a token from the token file and restarting ends its
  sessions; so does a restart without a fixed ``session_secret``.

Tokens come from a file (``treadle serve --token-file F``) or the environment
(``TREADLE_API_TOKENS``), one entry per line (or comma-separated in the variable)::

    read:3kq9...          # may read runs, events, workflows
    act:Zp0x...           # may read and act: start, signal, cancel, ...
    worker:Yy7c...        # remote workers (/api/v1/workers/...)
    read+worker:Qm1e...   # several scopes joined with '+'

A presented token is compared with every configured token by ``hmac.compare_digest``
(all of them, whichever matches), so timing says nothing about which prefix was right.
``act`` implies ``read``. ``auth=None`` in ``create_app`` means open access: every
caller acts with every scope; ``treadle serve`` allows it only on a loopback address.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Final, Literal

from treadle.kernel.errors import TreadleValidationError

if TYPE_CHECKING:
    from fastapi import Request

__all__ = [
    "ALL_SCOPES",
    "SESSION_COOKIE",
    "TOKENS_ENV",
    "Principal",
    "Scope",
    "TokenAuth",
    "fingerprint",
]

Scope = Literal["read", "act", "worker"]
ALL_SCOPES: Final[frozenset[str]] = frozenset({"read", "act", "worker"})
TOKENS_ENV: Final = "TREADLE_API_TOKENS"
SESSION_COOKIE: Final = "treadle_session"
SESSION_TTL: Final = 12 * 3600.0
"""Seconds a dashboard login lasts."""
MIN_TOKEN_LENGTH: Final = 16


def fingerprint(token: str) -> str:
    """A short, non-secret id for a token (logs, the session cookie, ``Principal.name``)."""
    return hashlib.sha256(token.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Principal:
    """The caller of a request: ``name`` (``token:<fingerprint>``, or ``anonymous`` under
    open access), its ``scopes`` and how it authenticated (``via``)."""

    name: str
    scopes: frozenset[str]
    via: Literal["bearer", "session", "open"] = "bearer"

    def has(self, scope: str) -> bool:
        """Whether the principal holds ``scope`` (``act`` implies ``read``)."""
        return scope in self.scopes or (scope == "read" and "act" in self.scopes)


OPEN_PRINCIPAL: Final = Principal("anonymous", ALL_SCOPES, via="open")


@dataclass(frozen=True)
class _Entry:
    token: bytes
    principal: Principal


@dataclass
class TokenAuth:
    """Bearer tokens and their scopes. Build with ``TokenAuth({"tok": {"read"}})``,
    ``TokenAuth.parse(text)``, ``TokenAuth.from_file(path)`` or ``TokenAuth.from_env()``.
    """

    tokens: Mapping[str, Iterable[str]]
    session_secret: bytes = field(default_factory=lambda: os.urandom(32), repr=False)
    _entries: tuple[_Entry, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        entries: list[_Entry] = []
        if not self.tokens:
            raise TreadleValidationError(
                "tokens: no API token given", [("tokens", "at least one token is required")]
            )
        for index, (token, scopes) in enumerate(self.tokens.items()):
            where = f"tokens[{index}]"
            if len(token) < MIN_TOKEN_LENGTH:
                raise TreadleValidationError(
                    f"{where}: a token must be a string of at least {MIN_TOKEN_LENGTH} characters",
                    [(where, "token too short")],
                )
            if any(ch.isspace() for ch in token):
                raise TreadleValidationError(
                    f"{where}: a token must not contain whitespace", [(where, "whitespace")]
                )
            wanted = frozenset(scopes)
            unknown = sorted(wanted - ALL_SCOPES)
            if not wanted or unknown:
                problem = f"unknown scope(s) {unknown}" if unknown else "no scope"
                raise TreadleValidationError(
                    f"{where}: {problem}; scopes are read, act, worker",
                    [(f"{where}.scopes", problem)],
                )
            entries.append(_Entry(token.encode(), Principal(f"token:{fingerprint(token)}", wanted)))
        self._entries = tuple(entries)

    # -- building --------------------------------------------------------------------
    @classmethod
    def parse(cls, text: str, *, source: str = "tokens") -> TokenAuth:
        """Entries ``scope[+scope]:token``, one per line or comma-separated; blank lines
        and ``#`` comments are skipped. A bad entry raises naming its line."""
        tokens: dict[str, set[str]] = {}
        for number, raw in enumerate(text.replace(",", "\n").splitlines(), start=1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            scopes, sep, token = line.partition(":")
            where = f"{source}:{number}"
            if not sep or not token.strip():
                raise TreadleValidationError(
                    f"{where}: expected 'scope:token' (scope read, act or worker)",
                    [(where, "not scope:token")],
                )
            tokens.setdefault(token.strip(), set()).update(
                s.strip().lower() for s in scopes.split("+")
            )
        if not tokens:
            raise TreadleValidationError(
                f"{source}: no token found", [(source, "at least one scope:token entry")]
            )
        return cls(tokens)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> TokenAuth:
        """Tokens from a file in the format of ``parse``."""
        file = Path(path)
        try:
            text = file.read_text(encoding="utf-8")
        except OSError as exc:
            raise TreadleValidationError(
                f"token_file: cannot read {str(file)!r}: {exc.strerror}",
                [("token_file", "unreadable")],
            ) from None
        return cls.parse(text, source=str(file))

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> TokenAuth | None:
        """Tokens from ``TREADLE_API_TOKENS``; ``None`` when it is unset or empty."""
        text = (os.environ if environ is None else environ).get(TOKENS_ENV, "")
        return cls.parse(text, source=TOKENS_ENV) if text.strip() else None

    # -- checking --------------------------------------------------------------------
    def authenticate(self, token: str) -> Principal | None:
        """The principal ``token`` belongs to, or ``None``. Constant time in which
        configured token matches: every one is compared."""
        presented = token.encode()
        found: Principal | None = None
        for entry in self._entries:
            if hmac.compare_digest(entry.token, presented):
                found = entry.principal
        return found

    def by_fingerprint(self, fp: str) -> Principal | None:
        for entry in self._entries:
            if hmac.compare_digest(entry.principal.name, f"token:{fp}"):
                return entry.principal
        return None

    # -- browser sessions ------------------------------------------------------------
    def issue_session(self, principal: Principal, *, now: float | None = None) -> str:
        """The session cookie value for ``principal``: ``fingerprint.expiry.nonce.mac``."""
        expiry = int((time.time() if now is None else now) + SESSION_TTL)
        fp = principal.name.removeprefix("token:")
        nonce = os.urandom(9).hex()
        body = f"{fp}.{expiry}.{nonce}"
        return f"{body}.{self._mac('session', body)}"

    def session_principal(self, value: str, *, now: float | None = None) -> Principal | None:
        """The principal a session cookie stands for, if its MAC holds and it has not
        expired (and its token is still configured)."""
        parts = value.split(".")
        if len(parts) != 4:
            return None
        fp, expiry, nonce, mac = parts
        body = f"{fp}.{expiry}.{nonce}"
        if not hmac.compare_digest(self._mac("session", body), mac):
            return None
        if not expiry.isdigit() or int(expiry) < (time.time() if now is None else now):
            return None
        principal = self.by_fingerprint(fp)
        return None if principal is None else Principal(principal.name, principal.scopes, "session")

    def _mac(self, purpose: str, body: str) -> str:
        return hmac.new(self.session_secret, f"{purpose}:{body}".encode(), "sha256").hexdigest()


def bearer_token(request: Request) -> str | None:
    """The token of an ``Authorization: Bearer`` header, if there is one."""
    header = request.headers.get("authorization")
    if header is None:
        return None
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else ""
