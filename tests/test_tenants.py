"""API keys, tenants and quotas in the job store (SQLite and a real PostgreSQL), and the authenticator."""

from __future__ import annotations

import sqlite3
import time

import pytest

from shopreel.serve import store as store_module
from shopreel.serve.auth import Authenticator, AuthError, key_digest, key_id_of, new_key
from shopreel.serve.config import AuthSettings, TenantQuotas
from shopreel.serve.store import JobRecord, QuotaExceeded, SqliteJobStore, new_video_id


def _record(tenant: str = "default", **overrides) -> JobRecord:
    values = {"model": "m", "seconds": "4", "size": "64x64", "request": "{}", "tenant": tenant}
    return JobRecord(**{**values, **overrides})


# --- keys ----------------------------------------------------------------------------------------


def test_keys_are_stored_hashed_listed_and_revoked(jobs, store_url, tmp_path):
    acme, admin = new_key("acme", label="shop frontend"), new_key("ops", "admin")
    for created in (acme, admin):
        jobs.create_key(created.record, created.secret_sha256)
    assert key_id_of(acme.secret) == acme.record.id
    found, digest = jobs.find_key(acme.record.id)
    assert found == acme.record and digest == key_digest(acme.secret) != acme.secret
    assert jobs.find_key("key_000000000000") is None
    assert [key.id for key in jobs.api_keys("acme")] == [acme.record.id]
    assert {key.id for key in jobs.api_keys()} == {acme.record.id, admin.record.id}

    assert jobs.revoke_key(acme.record.id) is True
    assert jobs.find_key(acme.record.id)[0].revoked_at is not None
    assert jobs.revoke_key(acme.record.id) is False  # already revoked
    assert jobs.revoke_key("key_000000000000") is None
    # The secret is nowhere in the store, only its digest.
    if store_url.startswith("sqlite"):
        raw = (tmp_path / "jobs.sqlite3").read_bytes() + (tmp_path / "jobs.sqlite3-wal").read_bytes()
        secret_part = acme.secret.split("-", 2)[2].encode()  # sr-<id>-<secret>: the secret may hold "-"
        assert secret_part not in raw and key_digest(acme.secret).encode() in raw


def test_tenant_quotas_are_set_replaced_and_cleared(jobs):
    assert jobs.tenant_quotas("acme") is None and jobs.tenants() == []
    jobs.set_tenant_quotas("acme", TenantQuotas(max_streams=2))
    jobs.set_tenant_quotas("acme", TenantQuotas(max_streams=3, videos_per_minute=10))
    assert jobs.tenant_quotas("acme") == TenantQuotas(max_streams=3, videos_per_minute=10)
    assert [name for name, _ in jobs.tenants()] == ["acme"]
    jobs.set_tenant_quotas("acme", None)
    assert jobs.tenant_quotas("acme") is None


# --- tenancy of videos ---------------------------------------------------------------------------


def test_listing_shows_only_the_tenants_own_videos(jobs):
    mine = [jobs.create(_record("acme", created_at=10 + i)) for i in range(3)]
    theirs = jobs.create(_record("globex", created_at=11))
    page, has_more = jobs.list(tenant="acme", limit=2, order="asc")
    assert [r.id for r in page] == [mine[0].id, mine[1].id] and has_more
    page, has_more = jobs.list(tenant="acme", after=mine[1].id, order="asc")
    assert [r.id for r in page] == [mine[2].id] and not has_more
    with pytest.raises(KeyError):  # another tenant's id is no cursor: it does not exist for this one
        jobs.list(tenant="acme", after=theirs.id)
    assert len(jobs.list()[0]) == 4  # no tenant: the operator's view
    assert jobs.get(theirs.id).tenant == "globex"


def test_tenant_cannot_change(jobs):
    record = jobs.create(_record("acme"))
    with pytest.raises(ValueError, match="cannot change"):
        jobs.update(record.id, tenant="globex")


# --- quotas at admission -------------------------------------------------------------------------


