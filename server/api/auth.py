"""API keys: who may call what. Bearer tokens with two scopes, checked by one ASGI middleware.

- ``inference`` keys may call the OpenAI endpoints and read adapters (``GET /v1/adapters``);
- ``admin`` keys may do all of that and also upload and delete adapters, merge them and delete merged models.

Keys come from the settings (``--api-keys``, ``--admin-api-keys``, comma-separated) and/or a
file (``--api-keys-file``: one ``inference KEY`` or ``admin KEY`` a line, ``#`` comments).
No key configured means auth is off (local development), logged as a warning at start.

``/health`` and ``/ready`` (probes), the OpenAPI schema and ``/docs`` are always open;
``/metrics`` and ``/dashboard`` are open unless ``--no-open-metrics`` / ``--no-open-dashboard``.
Keys are compared as sha256 digests with :func:`hmac.compare_digest` against every known
key (no early exit), so timing tells nothing about a key; they are never logged.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import logging
from dataclasses import dataclass
from pathlib import Path

from server.errors import send_envelope
from server.settings import Settings

log = logging.getLogger(__name__)


class Scope(enum.IntEnum):
    """What a key may do; a higher scope includes the lower ones."""

    INFERENCE = 1
    ADMIN = 2


_CHALLENGE = {"WWW-Authenticate": "Bearer"}
ALWAYS_OPEN = frozenset({"/health", "/ready", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"})


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def parse_keys_file(text: str) -> list[tuple[Scope, str]]:
    """Parse a keys file: ``inference KEY`` or ``admin KEY`` per line; blank lines and ``#`` comments skipped.

    Raises:
        ValueError: a line with another scope or without a key (the line number is named, never the key).
    """
    keys = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2 or parts[0] not in ("inference", "admin"):
            raise ValueError(f"API keys file line {number}: expected 'inference KEY' or 'admin KEY'")
        keys.append((Scope.ADMIN if parts[0] == "admin" else Scope.INFERENCE, parts[1]))
    return keys


@dataclass(frozen=True)
class KeyRing:
    """The known keys as sha256 digests with their scopes."""

    digests: tuple[tuple[bytes, Scope], ...]

    @classmethod
    def from_settings(cls, settings: Settings) -> KeyRing:
        """Collect keys from ``api_keys``, ``admin_api_keys`` and ``api_keys_file``.

        Raises:
            ValueError: a malformed keys file (see :func:`parse_keys_file`).
        """
        pairs: list[tuple[Scope, str]] = []
        for secret, scope in ((settings.api_keys, Scope.INFERENCE), (settings.admin_api_keys, Scope.ADMIN)):
            if secret is not None:
                pairs += [(scope, k.strip()) for k in secret.get_secret_value().split(",") if k.strip()]
        if settings.api_keys_file is not None:
            pairs += parse_keys_file(Path(settings.api_keys_file).read_text())
        return cls(tuple((_digest(key), scope) for scope, key in pairs))

    @property
    def enabled(self) -> bool:
        return bool(self.digests)

    def scope_of(self, token: str) -> Scope | None:
        """The scope of ``token``, or None if unknown. Compares against every key in constant time each."""
        probe = _digest(token)
        found: Scope | None = None
        for digest, scope in self.digests:
            if hmac.compare_digest(probe, digest) and (found is None or scope > found):
                found = scope
        return found


def required_scope(method: str, path: str, settings: Settings) -> Scope | None:
    """The scope a request needs, or None for open paths."""
    if path in ALWAYS_OPEN:
        return None
    if path == "/metrics" and settings.open_metrics:
        return None
    if (path == "/dashboard" or path.startswith("/dashboard/")) and settings.open_dashboard:
        return None
    if method not in ("GET", "HEAD") and (
        path == "/v1/adapters" or path.startswith(("/v1/adapters/", "/v1/merges/", "/v1/models/"))
    ):  # upload/delete adapters, merge, cancel a merge, delete (unmerge) a model
        return Scope.ADMIN
    return Scope.INFERENCE


def _bearer(headers: list[tuple[bytes, bytes]]) -> str | None:
    for name, value in headers:
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return token.strip() if scheme.lower() == "bearer" and token.strip() else None
    return None


class BearerAuth:
    """Pure ASGI middleware: 401 without a valid key, 403 with a key of too low a scope (OpenAI envelope)."""

    def __init__(self, app, settings: Settings, keys: KeyRing) -> None:
        self.app = app
        self.settings = settings
        self.keys = keys
        if not keys.enabled:
            log.warning("no API keys configured: every endpoint is open (set --api-keys-file or QSERVE_API_KEYS)")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not self.keys.enabled:
            return await self.app(scope, receive, send)
        needed = required_scope(scope["method"], scope["path"], self.settings)
        if needed is None:
            return await self.app(scope, receive, send)
        token = _bearer(scope["headers"])
        if token is None:
            return await send_envelope(
                send, 401, "missing API key: send 'Authorization: Bearer <key>'", headers=_CHALLENGE
            )
        have = self.keys.scope_of(token)
        if have is None:
            return await send_envelope(
                send, 401, "invalid API key: the bearer token is not a known key", headers=_CHALLENGE
            )
        if have < needed:
            return await send_envelope(
                send,
                403,
                f"this API key has scope '{have.name.lower()}'; {scope['method']} {scope['path']} "
                f"needs scope '{needed.name.lower()}'",
            )
        return await self.app(scope, receive, send)
