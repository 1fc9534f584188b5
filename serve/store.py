"""Job and video stores behind the ``/v1/videos`` API, shared by every ingress replica.

``JobStore`` keeps one row per video in SQLite (the embedded default) or PostgreSQL (a cluster), so
the job list and every job's state survive restarts. It is also the cluster's admission authority:
stream slots, pending and running jobs are counted and taken in one transaction under one lock.
Workers claim jobs with a lease they renew; a job whose worker died is claimed again.

``VideoStore`` keeps the finished files under one directory per job (shared storage when several
nodes serve) and only ever makes a *complete* file visible (temp file in the same directory +
``os.replace``), so a half-written video is never served.
"""

from __future__ import annotations

import abc
import builtins
import contextlib
import errno
import json
import os
import re
import shutil
import sqlite3
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from typing_extensions import TypedDict

from .auth import ApiKey
from .config import TENANT_PATTERN, SalesEvent, TenantQuotas

JobStatus = Literal["queued", "in_progress", "completed", "failed"]
VideoVariant = Literal["video", "thumbnail"]
ListOrder = Literal["asc", "desc"]
ProductionKind = Literal["job", "stream", "sync"]
AdmissionKind = Literal["job", "stream"]
# A queued job's class: ``bulk`` (catalog pre-generation) is claimed after every ``normal`` job and is
# refused first when the queue fills (``JobSettings.bulk_share``).
JobPriority = Literal["normal", "bulk"]

VIDEO_ID_PATTERN = r"video_[0-9a-f]{32}"
MAX_LIST_LIMIT = 100
UNFINISHED: tuple[JobStatus, ...] = ("queued", "in_progress")
FINISHED: tuple[JobStatus, ...] = ("completed", "failed")
VARIANT_FILES: dict[VideoVariant, str] = {"video": "video.mp4", "thumbnail": "thumbnail.jpg"}
VARIANT_MEDIA_TYPES: dict[VideoVariant, str] = {"video": "video/mp4", "thumbnail": "image/jpeg"}

_VIDEO_ID = re.compile(VIDEO_ID_PATTERN)


def new_video_id() -> str:
    return f"video_{uuid.uuid4().hex}"


def is_video_id(value: str) -> bool:
    return _VIDEO_ID.fullmatch(value) is not None


class JobError(TypedDict):
    """Why a job failed, in the shape of the OpenAI ``Video.error`` object."""

    code: str
    message: str


class JobRecord(BaseModel):
    """One video job as stored; the OpenAI ``Video`` object is rendered from it."""

    model_config = ConfigDict(extra="forbid", frozen=True)  # a snapshot: change jobs via JobStore.update

    id: str = Field(default_factory=new_video_id, pattern=f"^{VIDEO_ID_PATTERN}$")
    created_at: int = Field(default_factory=lambda: int(time.time()), ge=0, description="unix seconds")
    status: JobStatus = "queued"
    progress: int = Field(default=0, ge=0, le=100)
    model: str = Field(min_length=1)
    prompt: str | None = None
    seconds: str = Field(min_length=1, description="duration as the API reports it, e.g. '4'")
    size: str = Field(pattern=r"^\d+x\d+$", description="'WIDTHxHEIGHT'")
    completed_at: int | None = None
    expires_at: int | None = None
    error: JobError | None = None
    request: str = Field(description="JSON of what producing it needs (jobs.ProductionRequest)")
    num_frames: int | None = Field(default=None, ge=1, description="frames in the planned storyboard")
    timings: dict[str, float | None] | None = Field(default=None, description="seconds per stage")
    kind: ProductionKind = Field(default="job", description="how it was asked for: queued job, stream, sync")
    attempts: int = Field(default=0, ge=0, description="productions started (a lost worker's job is retried)")
    priority: JobPriority = Field(default="normal", description="bulk: claimed after normal jobs")
    tenant: str = Field(default="default", pattern=TENANT_PATTERN, description="whose video it is")
    stored_bytes: int = Field(default=0, ge=0, description="bytes of its files in the video store")
    quality: dict[str, Any] | None = Field(default=None, description="the finished video's quality report")
    wait_for: str | None = Field(
        default=None,
        pattern=f"^{VIDEO_ID_PATTERN}$",
        description="claimed only once this job is neither queued nor running (a variant waits for the "
        "one that makes the shots they share)",
    )


_COLUMNS = tuple(JobRecord.model_fields)
_JSON_COLUMNS = ("error", "timings", "quality")
_IMMUTABLE = frozenset({"id", "created_at", "kind", "tenant"})
# One advisory lock serialises admission and claiming across every replica of the cluster.
_ADMISSION_LOCK_KEY = 0x5E09_EE1

