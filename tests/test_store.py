import errno
import sqlite3
import threading
import time
from pathlib import Path

import pytest
from pydantic import ValidationError

from shopreel.serve import store as store_module
from shopreel.serve.store import (
    SCHEMA_VERSION,
    AdmissionRefused,
    JobRecord,
    SqliteJobStore,
    VideoStore,
    is_video_id,
    new_video_id,
    redact_url,
)
from shopreel.serve.store_url import open_job_store


def _record(**overrides) -> JobRecord:
    values = {
        "model": "shopreel-tiny",
        "prompt": "A red shoe.",
        "seconds": "4",
        "size": "832x480",
        "request": "{}",
    }
    return JobRecord(**{**values, **overrides})


def test_new_ids_are_valid_and_unique():
    ids = {new_video_id() for _ in range(100)}
    assert len(ids) == 100
    assert all(is_video_id(video_id) for video_id in ids)


def test_round_trip(jobs):
    record = jobs.create(_record(num_frames=33))
    assert jobs.get(record.id) == record
    assert jobs.get(new_video_id()) is None

    updated = jobs.update(
        record.id,
        status="failed",
        progress=40,
        completed_at=record.created_at + 5,
        error={"code": "generation_failed", "message": "out of memory"},
        timings={"generate_s": 1.5, "first_fragment_s": None},
    )
    assert updated == jobs.get(record.id)
    assert updated.status == "failed"
    assert updated.progress == 40
    assert updated.error == {"code": "generation_failed", "message": "out of memory"}
    assert updated.timings == {"generate_s": 1.5, "first_fragment_s": None}
    assert updated.num_frames == 33 and updated.request == "{}"


def test_update_is_validated_and_reports_a_missing_job(jobs):
    record = jobs.create(_record())
    with pytest.raises(ValidationError):
        jobs.update(record.id, progress=101)
    with pytest.raises(ValidationError):
        jobs.update(record.id, status="done")
    with pytest.raises(ValueError, match="unknown job fields"):
        jobs.update(record.id, colour="red")
    with pytest.raises(ValueError, match="cannot change"):
        jobs.update(record.id, id=new_video_id())
    assert jobs.get(record.id) == record  # nothing half-applied
    assert jobs.update(new_video_id(), progress=5) is None


def test_create_rejects_a_taken_id(jobs):
    record = jobs.create(_record())
    with pytest.raises(ValueError, match="already exists"):
        jobs.create(_record(id=record.id))


def _all_pages(jobs, order, limit):
    seen, after, pages = [], None, 0
    while True:
        records, has_more = jobs.list(after=after, limit=limit, order=order)
        seen += [record.id for record in records]
        pages += 1
        if not has_more:
            return seen, pages
        after = records[-1].id


def test_pagination_follows_creation_order_with_stable_ties(jobs):
    # Five jobs share one created_at (ties broken by insertion order); one older job is inserted last.
    tied = [jobs.create(_record(created_at=1_000)).id for _ in range(5)]
    newest = jobs.create(_record(created_at=2_000)).id
    oldest = jobs.create(_record(created_at=500)).id
    expected = [oldest, *tied, newest]

    records, has_more = jobs.list(limit=2, order="asc")
    assert [r.id for r in records] == expected[:2] and has_more
    records, has_more = jobs.list(after=records[-1].id, limit=2, order="asc")
    assert [r.id for r in records] == expected[2:4] and has_more

    assert _all_pages(jobs, "asc", 2) == (expected, 4)
    assert _all_pages(jobs, "desc", 3) == (expected[::-1], 3)
    assert _all_pages(jobs, "desc", 100) == (expected[::-1], 1)
    assert jobs.list(after=oldest, order="desc") == ([], False)


def test_list_rejects_bad_arguments(jobs):
    for limit in (0, 101):
        with pytest.raises(ValueError, match="limit"):
            jobs.list(limit=limit)
    with pytest.raises(ValueError, match="order"):
        jobs.list(order="up")
    with pytest.raises(KeyError):
        jobs.list(after=new_video_id())


def test_delete(jobs):
    keep, gone = jobs.create(_record()), jobs.create(_record())
    assert jobs.delete(gone.id) is True
    assert jobs.delete(gone.id) is False
    assert jobs.get(gone.id) is None
    assert jobs.list() == ([keep], False)


