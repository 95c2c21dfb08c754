"""Who may call the API: bearer tokens with two scopes, checked before any route runs.

Tokens come from ``api_tokens`` in the config and the ``FINDISTIL_API_TOKEN`` (admin) /
``FINDISTIL_API_READ_TOKEN`` (read) environment variables. With none configured the API is
open, which ``findistil serve`` allows only on a loopback address (``check_bind``). With any
configured, every route but the public ones (``/health``, the dashboard's static page and
files, the OpenAPI schema and docs) needs ``Authorization: Bearer <token>``:

- ``read``: ``GET``/``HEAD`` under ``/api`` and everything under ``/v1`` (model list, chat
  completions): what an application serving traffic needs;
- ``admin``: also the writing routes (create, cancel, delete, ``POST /api/logs``).

A missing or unknown token is 401, a read token on an admin route 403; in upstream's
``{"detail": ...}`` shape under ``/api`` and in OpenAI's ``{"error": {...}}`` under ``/v1``
(so the ``openai`` SDK, which sends its ``api_key`` as the bearer token, shows the message).
Tokens are compared as SHA-256 digests with ``hmac.compare_digest``, against every configured
token, so neither timing nor length says which part of a guess was right.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging

from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from findistil.api.schemas import openai_error_body
from findistil.config import ApiToken
from findistil.errors import ConfigError

log = logging.getLogger(__name__)

PUBLIC_PATHS = frozenset({"/health", "/", "/openapi.json", "/docs", "/docs/oauth2-redirect"})
PUBLIC_PREFIXES = ("/static/",)
READ_METHODS = frozenset({"GET", "HEAD"})
RANK = {"read": 1, "admin": 2}
HOW_TO_SET = (
    "set FINDISTIL_API_TOKEN (admin) or api_tokens in the config; make one with "
    "`python -c 'import secrets; print(secrets.token_urlsafe(32))'`"
)


def required_scope(method: str, path: str) -> str | None:
    """The scope a request needs: None for public routes, else ``read`` or ``admin``."""
    if path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES):
        return None
    if path.startswith("/v1/") or method in READ_METHODS:
        return "read"
    return "admin"


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).digest()


class TokenAuth:
    """ASGI middleware enforcing ``tokens`` (see the module docstring)."""

    def __init__(self, app: ASGIApp, tokens: list[ApiToken]) -> None:
        self.app = app
        self.tokens = [(_digest(t.token.get_secret_value()), t.scope, t.name) for t in tokens]

    def scope_of(self, presented: str) -> tuple[str, str] | None:
        """(scope, name) of the token ``presented``, or None; constant time in the guess."""
        guess = _digest(presented)
        found = None
        for digest, scope, name in self.tokens:
            if hmac.compare_digest(digest, guess) and found is None:
                found = (scope, name)
        return found

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.tokens:
            await self.app(scope, receive, send)
            return
        needed = required_scope(scope["method"], scope["path"])
        if needed is None:
            await self.app(scope, receive, send)
            return
        header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
        kind, _, presented = header.partition(" ")
        holder = self.scope_of(presented.strip()) if kind.lower() == "bearer" else None
        if holder is None:
            why = "a valid token" if header else "a token"
            await _refuse(
                scope, send, 401, f"This route needs {why}: send Authorization: Bearer <token>."
            )
            return
        if RANK[holder[0]] < RANK[needed]:
            log.warning(
                "token %r (read) refused on %s %s", holder[1], scope["method"], scope["path"]
            )
            await _refuse(scope, send, 403, "This route needs an admin token; yours is read-only.")
            return
        await self.app(scope, receive, send)


async def _refuse(scope: Scope, send: Send, status: int, message: str) -> None:
    if scope["path"].startswith("/v1/"):
        code = "invalid_api_key" if status == 401 else "insufficient_scope"
        body = openai_error_body(message, code)
    else:
        body = {"detail": message}
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    response = JSONResponse(body, status_code=status, headers=headers)
    await response(scope, _no_receive, send)


async def _no_receive():  # pragma: no cover - JSONResponse never reads the body
    return {"type": "http.disconnect"}


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def check_bind(host: str, tokens: list[ApiToken]) -> None:
    """Refuse to serve an open API on an address other machines can reach."""
    if not tokens and not is_loopback(host):
        raise ConfigError(
            f"refusing to serve on {host} without an API token (anyone who can reach it could "
            f"create and delete jobs): {HOW_TO_SET}; or bind to 127.0.0.1"
        )