# Schema v1 differs by dialect (the row id); later migrations are plain SQL both dialects accept.
_SCHEMA_V1 = """
    CREATE TABLE jobs (
        seq {seq_type} PRIMARY KEY{seq_suffix},
        id TEXT NOT NULL UNIQUE,
        created_at BIGINT NOT NULL,
        status TEXT NOT NULL CHECK (status IN ('queued', 'in_progress', 'completed', 'failed')),
        progress INTEGER NOT NULL CHECK (progress BETWEEN 0 AND 100),
        model TEXT NOT NULL,
        prompt TEXT,
        seconds TEXT NOT NULL,
        size TEXT NOT NULL,
        completed_at BIGINT,
        expires_at BIGINT,
        error TEXT,
        request TEXT NOT NULL,
        num_frames INTEGER,
        timings TEXT
    );
    CREATE INDEX jobs_by_creation ON jobs (created_at, seq);
    CREATE INDEX jobs_unfinished ON jobs (status) WHERE status IN ('queued', 'in_progress')
"""
_SCHEMA_V2 = """
    ALTER TABLE jobs ADD COLUMN kind TEXT NOT NULL DEFAULT 'job' CHECK (kind IN ('job', 'stream', 'sync'));
    ALTER TABLE jobs ADD COLUMN attempts INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE jobs ADD COLUMN lease_owner TEXT;
    ALTER TABLE jobs ADD COLUMN lease_expires_at DOUBLE PRECISION;
    CREATE TABLE admissions (
        id TEXT PRIMARY KEY,
        kind TEXT NOT NULL CHECK (kind IN ('job', 'stream')),
        expires_at DOUBLE PRECISION NOT NULL
    )
"""
_SCHEMA_V3 = """
    ALTER TABLE jobs ADD COLUMN priority TEXT NOT NULL DEFAULT 'normal'
        CHECK (priority IN ('normal', 'bulk'));
    CREATE TABLE sales_events (
        name TEXT PRIMARY KEY,
        spec TEXT NOT NULL
    )
"""
_SCHEMA_V4 = """
    ALTER TABLE jobs ADD COLUMN tenant TEXT NOT NULL DEFAULT 'default';
    ALTER TABLE jobs ADD COLUMN stored_bytes BIGINT NOT NULL DEFAULT 0;
    ALTER TABLE admissions ADD COLUMN tenant TEXT NOT NULL DEFAULT 'default';
    CREATE INDEX jobs_by_tenant ON jobs (tenant, created_at, seq);
    CREATE TABLE tenants (
        name TEXT PRIMARY KEY,
        quotas TEXT NOT NULL
    );
    CREATE TABLE api_keys (
        id TEXT PRIMARY KEY,
        tenant TEXT NOT NULL,
        role TEXT NOT NULL CHECK (role IN ('user', 'admin')),
        secret_sha256 TEXT NOT NULL,
        label TEXT,
        created_at BIGINT NOT NULL,
        revoked_at BIGINT
    )
"""
_SCHEMA_V5 = """
    ALTER TABLE jobs ADD COLUMN quality TEXT
"""
_SCHEMA_V6 = """
    ALTER TABLE jobs ADD COLUMN wait_for TEXT
"""
SCHEMA_VERSION = 6
QUOTA_WINDOW_S = 60  # videos_per_minute counts the videos a tenant started in this rolling window


class AdmissionRefused(Exception):
    """A cluster-wide limit is full; ``count`` is what holds it, ``limit`` the configured bound."""

    def __init__(self, kind: AdmissionKind, count: int, limit: int) -> None:
        super().__init__(f"{count} {kind} admissions held, limit {limit}")
        self.kind, self.count, self.limit = kind, count, limit


class QuotaExceeded(Exception):
    """A tenant's own quota is used up (``quota`` names it); ``retry_after_s`` when the store can tell."""

    def __init__(self, quota: str, used: int, limit: int, retry_after_s: float | None = None) -> None:
        super().__init__(f"{quota}: {used} of {limit} used")
        self.quota, self.used, self.limit, self.retry_after_s = quota, used, limit, retry_after_s


@dataclass(frozen=True)
class Claim:
    """A job a worker now owns until ``lease_expires_at`` (unix seconds) unless it renews the lease."""

    record: JobRecord
    owner: str
    attempt: int


