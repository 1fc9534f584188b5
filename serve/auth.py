"""API keys and tenants: who a request is, which videos it may see, and the quotas it runs under.

A key is ``sr-<key id>-<secret>``: the id (12 hex digits) finds the key's row, and the row holds
the SHA-256 of the whole key, never the key itself. SHA-256 rather than a slow password hash: the
secret is 256 random bits, which no dictionary guesses, and every request checks a key. Each key
belongs to one tenant; every video belongs to the tenant whose key asked for it, and another
tenant's video id answers 404, as if it did not exist. A key with the ``admin`` role may also call
the admin API (the event calendar, keys and quotas).

``Authenticator`` answers per request from a small cache (``auth.key_cache_s``), so a revoked key
or a changed quota takes effect on every replica within that many seconds, without a restart.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
import time
from dataclasses import dataclass
from typing import Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field

from .config import TENANT_PATTERN, AuthSettings, TenantQuotas

KeyRole = Literal["user", "admin"]
KEY_PREFIX = "sr-"
_KEY = re.compile(r"^sr-([0-9a-f]{12})-([A-Za-z0-9_-]{43})$")
AUTH_OFF_WARNING = (
    "AUTHENTICATION IS OFF: any client can list, download and delete every video. "
    "Set auth.enabled: true (deploy/ does) and create keys with `shopreel keys create`."
)
DEFAULT_TENANT = "default"  # every video's tenant while authentication is off
ENV_ADMIN_TENANT = "admin"  # the tenant of requests made with the environment's admin key


class ApiKey(BaseModel):
    """One stored key, without its secret: what ``shopreel keys list`` and ``GET /admin/keys`` show."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(pattern=r"^key_[0-9a-f]{12}$")
    tenant: str = Field(pattern=TENANT_PATTERN)
    role: KeyRole = "user"
    label: str | None = Field(default=None, max_length=200)
    created_at: int = Field(ge=0, description="unix seconds")
    revoked_at: int | None = Field(default=None, description="unix seconds; revoked keys stay listed")


@dataclass(frozen=True)
class NewKey:
    """A key as created: the only time its secret exists outside the client that keeps it."""

    record: ApiKey
    secret: str  # the whole key, ``sr-<id>-<secret>``
    secret_sha256: str


def new_key(tenant: str, role: KeyRole = "user", label: str | None = None) -> NewKey:
    key_hex = secrets.token_hex(6)
    secret = f"{KEY_PREFIX}{key_hex}-{secrets.token_urlsafe(32)}"
    record = ApiKey(id=f"key_{key_hex}", tenant=tenant, role=role, label=label, created_at=int(time.time()))
    return NewKey(record=record, secret=secret, secret_sha256=key_digest(secret))


def key_digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def key_id_of(secret: str) -> str | None:
    """The id a well-formed key names (``key_<hex>``); ``None`` for anything else."""
    match = _KEY.fullmatch(secret)
    return None if match is None else f"key_{match.group(1)}"


@dataclass(frozen=True)
class Principal:
    """Who made a request: its tenant, its key (``None`` while authentication is off) and its quotas."""

    tenant: str
    key_id: str | None
    admin: bool
    quotas: TenantQuotas


# Whoever asks when no one is told apart: the default tenant, no quotas of its own (tests, in-process).
ANONYMOUS = Principal(DEFAULT_TENANT, None, admin=False, quotas=TenantQuotas())


class AuthError(Exception):
    """Why a request is not let in: ``status`` 401 (no valid key) or 403 (a valid key lacking a role)."""

    def __init__(self, status: Literal[401, 403], message: str, code: str) -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


class KeyLookup(Protocol):
    """What the authenticator needs from the store (``JobStore`` provides it)."""

    def find_key(self, key_id: str) -> tuple[ApiKey, str] | None:
        """The key and its SHA-256, or ``None``."""

    def tenant_quotas(self, tenant: str) -> TenantQuotas | None:
        """The tenant's own quotas, or ``None`` where the config's defaults apply."""