def test_stream_quota_is_per_tenant(jobs):
    quotas = TenantQuotas(max_streams=1)
    jobs.admit(new_video_id(), "stream", limit=10, hold_s=30, tenant="acme", quotas=quotas)
    with pytest.raises(QuotaExceeded) as refused:
        jobs.admit(new_video_id(), "stream", limit=10, hold_s=30, tenant="acme", quotas=quotas)
    assert (refused.value.quota, refused.value.used, refused.value.limit) == ("max_streams", 1, 1)
    jobs.admit(new_video_id(), "stream", limit=10, hold_s=30, tenant="globex", quotas=quotas)


def test_job_quota_counts_queued_and_running_jobs(jobs):
    quotas = TenantQuotas(max_jobs=2)
    first, second = _record("acme"), _record("acme")
    for record in (first, second):
        jobs.admit(record.id, "job", limit=10, hold_s=30, tenant="acme", quotas=quotas)
        jobs.enqueue(record)
    jobs.claim("w", lease_s=30, max_running=4, max_attempts=3)  # running still counts for the tenant
    with pytest.raises(QuotaExceeded, match="max_jobs"):
        jobs.admit(new_video_id(), "job", limit=10, hold_s=30, tenant="acme", quotas=quotas)
    jobs.update(first.id, status="completed", progress=100)
    jobs.admit(new_video_id(), "job", limit=10, hold_s=30, tenant="acme", quotas=quotas)


def test_videos_per_minute_counts_accepted_and_admitted_videos(jobs):
    quotas = TenantQuotas(videos_per_minute=3)
    now = int(time.time())
    jobs.create(_record("acme", created_at=now - 90, status="completed", progress=100))  # out of the window
    jobs.create(_record("acme", created_at=now - 20, status="completed", progress=100))
    streaming = _record("acme")
    jobs.admit(streaming.id, "stream", limit=10, hold_s=30, tenant="acme", quotas=quotas)
    jobs.start(streaming, "w", lease_s=30)  # admitted and recorded: counted once
    jobs.admit(new_video_id(), "job", limit=10, hold_s=30, tenant="acme", quotas=quotas)  # 3rd, planning
    with pytest.raises(QuotaExceeded) as refused:
        jobs.admit(new_video_id(), "stream", limit=10, hold_s=30, tenant="acme", quotas=quotas)
    assert refused.value.quota == "videos_per_minute" and refused.value.used == 3
    # The oldest video in the window leaves it about 40 s from now: that is when to come back.
    assert refused.value.retry_after_s is not None and 35 <= refused.value.retry_after_s <= 42


def test_stored_bytes_quota_and_when_space_frees(jobs):
    quotas = TenantQuotas(max_stored_bytes=1000)
    now = int(time.time())
    kept = jobs.create(
        _record("acme", status="completed", progress=100, stored_bytes=600, expires_at=now + 3600)
    )
    jobs.admit(new_video_id(), "job", limit=10, hold_s=30, tenant="acme", quotas=quotas)
    jobs.create(_record("acme", status="completed", progress=100, stored_bytes=500, expires_at=now + 120))
    with pytest.raises(QuotaExceeded) as refused:
        jobs.admit(new_video_id(), "job", limit=10, hold_s=30, tenant="acme", quotas=quotas)
    assert (refused.value.quota, refused.value.used) == ("max_stored_bytes", 1100)
    assert 110 <= refused.value.retry_after_s <= 121  # the first video to expire frees space
    jobs.delete(kept.id)  # deleting a video frees its bytes at once
    jobs.admit(new_video_id(), "job", limit=10, hold_s=30, tenant="acme", quotas=quotas)


def test_version_3_stores_are_migrated_to_the_default_tenant(tmp_path):
    path = tmp_path / "jobs.sqlite3"
    with sqlite3.connect(path) as conn:
        conn.executescript(store_module._SCHEMA_V1.format(seq_type="INTEGER", seq_suffix=" AUTOINCREMENT"))
        conn.executescript(store_module._SCHEMA_V2)
        conn.executescript(store_module._SCHEMA_V3)
        conn.execute(
            "INSERT INTO jobs (id, created_at, status, progress, model, seconds, size, request)"
            " VALUES (?, 1, 'completed', 100, 'm', '4', '64x64', '{}')",
            (video_id := new_video_id(),),
        )
        conn.execute("PRAGMA user_version = 3")
    conn.close()
    with SqliteJobStore(path) as store:
        record = store.get(video_id)
        assert (record.tenant, record.stored_bytes) == ("default", 0)
        assert [r.id for r in store.list(tenant="default")[0]] == [video_id]