class JobStore(abc.ABC):
    """The job table and admission authority of the whole cluster, shared by every ingress replica.

    Two backends keep the same rows with the same SQL: SQLite (the embedded default: one machine,
    any number of processes) and PostgreSQL (a cluster). What must hold across replicas and nodes
    happens in one transaction under one lock: admission (stream slots, pending jobs) and claiming
    (cluster-wide production capacity). A claimed job carries a lease its worker renews; a job whose
    lease lapsed (its worker, replica or node died) is claimed again, at most ``max_attempts`` times.
    """

    # -- backend hooks --------------------------------------------------------------------------

    @abc.abstractmethod
    def _transaction(self, *, exclusive: bool = False) -> contextlib.AbstractContextManager[Any]:
        """A connection in a transaction; ``exclusive`` also takes the cluster-wide admission lock."""

    @abc.abstractmethod
    def _sql(self, statement: str) -> str:
        """Adapt ``?`` placeholders to the driver."""

    now_sql: str  # the database's clock, unix seconds: one clock for every node's leases
    skip_locked: str  # row-locking clause of the claim's SELECT, where the database has one

    def close(self) -> None:  # noqa: B027 - optional hook: SQLite and Postgres have connections to close
        """Release connections."""

    def __enter__(self) -> JobStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _run(self, conn: Any, statement: str, params: tuple[Any, ...] = ()) -> Any:
        return conn.execute(self._sql(statement.replace("{now}", self.now_sql)), params)

    def _apply(self, conn: Any, script: str) -> None:
        for statement in filter(str.strip, script.split(";")):
            conn.execute(statement)

    def _upgrade(self, conn: Any, version: int, where: str, *, seq_type: str, seq_suffix: str) -> None:
        """Take a store from schema ``version`` to ``SCHEMA_VERSION`` (inside the caller's transaction)."""
        if version > SCHEMA_VERSION:
            raise RuntimeError(
                f"{where} has job schema v{version}; this shopreel knows v{SCHEMA_VERSION} at most"
            )
        if version < 1:
            self._apply(conn, _SCHEMA_V1.format(seq_type=seq_type, seq_suffix=seq_suffix))
        if version < 2:
            self._apply(conn, _SCHEMA_V2)
        if version < 3:
            self._apply(conn, _SCHEMA_V3)
        if version < 4:
            self._apply(conn, _SCHEMA_V4)
        if version < 5:
            self._apply(conn, _SCHEMA_V5)
        if version < 6:
            self._apply(conn, _SCHEMA_V6)

    # -- records --------------------------------------------------------------------------------

    def create(self, record: JobRecord) -> JobRecord:
        """Insert a new job; raises ``ValueError`` if the id is taken."""
        with self._transaction() as conn:
            if self._run(conn, "SELECT 1 FROM jobs WHERE id = ?", (record.id,)).fetchone() is not None:
                raise ValueError(f"job {record.id} already exists")
            self._insert(conn, record)
        return record

    def _insert(self, conn: Any, record: JobRecord, owner: str | None = None, lease_s: float = 0.0) -> None:
        row = _to_row(record)
        columns, values = list(row), list(row.values())
        placeholders = ["?"] * len(values)
        if owner is not None:  # a production that starts now holds its lease from the first instant
            columns += ["lease_owner", "lease_expires_at"]
            placeholders += ["?", "{now} + ?"]
            values += [owner, lease_s]
        self._run(
            conn,
            f"INSERT INTO jobs ({', '.join(columns)}) VALUES ({', '.join(placeholders)})",
            tuple(values),
        )

    def get(self, video_id: str) -> JobRecord | None:
        with self._transaction() as conn:
            row = self._run(conn, "SELECT * FROM jobs WHERE id = ?", (video_id,)).fetchone()
        return None if row is None else _from_row(row)

    def update(self, video_id: str, *, owner: str | None = None, **fields: Any) -> JobRecord | None:
        """Change some fields of a job (validated as a whole record); ``None`` if the job is gone.

        With ``owner``, only while that worker holds the job's lease: a worker reading ``None`` back
        knows its job was deleted or taken over, and stops.
        """
        if unknown := set(fields) - set(_COLUMNS):
            raise ValueError(f"unknown job fields: {sorted(unknown)}")
        if frozen := set(fields) & _IMMUTABLE:
            raise ValueError(f"job fields cannot change: {sorted(frozen)}")
        with self._transaction() as conn:
            row = self._select_owned(conn, video_id, owner)
            if row is None:
                return None
            record = JobRecord.model_validate({**_from_row(row).model_dump(), **fields})
            values = {name: value for name, value in _to_row(record).items() if name in fields}
            if record.status in FINISHED:  # a finished job holds no lease
                values.update(lease_owner=None, lease_expires_at=None)
            if values:
                assignments = ", ".join(f"{name} = ?" for name in values)
                self._run(conn, f"UPDATE jobs SET {assignments} WHERE id = ?", (*values.values(), video_id))
        return record

    def _select_owned(self, conn: Any, video_id: str, owner: str | None) -> Any:
        if owner is None:
            return self._run(conn, "SELECT * FROM jobs WHERE id = ?", (video_id,)).fetchone()
        return self._run(
            conn, "SELECT * FROM jobs WHERE id = ? AND lease_owner = ?", (video_id, owner)
        ).fetchone()

    def list(
        self,
        after: str | None = None,
        limit: int = 20,
        order: ListOrder = "desc",
        tenant: str | None = None,
    ) -> tuple[builtins.list[JobRecord], bool]:
        """One page of jobs in creation order, starting after the job ``after``; and whether more follow.

        With ``tenant``, only that tenant's jobs; never expired ones. Raises ``KeyError`` when ``after``
        names no listed job (e.g. it was deleted between two pages).
        """
        if not 1 <= limit <= MAX_LIST_LIMIT:
            raise ValueError(f"limit must be 1..{MAX_LIST_LIMIT}, got {limit}")
        if order not in ("asc", "desc"):
            raise ValueError(f"order must be 'asc' or 'desc', got {order!r}")
        direction, compare = ("ASC", ">") if order == "asc" else ("DESC", "<")
        # An expired video is gone for clients whether or not the sweeper has deleted it yet.
        conditions: builtins.list[str] = ["(expires_at IS NULL OR expires_at > {now})"]
        params: tuple[Any, ...] = ()
        if tenant is not None:
            conditions.append("tenant = ?")
            params = (tenant,)
        with self._transaction() as conn:
            if after is not None:
                cursor = self._run(
                    conn,
                    f"SELECT created_at, seq FROM jobs WHERE {' AND '.join(['id = ?', *conditions])}",
                    (after, *params),
                ).fetchone()
                if cursor is None:
                    raise KeyError(after)
                conditions.append(f"(created_at {compare} ? OR (created_at = ? AND seq {compare} ?))")
                params = (*params, cursor["created_at"], cursor["created_at"], cursor["seq"])
            where = f"WHERE {' AND '.join(conditions)}" if conditions else ""
            rows = self._run(
                conn,
                f"SELECT * FROM jobs {where} ORDER BY created_at {direction}, seq {direction} LIMIT ?",
                (*params, limit + 1),
            ).fetchall()
        return [_from_row(row) for row in rows[:limit]], len(rows) > limit

    def delete(self, video_id: str) -> bool:
        with self._transaction() as conn:
            self._run(conn, "DELETE FROM admissions WHERE id = ?", (video_id,))
            return bool(self._run(conn, "DELETE FROM jobs WHERE id = ?", (video_id,)).rowcount > 0)

    def expired(self, limit: int, failed_ttl_s: float) -> builtins.list[tuple[str, int]]:
        """Up to ``limit`` videos past ``expires_at`` (failed ones, which have none: ``failed_ttl_s``
        after they were made), oldest first, with their stored bytes."""
        with self._transaction() as conn:
            rows = self._run(
                conn,
                "SELECT id, stored_bytes FROM jobs WHERE expires_at <= {now}"
                " OR (status = 'failed' AND expires_at IS NULL AND created_at <= {now} - ?)"
                " ORDER BY created_at, seq LIMIT ?",
                (failed_ttl_s, limit),
            ).fetchall()
        return [(row["id"], int(row["stored_bytes"])) for row in rows]

    def counts(self) -> dict[str, int]:
        """Unfinished jobs per status (``queued``, ``in_progress``), live admissions per kind
        (``admitted_job``, ``admitted_stream``) and the bytes of every stored video (``stored_bytes``)."""
        with self._transaction() as conn:
            rows = self._run(
                conn,
                "SELECT status, COUNT(*) AS n FROM jobs"
                " WHERE status IN ('queued', 'in_progress') GROUP BY status",
            ).fetchall()
            held = self._run(
                conn, "SELECT kind, COUNT(*) AS n FROM admissions WHERE expires_at > {now} GROUP BY kind"
            ).fetchall()
            stored = self._run(conn, "SELECT COALESCE(SUM(stored_bytes), 0) AS n FROM jobs").fetchone()
        counts: dict[str, int] = dict.fromkeys(UNFINISHED, 0)
        counts.update({row["status"]: int(row["n"]) for row in rows})
        counts.update({f"admitted_{row['kind']}": int(row["n"]) for row in held})
        counts["stored_bytes"] = int(stored["n"])
        return counts

    # -- the sales-event calendar (events added at run time; the config's own are not stored) ------

    def put_event(self, event: SalesEvent) -> None:
        """Add an event, or replace the one of the same name."""
        with self._transaction() as conn:
            self._run(
                conn,
                "INSERT INTO sales_events (name, spec) VALUES (?, ?)"
                " ON CONFLICT (name) DO UPDATE SET spec = excluded.spec",
                (event.name, event.model_dump_json()),
            )

    def delete_event(self, name: str) -> bool:
        with self._transaction() as conn:
            return bool(self._run(conn, "DELETE FROM sales_events WHERE name = ?", (name,)).rowcount > 0)

    def events(self) -> builtins.list[SalesEvent]:
        with self._transaction() as conn:
            rows = self._run(conn, "SELECT spec FROM sales_events ORDER BY name").fetchall()
        return [SalesEvent.model_validate_json(row["spec"]) for row in rows]

    # -- API keys and tenants' quotas (serve/auth.py) --------------------------------------------

    def create_key(self, key: ApiKey, secret_sha256: str) -> None:
        with self._transaction() as conn:
            self._run(
                conn,
                "INSERT INTO api_keys (id, tenant, role, secret_sha256, label, created_at, revoked_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (key.id, key.tenant, key.role, secret_sha256, key.label, key.created_at, key.revoked_at),
            )

    def find_key(self, key_id: str) -> tuple[ApiKey, str] | None:
        """The key and the SHA-256 of its secret, or ``None``."""
        with self._transaction() as conn:
            row = self._run(conn, "SELECT * FROM api_keys WHERE id = ?", (key_id,)).fetchone()
        return None if row is None else (_key_from_row(row), row["secret_sha256"])

    def api_keys(self, tenant: str | None = None) -> builtins.list[ApiKey]:
        where, params = ("WHERE tenant = ?", (tenant,)) if tenant is not None else ("", ())
        with self._transaction() as conn:
            rows = self._run(
                conn, f"SELECT * FROM api_keys {where} ORDER BY created_at, id", params
            ).fetchall()
        return [_key_from_row(row) for row in rows]

    def revoke_key(self, key_id: str) -> bool | None:
        """Revoke a key: True; False if it already was; ``None`` if there is no such key."""
        with self._transaction() as conn:
            row = self._run(conn, "SELECT revoked_at FROM api_keys WHERE id = ?", (key_id,)).fetchone()
            if row is None:
                return None
            if row["revoked_at"] is not None:
                return False
            self._run(conn, "UPDATE api_keys SET revoked_at = ? WHERE id = ?", (int(time.time()), key_id))
        return True

    def set_tenant_quotas(self, tenant: str, quotas: TenantQuotas | None) -> None:
        """Give a tenant its own quotas; ``None``: the config's defaults apply again."""
        with self._transaction() as conn:
            if quotas is None:
                self._run(conn, "DELETE FROM tenants WHERE name = ?", (tenant,))
                return
            self._run(
                conn,
                "INSERT INTO tenants (name, quotas) VALUES (?, ?)"
                " ON CONFLICT (name) DO UPDATE SET quotas = excluded.quotas",
                (tenant, quotas.model_dump_json()),
            )

    def tenant_quotas(self, tenant: str) -> TenantQuotas | None:
        with self._transaction() as conn:
            row = self._run(conn, "SELECT quotas FROM tenants WHERE name = ?", (tenant,)).fetchone()
        return None if row is None else TenantQuotas.model_validate_json(row["quotas"])

    def tenants(self) -> builtins.list[tuple[str, TenantQuotas]]:
        with self._transaction() as conn:
            rows = self._run(conn, "SELECT name, quotas FROM tenants ORDER BY name").fetchall()
        return [(row["name"], TenantQuotas.model_validate_json(row["quotas"])) for row in rows]

    # -- admission ------------------------------------------------------------------------------

    def admit(
        self,
        video_id: str,
        kind: AdmissionKind,
        limit: int,
        hold_s: float,
        *,
        tenant: str = "default",
        quotas: TenantQuotas | None = None,
    ) -> None:
        """Take one cluster-wide slot before any model work, or raise ``AdmissionRefused``; a tenant
        past one of its ``quotas`` gets ``QuotaExceeded`` instead (checked first, in the same lock).

        ``stream``: one of ``limit`` concurrent sync/streaming productions, held (and renewed with
        ``renew``) until ``release``. ``job``: one of ``limit`` pending jobs; the slot is the job's
        place in the queue while it is planned, and becomes the queued job itself in ``enqueue``.
        A slot whose holder died lapses after ``hold_s`` unless renewed.
        """
        with self._transaction(exclusive=True) as conn:
            self._run(conn, "DELETE FROM admissions WHERE expires_at <= {now}")
            if quotas is not None:
                self._check_quotas(conn, kind, tenant, quotas)
            held = self._run(conn, "SELECT COUNT(*) AS n FROM admissions WHERE kind = ?", (kind,)).fetchone()
            count = int(held["n"])
            if kind == "job":
                queued = self._run(conn, "SELECT COUNT(*) AS n FROM jobs WHERE status = 'queued'").fetchone()
                count += int(queued["n"])
            if count >= limit:
                raise AdmissionRefused(kind, count, limit)
            self._run(
                conn,
                "INSERT INTO admissions (id, kind, tenant, expires_at) VALUES (?, ?, ?, {now} + ?)",
                (video_id, kind, tenant, hold_s),
            )

    def _check_quotas(self, conn: Any, kind: AdmissionKind, tenant: str, quotas: TenantQuotas) -> None:
        """Raise ``QuotaExceeded`` for the first of the tenant's quotas one more video would pass."""

        def count(statement: str, *params: Any) -> Any:
            return self._run(conn, statement, (tenant, *params)).fetchone()

        if kind == "stream" and quotas.max_streams is not None:
            streams = count("SELECT COUNT(*) AS n FROM admissions WHERE tenant = ? AND kind = 'stream'")
            used = int(streams["n"])
            if used >= quotas.max_streams:
                raise QuotaExceeded("max_streams", used, quotas.max_streams)
        if kind == "job" and quotas.max_jobs is not None:
            queued = count(
                "SELECT COUNT(*) AS n FROM jobs WHERE tenant = ? AND kind = 'job'"
                " AND status IN ('queued', 'in_progress')"
            )
            planning = count("SELECT COUNT(*) AS n FROM admissions WHERE tenant = ? AND kind = 'job'")
            used = int(queued["n"]) + int(planning["n"])
            if used >= quotas.max_jobs:
                raise QuotaExceeded("max_jobs", used, quotas.max_jobs)
        if quotas.videos_per_minute is not None:
            recent = count(
                "SELECT COUNT(*) AS n, MIN(created_at) AS oldest FROM jobs"
                " WHERE tenant = ? AND created_at > {now} - ?",
                QUOTA_WINDOW_S,
            )
            # Admitted and still planning: no record yet, but already one of this minute's videos.
            planning = count(
                "SELECT COUNT(*) AS n FROM admissions a WHERE a.tenant = ?"
                " AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.id = a.id)"
            )
            used = int(recent["n"]) + int(planning["n"])
            if used >= quotas.videos_per_minute:
                oldest = recent["oldest"]
                retry = None if oldest is None else float(oldest) + QUOTA_WINDOW_S - time.time()
                raise QuotaExceeded("videos_per_minute", used, quotas.videos_per_minute, retry)
        if quotas.max_stored_bytes is not None:
            stored = count(
                "SELECT COALESCE(SUM(stored_bytes), 0) AS n, MIN(expires_at) AS soonest FROM jobs"
                " WHERE tenant = ? AND stored_bytes > 0"
            )
            used = int(stored["n"])
            if used >= quotas.max_stored_bytes:
                soonest = stored["soonest"]
                retry = None if soonest is None else float(soonest) - time.time()
                raise QuotaExceeded("max_stored_bytes", used, quotas.max_stored_bytes, retry)

    def drain_rate(self, kind: AdmissionKind, window_s: float) -> float:
        """Videos holding ``kind`` slots that completed per second over the last ``window_s``, cluster-wide:
        how fast a full limit frees up (``job``: queued jobs; ``stream``: streaming and sync videos)."""
        kinds = ("job",) if kind == "job" else ("stream", "sync")
        placeholders = ", ".join("?" for _ in kinds)
        with self._transaction() as conn:
            row = self._run(
                conn,
                f"SELECT COUNT(*) AS n FROM jobs WHERE status = 'completed' AND kind IN ({placeholders})"
                " AND completed_at >= {now} - ?",
                (*kinds, window_s),
            ).fetchone()
        return int(row["n"]) / window_s

    def release(self, video_id: str) -> None:
        """Give an admission slot back (idempotent)."""
        with self._transaction() as conn:
            self._run(conn, "DELETE FROM admissions WHERE id = ?", (video_id,))

    def enqueue(self, record: JobRecord) -> JobRecord:
        """Turn a planned job's admission slot into the queued job, atomically."""
        return self.enqueue_many([record])[0]

    def enqueue_many(self, records: builtins.list[JobRecord]) -> builtins.list[JobRecord]:
        """Queue planned jobs (their admission slots become the jobs) in one transaction: all or none."""
        with self._transaction() as conn:
            for record in records:
                self._insert(conn, record.model_copy(update={"status": "queued", "kind": "job"}))
                self._run(conn, "DELETE FROM admissions WHERE id = ?", (record.id,))
        return records

    def start(self, record: JobRecord, owner: str, lease_s: float) -> JobRecord:
        """Record a sync/streaming production that ``owner`` runs now, leased from the first instant.

        If its owner dies the lease lapses and a worker produces it as a job: the video the client
        was promised stays downloadable by id.
        """
        started = record.model_copy(update={"status": "in_progress", "attempts": 1})
        with self._transaction() as conn:
            self._insert(conn, started, owner=owner, lease_s=lease_s)
        return started

    # -- claiming -------------------------------------------------------------------------------

    def claim(self, owner: str, *, lease_s: float, max_running: int, max_attempts: int) -> Claim | None:
        """Take the oldest job waiting for a worker: queued, or in progress under a lapsed lease.

        Normal jobs go before bulk ones, whenever either was queued.

        At most ``max_running`` jobs (kind ``job``) run under live leases in the whole cluster. A job
        already started ``max_attempts`` times is failed with the reason instead of run again.
        """
        with self._transaction(exclusive=True) as conn:
            running = self._run(
                conn,
                "SELECT COUNT(*) AS n FROM jobs WHERE status = 'in_progress' AND kind = 'job'"
                " AND lease_expires_at > {now}",
            ).fetchone()
            if int(running["n"]) >= max_running:
                return None
            while True:
                row = self._run(
                    conn,
                    "SELECT * FROM jobs WHERE (status = 'queued' OR (status = 'in_progress'"
                    " AND (lease_expires_at IS NULL OR lease_expires_at <= {now})))"
                    # A variant waits until the one making the shots they share is done (or gone).
                    " AND (wait_for IS NULL OR NOT EXISTS (SELECT 1 FROM jobs AS first WHERE"
                    " first.id = jobs.wait_for AND first.status IN ('queued', 'in_progress')))"
                    # Normal before bulk (false sorts first), then oldest first.
                    f" ORDER BY (priority = 'bulk'), created_at, seq LIMIT 1{self.skip_locked}",
                ).fetchone()
                if row is None:
                    return None
                record = _from_row(row)
                if record.attempts >= max_attempts:
                    error: JobError = {
                        "code": "production_interrupted",
                        "message": f"the video's production stopped {record.attempts} times (a replica or "
                        "node was lost each time); it was not retried again",
                    }
                    self._run(
                        conn,
                        "UPDATE jobs SET status = 'failed', error = ?, lease_owner = NULL,"
                        " lease_expires_at = NULL WHERE id = ?",
                        (json.dumps(error), record.id),
                    )
                    continue
                attempt = record.attempts + 1
                self._run(
                    conn,
                    "UPDATE jobs SET status = 'in_progress', progress = 0, attempts = ?, kind = 'job',"
                    " lease_owner = ?, lease_expires_at = {now} + ? WHERE id = ?",
                    (attempt, owner, lease_s, record.id),
                )
                claimed = record.model_copy(
                    update={"status": "in_progress", "progress": 0, "attempts": attempt, "kind": "job"}
                )
                return Claim(record=claimed, owner=owner, attempt=attempt)

    def renew(self, video_id: str, owner: str, lease_s: float) -> bool:
        """Extend a lease (and the job's admission slot, if any); False if the job is gone or not ours."""
        with self._transaction() as conn:
            renewed = self._run(
                conn,
                "UPDATE jobs SET lease_expires_at = {now} + ? WHERE id = ? AND lease_owner = ?"
                " AND status = 'in_progress'",
                (lease_s, video_id, owner),
            ).rowcount
            self._run(conn, "UPDATE admissions SET expires_at = {now} + ? WHERE id = ?", (lease_s, video_id))
        return bool(renewed)

    def requeue(self, video_id: str, owner: str) -> bool:
        """Hand an owned job back to the queue at once (a stage was lost; the attempt still counts)."""
        with self._transaction() as conn:
            return bool(
                self._run(
                    conn,
                    "UPDATE jobs SET status = 'queued', progress = 0, lease_owner = NULL,"
                    " lease_expires_at = NULL WHERE id = ? AND lease_owner = ?",
                    (video_id, owner),
                ).rowcount
            )


