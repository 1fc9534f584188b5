"""The job service without HTTP or Ray: stored production requests, and a job from accept to video.

Planner and compositor are fakes with the handles' calling shape (``.plan.remote``,
``.options(stream=True).produce.remote``); the job store is a real SQLite file.
"""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from storyboards import make_storyboard

from shopreel.pipelines.compose import ComposeResult
from shopreel.pipelines.produce import Fragment, Produced, ProductionOrder, ProductionProgress
from shopreel.pipelines.types import ProductBrief, StageTimings
from shopreel.serve.auth import Principal
from shopreel.serve.config import ServeConfig, TenantQuotas
from shopreel.serve.jobs import JobService, ProductionRequest, failure_code
from shopreel.serve.metrics import ServingMetrics
from shopreel.serve.protocol import APIError, GenerationOptions, JobRequest
from shopreel.serve.stage_clients import StageUnavailable
from shopreel.serve.store import JobRecord, SqliteJobStore, VideoStore

BRIEF = ProductBrief(
    title="Thermo Mug", selling_points=["Keeps coffee hot"], duration_s=2, size="64x64", fps=8
)


def _production() -> ProductionRequest:
    return ProductionRequest(
        job=JobRequest(brief=BRIEF, options=GenerationOptions(num_inference_steps=3, negative_prompt="blur")),
        storyboard=make_storyboard(),
        audio="none",
        understand_s=0.25,
    )


def _record(request: str) -> JobRecord:
    return JobRecord(model="shopreel-tiny", seconds="2", size="64x64", request=request)


def test_production_request_round_trips_through_the_job_store(tmp_path):
    production = _production()
    with SqliteJobStore(tmp_path / "jobs.sqlite3") as jobs:
        jobs.enqueue(_record(production.to_record_json()))
        claim = jobs.claim("worker", lease_s=30, max_running=4, max_attempts=3)
    assert claim is not None
    assert ProductionRequest.from_record(claim.record) == production
    # The stored keys are the column's format, shared with records written before the typed model.
    assert set(json.loads(claim.record.request)) == {"job", "storyboard", "audio", "understand_s"}


def test_a_record_in_the_old_json_format_still_parses():
    production = _production()
    stored = {  # what _accept wrote with json.dumps before ProductionRequest existed
        "job": production.job.model_dump(mode="json"),
        "storyboard": production.storyboard.model_dump(mode="json"),
        "audio": "none",
        "understand_s": 0.25,
    }
    assert ProductionRequest.from_record(_record(json.dumps(stored))) == production
    # Readers always defaulted a missing audio and planning time.
    del stored["audio"], stored["understand_s"]
    parsed = ProductionRequest.from_record(_record(json.dumps(stored)))
    assert (parsed.audio, parsed.understand_s) == ("bed", 0.0)


def test_the_order_carries_the_request_and_its_options():
    order = _production().order("video_" + "0" * 32)
    assert order.request_id == "video_" + "0" * 32 and order.audio == "none"
    assert order.num_inference_steps == 3 and order.guidance_scale is None
    assert order.seed == BRIEF.seed and order.product_images == list(BRIEF.images)


def test_failure_codes_say_whose_fault_it_was():
    assert failure_code(ValueError("bad shot"), "v") == ("invalid_request", "bad shot")
    assert failure_code(StageUnavailable("renderer", 5), "v")[0] == "stage_unavailable"
    code, message = failure_code(RuntimeError("actor 1234 on 10.0.0.1"), "v")
    assert code == "internal_error" and "10.0.0.1" not in message


def test_ray_failures_reach_clients_without_ray_internals():
    """What Ray raises when a stage's replica or node dies names actors, nodes and tuning knobs: the
    job's error says what happened in our words and names the video, which finds the log lines."""
    from ray.exceptions import OutOfMemoryError, RayActorError

    internals = ("7f3ac0ffee", "10.0.0.5", "RAY_", "ray::", "Traceback")
    lost = RayActorError(
        actor_id="7f3ac0ffee", error_msg="The actor died on node 10.0.0.5: raise RAY_memory_usage_threshold"
    )
    oom = OutOfMemoryError("Task ray::render was killed: memory on the node (IP: 10.0.0.5) ... Traceback")
    for exc, code in ((lost, "stage_unavailable"), (oom, "internal_error")):
        got, message = failure_code(exc, "video_0")
        assert got == code and "video_0" in message
        assert not any(secret in message for secret in internals), message