# --- the authenticator ---------------------------------------------------------------------------


def _authenticator(jobs, **settings) -> Authenticator:
    return Authenticator(AuthSettings(enabled=True, **settings), jobs, "SHOPREEL_TEST_ADMIN_KEY")


def test_a_valid_key_names_its_tenant_and_quotas(jobs):
    created = new_key("acme")
    jobs.create_key(created.record, created.secret_sha256)
    jobs.set_tenant_quotas("acme", TenantQuotas(max_streams=1))
    principal = _authenticator(jobs).principal(f"Bearer {created.secret}")
    assert (principal.tenant, principal.key_id, principal.admin) == ("acme", created.record.id, False)
    assert principal.quotas == TenantQuotas(max_streams=1)
    other = new_key("globex")
    jobs.create_key(other.record, other.secret_sha256)
    defaults = TenantQuotas(videos_per_minute=5)
    auth = _authenticator(jobs, default_quotas=defaults)
    assert auth.principal(f"bearer {other.secret}").quotas == defaults


@pytest.mark.parametrize(
    ("header", "code"),
    [
        (None, "missing_api_key"),
        ("Basic dXNlcjpwYXNz", "missing_api_key"),
        ("Bearer ", "missing_api_key"),
        ("Bearer sk-not-ours", "invalid_api_key"),
        ("Bearer sr-000000000000-" + "A" * 43, "invalid_api_key"),  # well formed, unknown
    ],
)
def test_requests_without_a_valid_key_are_401(jobs, header, code):
    with pytest.raises(AuthError) as refused:
        _authenticator(jobs).principal(header)
    assert (refused.value.status, refused.value.code) == (401, code)


def test_a_right_id_with_a_wrong_secret_is_refused(jobs):
    created = new_key("acme")
    jobs.create_key(created.record, created.secret_sha256)
    forged = created.secret[:-1] + ("A" if created.secret[-1] != "A" else "B")
    with pytest.raises(AuthError, match="not valid"):
        _authenticator(jobs).principal(f"Bearer {forged}")


def test_revocation_takes_effect_within_the_cache_time(jobs):
    created = new_key("acme")
    jobs.create_key(created.record, created.secret_sha256)
    auth = _authenticator(jobs, key_cache_s=0.3)
    header = f"Bearer {created.secret}"
    assert auth.principal(header).tenant == "acme"
    jobs.revoke_key(created.record.id)
    assert auth.principal(header).tenant == "acme"  # cached: stores are not read per request
    time.sleep(0.35)
    with pytest.raises(AuthError, match="not valid"):
        auth.principal(header)


def test_admin_needs_an_admin_key(jobs, monkeypatch):
    user, admin = new_key("acme"), new_key("ops", "admin")
    for created in (user, admin):
        jobs.create_key(created.record, created.secret_sha256)
    auth = _authenticator(jobs)
    assert auth.admin(f"Bearer {admin.secret}").admin
    with pytest.raises(AuthError) as refused:
        auth.admin(f"Bearer {user.secret}")
    assert (refused.value.status, refused.value.code) == (403, "permission_denied")
    with pytest.raises(AuthError) as refused:
        auth.admin("Bearer env-admin")
    assert refused.value.status == 401
    monkeypatch.setenv("SHOPREEL_TEST_ADMIN_KEY", "env-admin")
    assert auth.admin("Bearer env-admin").admin
    assert auth.principal("Bearer env-admin").admin  # the bootstrap key works on /v1 too


def test_auth_off_puts_every_request_in_the_default_tenant(jobs):
    auth = Authenticator(AuthSettings(enabled=False), jobs, "SHOPREEL_TEST_ADMIN_KEY")
    assert auth.principal(None).tenant == "default"
    assert auth.principal("Bearer anything").tenant == "default"  # the openai SDK always sends one
    with pytest.raises(AuthError) as refused:
        auth.admin(None)
    assert (refused.value.status, refused.value.code) == (403, "admin_disabled")