def test_state_survives_reopening_and_lapsed_leases_are_claimed_again(store_url):
    with open_job_store(store_url) as first:
        queued = first.create(_record(created_at=10))
        running = first.create(_record(created_at=11))
        assert first.claim("dead-worker", lease_s=0.2, max_running=8, max_attempts=3).record.id == queued.id
        done = first.create(_record(created_at=12, status="completed", progress=100, completed_at=20))
        failed = first.create(_record(created_at=13, status="failed", error={"code": "x", "message": "y"}))
    # The process "crashed" here; a new one opens the same store once the dead worker's lease lapsed.
    time.sleep(0.3)
    with open_job_store(store_url) as second:
        assert second.get(queued.id).status == "in_progress"
        claims = [second.claim("new-worker", lease_s=30, max_running=8, max_attempts=3) for _ in range(3)]
        assert [c.record.id for c in claims[:2]] == [queued.id, running.id] and claims[2] is None
        assert [c.attempt for c in claims[:2]] == [2, 1]  # the lapsed one counts its earlier attempt
        assert second.get(done.id) == done and second.get(failed.id) == failed
        assert [r.id for r in second.list(order="asc")[0]] == [queued.id, running.id, done.id, failed.id]


def test_schema_is_versioned(tmp_path):
    path = tmp_path / "jobs.sqlite3"
    SqliteJobStore(path).close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(RuntimeError, match="schema"):
        SqliteJobStore(path)


def test_version_1_files_are_migrated(tmp_path):
    """A data dir written before leases existed opens, and its unfinished jobs are claimable."""
    path = tmp_path / "jobs.sqlite3"
    with sqlite3.connect(path) as conn:
        conn.executescript(store_module._SCHEMA_V1.format(seq_type="INTEGER", seq_suffix=" AUTOINCREMENT"))
        conn.execute(
            "INSERT INTO jobs (id, created_at, status, progress, model, seconds, size, request)"
            " VALUES (?, 1, 'in_progress', 40, 'm', '4', '64x64', '{}')",
            (video_id := new_video_id(),),
        )
        conn.execute("PRAGMA user_version = 1")
    conn.close()
    with SqliteJobStore(path) as store:
        assert store.get(video_id).kind == "job"
        assert store.claim("w", lease_s=30, max_running=1, max_attempts=3).record.id == video_id


def test_postgres_schema_is_versioned(postgres):
    url = postgres.new_database()
    open_job_store(url).close()
    open_job_store(url).close()  # a second replica starting on a migrated database changes nothing
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        assert conn.execute("SELECT version FROM shopreel_schema").fetchall() == [(SCHEMA_VERSION,)]
        conn.execute("UPDATE shopreel_schema SET version = %s", (SCHEMA_VERSION + 1,))
    with pytest.raises(RuntimeError, match="schema"):
        open_job_store(url)


def test_store_is_shared_between_threads(jobs):
    def work():
        for _ in range(20):
            record = jobs.create(_record())
            jobs.update(record.id, status="in_progress", progress=50)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert jobs.counts()["in_progress"] == 160


# --- cluster-wide admission and claims -------------------------------------------------------------


def _replicas(url: str, count: int) -> list:
    """Separate store objects (own connections), as separate ingress replicas would have."""
    return [open_job_store(url) for _ in range(count)]


def test_admission_never_exceeds_the_limit_under_a_burst(store_url):
    """40 concurrent stream admissions from 4 "replicas" against 4 slots: exactly 4 get in."""
    replicas = _replicas(store_url, 4)
    admitted, refused = [], []
    barrier = threading.Barrier(40)

    def ask(index: int) -> None:
        video_id = new_video_id()
        barrier.wait()
        try:
            replicas[index % 4].admit(video_id, "stream", limit=4, hold_s=30)
            admitted.append(video_id)
        except AdmissionRefused as exc:
            assert exc.limit == 4 and exc.count >= 4
            refused.append(video_id)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(40)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert (len(admitted), len(refused)) == (4, 36)
    assert replicas[0].counts()["admitted_stream"] == 4
    replicas[1].release(admitted[0])
    replicas[2].admit(new_video_id(), "stream", limit=4, hold_s=30)  # a released slot is free again
    for store in replicas:
        store.close()