class SqliteJobStore(JobStore):
    """The embedded backend: one SQLite file (WAL) that every process on this machine may open.

    Writes run in ``BEGIN IMMEDIATE`` transactions, which SQLite serialises across processes, so
    admission and claims are atomic without a separate lock.
    """

    now_sql = "((julianday('now') - 2440587.5) * 86400.0)"
    skip_locked = ""  # BEGIN IMMEDIATE already holds the database's only write lock

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(path, timeout=30.0, isolation_level=None, check_same_thread=False)
        self._conn.row_factory = sqlite3.Row
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable apart from power loss
        self._migrate()

    def _sql(self, statement: str) -> str:
        return statement

    def _migrate(self) -> None:
        with self._transaction() as conn:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            self._upgrade(conn, version, str(self.path), seq_type="INTEGER", seq_suffix=" AUTOINCREMENT")
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    @contextlib.contextmanager
    def _transaction(self, *, exclusive: bool = False) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            self._conn.close()


def redact_url(url: str) -> str:
    """The URL without its password, for logs and errors."""
    return re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", url)


def _key_from_row(row: Any) -> ApiKey:
    return ApiKey(
        id=row["id"],
        tenant=row["tenant"],
        role=row["role"],
        label=row["label"],
        created_at=row["created_at"],
        revoked_at=row["revoked_at"],
    )


