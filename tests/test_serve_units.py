"""Serving pieces without a cluster: config -> deployment options, renderer cache recovery."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import numpy as np
import pytest
from pydantic import ValidationError

from shopreel.pipelines.types import LatentChunk
from shopreel.serve.config import AutoscalingSettings, DeploymentSettings, ServeConfig
from shopreel.serve.deployments import RendererDeployment
from shopreel.serve.stage_clients import NeedHistory


def test_deployment_options_fixed_and_autoscaled():
    fixed = DeploymentSettings(
        num_replicas=3, num_cpus=0.5, resources={"render_pool": 1}
    ).deployment_options()
    assert fixed["num_replicas"] == 3 and "autoscaling_config" not in fixed
    assert fixed["ray_actor_options"] == {"num_cpus": 0.5, "num_gpus": 0.0, "resources": {"render_pool": 1}}
    scaled = DeploymentSettings(
        autoscaling=AutoscalingSettings(min_replicas=1, max_replicas=4)
    ).deployment_options()
    assert "num_replicas" not in scaled and scaled["autoscaling_config"]["max_replicas"] == 4


def test_config_rejects_bad_values():
    with pytest.raises(ValidationError, match="min_replicas"):
        AutoscalingSettings(min_replicas=5, max_replicas=2)
    with pytest.raises(ValidationError):
        ServeConfig.model_validate({"renderer": {"num_cpus": -1}})
    with pytest.raises(ValidationError):
        ServeConfig.model_validate({"rendrer": {}})  # typo: unknown key


def _chunks(latents: np.ndarray, request_id: str = "r") -> list[LatentChunk]:
    total = latents.shape[2]
    return [
        LatentChunk(
            request_id,
            0,
            index,
            start,
            min(start + 2, total),
            latents[:, :, start : start + 2],
            is_last=start + 2 >= total,
            is_last_shot=True,
        )
        for index, start in enumerate(range(0, total, 2))
    ]


def test_renderer_without_the_shot_cache_asks_for_history_and_rebuilds_it():
    """A chunk routed to another replica still decodes to exactly the same frames."""
    config = ServeConfig(warmup=False)
    first_replica = RendererDeployment.func_or_class(config)
    second_replica = RendererDeployment.func_or_class(config)
    z_dim = first_replica.renderer.backend.vae.config.z_dim
    latents = np.random.default_rng(0).standard_normal((1, z_dim, 6, 8, 8)).astype(np.float32)
    chunks = _chunks(latents)

    async def scenario():
        reference = [await first_replica.render(chunk) for chunk in _chunks(latents, "ref")]
        await first_replica.render(chunks[0])
        missing = await second_replica.render(chunks[1])
        assert missing == NeedHistory(next_latent=0)
        rebuilt = await second_replica.render(chunks[1], latents[:, :, :2])
        wrong_history = await second_replica.render(replace(chunks[2], latent_start=2), latents[:, :, :1])
        return reference, rebuilt, wrong_history

    reference, rebuilt, wrong_history = asyncio.run(scenario())
    np.testing.assert_array_equal(rebuilt.frames, reference[1].frames)
    assert (rebuilt.frame_start, rebuilt.frame_end) == (reference[1].frame_start, reference[1].frame_end)
    assert isinstance(wrong_history, NeedHistory)  # a history of the wrong length is not trusted



def test_one_streaming_call_decodes_a_run_of_chunks_as_single_calls_do():
    config = ServeConfig(warmup=False)
    replica = RendererDeployment.func_or_class(config)
    other_replica = RendererDeployment.func_or_class(config)
    z_dim = replica.renderer.backend.vae.config.z_dim
    latents = np.random.default_rng(1).standard_normal((1, z_dim, 6, 8, 8)).astype(np.float32)
    chunks = _chunks(latents)

    async def answers(target, run, history=None):
        return [answer async for answer in target.render_chunks(run, history)]

    async def scenario():
        reference = [await replica.render(chunk) for chunk in _chunks(latents, "ref")]
        streamed = await answers(replica, chunks)
        # Another replica without the shot's cache: one NeedHistory ends the call; with the history the
        # rest of the shot decodes in one call too.
        missing = await answers(other_replica, chunks[1:])
        rebuilt = await answers(other_replica, chunks[1:], latents[:, :, :2])
        return reference, streamed, missing, rebuilt

    reference, streamed, missing, rebuilt = asyncio.run(scenario())
    assert missing == [NeedHistory(next_latent=0)]
    for got in (streamed, [reference[0], *rebuilt]):
        assert len(got) == len(reference)
        for frames, want in zip(got, reference, strict=True):
            np.testing.assert_array_equal(frames.frames, want.frames)
            assert (frames.frame_start, frames.frame_end) == (want.frame_start, want.frame_end)
    assert replica._shot_locks == {} and replica.renderer.active_streams == 0  # the shot ended cleanly

def test_serve_config_files_build_the_app():
    """deploy/serve.yaml and the KubeRay manifest's serveConfigV2 hold valid ServeConfig args."""
    from pathlib import Path

    import yaml

    from shopreel.serve.app import app_builder
    from shopreel.serve.runner import load_config

    deploy = Path(__file__).resolve().parents[1] / "deploy"
    serve_file = yaml.safe_load((deploy / "serve.yaml").read_text())
    assert serve_file["applications"][0]["import_path"] == "shopreel.serve.app:app_builder"
    app_builder(serve_file["applications"][0]["args"])  # builds the bound graph; starts nothing
    local = load_config(deploy / "serve.yaml")
    assert local.renderer.autoscaling is not None and local.auth.enabled  # deploy/ requires keys
    manifest = yaml.safe_load((deploy / "kuberay" / "rayservice.yaml").read_text())
    args = yaml.safe_load(manifest["spec"]["serveConfigV2"])["applications"][0]["args"]
    cluster = ServeConfig.model_validate(args)
    assert cluster.generator.num_gpus == 1 and cluster.auth.enabled
    assert cluster.auth.default_quotas.max_streams is not None