# --- accept -> queue -> worker -> video, with fake stage handles ---------------------------------


class _Remote:
    def __init__(self, call):
        self.remote = call


class FakePlanner:
    def __init__(self):
        async def plan(brief, profile, campaign):
            return make_storyboard()

        self.plan = _Remote(plan)


class FakeStream:
    """A compositor's event stream as ``DeploymentResponseGenerator`` looks to its consumer."""

    def __init__(self, events):
        self.events = events
        self.cancelled = False

    def __aiter__(self):
        return self._iterate()

    async def _iterate(self):
        for event in self.events:
            if isinstance(event, BaseException):
                raise event
            yield event

    def cancel(self):
        self.cancelled = True


class FakeCompositor:
    def __init__(self, *events):
        self.events = events
        self.orders: list[ProductionOrder] = []

        def produce(order):
            self.orders.append(order)
            return FakeStream(self.events)

        self.produce = _Remote(produce)

    def options(self, stream: bool):
        assert stream
        return self


def _produced(num_frames: int) -> Produced:
    compose = ComposeResult(num_frames, 2.0, 8, 64, 64, False, None, None, 10, 0.1)
    timings = StageTimings(generate_s=1.0, render_s=0.5, compose_s=0.1, total_s=9.9, render_retries=1)
    return Produced(compose, timings, [1.0], [123.0], 1, mp4=b"mp4 bytes", thumbnail=b"\xff\xd8\xff")


def _service(tmp_path, compositor, **jobs) -> JobService:
    config = ServeConfig.model_validate({"jobs": {"data_dir": str(tmp_path), "concurrency": 1, **jobs}})
    return JobService(
        config,
        planner=FakePlanner(),
        compositor=compositor,
        jobs=SqliteJobStore(tmp_path / "jobs.sqlite3"),
        videos=VideoStore(tmp_path / "videos"),
        metrics=ServingMetrics(),
    )


async def _finished(service: JobService, video_id: str) -> JobRecord:
    for _ in range(200):
        record = await asyncio.to_thread(service.jobs.get, video_id)
        assert record is not None
        if record.status in ("completed", "failed"):
            return record
        await asyncio.sleep(0.05)
    raise AssertionError(f"{video_id} did not finish: {record.status}")


def test_a_job_is_accepted_queued_and_produced_without_http(tmp_path):
    frames = make_storyboard().total_frames
    compositor = FakeCompositor(
        ProductionProgress(2, 4, 0, frames),
        Fragment(b"init"),
        ProductionProgress(4, 4, frames, frames),
        _produced(frames),
    )
    service = _service(tmp_path, compositor)
    job = JobRequest(brief=BRIEF, options=GenerationOptions(negative_prompt="blur"))

    async def scenario() -> tuple[JobRecord, ProductionRequest]:
        record, production = await service.accept(job, prompt=None, model="shopreel-tiny", kind="job")
        assert record.status == "queued" and record.num_frames == frames
        assert all(shot.negative_prompt == "blur" for shot in production.storyboard.shots)
        assert ProductionRequest.from_record(record) == production
        return await _finished(service, record.id), production

    record, production = asyncio.run(scenario())
    assert record.status == "completed" and record.progress == 100, record
    assert service.videos.path_for(record.id).read_bytes() == b"mp4 bytes"
    thumbnail = service.videos.path_for(record.id, "thumbnail").read_bytes()
    assert record.stored_bytes == len(b"mp4 bytes") + len(thumbnail) and record.tenant == "default"
    timings = record.timings or {}
    assert timings["generate_s"] == 1.0 and timings["render_retries"] == 1  # the compositor's
    # Planning, first fragment and total are this replica's, measured from accepting the video.
    assert timings["understand_s"] == production.understand_s
    assert timings["understand_s"] <= timings["total_s"] < 9.9 and timings["first_fragment_s"] is not None
    assert timings["last_shot_denoised_at"] == 123.0
    (order,) = compositor.orders
    assert order.request_id == record.id and order.audio == "bed"