def _to_row(record: JobRecord) -> dict[str, Any]:
    row = record.model_dump()
    for name in _JSON_COLUMNS:
        if row[name] is not None:
            row[name] = json.dumps(row[name])
    return row


def _from_row(row: Any) -> JobRecord:
    values = {name: row[name] for name in _COLUMNS}
    for name in _JSON_COLUMNS:
        if values[name] is not None:
            values[name] = json.loads(values[name])
    return JobRecord.model_validate(values)


class VideoStore:
    """Finished videos and thumbnails on local disk: ``root/<video id>/video.mp4`` and ``thumbnail.jpg``.

    Files appear only complete: writers fill a ``.part`` temp file in the job's directory and rename it
    into place. ``exists``/``path_for`` never name a temp file.
    """

    def __init__(self, root: Path) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.root = root

    def _dir(self, video_id: str) -> Path:
        if not is_video_id(video_id):  # the id becomes a path component: nothing else may get through
            raise ValueError(f"not a video id: {video_id!r}")
        return self.root / video_id

    def path_for(self, video_id: str, variant: VideoVariant = "video") -> Path:
        """Where the finished file lives (it may not exist yet)."""
        if variant not in VARIANT_FILES:
            raise ValueError(f"variant must be one of {sorted(VARIANT_FILES)}, got {variant!r}")
        return self._dir(video_id) / VARIANT_FILES[variant]

    def exists(self, video_id: str, variant: VideoVariant = "video") -> bool:
        return self.path_for(video_id, variant).is_file()

    @contextlib.contextmanager
    def open_writer(self, video_id: str, variant: VideoVariant = "video") -> Iterator[IO[bytes]]:
        """Write a file that becomes visible, complete and fsynced, only when the block exits cleanly."""
        final = self.path_for(video_id, variant)
        final.parent.mkdir(exist_ok=True)
        fd, temp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".part", dir=final.parent)
        try:
            with os.fdopen(fd, "wb") as file:
                yield file
                file.flush()
                os.fsync(file.fileno())
            os.replace(temp_name, final)
        except BaseException:
            Path(temp_name).unlink(missing_ok=True)
            raise
        _fsync_dir(final.parent)

    def commit(self, video_id: str, variant: VideoVariant, src: Path) -> Path:
        """Move a finished file (e.g. a compositor's output) into place atomically; ``src`` is consumed."""
        final = self.path_for(video_id, variant)
        final.parent.mkdir(exist_ok=True)
        try:
            os.replace(src, final)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            with self.open_writer(video_id, variant) as target, src.open("rb") as source:
                shutil.copyfileobj(source, target)
            src.unlink()
            return final
        _fsync_dir(final.parent)
        return final

    def delete(self, video_id: str) -> bool:
        """Remove every variant (and any half-written temp file) of a video; False if there was none."""
        directory = self._dir(video_id)
        try:
            shutil.rmtree(directory)
        except FileNotFoundError:  # never written, or another replica's sweeper was first
            return False
        return True


def _fsync_dir(directory: Path) -> None:
    """Persist a rename: without it a crash can forget a file the job table already calls complete."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