def test_a_partial_stage_setting_keeps_that_stages_other_defaults():
    """`ingress: {num_replicas: 2}` must not drop the ingress's own 64 concurrent requests to the generic
    default (which would queue a burst in front of admission instead of refusing it)."""
    from shopreel.serve.runner import load_config

    config = load_config(None, **{"ingress.num_replicas": 2, "generator.resources": {"gpu_node": 0.1}})
    assert config.ingress.num_replicas == 2
    assert config.ingress.max_ongoing_requests == ServeConfig().ingress.max_ongoing_requests == 64
    assert config.ingress.max_queued_requests == -1
    assert config.generator.max_ongoing_requests == 2 and config.generator.resources == {"gpu_node": 0.1}


def test_every_response_says_how_long_the_ingress_spent_on_it():
    import httpx
    from fastapi import FastAPI

    from shopreel.serve.app import ServerTiming

    app = FastAPI()
    app.add_middleware(ServerTiming)

    @app.get("/slow")
    async def slow() -> dict[str, str]:
        await asyncio.sleep(0.05)
        return {"ok": "yes"}

    async def call() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.get("/slow")

    response = asyncio.run(call())
    name, _, duration = response.headers["server-timing"].partition(";dur=")
    assert name == "ingress" and 50 <= float(duration) < 5000


def test_json_depth_counts_without_recursion_and_stops_past_the_limit():
    from shopreel.serve.protocol import json_depth

    assert json_depth({"brief": {"images": [{"data": "x"}]}}, 32) == 4
    assert json_depth("text", 32) == 0
    deep: list = []
    for _ in range(200_000):  # far past Python's recursion limit
        deep = [deep]
    assert json_depth(deep, 32) == 33  # stopped one past the limit, whatever the real depth


def test_an_unexpected_error_is_an_openai_500_whose_id_is_in_the_log(caplog):
    from fastapi.testclient import TestClient

    from shopreel.serve.app import api

    async def broken() -> None:
        raise RuntimeError("actor 7f3a on 10.0.0.12 ran out of memory")

    api.add_api_route("/test-only/broken", broken)
    try:
        with caplog.at_level("ERROR", logger="shopreel.serve"):
            response = TestClient(api, raise_server_exceptions=False).get("/test-only/broken")
    finally:
        api.router.routes = [r for r in api.router.routes if getattr(r, "path", "") != "/test-only/broken"]
    assert response.status_code == 500
    error = response.json()["error"]
    assert error["code"] == "internal_error" and error["type"] == "server_error"
    assert "10.0.0.12" not in response.text and "actor" not in response.text  # internals stay in the log
    error_id = error["message"].rsplit(" ", 1)[-1]
    assert error_id.startswith("err_") and error_id in caplog.text and "10.0.0.12" in caplog.text