class LingeringStream(FakeStream):
    """Ends ``linger_s`` after its last event, as a compositor's stream does after the video."""

    def __init__(self, events, linger_s: float):
        super().__init__(events)
        self.linger_s = linger_s

    async def _iterate(self):
        for event in self.events:
            yield event
        await asyncio.sleep(self.linger_s)


def test_a_production_that_recorded_its_video_is_not_stopped_while_it_finishes(tmp_path):
    """Once the video is recorded its lease no longer renews; that must not cancel the production
    (a sync request awaiting it answered a bare 500 when the renewal came in that moment)."""
    frames = make_storyboard().total_frames
    compositor = FakeCompositor()
    compositor.produce = _Remote(lambda order: LingeringStream([Fragment(b"init"), _produced(frames)], 0.6))
    service = _service(tmp_path, compositor, lease_s=0.5)  # renewed every 1/6 s while it lingers

    async def scenario() -> tuple[JobRecord, bool]:
        record, production = await service.accept(
            JobRequest(brief=BRIEF), prompt=None, model="shopreel-tiny", kind="sync"
        )
        task = service.start_production(record, production)
        await asyncio.wait_for(asyncio.shield(task), 10)  # raised CancelledError before the fix
        return await asyncio.to_thread(service.jobs.get, record.id), task.cancelled()

    record, cancelled = asyncio.run(scenario())
    assert not cancelled and record.status == "completed"
    assert service.recorded == set()  # forgotten when the production ended


@pytest.mark.parametrize(
    ("error", "code"),
    [(ValueError("no such font"), "invalid_request"), (RuntimeError("boom"), "internal_error")],
)
def test_a_failed_production_is_recorded_on_the_job(tmp_path, error, code):
    service = _service(tmp_path, FakeCompositor(Fragment(b"init"), error))

    async def scenario() -> JobRecord:
        record, _ = await service.accept(
            JobRequest(brief=BRIEF), prompt="p", model="shopreel-tiny", kind="job"
        )
        return await _finished(service, record.id)

    record = asyncio.run(scenario())
    assert record.status == "failed" and record.error is not None and record.error["code"] == code


def test_an_unreadable_stored_request_fails_its_job_and_the_worker_goes_on(tmp_path):
    frames = make_storyboard().total_frames
    service = _service(tmp_path, FakeCompositor(_produced(frames)))
    damaged = JobRecord(model="shopreel-tiny", seconds="2", size="64x64", request='{"job": "not a job"}')
    service.jobs.enqueue(damaged)

    async def scenario() -> tuple[JobRecord, JobRecord]:
        service.start()
        failed = await _finished(service, damaged.id)
        record, _ = await service.accept(
            JobRequest(brief=BRIEF), prompt=None, model="shopreel-tiny", kind="job"
        )
        return failed, await _finished(service, record.id)

    failed, after = asyncio.run(scenario())
    assert failed.status == "failed" and failed.error is not None
    assert failed.error["code"] == "internal_error" and "unreadable" in failed.error["message"]
    assert after.status == "completed"  # the one worker survived the bad record


def test_a_refusal_is_remembered_briefly_and_never_turns_into_a_grant(tmp_path):
    service = _service(tmp_path, FakeCompositor(), max_streams=1, refusal_memory_s=0.3)
    asked: list[str] = []
    admit = service.jobs.admit

    def counting_admit(video_id, kind, limit, hold_s, **tenancy):
        asked.append(kind)
        return admit(video_id, kind, limit, hold_s, **tenancy)

    service.jobs.admit = counting_admit  # type: ignore[method-assign]
    job = JobRequest(brief=BRIEF)

    async def refused() -> APIError:
        try:
            await service.accept(job, prompt=None, model="shopreel-tiny", kind="stream")
        except APIError as exc:
            return exc
        raise AssertionError("admitted past max_streams")

    async def scenario() -> list[APIError]:
        await service.accept(job, prompt=None, model="shopreel-tiny", kind="stream")  # the one slot
        errors = [await refused(), await refused()]  # the store refuses, then the replica itself
        assert asked == ["stream", "stream"]
        service.refuse_if_full("job")  # another kind of slot is not affected
        await asyncio.sleep(0.35)
        errors.append(await refused())  # forgotten: the store is asked again, and still refuses
        assert asked == ["stream", "stream", "stream"]
        return errors

    errors = asyncio.run(scenario())
    assert [(e.status_code, e.code) for e in errors] == [(503, "queue_full")] * 3
    assert all("1 videos are streaming" in e.message for e in errors)
    assert service.jobs.counts().get("admitted_stream") == 1


