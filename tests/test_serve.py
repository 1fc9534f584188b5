"""Integration: a real Ray Serve app on localhost (tiny preset, fractional CPUs), driven over HTTP.

One app for the module (starting Ray and five deployments costs ~30 s on 2 cores). Its job queue
is small on purpose so the queue-full answer can be reached. Authentication is on, as in deploy/:
the tests call as tenant ``acme`` unless they say otherwise; ``globex`` is the other tenant, and
``ops`` holds the admin key. Keys are created in the job store before the app starts.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import time

import httpx
import pytest
from media import probe
from net import free_port
from PIL import Image

pytestmark = pytest.mark.serve

MODEL = "shopreel-tiny"
FOUR_SHOT_BRIEF = {
    "title": "Thermo Mug",
    "category": "drinkware",
    "selling_points": ["Keeps coffee hot for 6 hours", "Leak-proof lid"],
    "price": 89,
    "currency": "CNY",
    "language": "en",
    "duration_s": 4,
    "size": "64x64",
    "fps": 8,
}


KEYS: dict[str, str] = {}  # tenant -> API key, made by the server fixture


def _bearer(tenant: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[tenant]}"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from shopreel.serve.auth import new_key
    from shopreel.serve.runner import load_config, start
    from shopreel.serve.store_url import open_job_store

    data_dir = tmp_path_factory.mktemp("serve-data")
    config = load_config(
        None,
        **{
            "jobs.data_dir": str(data_dir),
            "auth.enabled": True,
            "auth.key_cache_s": 0.5,
            "jobs.expiry_sweep_s": 0.5,
            "jobs.concurrency": 1,
            "jobs.max_pending": 2,
            "jobs.max_streams": 2,
            "jobs.lease_s": 3,  # an interrupted job is claimed again 3 s after its replica went away
            "pipeline.generate.num_inference_steps": 2,
        },
    )
    with open_job_store(config.jobs.store_url()) as jobs:
        for tenant, role in (("acme", "user"), ("globex", "user"), ("ops", "admin")):
            created = new_key(tenant, role)
            jobs.create_key(created.record, created.secret_sha256)
            KEYS[tenant] = created.secret
    running = start(config, port=free_port(), ready_timeout_s=300)
    yield running
    running.stop()


@pytest.fixture
def http(server):
    """Tenant acme's client."""
    with httpx.Client(base_url=server.url, timeout=300, headers=_bearer("acme")) as client:
        yield client


@pytest.fixture
def anonymous(server):
    with httpx.Client(base_url=server.url, timeout=300) as client:
        yield client


@pytest.fixture
def openai_client(server):
    from openai import OpenAI

    return OpenAI(base_url=f"{server.url}/v1", api_key=KEYS["acme"], max_retries=0)


