"""Database URLs made safe to show: ``redact_url`` hides every credential a URL carries.

A database URL reaches output in many places (the ``worker.ready`` log line, the
``doctor`` header, "could not open ..." errors); each shows ``redact_url(url)``, never
the URL itself. SQLAlchemy's ``render_as_string(hide_password=True)`` is not enough: it
hides only the user-info password, while libpq also reads ``?password=`` and
``?sslpassword=``, and proxies and cloud drivers read ``?token=``, ``?api_key=`` and the
like. So the user-info password and every query parameter whose name looks secret
(``SECRET_WORDS``) are replaced by ``***``; the scheme, user, host, port, database and
the other parameters stay, since they are what an operator needs to see.

``scrub(text, url)`` is the second line of defence, for messages Treadle does not build
(a driver's error): it replaces each credential ``url`` carries wherever it appears.

Standard library only: the memory backend and the CLI use it without SQLAlchemy.
"""

from __future__ import annotations

import re
from urllib.parse import unquote, unquote_plus

__all__ = ["MASK", "SECRET_WORDS", "redact_url", "scrub", "url_secrets"]

MASK = "***"

SECRET_WORDS = ("pass", "pwd", "secret", "token", "key", "credential", "auth", "signature")
"""A parameter whose name contains one of these (any case) holds a secret: ``password``,
``sslpassword``, ``passfile``, ``client_secret``, ``auth_token``, ``api_key``,
``access_key``, ``sslkey`` ... Hiding a harmless one (a key file's path) costs nothing."""

_PAIR = re.compile(r"(?P<key>[A-Za-z_][\w.-]*)(?P<eq>\s*=\s*)(?P<value>'(?:[^'\\]|\\.)*'|\S*)")
"""``key=value`` in a libpq connection string (``host=db password='a b'``)."""


def is_secret_name(name: str) -> bool:
    """Whether a URL parameter or connection option of this name holds a credential."""
    lowered = unquote_plus(name).lower()
    return any(word in lowered for word in SECRET_WORDS)


def redact_url(url: object) -> str:
    """``url`` with its credentials replaced by ``***``, for logs, tables and errors.

    ``postgresql://u:pw@h/db?password=x&sslmode=require`` shows as
    ``postgresql://u:***@h/db?password=***&sslmode=require``; ``sqlite:///path.db`` and
    ``memory://`` are unchanged. A string that is not a URL is shown with the same
    rules (a libpq ``password=...`` option, a ``user:pw@host`` prefix) applied.
    A SQLAlchemy ``URL`` object is accepted too (through ``str()``).
    """
    text = url if isinstance(url, str) else str(url)
    scheme, sep, rest = text.partition("://")
    if not sep:
        userinfo, after = _split_userinfo(text)
        return _redact_pairs(_redact_userinfo(userinfo) + after)
    userinfo, after = _split_userinfo(rest)
    path, question, query = after.partition("?")
    if question:
        query = "&".join(_redact_param(param) for param in query.split("&"))
    return f"{scheme}{sep}{_redact_userinfo(userinfo)}{path}{question}{query}"


def url_secrets(url: object) -> list[str]:
    """The credentials ``url`` carries, as written and percent-decoded, longest first."""
    text = url if isinstance(url, str) else str(url)
    _, sep, rest = text.partition("://")
    userinfo, after = _split_userinfo(rest if sep else text)
    found: set[str] = set()
    _, colon, password = userinfo[:-1].partition(":")
    if colon and password:
        found.add(password)
    if sep:
        params = after.partition("?")[2].split("&")
        for name, eq, value in (param.partition("=") for param in params):
            if eq and value and is_secret_name(name):
                found.add(value)
    else:
        for match in _PAIR.finditer(text):
            if match["value"] and is_secret_name(match["key"]):
                found.add(match["value"].strip("'"))
    decoded = {unquote(secret) for secret in found} | {unquote_plus(secret) for secret in found}
    return sorted((found | decoded) - {"", MASK}, key=len, reverse=True)


def scrub(text: str, url: object) -> str:
    """``text`` with every credential of ``url`` (``url_secrets``) replaced by ``***``."""
    for secret in url_secrets(url):
        text = text.replace(secret, MASK)
    return text


def _split_userinfo(rest: str) -> tuple[str, str]:
    """``rest`` (what follows ``scheme://``) split after its user-info's ``@``.

    The user-info ends at the last ``@`` before the query, so a password holding an
    unescaped ``@``, ``/`` or ``:`` is hidden whole (SQLAlchemy stops at the first
    ``@`` and would show the rest as the host). Nothing follows the scheme's ``//``
    directly in ``sqlite:///path``, so a path is never taken for a user-info part.
    """
    first_at = rest.find("@")
    if first_at < 0 or rest.startswith(("/", ".")):
        return "", rest
    query = rest.find("?", first_at)
    end = rest.rfind("@", 0, query if query >= 0 else len(rest))
    return rest[: end + 1], rest[end + 1 :]


def _redact_userinfo(userinfo: str) -> str:
    user, colon, password = userinfo[:-1].partition(":")
    return f"{user}:{MASK}@" if colon and password else userinfo


def _redact_param(param: str) -> str:
    name, eq, value = param.partition("=")
    return f"{name}={MASK}" if eq and value and is_secret_name(name) else param


def _redact_pairs(text: str) -> str:
    def hide(match: re.Match[str]) -> str:
        if not match["value"] or not is_secret_name(match["key"]):
            return match[0]
        return f"{match['key']}{match['eq']}{MASK}"

    return _PAIR.sub(hide, text)
