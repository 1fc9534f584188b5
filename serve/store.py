"""Embedded job and video stores behind the ``/v1/videos`` API.

``JobStore`` keeps one row per video job in SQLite (WAL, so readers never block the writer), so the
job list and every job's state survive a restart; ``requeue_interrupted`` hands back the jobs a
crashed process left unfinished. ``VideoStore`` keeps the finished files under one directory per
job and only ever makes a *complete* file visible (temp file in the same directory + ``os.replace``),
so a half-written video is never served.
"""

from __future__ import annotations

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
from pathlib import Path
from typing import IO, Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from typing_extensions import TypedDict

JobStatus = Literal["queued", "in_progress", "completed", "failed"]
VideoVariant = Literal["video", "thumbnail"]
ListOrder = Literal["asc", "desc"]

VIDEO_ID_PATTERN = r"video_[0-9a-f]{32}"
MAX_LIST_LIMIT = 100
UNFINISHED: tuple[JobStatus, ...] = ("queued", "in_progress")
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
    request: str = Field(description="JSON of the internal request (brief, profile, campaign, options)")
    num_frames: int | None = Field(default=None, ge=1, description="frames in the planned storyboard")
    timings: dict[str, float | None] | None = Field(default=None, description="seconds per stage")


_COLUMNS = tuple(JobRecord.model_fields)
_JSON_COLUMNS = ("error", "timings")
_IMMUTABLE = frozenset({"id", "created_at"})

# _MIGRATIONS[v] takes a database from PRAGMA user_version v to v + 1.
_MIGRATIONS = (
    """
    CREATE TABLE jobs (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        id TEXT NOT NULL UNIQUE,
        created_at INTEGER NOT NULL,
        status TEXT NOT NULL CHECK (status IN ('queued', 'in_progress', 'completed', 'failed')),
        progress INTEGER NOT NULL CHECK (progress BETWEEN 0 AND 100),
        model TEXT NOT NULL,
        prompt TEXT,
        seconds TEXT NOT NULL,
        size TEXT NOT NULL,
        completed_at INTEGER,
        expires_at INTEGER,
        error TEXT,
        request TEXT NOT NULL,
        num_frames INTEGER,
        timings TEXT
    );
    CREATE INDEX jobs_by_creation ON jobs (created_at, seq);
    CREATE INDEX jobs_unfinished ON jobs (status) WHERE status IN ('queued', 'in_progress');
    """,
)
SCHEMA_VERSION = len(_MIGRATIONS)


class JobStore:
    """SQLite-backed job table; safe to share between threads (one connection behind a lock).

    Read-modify-write updates run in ``BEGIN IMMEDIATE`` transactions, so two processes opening the
    same file (e.g. an app restarted while the old one drains) do not lose each other's updates.
    """

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(path, timeout=30.0, isolation_level=None, check_same_thread=False)
        self._conn.row_factory = sqlite3.Row
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable apart from power loss
        self._migrate()

    def _migrate(self) -> None:
        with self._transaction() as conn:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise RuntimeError(
                    f"{self.path} has job schema v{version}; this shopreel knows v{SCHEMA_VERSION} at most"
                )
            for script in _MIGRATIONS[version:]:
                for statement in filter(str.strip, script.split(";")):
                    conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
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

    def __enter__(self) -> JobStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def create(self, record: JobRecord) -> JobRecord:
        """Insert a new job; raises ``ValueError`` if the id is taken."""
        row = _to_row(record)
        try:
            with self._transaction() as conn:
                conn.execute(
                    f"INSERT INTO jobs ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})",
                    tuple(row.values()),
                )
        except sqlite3.IntegrityError as exc:
            raise ValueError(f"job {record.id} already exists") from exc
        return record

    def get(self, video_id: str) -> JobRecord | None:
        with self._lock:
            row = self._conn.execute("SELECT * FROM jobs WHERE id = ?", (video_id,)).fetchone()
        return None if row is None else _from_row(row)

    def update(self, video_id: str, **fields: Any) -> JobRecord | None:
        """Change some fields of a job (validated as a whole record); ``None`` if the job is gone.

        A worker reading ``None`` back knows its job was deleted and can stop.
        """
        if unknown := set(fields) - set(_COLUMNS):
            raise ValueError(f"unknown job fields: {sorted(unknown)}")
        if frozen := set(fields) & _IMMUTABLE:
            raise ValueError(f"job fields cannot change: {sorted(frozen)}")
        with self._transaction() as conn:
            row = conn.execute("SELECT * FROM jobs WHERE id = ?", (video_id,)).fetchone()
            if row is None:
                return None
            record = JobRecord.model_validate({**_from_row(row).model_dump(), **fields})
            values = {name: value for name, value in _to_row(record).items() if name in fields}
            if values:
                assignments = ", ".join(f"{name} = ?" for name in values)
                conn.execute(f"UPDATE jobs SET {assignments} WHERE id = ?", (*values.values(), video_id))
        return record

    def list(
        self, after: str | None = None, limit: int = 20, order: ListOrder = "desc"
    ) -> tuple[builtins.list[JobRecord], bool]:
        """One page of jobs in creation order, starting after the job ``after``; and whether more follow.

        Raises ``KeyError`` when ``after`` names no job (e.g. it was deleted between two pages).
        """
        if not 1 <= limit <= MAX_LIST_LIMIT:
            raise ValueError(f"limit must be 1..{MAX_LIST_LIMIT}, got {limit}")
        if order not in ("asc", "desc"):
            raise ValueError(f"order must be 'asc' or 'desc', got {order!r}")
        direction, compare = ("ASC", ">") if order == "asc" else ("DESC", "<")
        params: tuple[Any, ...]
        where, params = "", ()
        with self._lock:
            if after is not None:
                query = "SELECT created_at, seq FROM jobs WHERE id = ?"
                cursor = self._conn.execute(query, (after,)).fetchone()
                if cursor is None:
                    raise KeyError(after)
                where, params = f"WHERE (created_at, seq) {compare} (?, ?)", tuple(cursor)
            rows = self._conn.execute(
                f"SELECT * FROM jobs {where} ORDER BY created_at {direction}, seq {direction} LIMIT ?",
                (*params, limit + 1),
            ).fetchall()
        return [_from_row(row) for row in rows[:limit]], len(rows) > limit

    def delete(self, video_id: str) -> bool:
        with self._transaction() as conn:
            return conn.execute("DELETE FROM jobs WHERE id = ?", (video_id,)).rowcount > 0

    def requeue_interrupted(self) -> builtins.list[JobRecord]:
        """Reset jobs a previous process left queued/in progress to ``queued``, oldest first, and return them.

        Call once at startup from the one process that owns the store: a job another live process is
        still running would otherwise be run twice.
        """
        with self._transaction() as conn:
            rows = conn.execute(
                "SELECT * FROM jobs WHERE status IN (?, ?) ORDER BY created_at, seq", UNFINISHED
            ).fetchall()
            conn.execute("UPDATE jobs SET status = 'queued', progress = 0 WHERE status IN (?, ?)", UNFINISHED)
        return [_from_row(row).model_copy(update={"status": "queued", "progress": 0}) for row in rows]


def _to_row(record: JobRecord) -> dict[str, Any]:
    row = record.model_dump()
    for name in _JSON_COLUMNS:
        if row[name] is not None:
            row[name] = json.dumps(row[name])
    return row


def _from_row(row: sqlite3.Row) -> JobRecord:
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
        if not directory.exists():
            return False
        shutil.rmtree(directory)
        return True


def _fsync_dir(directory: Path) -> None:
    """Persist a rename: without it a crash can forget a file the job table already calls complete."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