def test_a_tenant_past_its_quota_gets_a_429_and_others_go_on(tmp_path):
    service = _service(tmp_path, FakeCompositor(), max_streams=4)
    quotas = TenantQuotas(max_streams=1, videos_per_minute=5)
    acme = Principal("acme", "key_000000000001", admin=False, quotas=quotas)
    globex = Principal("globex", "key_000000000002", admin=False, quotas=quotas)
    job = JobRequest(brief=BRIEF)

    async def scenario() -> APIError:
        record, _ = await service.accept(job, prompt=None, model="m", kind="stream", principal=acme)
        assert record.tenant == "acme"
        await service.accept(job, prompt=None, model="m", kind="stream", principal=globex)
        with pytest.raises(APIError) as refused:
            await service.accept(job, prompt=None, model="m", kind="sync", principal=acme)
        return refused.value

    refusal = asyncio.run(scenario())
    assert (refusal.status_code, refusal.code) == (429, "rate_limit_exceeded")
    assert refusal.type == "rate_limit_error"
    assert int(refusal.headers["Retry-After"]) >= 1
    assert "quota max_streams" in refusal.message and "limit is 1" in refusal.message
    assert service.jobs.counts()["admitted_stream"] == 2  # the refusal took no slot
    assert b'shopreel_errors_total{type="quota_exceeded"} 1.0' in service.metrics.render()


def test_retry_after_is_the_wait_the_recent_drain_rate_predicts(tmp_path):
    service = _service(tmp_path, FakeCompositor(), max_streams=2, drain_window_s=300, retry_after_s=7)
    job = JobRequest(brief=BRIEF)

    async def refusal() -> APIError:
        for _ in range(3):
            try:
                await service.accept(job, prompt=None, model="shopreel-tiny", kind="sync")
            except APIError as exc:
                return exc
        raise AssertionError("admitted past max_streams")

    first = asyncio.run(refusal())  # nothing finished yet: the configured fallback
    assert first.headers["Retry-After"] == "7"
    # 10 streamed videos completed in the last 5 minutes (one per 30 s); other kinds do not count.
    now = int(time.time())
    for kind in ("stream",) * 10 + ("job",) * 20:
        done = JobRecord(model="m", seconds="2", size="64x64", request="{}", kind=kind)
        service.jobs.create(done.model_copy(update={"status": "completed", "completed_at": now - 60}))
    service._full.clear()  # forget the remembered refusal: ask the store again
    assert service._drain_rates  # a burst's refusals read the rate once ...
    service._drain_rates.clear()  # ... for DRAIN_RATE_TTL_S: this test does not wait that long
    second = asyncio.run(refusal())
    # 2 slots held, limit 2: one must finish before this request fits, in about 30 s.
    assert second.headers["Retry-After"] == "30" and second.headers["retry-after-ms"] == "30000"


def test_lower_classes_are_refused_first_as_their_slots_fill(tmp_path):
    service = _service(
        tmp_path, FakeCompositor(), max_pending=4, bulk_share=0.5, max_streams=3, interactive_reserve=1
    )
    job = JobRequest(brief=BRIEF)

    async def outcome(kind: str, priority: str = "normal") -> int:
        try:
            await service.accept(job, prompt=None, model="m", kind=kind, priority=priority)  # type: ignore[arg-type]
        except APIError as exc:
            return exc.status_code
        return 200

    async def scenario() -> list[int]:
        # No workers run (start() is never awaited on a loop that keeps them), so jobs stay queued.
        jobs = [await outcome("job", "bulk"), await outcome("job", "bulk"), await outcome("job", "bulk")]
        jobs += [await outcome("job"), await outcome("job"), await outcome("job")]
        streams = [
            await outcome("sync"),
            await outcome("sync"),
            await outcome("stream"),
            await outcome("stream"),
        ]
        return jobs + streams

    service.start = lambda: None  # type: ignore[method-assign]
    service.job_waiting = asyncio.Event()
    # bulk: 2 of 4 pending slots; normal: all 4. sync: 2 of 3 stream slots; streams: all 3.
    assert asyncio.run(scenario()) == [200, 200, 429, 200, 200, 429, 200, 200, 200, 503]
    claims = [service.jobs.claim("w", lease_s=30, max_running=9, max_attempts=3) for _ in range(4)]
    assert [claim.record.priority for claim in claims if claim] == ["normal", "normal", "bulk", "bulk"]