def test_pending_jobs_count_queued_and_admitted(jobs):
    first, second = _record(), _record()
    jobs.admit(first.id, "job", limit=2, hold_s=30)
    jobs.admit(second.id, "job", limit=2, hold_s=30)
    with pytest.raises(AdmissionRefused):
        jobs.admit(new_video_id(), "job", limit=2, hold_s=30)
    jobs.enqueue(first)  # the slot becomes the queued job: still 2 pending
    with pytest.raises(AdmissionRefused):
        jobs.admit(new_video_id(), "job", limit=2, hold_s=30)
    assert jobs.counts()["queued"] == 1 and jobs.counts()["admitted_job"] == 1
    jobs.claim("w", lease_s=30, max_running=4, max_attempts=3)  # running jobs are not pending
    jobs.admit(new_video_id(), "job", limit=2, hold_s=30)


def test_a_dead_holders_admission_lapses(jobs):
    jobs.admit(new_video_id(), "stream", limit=1, hold_s=0.2)
    with pytest.raises(AdmissionRefused):
        jobs.admit(new_video_id(), "stream", limit=1, hold_s=30)
    time.sleep(0.3)
    jobs.admit(new_video_id(), "stream", limit=1, hold_s=30)


def test_claims_are_exclusive_and_capacity_is_cluster_wide(store_url):
    replicas = _replicas(store_url, 3)
    for index in range(6):
        replicas[0].enqueue(_record(created_at=index))
    claimed: list = []
    barrier = threading.Barrier(12)

    def work(index: int) -> None:
        barrier.wait()
        claim = replicas[index % 3].claim(f"worker-{index}", lease_s=30, max_running=4, max_attempts=3)
        if claim is not None:
            claimed.append(claim.record.id)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(claimed) == 4 == len(set(claimed))  # the cluster-wide bound, no job twice
    assert replicas[1].counts() | {} == {**replicas[1].counts(), "queued": 2, "in_progress": 4}
    for store in replicas:
        store.close()


def test_normal_jobs_are_claimed_before_bulk_ones_whenever_queued(jobs):
    bulk = [jobs.enqueue(_record(created_at=index, priority="bulk")) for index in range(2)]
    normal = [jobs.enqueue(_record(created_at=10 + index)) for index in range(2)]
    order = [jobs.claim("w", lease_s=30, max_running=10, max_attempts=3) for _ in range(4)]
    assert [claim.record.id for claim in order] == [r.id for r in normal + bulk]
    assert jobs.get(bulk[0].id).priority == "bulk"


def test_lease_renewal_ownership_and_bounded_attempts(jobs):
    record = jobs.enqueue(_record())
    claim = jobs.claim("a", lease_s=0.3, max_running=1, max_attempts=2)
    assert claim.attempt == 1 and claim.record.status == "in_progress"
    assert jobs.renew(record.id, "a", lease_s=0.3) and not jobs.renew(record.id, "b", lease_s=30)
    assert jobs.claim("b", lease_s=30, max_running=2, max_attempts=2) is None  # the lease is live
    time.sleep(0.4)
    retaken = jobs.claim("b", lease_s=0.2, max_running=1, max_attempts=2)
    assert (retaken.record.id, retaken.attempt) == (record.id, 2)
    # The first worker woke up late: its writes no longer land.
    assert jobs.update(record.id, owner="a", status="completed", progress=100) is None
    assert not jobs.renew(record.id, "a", lease_s=30)
    time.sleep(0.3)
    assert jobs.claim("c", lease_s=30, max_running=1, max_attempts=2) is None  # attempts used up
    failed = jobs.get(record.id)
    assert failed.status == "failed" and failed.error["code"] == "production_interrupted"
    assert "2 times" in failed.error["message"]


