"""The job store a URL names: ``sqlite:///PATH`` (embedded) or ``postgresql://...`` (a cluster)."""

from __future__ import annotations

from pathlib import Path

from .store import JobStore, SqliteJobStore, redact_url


def open_job_store(url: str, *, pool_size: int = 4) -> JobStore:
    """``sqlite:///path/to/jobs.sqlite3`` (relative after the third slash, absolute after a fourth)
    or ``postgresql://user:password@host:port/database`` (``pool_size`` connections at most)."""
    if url.startswith("sqlite:///"):
        return SqliteJobStore(Path(url.removeprefix("sqlite:///")))
    if url.startswith(("postgresql://", "postgres://")):
        from .store_postgres import PostgresJobStore  # psycopg only where Postgres is used

        return PostgresJobStore(url, pool_size=pool_size)
    raise ValueError(f"jobs.store must be sqlite:///PATH or postgresql://..., got {redact_url(url)!r}")
