import errno
import sqlite3
import threading
from pathlib import Path

import pytest
from pydantic import ValidationError

from shopreel.serve import store as store_module
from shopreel.serve.store import SCHEMA_VERSION, JobRecord, JobStore, VideoStore, is_video_id, new_video_id


def _record(**overrides) -> JobRecord:
    values = {
        "model": "shopreel-tiny",
        "prompt": "A red shoe.",
        "seconds": "4",
        "size": "832x480",
        "request": "{}",
    }
    return JobRecord(**{**values, **overrides})


@pytest.fixture
def jobs(tmp_path):
    with JobStore(tmp_path / "jobs.sqlite3") as store:
        yield store


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


def test_state_survives_reopening_and_interrupted_jobs_are_requeued(tmp_path):
    path = tmp_path / "jobs.sqlite3"
    with JobStore(path) as first:
        queued = first.create(_record(created_at=10))
        running = first.create(_record(created_at=11))
        first.update(running.id, status="in_progress", progress=40)
        done = first.create(_record(created_at=12, status="completed", progress=100, completed_at=20))
        failed = first.create(_record(created_at=13, status="failed", error={"code": "x", "message": "y"}))
    # The process "crashed" here; a new one opens the same file.
    with JobStore(path) as second:
        assert second.get(running.id).status == "in_progress"
        requeued = second.requeue_interrupted()
        assert [r.id for r in requeued] == [queued.id, running.id]
        assert all(r.status == "queued" and r.progress == 0 for r in requeued)
        assert requeued == [second.get(queued.id), second.get(running.id)]
        assert second.get(done.id) == done and second.get(failed.id) == failed
        assert [r.id for r in second.list(order="asc")[0]] == [queued.id, running.id, done.id, failed.id]


def test_schema_is_versioned(tmp_path):
    path = tmp_path / "jobs.sqlite3"
    JobStore(path).close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(RuntimeError, match="schema"):
        JobStore(path)


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
    assert len(jobs.requeue_interrupted()) == 160


# --- VideoStore ------------------------------------------------------------------------------------


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