def _wait_idle(http: httpx.Client, timeout_s: float = 120) -> None:
    """Let queued jobs of an earlier test finish so each test sees an empty queue."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        videos = http.get("/v1/videos", params={"limit": 100}).json()["data"]
        if all(v["status"] in ("completed", "failed") for v in videos):
            return
        time.sleep(0.5)
    raise AssertionError("jobs did not finish")


def test_health_models_and_readiness(http, anonymous):
    # Probes and the scrape need no key (keep /metrics off the public network: deploy/ scrapes pods).
    assert anonymous.get("/healthz").json() == {"status": "ok"}
    assert anonymous.get("/readyz").status_code == 200
    assert anonymous.get("/metrics").status_code == 200
    models = http.get("/v1/models").json()
    assert models["data"][0]["id"] == MODEL and models["data"][0]["preset"] == "tiny"
    # What the renderer replica really runs: auto chose ONNX Runtime, and warm-up built the graph for
    # the preset's default size (128x128 video -> 16x16 latents), which passed its check against torch.
    renderer = models["data"][0]["renderer"]
    assert (renderer["requested"], renderer["backend"]) == ("auto", "onnxruntime")
    assert renderer["precision"] == "fp32"
    assert renderer["graphs_by_latent_size"]["16x16"].endswith(".fp32.onnx")
    assert renderer["fallback_reason"] is None


def test_openai_sdk_create_poll_download_list_delete(openai_client, tmp_path):
    import openai

    video = openai_client.videos.create_and_poll(
        model=MODEL,
        prompt="A steel water bottle. Keeps drinks cold all day.",
        seconds="4",
        size="64x64",
        poll_interval_ms=200,
    )
    assert video.status == "completed" and video.progress == 100, video
    assert video.size == "64x64" and video.model == MODEL
    content = openai_client.videos.download_content(video.id)
    (tmp_path / "v.mp4").write_bytes(content.read())
    probed = probe(tmp_path / "v.mp4")
    assert (probed.width, probed.height) == (64, 64) and probed.audio_streams == 1
    assert probed.duration_s == pytest.approx(float(video.seconds), abs=0.15)
    thumbnail = openai_client.videos.download_content(video.id, variant="thumbnail").read()
    assert thumbnail[:3] == b"\xff\xd8\xff"

    listed = [v.id for v in openai_client.videos.list(limit=2, order="desc")]  # auto-paginates
    assert video.id in listed
    deleted = openai_client.videos.delete(video.id)
    assert deleted.deleted and deleted.id == video.id
    with pytest.raises(openai.NotFoundError):
        openai_client.videos.retrieve(video.id)


def test_multipart_with_input_reference_image(openai_client):
    buffer = io.BytesIO()
    Image.new("RGB", (48, 48), (0, 180, 0)).save(buffer, format="PNG")
    video = openai_client.videos.create_and_poll(
        model=MODEL,
        prompt="红色保温杯。一整天都保温。",
        seconds="2",
        size="64x64",
        input_reference=("mug.png", buffer.getvalue(), "image/png"),
        poll_interval_ms=200,
    )
    assert video.status == "completed", video.error


def test_sync_endpoint_returns_the_mp4(http, tmp_path):
    response = http.post(
        "/v1/videos/sync",
        json={"prompt": "A desk lamp. Warm light.", "seconds": 2, "size": "64x64", "fps": 8},
    )
    assert response.status_code == 200 and response.headers["content-type"] == "video/mp4"
    (tmp_path / "sync.mp4").write_bytes(response.content)
    record = http.get(f"/v1/videos/{response.headers['x-shopreel-video-id']}").json()
    assert probe(tmp_path / "sync.mp4").frames == record["shopreel"]["num_frames"]


def test_streaming_product_video_overlaps_generation(http, tmp_path):
    """Fragments reach the client while later shots are still being denoised."""
    arrivals: list[float] = []
    data = bytearray()
    # More steps than the preset's 4: a shot's denoising must outlast muxer set-up and one chunk's
    # decode, or the tiny model finishes every shot before any frame could be composed at all.
    body = {"brief": FOUR_SHOT_BRIEF, "stream": True, "num_inference_steps": 12}
    with http.stream("POST", "/v1/product-videos", json=body) as response:
        assert response.status_code == 200 and response.headers["content-type"] == "video/mp4"
        video_id = response.headers["x-shopreel-video-id"]
        for chunk in response.iter_bytes():
            arrivals.append(time.time())
            data.extend(chunk)
    (tmp_path / "stream.mp4").write_bytes(data)
    record = http.get(f"/v1/videos/{video_id}").json()
    assert record["status"] == "completed"
    assert probe(tmp_path / "stream.mp4").frames == record["shopreel"]["num_frames"] == 9 * 4 - 3 * 2
    timings = record["shopreel"]["timings"]
    # Every video is scored; the report is kept with it (the tiny model's noise-like frames may be flagged).
    quality = record["shopreel"]["quality"]
    assert quality["num_frames"] == record["shopreel"]["num_frames"] and quality["has_audio"] is True
    assert quality["passed"] == (quality["flags"] == []) and timings["quality_s"] > 0
    # Stage clocks: the compositor's first fragment left before the generator finished the 4th shot.
    assert timings["first_fragment_at"] < timings["last_shot_denoised_at"], timings
    assert len(arrivals) > 1 and arrivals[0] < arrivals[-1]
    # The streamed video is also kept for download.
    assert http.get(f"/v1/videos/{video_id}/content").content[:12] != b""


def test_a_tutorial_brief_streams_a_video_with_one_shot_per_step(http, tmp_path):
    brief = {
        "title": "Trail bottle",
        "mode": "tutorial",
        "steps": ["Unscrew the lid", "Rinse it"],
        "duration_s": 2,
        "size": "64x64",
        "fps": 8,
    }
    body = {"brief": brief, "stream": True, "num_inference_steps": 2}
    with http.stream("POST", "/v1/product-videos", json=body) as response:
        assert response.status_code == 200, response.read()
        video_id = response.headers["x-shopreel-video-id"]
        (tmp_path / "tutorial.mp4").write_bytes(response.read())
    record = http.get(f"/v1/videos/{video_id}").json()
    assert record["status"] == "completed"
    assert probe(tmp_path / "tutorial.mp4").frames == record["shopreel"]["num_frames"]
    # No steps for a tutorial: a 400 before anything is made.
    refused = http.post("/v1/product-videos", json={"brief": {**brief, "steps": []}})
    assert refused.status_code == 400 and "needs steps" in refused.json()["error"]["message"]


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"prompt": ""}, 400, "prompt"),
        ({"prompt": "x" * 2001}, 400, "prompt"),
        ({"prompt": "mug", "size": "100x100"}, 400, "size"),
        ({"prompt": "mug", "seconds": 120}, 400, "seconds"),
        ({"prompt": "mug", "num_inference_steps": 0}, 400, "num_inference_steps"),
        ({"prompt": "mug", "speed_profile": "turbo"}, 400, "speed_profile"),
        ({"prompt": "mug", "step_cache": "faster"}, 400, "step_cache"),
        ({"prompt": "mug", "surprise": 1}, 400, "surprise"),
        ({"prompt": "mug", "model": "sora-2"}, 404, "model"),
    ],
)
def test_bad_video_requests_get_openai_errors(http, body, status, param):
    response = http.post("/v1/videos", json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["message"] and error["type"]


def test_bad_bodies_and_ids(http):
    assert (
        http.post(
            "/v1/videos", content=b"{not json", headers={"content-type": "application/json"}
        ).status_code
        == 400
    )
    big = {"prompt": "mug", "input_reference": "A" * (17 * 1024 * 1024)}
    assert http.post("/v1/videos", content=json.dumps(big)).status_code == 413
    assert http.get("/v1/videos/video_" + "0" * 32).status_code == 404
    assert http.get("/v1/videos/../../etc/passwd").status_code == 404
    assert http.get("/v1/videos", params={"limit": 0}).status_code == 400
    bad_brief = http.post("/v1/product-videos", json={"brief": {**FOUR_SHOT_BRIEF, "price": -1}})
    assert bad_brief.status_code == 400 and bad_brief.json()["error"]["param"] == "brief.price"


def _nested(levels: int) -> list:
    value: list = []
    for _ in range(levels - 1):
        value = [value]
    return value


@pytest.mark.parametrize(
    "body",
    [
        b"[" * 100_000,
        b"[" * 5_000 + b"]" * 5_000,
        json.dumps({"prompt": "mug", "extra": _nested(40)}).encode(),
    ],
    ids=["unclosed-100k", "closed-5k", "valid-but-40-deep"],
)
@pytest.mark.parametrize("path", ["/v1/videos", "/v1/product-videos"])
def test_deeply_nested_json_is_a_400_never_a_500(http, path, body):
    response = http.post(path, content=body, headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_json" and error["type"] == "invalid_request_error"


def test_full_queue_answers_429_with_retry_after(http):
    _wait_idle(http)
    accepted, refused = [], None
    for _ in range(6):
        response = http.post(
            "/v1/videos", json={"prompt": "A mug. Hot coffee.", "seconds": 4, "size": "64x64"}
        )
        if response.status_code == 429:
            refused = response
            break
        assert response.status_code == 200, response.text
        accepted.append(response.json()["id"])
    assert refused is not None, "queue never filled"
    assert int(refused.headers["Retry-After"]) >= 1 and refused.json()["error"]["code"] == "queue_full"
    # Deleting queued jobs frees the queue; nothing that was accepted is silently dropped before that.
    for video_id in accepted:
        assert http.get(f"/v1/videos/{video_id}").json()["status"] in ("queued", "in_progress", "completed")
        assert http.delete(f"/v1/videos/{video_id}").json()["deleted"]


def test_variants_are_jobs_that_share_their_common_shots(http, tmp_path):
    _wait_idle(http)
    body = {
        "brief": {**FOUR_SHOT_BRIEF, "selling_points": ["Keeps coffee hot for 6 hours", "Leak-proof lid"]},
        "profiles": [{"segment": "commuters"}, {"interests": ["leak", "bag"], "language": "zh"}],
        "audio": "none",
    }
    answer = http.post("/v1/product-videos/variants", json=body)
    assert answer.status_code == 200, answer.text
    first, second = answer.json()["data"]
    assert first["object"] == "video" and first["status"] == "queued"
    assert first["shopreel"]["variant"] == 0 and first["shopreel"]["waits_for"] is None
    assert second["shopreel"]["waits_for"] == first["id"] and second["shopreel"]["shared_shots"]
    done = {}
    deadline = time.monotonic() + 240
    while len(done) < 2 and time.monotonic() < deadline:
        for video in (first, second):
            record = http.get(f"/v1/videos/{video['id']}").json()
            if record["status"] in ("completed", "failed"):
                done[video["id"]] = record
        time.sleep(0.5)
    assert [done[v["id"]]["status"] for v in (first, second)] == ["completed", "completed"], done
    # The second waited for the first, then took every shared shot from the caches.
    made, reused = done[first["id"]], done[second["id"]]
    assert reused["created_at"] == made["created_at"] and reused["completed_at"] >= made["completed_at"]
    # Same features, other order and captions: every shot is shared, so nothing was denoised or decoded.
    assert second["shopreel"]["shared_shots"] == first["shopreel"]["shared_shots"] == [0, 1, 2, 3]
    assert reused["shopreel"]["timings"]["generate_s"] < made["shopreel"]["timings"]["generate_s"] / 3
    assert reused["shopreel"]["timings"]["render_s"] < made["shopreel"]["timings"]["render_s"] / 3
    path = tmp_path / "variant.mp4"
    path.write_bytes(http.get(f"/v1/videos/{second['id']}/content").content)
    assert probe(path).frames == reused["shopreel"]["num_frames"]
    refused = http.post("/v1/product-videos/variants", json={**body, "profiles": []})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "profiles"


def _finished(http: httpx.Client, video_id: str, timeout_s: float = 240) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        record = http.get(f"/v1/videos/{video_id}").json()
        if record["status"] in ("completed", "failed"):
            return record
        time.sleep(0.5)
    raise AssertionError(f"video {video_id} did not finish")


def test_speed_profiles_and_step_caches_reach_the_generator(openai_client, http, server):
    from datetime import datetime, timedelta, timezone

    from shopreel.serve.autoscaling import EVENTS_REFRESH_S

    _wait_idle(http)
    # 1. The SDK sends the profile as an extra field; the video says which profile made it.
    video = openai_client.videos.create_and_poll(
        model=MODEL,
        prompt="A steel water bottle.",
        size="64x64",
        poll_interval_ms=200,
        extra_body={"speed_profile": "fast"},
    )
    assert video.status == "completed", video
    assert http.get(f"/v1/videos/{video.id}").json()["shopreel"]["speed_profile"] == "fast"

    # 2. A step cache the request asks for that misses the fidelity floor (30 dB; MagCache at 12 steps
    #    makes the tiny model's frames about 23 dB) fails the job with the measured figures.
    body = {"brief": FOUR_SHOT_BRIEF, "audio": "none", "num_inference_steps": 12, "step_cache": "mag"}
    job = http.post("/v1/product-videos", json=body).json()
    failed = _finished(http, job["id"])
    assert failed["status"] == "failed" and failed["error"]["code"] == "invalid_request", failed
    assert re.search(r"mag\(.*\): \d+\.\d dB PSNR, latent error", failed["error"]["message"]), failed

    # 3. A sales event at its peak gives its profile to videos that name none; a request's own wins.
    now = datetime.now(timezone.utc)
    event = {"name": "flash-sale", "start": (now - timedelta(minutes=1)).isoformat(), "speed_profile": "fast"}
    event["end"] = (now + timedelta(hours=1)).isoformat()
    admin = _bearer("ops")
    assert http.post("/admin/events", json=event, headers=admin).status_code == 200
    try:
        time.sleep(EVENTS_REFRESH_S + 0.5)  # the job service re-reads stored events this often
        plain = http.post("/v1/product-videos", json={"brief": FOUR_SHOT_BRIEF, "audio": "none"}).json()
        own = http.post(
            "/v1/product-videos", json={"brief": FOUR_SHOT_BRIEF, "audio": "none", "speed_profile": "quality"}
        ).json()
        profiles = [_finished(http, made["id"])["shopreel"]["speed_profile"] for made in (plain, own)]
        assert profiles == ["fast", "quality"]
    finally:
        http.delete("/admin/events/flash-sale", headers=admin)


def test_metrics_expose_the_named_series(http):
    http.post("/v1/videos/sync", json={"prompt": "A pen.", "seconds": 2, "size": "64x64", "fps": 8})
    text = http.get("/metrics").text
    for series in (
        "shopreel_stage_latency_seconds_bucket",
        "shopreel_time_to_first_fragment_seconds_count",
        "shopreel_queue_depth",
        "shopreel_in_flight_requests",
        "shopreel_frames_rendered_total",
        "shopreel_errors_total",
        "shopreel_videos_scored_total",
    ):
        assert series in text, series
    assert 'stage="render"' in text


def test_cli_remote_streams_a_brief_from_disk(server, tmp_path):
    """`shopreel remote` (the quick start's client) inlines image paths and writes the streamed MP4."""
    import shutil
    from pathlib import Path

    from typer.testing import CliRunner

    from shopreel.cli import app

    examples = Path(__file__).resolve().parents[1] / "examples"
    shutil.copy(examples / "sneaker.png", tmp_path / "sneaker.png")
    brief = json.loads((examples / "brief_en.json").read_text())
    (tmp_path / "brief.json").write_text(json.dumps({**brief, "duration_s": 2, "size": "64x64", "fps": 8}))
    out = tmp_path / "remote.mp4"
    args = ["remote", str(tmp_path / "brief.json"), "-o", str(out), "--url", server.url]
    refused = CliRunner().invoke(app, args, env={"SHOPREEL_API_KEY": ""})
    assert refused.exit_code == 2 and "401" in refused.output and "API key" in refused.output
    result = CliRunner().invoke(app, args, env={"SHOPREEL_API_KEY": KEYS["acme"]})
    assert result.exit_code == 0, result.output
    assert probe(out).frames == 16 and "first bytes after" in result.output


def test_concurrent_streams_both_complete(server, tmp_path):
    """Two videos at once share generator and renderer replicas without mixing their state."""
    import threading

    sizes: dict[int, bytes] = {}

    def stream(index: int) -> None:
        with httpx.Client(base_url=server.url, timeout=300, headers=_bearer("acme")) as client:
            body = {"brief": {**FOUR_SHOT_BRIEF, "seed": index}, "stream": True}
            with client.stream("POST", "/v1/product-videos", json=body) as response:
                assert response.status_code == 200
                sizes[index] = response.read()

    threads = [threading.Thread(target=stream, args=(index,)) for index in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert set(sizes) == {0, 1}
    for index, data in sizes.items():
        (tmp_path / f"{index}.mp4").write_bytes(data)
        assert probe(tmp_path / f"{index}.mp4").frames == 9 * 4 - 3 * 2


def test_briefs_breaking_advertising_rules_are_refused_or_rewritten(http):
    claims = {
        "title": "最好的保温杯",
        "language": "zh",
        "selling_points": ["国家级工艺", "治疗失眠", "防漏杯盖"],
    }
    refused = http.post("/v1/product-videos", json={"brief": {**FOUR_SHOT_BRIEF, **claims}})
    assert refused.status_code == 400, refused.text
    error = refused.json()["error"]
    assert (error["code"], error["param"]) == ("content_policy_violation", "brief.title")
    assert "'最好'" in error["message"] and "brief.selling_points[1]: '治疗'" in error["message"]
    assert "Traceback" not in error["message"] and "ray" not in error["message"].lower()

    rewrite = {**FOUR_SHOT_BRIEF, **claims, "compliance": "rewrite"}
    accepted = http.post("/v1/product-videos", json={"brief": rewrite})
    assert accepted.status_code == 200, accepted.text
    record = http.get(f"/v1/videos/{accepted.json()['id']}").json()
    rewritten = {(f["field"], f["term"]) for f in record["shopreel"]["compliance"]}
    assert rewritten == {
        ("brief.title", "最好"),
        ("brief.selling_points[0]", "国家级"),
        ("brief.selling_points[1]", "治疗"),
    }
    _wait_idle(http)


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")
def test_a_narrated_brief_is_spoken_through_the_cluster(http, tmp_path):
    brief = {**FOUR_SHOT_BRIEF, "duration_s": 2, "narration": True}
    body = {"brief": brief, "stream": True, "num_inference_steps": 2, "audio": "none"}
    with http.stream("POST", "/v1/product-videos", json=body) as response:
        assert response.status_code == 200, response.read()
        video_id = response.headers["x-shopreel-video-id"]
        (tmp_path / "spoken.mp4").write_bytes(response.read())
    assert probe(tmp_path / "spoken.mp4").audio_streams == 1  # audio "none", yet a voice track
    quality = http.get(f"/v1/videos/{video_id}").json()["shopreel"]["quality"]
    assert quality["has_audio"] and quality["loudness_lufs"] is not None  # not silence


def test_a_tenants_own_compliance_policy_applies_to_briefs_that_name_none(http, anonymous):
    admin = _bearer("ops")
    policy = anonymous.put("/admin/tenants/lenient", json={"compliance": "rewrite"}, headers=admin)
    assert policy.status_code == 200, policy.text
    key = anonymous.post("/admin/keys", json={"tenant": "lenient"}, headers=admin).json()["key"]
    lenient = {"Authorization": f"Bearer {key}"}
    brief = {**FOUR_SHOT_BRIEF, "title": "The best thermo mug", "duration_s": 2}
    rewritten = anonymous.post("/v1/product-videos", json={"brief": brief}, headers=lenient)
    assert rewritten.status_code == 200, rewritten.text
    record = anonymous.get(f"/v1/videos/{rewritten.json()['id']}", headers=lenient).json()
    assert [(f["field"], f["term"]) for f in record["shopreel"]["compliance"]] == [
        ("brief.title", "The best")
    ]
    # The brief's own policy wins; other tenants keep the server's (reject).
    own = anonymous.post(
        "/v1/product-videos", json={"brief": {**brief, "compliance": "reject"}}, headers=lenient
    )
    assert own.status_code == 400 and own.json()["error"]["code"] == "content_policy_violation"
    assert http.post("/v1/product-videos", json={"brief": brief}).status_code == 400
    _wait_idle(http)


def test_finished_shots_leave_no_routing_state_behind(server, http):
    """A shot whose chunks take several renderer calls is routed by a key of its own; Serve's router
    would keep every finished shot's last call (its latents) under that key for good
    (serve/stage_clients.py, forget_routing_key). Videos done, the compositor's router holds no keys."""
    from ray import serve

    for seed in range(3):
        body = {"brief": {**FOUR_SHOT_BRIEF, "seed": 100 + seed}, "stream": True}
        with http.stream("POST", "/v1/product-videos", json=body) as response:
            assert response.status_code == 200
            response.read()
    compositor = serve.get_deployment_handle("compositor", "shopreel")
    assert compositor.stats.remote().result() == {"renderer_routing_keys": 0}


def test_a_shot_split_over_calls_is_keyed_and_its_key_let_go(server):
    """The renderer port against the live renderer through a real Serve router: a shot sent in two
    calls carries its key on both (Serve keeps the first call under it), a whole shot carries none, and
    nothing stays indexed once the shots are done."""
    import asyncio

    import numpy as np
    from ray import serve

    from shopreel.pipelines.types import LatentChunk
    from shopreel.serve.stage_clients import RemoteFrameRenderer, RetryPolicy, routing_keys_held

    latents = np.random.default_rng(5).standard_normal((1, 16, 3, 8, 8)).astype(np.float32)  # 64x64

    def chunks(shot: int) -> list[LatentChunk]:
        bounds = [(0, 1), (1, 3)]
        return [
            LatentChunk(
                "video_split", shot, i, a, b, latents[:, :, a:b], is_last=i == 1, is_last_shot=shot == 1
            )
            for i, (a, b) in enumerate(bounds)
        ]

    async def scenario() -> tuple[list[str | None], int | None, int | None, list[int]]:
        handle = serve.get_deployment_handle("renderer", "shopreel")
        keys: list[str | None] = []
        options = handle.options

        def recording(**kwargs):
            keys.append(kwargs.get("multiplexed_model_id"))
            return options(**kwargs)

        handle.options = recording  # type: ignore[method-assign]
        port = RemoteFrameRenderer(handle, RetryPolicy(), "video_split", max_in_flight=2)
        split = chunks(0)
        frames = [await port.render(split[0])]  # the shot goes on in a later call: keyed
        held_mid_shot = routing_keys_held(handle)
        frames.append(await port.render(split[1]))
        frames += await asyncio.gather(*(port.render(chunk) for chunk in chunks(1)))  # whole: no key
        await asyncio.sleep(0)  # the router prunes on its loop
        return keys, held_mid_shot, routing_keys_held(handle), [f.frames.shape[0] for f in frames]

    keys, held_mid_shot, held_after, frame_counts = asyncio.run(scenario())
    assert keys == ["video_split:0", "video_split:0", None]
    assert held_mid_shot == 1 and held_after == 0
    assert frame_counts == [1, 8, 1, 8]


def test_accepted_jobs_survive_an_app_restart(server, http):
    """Jobs accepted before the app goes down are produced by the next one (SQLite job store)."""
    _wait_idle(http)
    ids = []
    for index in range(2):
        body = {
            "prompt": f"A notebook, model {index}. Dotted pages.",
            "seconds": 2,
            "size": "64x64",
            "fps": 8,
        }
        response = http.post("/v1/videos", json=body)
        assert response.status_code == 200, response.text
        ids.append(response.json()["id"])
    before = [http.get(f"/v1/videos/{video_id}").json()["status"] for video_id in ids]
    assert before.count("queued") >= 1, before  # the restart really interrupts accepted work
    server.restart_app(ready_timeout_s=300)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        statuses = [http.get(f"/v1/videos/{video_id}").json()["status"] for video_id in ids]
        if all(status == "completed" for status in statuses):
            break
        assert "failed" not in statuses
        time.sleep(0.5)
    else:
        raise AssertionError(f"jobs not completed after the restart: {statuses}")
    for video_id in ids:
        assert http.get(f"/v1/videos/{video_id}/content").status_code == 200


# --- API keys, tenants and quotas ----------------------------------------------------------------

FAKE_ID = "video_" + "0" * 32
V1_ENDPOINTS = [
    ("GET", "/v1/models"),
    ("POST", "/v1/videos"),
    ("GET", "/v1/videos"),
    ("GET", f"/v1/videos/{FAKE_ID}"),
    ("DELETE", f"/v1/videos/{FAKE_ID}"),
    ("GET", f"/v1/videos/{FAKE_ID}/content"),
    ("POST", "/v1/videos/sync"),
    ("POST", "/v1/product-videos"),
    ("POST", "/v1/product-videos/variants"),
]


@pytest.mark.parametrize(("method", "path"), V1_ENDPOINTS)
def test_every_v1_endpoint_needs_a_valid_key(anonymous, method, path):
    body = {"prompt": "A mug."} if method == "POST" else None
    for headers, code in (
        ({}, "missing_api_key"),
        ({"Authorization": "Bearer sk-wrong"}, "invalid_api_key"),
        ({"Authorization": "Bearer " + KEYS["acme"][:-2] + "xx"}, "invalid_api_key"),  # forged secret
    ):
        response = anonymous.request(method, path, json=body, headers=headers)
        assert response.status_code == 401, (headers, response.text)
        assert response.headers["www-authenticate"] == "Bearer"
        error = response.json()["error"]
        assert (error["code"], error["type"]) == (code, "invalid_request_error")


def test_a_tenant_never_sees_another_tenants_videos(http, server):
    video = http.post("/v1/videos", json={"prompt": "A mug. Hot.", "seconds": 2, "size": "64x64"}).json()
    with httpx.Client(base_url=server.url, timeout=60, headers=_bearer("globex")) as globex:
        for method, path in (
            ("GET", f"/v1/videos/{video['id']}"),
            ("GET", f"/v1/videos/{video['id']}/content"),
            ("GET", f"/v1/videos/{video['id']}/content?variant=thumbnail"),
            ("DELETE", f"/v1/videos/{video['id']}"),
        ):
            response = globex.request(method, path)
            assert response.status_code == 404, (path, response.text)
            assert response.json()["error"]["message"] == f"no video with id {video['id']!r}"  # as if absent
        assert video["id"] not in [
            v["id"] for v in globex.get("/v1/videos", params={"limit": 100}).json()["data"]
        ]
        after = globex.get("/v1/videos", params={"after": video["id"]})
        assert after.status_code == 400 and after.json()["error"]["param"] == "after"
    # The owner still has it, untouched by the other tenant's delete.
    assert http.get(f"/v1/videos/{video['id']}").status_code == 200
    assert video["id"] in [v["id"] for v in http.get("/v1/videos", params={"limit": 100}).json()["data"]]
    _wait_idle(http)


def test_keys_and_quotas_through_the_admin_api(http, server, anonymous):
    """An admin makes a key with a 1 video/minute quota: the second video is a 429; revoking the key
    takes effect on the running app within auth.key_cache_s; a user key cannot use the admin API."""
    admin = _bearer("ops")
    assert http.get("/admin/keys").status_code == 403  # acme's key is no admin key
    assert anonymous.post("/admin/keys", json={"tenant": "tight"}).status_code == 401
    quota = anonymous.put("/admin/tenants/tight", json={"videos_per_minute": 1}, headers=admin)
    assert quota.status_code == 200, quota.text
    bad = anonymous.put("/admin/tenants/tight", json={"videos_per_minute": 0}, headers=admin)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "videos_per_minute"
    created = anonymous.post("/admin/keys", json={"tenant": "tight", "label": "test"}, headers=admin).json()
    assert created["key"].startswith("sr-") and created["tenant"] == "tight"
    listed = anonymous.get("/admin/keys", params={"tenant": "tight"}, headers=admin).json()["data"]
    assert [key["id"] for key in listed] == [created["id"]] and "key" not in listed[0]

    tight = {"Authorization": f"Bearer {created['key']}"}
    body = {"prompt": "A pen. Smooth ink.", "seconds": 2, "size": "64x64"}
    first = anonymous.post("/v1/videos", json=body, headers=tight)
    assert first.status_code == 200, first.text
    second = anonymous.post("/v1/videos", json=body, headers=tight)
    assert second.status_code == 429, second.text
    error = second.json()["error"]
    assert (error["code"], error["type"]) == ("rate_limit_exceeded", "rate_limit_error")
    assert "videos_per_minute" in error["message"] and 1 <= int(second.headers["Retry-After"]) <= 60
    assert http.post("/v1/videos", json=body).status_code == 200  # other tenants go on

    assert anonymous.delete(f"/admin/keys/{created['id']}", headers=admin).status_code == 200
    deadline = time.monotonic() + 10
    while anonymous.get("/v1/videos", headers=tight).status_code != 401:
        assert time.monotonic() < deadline, "the revoked key still works"
        time.sleep(0.2)
    assert anonymous.delete("/admin/keys/key_000000000000", headers=admin).status_code == 404
    _wait_idle(http)


def test_an_expired_video_is_gone_at_once_and_its_files_soon_after(http, server):
    from shopreel.serve.store_url import open_job_store

    response = http.post(
        "/v1/videos/sync", json={"prompt": "A cup.", "seconds": 2, "size": "64x64", "fps": 8}
    )
    assert response.status_code == 200, response.text
    video_id = response.headers["x-shopreel-video-id"]
    record = http.get(f"/v1/videos/{video_id}").json()
    assert record["expires_at"] >= record["completed_at"] + 3600  # the default day, at least an hour
    files = server.config.jobs.videos_path() / video_id
    assert (files / "video.mp4").exists()
    with open_job_store(server.config.jobs.store_url()) as jobs:  # as if a day had passed
        jobs.update(video_id, expires_at=int(time.time()) - 1)
    for path in (f"/v1/videos/{video_id}", f"/v1/videos/{video_id}/content"):
        assert http.get(path).status_code == 404, path
    assert video_id not in [v["id"] for v in http.get("/v1/videos", params={"limit": 100}).json()["data"]]
    deadline = time.monotonic() + 30
    while files.exists():
        assert time.monotonic() < deadline, "the sweeper did not delete the files"
        time.sleep(0.2)
    with open_job_store(server.config.jobs.store_url()) as jobs:
        assert jobs.get(video_id) is None
    swept = re.search(r"^shopreel_videos_expired_total (\S+)$", http.get("/metrics").text, re.M)
    assert swept is not None and float(swept.group(1)) >= 1  # one ingress replica: it swept the video


# --- schema fuzzing: the live app against its own OpenAPI schema (last: it leaves jobs behind) -------

# What makes a case expensive on the tiny preset, pinned to cheap valid values where a case sets it;
# every other field (and these ones' absence) is left to the fuzzer.
CHEAP_VIDEO = {"seconds": 2, "num_frames": 17, "num_inference_steps": 2, "size": "64x64", "fps": 8}
CHEAP_BRIEF = {"duration_s": 2, "size": "64x64", "fps": 8}


def _cheap(case) -> None:
    body = case.body
    if not isinstance(body, dict):
        return
    pins = CHEAP_VIDEO if case.path.startswith("/v1/videos") else {"num_inference_steps": 2}
    for key, value in pins.items():
        if key in body and isinstance(body[key], (int, float, str)) and not isinstance(body[key], bool):
            body[key] = value
    brief = body.get("brief")
    if case.path.startswith("/v1/product-videos") and isinstance(brief, dict):
        brief.update({key: value for key, value in CHEAP_BRIEF.items() if key in brief})


FUZZ_EXAMPLES = 20  # generated requests per operation and mode (positive, negative): ~800 in all


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_the_api_answers_every_generated_request_as_its_schema_says(server, mode):
    """Schemathesis cases for every operation in the app's own /openapi.json, as the admin key (which
    reaches every route): no 5xx, and status, media type, headers and body as the schema documents them.
    Derandomized, so CI fuzzes the same cases every run."""
    schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is not installed (.[dev])")
    from hypothesis import HealthCheck, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        response_headers_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    checks = [
        not_a_server_error,
        status_code_conformance,
        content_type_conformance,
        response_headers_conformance,
        response_schema_conformance,
    ]
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    failures: list[str] = []
    operations = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        operations += 1

        @given(case=operation.as_strategy(generation_mode=schemathesis.GenerationMode(mode)))
        @settings(
            max_examples=FUZZ_EXAMPLES,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def call(case) -> None:
            _cheap(case)
            case.call_and_validate(headers=_bearer("ops"), checks=checks, timeout=120)

        try:
            call()
        except Unsatisfiable:  # negative mode, an operation without parameters or body: nothing to break
            assert mode == "negative", operation.path
        except Exception as exc:  # noqa: BLE001 - collect every operation's failure, then report them all
            failures.append(f"{operation.method.upper()} {operation.path}: {exc}")
    assert operations == 21
    assert not failures, "\n\n".join(failures)


def test_the_schema_describes_every_route(anonymous):
    schema = anonymous.get("/openapi.json").json()
    operations = {(method, path) for path, ops in schema["paths"].items() for method in ops}
    assert len(operations) == 21 and ("post", "/v1/videos") in operations
    create = schema["paths"]["/v1/videos"]["post"]
    assert set(create["requestBody"]["content"]) == {"application/json", "multipart/form-data"}
    stream = schema["paths"]["/v1/product-videos"]["post"]["responses"]["200"]["content"]
    assert set(stream) == {"video/mp4", "application/json"}
    assert create["security"] == [{"bearer": []}] and "422" not in create["responses"]
