"""The PostgreSQL job store: one database for every ingress replica on every node of a cluster.

Same rows and SQL as the SQLite store (``store.JobStore``); what differs is the connection pool
(``psycopg_pool``), the database clock for leases (one clock for all nodes), the schema version kept
in a table, and how cluster-wide decisions are made atomic: admission and claiming take one
transaction-scoped advisory lock, and the claim reads its row ``FOR UPDATE SKIP LOCKED``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from .store import _ADMISSION_LOCK_KEY, SCHEMA_VERSION, JobStore, redact_url

INSTALL_HINT = "the PostgreSQL job store needs psycopg 3: pip install 'shopreel[serve]'"


class PostgresJobStore(JobStore):
    now_sql = "(extract(epoch from clock_timestamp())::double precision)"
    skip_locked = " FOR UPDATE SKIP LOCKED"

    def __init__(self, url: str, *, pool_size: int = 4, connect_timeout_s: float = 30.0) -> None:
        try:
            from psycopg.rows import dict_row
            from psycopg_pool import ConnectionPool
        except ImportError as exc:
            raise RuntimeError(INSTALL_HINT) from exc
        self.url = redact_url(url)
        self._pool = ConnectionPool(
            url,
            min_size=1,
            max_size=pool_size,
            kwargs={"row_factory": dict_row, "autocommit": False},
            open=False,
            name="shopreel-jobs",
        )
        self._pool.open(wait=True, timeout=connect_timeout_s)
        self._migrate()

    def _sql(self, statement: str) -> str:
        return statement.replace("?", "%s")

    @contextlib.contextmanager
    def _transaction(self, *, exclusive: bool = False) -> Iterator[Any]:
        with self._pool.connection() as conn, conn.transaction():
            if exclusive:
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (_ADMISSION_LOCK_KEY,))
            yield conn

    def _migrate(self) -> None:
        with self._transaction(exclusive=True) as conn:  # replicas starting together migrate once
            conn.execute("CREATE TABLE IF NOT EXISTS shopreel_schema (version INTEGER NOT NULL)")
            row = conn.execute("SELECT version FROM shopreel_schema").fetchone()
            version = 0 if row is None else int(row["version"])
            self._upgrade(conn, version, self.url, seq_type="BIGSERIAL", seq_suffix="")
            conn.execute("DELETE FROM shopreel_schema")
            conn.execute("INSERT INTO shopreel_schema (version) VALUES (%s)", (SCHEMA_VERSION,))

    def close(self) -> None:
        self._pool.close()