def test_bulk_is_for_jobs_only(tmp_path):
    service = _service(tmp_path, FakeCompositor())
    with pytest.raises(APIError, match="bulk") as caught:
        asyncio.run(
            service.accept(JobRequest(brief=BRIEF), prompt=None, model="m", kind="stream", priority="bulk")
        )
    assert caught.value.status_code == 400


def test_the_stream_limit_follows_the_running_generator_replicas(tmp_path):
    service = _service(
        tmp_path,
        FakeCompositor(),
        max_streams=5,
        streams_per_generator_replica=1,
        capacity_poll_s=0.1,
        refusal_memory_s=5,  # long: a change of capacity must clear a remembered refusal itself
    )
    running = [1]
    service.running_generators = lambda: running[0]
    job = JobRequest(brief=BRIEF)

    async def outcome() -> int:
        try:
            await service.accept(job, prompt=None, model="m", kind="stream")
        except APIError as exc:
            return exc.status_code
        return 200

    async def replicas_seen(count: int) -> None:
        for _ in range(100):
            if service.generator_replicas == count:
                return
            await asyncio.sleep(0.02)
        raise AssertionError(f"the service never saw {count} generator replicas")

    async def scenario() -> list[list[int]]:
        service.start()
        await replicas_seen(1)
        one = [await outcome(), await outcome(), await outcome()]  # one replica up: 1 + 1 slots
        running[0] = 3
        await replicas_seen(3)
        three = [await outcome(), await outcome(), await outcome()]  # 3 + 1 slots: two more, then full
        running[0] = 9
        await replicas_seen(9)
        capped = [await outcome(), await outcome()]  # max_streams stays the ceiling
        return [one, three, capped]

    assert asyncio.run(scenario()) == [[200, 200, 503], [200, 200, 503], [200, 503]]
    assert service.jobs.counts().get("admitted_stream") == 5


def test_without_a_per_replica_figure_the_stream_limit_is_max_streams():
    settings = ServeConfig.model_validate({"jobs": {"max_streams": 6, "interactive_reserve": 2}}).jobs
    assert settings.stream_limit(1) == settings.stream_limit(None) == 6
    assert settings.limit_of("sync", 1) == 4
    following = settings.model_copy(update={"streams_per_generator_replica": 2})
    assert following.stream_limit(None) == 6  # not read yet: the configured ceiling
    # One replica's worth beyond those running, so the generator's backlog can show refused demand.
    assert [following.stream_limit(n) for n in (0, 1, 2, 3)] == [2, 4, 6, 6]
    # The reserve keeps interactive streams first while capacity is short: sync waits for it.
    assert [following.limit_of("sync", n) for n in (0, 1, 2)] == [0, 2, 4]


def test_the_sweeper_deletes_expired_videos_files_first(tmp_path):
    service = _service(tmp_path, FakeCompositor(), video_ttl_s=3600)
    now = int(time.time())
    done = {"status": "completed", "progress": 100, "model": "m", "seconds": "2", "size": "64x64"}
    expired = JobRecord(request="{}", expires_at=now - 1, stored_bytes=9, **done)
    kept = JobRecord(request="{}", expires_at=now + 600, stored_bytes=9, **done)
    for record in (expired, kept):
        service.jobs.create(record)
        with service.videos.open_writer(record.id) as file:
            file.write(b"mp4 bytes")

    assert asyncio.run(service.sweep_expired()) == 1
    assert service.jobs.get(expired.id) is None and not service.videos.exists(expired.id)
    assert not (tmp_path / "videos" / expired.id).exists()  # the video's directory too
    assert service.jobs.get(kept.id) is not None and service.videos.exists(kept.id)
    assert asyncio.run(service.sweep_expired()) == 0  # another replica sweeping again: nothing left
    text = service.metrics.render()
    assert b"shopreel_videos_expired_total 1.0" in text and b"shopreel_expired_bytes_total 9.0" in text