def test_requeue_hands_a_job_back_and_owner_completes(jobs):
    record = jobs.enqueue(_record())
    claim = jobs.claim("a", lease_s=30, max_running=1, max_attempts=3)
    assert jobs.requeue(record.id, "a") and jobs.get(record.id).status == "queued"
    claim = jobs.claim("b", lease_s=30, max_running=1, max_attempts=3)
    assert claim.attempt == 2
    done = jobs.update(record.id, owner="b", status="completed", progress=100, completed_at=5)
    assert done.status == "completed" and not jobs.renew(record.id, "b", lease_s=30)


def test_started_streams_are_leased_and_taken_over_when_their_owner_dies(jobs):
    record = jobs.start(_record(kind="stream"), owner="ingress-1", lease_s=0.2)
    assert jobs.get(record.id).status == "in_progress"
    assert jobs.claim("w", lease_s=30, max_running=1, max_attempts=3) is None
    time.sleep(0.3)
    claim = jobs.claim("w", lease_s=30, max_running=1, max_attempts=3)
    assert claim.record.id == record.id and claim.attempt == 2 and claim.record.kind == "job"


def test_store_urls():
    with pytest.raises(ValueError, match="sqlite:///PATH or postgresql") as info:
        open_job_store("mysql://root:secret@db/x")
    assert "secret" not in str(info.value)
    assert redact_url("postgresql://u:pw@h:5432/db") == "postgresql://u:***@h:5432/db"


# --- VideoStore ------------------------------------------------------------------------------------


def test_sales_events_are_added_replaced_listed_and_deleted(jobs):
    from datetime import datetime, timezone

    from shopreel.serve.config import SalesEvent

    start = datetime(2026, 11, 11, tzinfo=timezone.utc)
    singles_day = SalesEvent(name="11.11", start=start, end=start.replace(day=12), peak_multiplier=10)
    jobs.put_event(singles_day)
    jobs.put_event(
        SalesEvent(name="618", start=start.replace(month=6, day=18), end=start.replace(month=6, day=19))
    )
    jobs.put_event(singles_day.model_copy(update={"peak_multiplier": 20.0}))  # the same name: replaced
    assert [(event.name, event.peak_multiplier) for event in jobs.events()] == [
        ("11.11", 20.0),
        ("618", 10.0),
    ]
    assert jobs.events()[0].start == start  # the instant survives the round trip
    assert jobs.delete_event("618") and not jobs.delete_event("618")
    assert [event.name for event in jobs.events()] == ["11.11"]


@pytest.fixture
def videos(tmp_path):
    return VideoStore(tmp_path / "videos")


def _visible_files(directory: Path) -> list[str]:
    return sorted(path.name for path in directory.iterdir()) if directory.exists() else []


def test_writer_makes_a_file_visible_only_when_complete(videos):
    video_id = new_video_id()
    final = videos.path_for(video_id, "video")
    assert final == videos.root / video_id / "video.mp4"
    with videos.open_writer(video_id, "video") as file:
        file.write(b"half")
        assert not videos.exists(video_id, "video") and not final.exists()
        (temp,) = _visible_files(final.parent)
        assert temp.startswith(".video.mp4.") and temp.endswith(".part")
        file.write(b" and the rest")
    assert videos.exists(video_id, "video")
    assert final.read_bytes() == b"half and the rest"
    assert _visible_files(final.parent) == ["video.mp4"]


def test_failed_write_leaves_nothing(videos):
    video_id = new_video_id()
    with pytest.raises(RuntimeError), videos.open_writer(video_id, "thumbnail") as file:
        file.write(b"partial")
        raise RuntimeError("encoder died")
    assert not videos.exists(video_id, "thumbnail")
    assert _visible_files(videos.root / video_id) == []


def test_commit_moves_a_finished_file_into_place(videos, tmp_path):
    video_id = new_video_id()
    src = tmp_path / "out.jpg"
    src.write_bytes(b"jpeg")
    assert videos.commit(video_id, "thumbnail", src) == videos.path_for(video_id, "thumbnail")
    assert videos.path_for(video_id, "thumbnail").read_bytes() == b"jpeg"
    assert not src.exists()


