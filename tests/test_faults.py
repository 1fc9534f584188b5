"""Fault injection: stage replicas of a real Ray Serve app are killed while they serve a video.

One app for the module (tiny preset, CPU, fractional CPUs). A streaming video is made once without
faults; then the same brief is made again while a renderer replica, and then the generator replica,
is SIGKILLed in the middle of a call it is serving. The video must complete with the same frames,
and the job record must show that the compositor retried (a kill between two calls would be
absorbed by Serve's own routing and prove nothing about ours).
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import time
from typing import Any

import av
import httpx
import numpy as np
import pytest
from net import free_port

pytestmark = [pytest.mark.serve, pytest.mark.slow]

BRIEF = {
    "title": "Trail Bottle",
    "category": "drinkware",
    "selling_points": ["Keeps water cold all day", "Leak-proof lid", "Fits bike cages"],
    "language": "en",
    "duration_s": 8,  # 5 shots, 12 latent chunks
    "size": "128x128",
    "fps": 8,
    "seed": 7,
}
# Enough denoising steps that the generator is still busy with later shots when the first bytes arrive.
BODY = {"brief": BRIEF, "stream": True, "num_inference_steps": 8, "audio": "none"}
FRAMES = 65



@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from shopreel.serve.runner import load_config, start

    config = load_config(
        None,
        **{
            "jobs.data_dir": str(tmp_path_factory.mktemp("faults-data")),
            # The torch decoder takes ~0.5 s a chunk here (ONNX ~0.1 s): a wide window to kill a replica
            # inside a call, and a replacement replica needs no graph export.
            "pipeline.render.backend": "torch",
        },
    )
    running = start(config, port=free_port(), ready_timeout_s=300)  # a new local Ray, never another one
    yield running
    running.stop()


def _replica(deployment: str) -> tuple[str, dict[str, Any]]:
    """The one live replica actor of a deployment in this test's cluster: (actor id, GCS record)."""
    from ray._private import state  # the public state API needs the dashboard, which tests don't start

    from shopreel.serve.runner import APP_NAME

    alive = [
        (actor_id, info)
        for actor_id, info in state.actors().items()
        if info["State"] == "ALIVE" and info["ActorClassName"] == f"ServeReplica:{APP_NAME}:{deployment}"
    ]
    assert len(alive) == 1, [info["Name"] for _, info in alive]
    return alive[0]


def _kill_while_serving(deployment: str, timeout_s: float = 60.0) -> str:
    """SIGKILL a deployment's replica process as soon as it holds a request; returns its actor id."""
    import ray

    actor_id, info = _replica(deployment)
    actor = ray.get_actor(info["Name"], namespace="serve")
    deadline = time.monotonic() + timeout_s
    while ray.get(actor.get_num_ongoing_requests.remote()) == 0:  # Serve's own per-replica count
        if time.monotonic() > deadline:
            raise AssertionError(f"{deployment} replica got no request to be killed in")
        time.sleep(0.005)
    os.kill(info["Pid"], signal.SIGKILL)
    return actor_id


def _stream_video(http: httpx.Client, kill: str | None = None) -> tuple[bytes, dict[str, Any], str | None]:
    """POST the brief with stream=true; optionally kill a stage's replica once the first bytes arrive."""
    data = bytearray()
    killed = None
    with http.stream("POST", "/v1/product-videos", json=BODY) as response:
        assert response.status_code == 200, response.read()
        video_id = response.headers["x-shopreel-video-id"]
        for chunk in response.iter_bytes():
            data.extend(chunk)
            if kill is not None and killed is None:
                killed = _kill_while_serving(kill)
    record = http.get(f"/v1/videos/{video_id}").json()
    return bytes(data), record, killed


def _frames(mp4: bytes) -> np.ndarray:
    with av.open(io.BytesIO(mp4)) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


@pytest.fixture(scope="module")
def reference(server):
    with httpx.Client(base_url=server.url, timeout=300) as client:
        mp4, record, _ = _stream_video(client)
    assert record["status"] == "completed", record
    assert record["shopreel"]["timings"]["render_retries"] == 0
    assert record["shopreel"]["timings"]["generate_restarts"] == 0
    frames = _frames(mp4)
    assert frames.shape == (FRAMES, 128, 128, 3)
    return frames


def _wait_for_replacement(deployment: str, killed: str, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if _replica(deployment)[0] != killed:
                return
        except AssertionError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"no new {deployment} replica after the kill")


def _survives(http: httpx.Client, reference: np.ndarray, deployment: str, counter: str) -> None:
    mp4, record, killed = _stream_video(http, kill=deployment)
    assert killed is not None
    assert record["status"] == "completed", record
    # The compositor itself recovered the lost call (not Serve's routing before a call was accepted).
    assert record["shopreel"]["timings"][counter] >= 1, record["shopreel"]["timings"]
    frames = _frames(mp4)
    assert len(frames) == record["shopreel"]["num_frames"] == FRAMES
    np.testing.assert_array_equal(frames, reference)
    _wait_for_replacement(deployment, killed)


def test_video_survives_a_renderer_replica_killed_mid_chunk(http, reference):
    """The chunks in flight go to the replacement replica with their shots' earlier latents."""
    _survives(http, reference, "renderer", "render_retries")


def test_video_survives_the_generator_replica_killed_mid_stream(http, reference):
    """The stream is re-issued from the first shot not fully received, on the replacement replica."""
    # A renderer replica that replaced a killed one builds its decoder graphs for this size on its
    # first video; until it has, the generator can finish every shot before the first bytes arrive,
    # leaving nothing to kill it in. One video first warms it.
    _stream_video(http)
    _survives(http, reference, "generator", "generate_restarts")


def test_a_lost_compositor_fails_the_stream_visibly_and_the_video_is_still_made(http, reference):
    """The compositor drives the video, so its loss ends the stream early. Serve's proxy closes the
    response cleanly, so the client tells by the frame-count header (and the job record: not completed).
    The video is queued again and a worker produces it whole: the same frames as without the fault."""
    data = bytearray()
    with http.stream("POST", "/v1/product-videos", json=BODY) as response:
        assert response.status_code == 200
        video_id = response.headers["x-shopreel-video-id"]
        expected_frames = int(response.headers["x-shopreel-num-frames"])
        killed = None
        with contextlib.suppress(httpx.TransportError):  # a proxy that aborts the connection is fine too
            for chunk in response.iter_bytes():
                data.extend(chunk)
                if killed is None:
                    killed = _kill_while_serving("compositor")
    assert expected_frames == FRAMES
    broken_off = http.get(f"/v1/videos/{video_id}").json()
    assert broken_off["status"] in ("queued", "in_progress"), broken_off  # not "completed": it broke off
    try:
        received = len(_frames(bytes(data)))
    except av.error.FFmpegError:  # too little arrived to parse at all
        received = 0
    assert received < expected_frames
    deadline = time.monotonic() + 180
    while (record := http.get(f"/v1/videos/{video_id}").json())["status"] != "completed":
        assert record["status"] != "failed", record
        assert time.monotonic() < deadline, record
        time.sleep(0.2)
    assert record["shopreel"]["attempts"] >= 2, record  # produced again by a worker, from the start
    content = http.get(f"/v1/videos/{video_id}/content")
    assert content.status_code == 200
    np.testing.assert_array_equal(_frames(content.content), reference)