def bearer_token(authorization: str | None) -> str | None:
    scheme, _, token = (authorization or "").partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


class Authenticator:
    """Turns a request's ``Authorization: Bearer`` key into a ``Principal``, for one ingress replica.

    Store lookups are cached for ``settings.key_cache_s`` (keyed by the key's digest, so the cache
    holds no secret); the admin key from the environment is compared in constant time.
    """

    def __init__(self, settings: AuthSettings, store: KeyLookup, admin_key_env: str) -> None:
        self.settings = settings
        self.store = store
        self.admin_key_env = admin_key_env
        self._cache: dict[str, tuple[float, Principal | None]] = {}
        self._quota_cache: dict[str, tuple[float, TenantQuotas]] = {}

    @property
    def enabled(self) -> bool:
        return self.settings.enabled

    def anonymous(self) -> Principal:
        return Principal(DEFAULT_TENANT, None, admin=False, quotas=self._quotas(DEFAULT_TENANT))

    def principal(self, authorization: str | None) -> Principal:
        """The principal of a ``/v1`` request (blocking: reads the store on a cache miss)."""
        if not self.settings.enabled:
            return self.anonymous()
        token = bearer_token(authorization)
        if token is None:
            raise AuthError(
                401,
                "an API key is required: send it as 'Authorization: Bearer <key>' (shopreel keys create)",
                "missing_api_key",
            )
        found = self._stored(token) or self._env_admin(token)
        if found is None:
            raise AuthError(401, "the API key is not valid (unknown, revoked or mistyped)", "invalid_api_key")
        return found

    def admin(self, authorization: str | None) -> Principal:
        """The principal of an admin request: a stored admin key or the environment's admin key."""
        token = bearer_token(authorization)
        found = None if token is None else (self._env_admin(token) or self._stored(token))
        if found is None:
            if token is None and not os.environ.get(self.admin_key_env) and not self.settings.enabled:
                raise AuthError(
                    403,
                    f"the admin API is off: set ${self.admin_key_env} or create an admin key "
                    "(shopreel keys create --admin)",
                    "admin_disabled",
                )
            raise AuthError(
                401, "a valid admin key is required (Authorization: Bearer ...)", "invalid_api_key"
            )
        if not found.admin:
            raise AuthError(403, "this API key may not use the admin API", "permission_denied")
        return found

    def _env_admin(self, token: str) -> Principal | None:
        expected = os.environ.get(self.admin_key_env, "")
        if expected and hmac.compare_digest(token.encode(), expected.encode()):
            return Principal(ENV_ADMIN_TENANT, None, admin=True, quotas=self.settings.default_quotas)
        return None

    def _stored(self, token: str) -> Principal | None:
        key_id = key_id_of(token)
        if key_id is None:
            return None
        digest = key_digest(token)
        now = time.monotonic()
        cached = self._cache.get(digest)
        if cached is not None and cached[0] > now:
            return cached[1]
        found = self.store.find_key(key_id)
        principal: Principal | None = None
        if found is not None:
            record, stored_digest = found
            if record.revoked_at is None and hmac.compare_digest(digest, stored_digest):
                principal = Principal(
                    record.tenant, record.id, admin=record.role == "admin", quotas=self._quotas(record.tenant)
                )
        if self.settings.key_cache_s > 0:
            if len(self._cache) > 10_000:  # random keys must not grow it without bound
                self._cache.clear()
            self._cache[digest] = (now + self.settings.key_cache_s, principal)
        return principal

    def _quotas(self, tenant: str) -> TenantQuotas:
        now = time.monotonic()
        cached = self._quota_cache.get(tenant)
        if cached is not None and cached[0] > now:
            return cached[1]
        quotas = self.store.tenant_quotas(tenant) or self.settings.default_quotas
        if self.settings.key_cache_s > 0:
            self._quota_cache[tenant] = (now + self.settings.key_cache_s, quotas)
        return quotas