def test_commit_copies_across_filesystems(videos, tmp_path, monkeypatch):
    video_id = new_video_id()
    src = tmp_path / "out.mp4"
    src.write_bytes(b"mp4 bytes")
    real_replace = store_module.os.replace

    def replace(a, b):
        if Path(a) == src:
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        real_replace(a, b)

    monkeypatch.setattr(store_module.os, "replace", replace)
    videos.commit(video_id, "video", src)
    assert videos.path_for(video_id).read_bytes() == b"mp4 bytes"
    assert not src.exists()
    assert _visible_files(videos.root / video_id) == ["video.mp4"]


def test_delete_removes_every_variant(videos):
    video_id, other = new_video_id(), new_video_id()
    for vid in (video_id, other):
        for variant in ("video", "thumbnail"):
            with videos.open_writer(vid, variant) as file:
                file.write(b"x")
    assert videos.delete(video_id) is True
    assert not videos.exists(video_id, "video") and not videos.exists(video_id, "thumbnail")
    assert videos.delete(video_id) is False
    assert videos.exists(other, "video") and videos.exists(other, "thumbnail")


@pytest.mark.parametrize(
    "bad_id",
    [
        "../etc",
        "video_" + "A" * 32,
        "video_" + "a" * 31,
        "video_" + "a" * 32 + "/..",
        "video_" + "g" * 32,
        "",
    ],
)
def test_bad_ids_are_rejected(videos, bad_id):
    assert not is_video_id(bad_id)
    for call in (videos.path_for, videos.exists, videos.delete):
        with pytest.raises(ValueError, match="not a video id"):
            call(bad_id)
    with pytest.raises(ValueError, match="not a video id"), videos.open_writer(bad_id):
        pass
    with pytest.raises(ValidationError):
        _record(id=bad_id)


def test_bad_variant_is_rejected(videos):
    with pytest.raises(ValueError, match="variant"):
        videos.path_for(new_video_id(), "spritesheet")


def test_expired_videos_are_found_and_never_listed(jobs):
    now = int(time.time())
    done = {"status": "completed", "progress": 100}
    old = jobs.create(_record(created_at=now - 100, expires_at=now - 1, stored_bytes=70, **done))
    fresh = jobs.create(_record(created_at=now - 90, expires_at=now + 3600, stored_bytes=50, **done))
    old_failure = jobs.create(
        _record(created_at=now - 4000, status="failed", error={"code": "x", "message": "y"})
    )
    new_failure = jobs.create(
        _record(created_at=now - 10, status="failed", error={"code": "x", "message": "y"})
    )
    running = jobs.create(_record(created_at=now - 5000))  # unfinished: never expires
    assert jobs.expired(limit=10, failed_ttl_s=3600) == [(old_failure.id, 0), (old.id, 70)]
    assert jobs.expired(limit=1, failed_ttl_s=3600) == [(old_failure.id, 0)]
    listed = [record.id for record in jobs.list(order="asc")[0]]
    assert listed == [running.id, old_failure.id, fresh.id, new_failure.id]  # the expired one is gone
    assert jobs.counts()["stored_bytes"] == 120


def test_a_job_waiting_for_another_is_claimed_only_once_that_one_is_done(jobs):
    leader = jobs.enqueue(_record(created_at=2))
    follower = jobs.enqueue(_record(created_at=1, wait_for=leader.id))  # older, yet it waits
    other = jobs.enqueue(_record(created_at=3))
    first = jobs.claim("w", lease_s=30, max_running=10, max_attempts=3)
    assert first.record.id == leader.id  # the follower is skipped while its leader is queued
    assert jobs.claim("w", lease_s=30, max_running=10, max_attempts=3).record.id == other.id
    assert jobs.claim("w", lease_s=30, max_running=10, max_attempts=3) is None  # leader still running
    jobs.update(leader.id, owner="w", status="failed", progress=0)  # done, even if it failed
    claimed = jobs.claim("w", lease_s=30, max_running=10, max_attempts=3)
    assert claimed.record.id == follower.id and claimed.record.wait_for == leader.id


def test_a_job_whose_leader_was_deleted_is_claimed(jobs):
    leader = jobs.enqueue(_record())
    follower = jobs.enqueue(_record(wait_for=leader.id))
    assert jobs.enqueue_many([]) == []
    assert jobs.delete(leader.id)
    assert jobs.claim("w", lease_s=30, max_running=10, max_attempts=3).record.id == follower.id
