"""Cluster-wide metrics: the stage replicas' series through Ray's metrics export.

Fast tests check the series table, the recording rules and what the stage classes record (with a
fake recorder, no cluster). The integration test starts the embedded server with a fixed Ray metrics
export port and scrapes it the way Prometheus would.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from shopreel.serve import stage_metrics as sm

ROOT = Path(__file__).resolve().parents[1]


class FakeRecorder:
    def __init__(self) -> None:
        self.records: list[tuple[str, float, dict[str, str]]] = []

    def record(self, series: sm.Series, value: float, tags: dict[str, str]) -> None:
        self.records.append((series.name, value, dict(tags)))

    def values(self, series: sm.Series, deployment: str | None = None) -> list[float]:
        return [
            value
            for name, value, tags in self.records
            if name == series.name and (deployment is None or tags["deployment"] == deployment)
        ]


@pytest.fixture
def recorder(monkeypatch: pytest.MonkeyPatch) -> FakeRecorder:
    fake = FakeRecorder()
    monkeypatch.setattr(sm, "_default_recorder", lambda: fake)
    monkeypatch.setattr(sm._refresher, "watch", lambda metrics: None)  # no background thread in tests
    return fake


# --- the series table ----------------------------------------------------------------------------


def test_series_are_unique_valid_prometheus_names_with_sorted_buckets():
    names = [series.name for series in sm.ALL_SERIES]
    assert len(names) == len(set(names))
    for series in sm.ALL_SERIES:
        assert re.fullmatch(r"shopreel_[a-z_]+", series.name), series.name
        assert series.prometheus_name.startswith("ray_shopreel_")
        assert series.prometheus_name.endswith("_total") == (series.kind == "counter")
        if series.kind == "histogram":
            assert series.name.endswith("_seconds") and len(series.boundaries) > 3
            assert list(series.boundaries) == sorted(set(series.boundaries)) and series.boundaries[0] > 0
        else:
            assert series.boundaries == ()


def test_the_prometheus_readme_lists_every_series():
    readme = (ROOT / "deploy" / "prometheus" / "README.md").read_text()
    for series in sm.ALL_SERIES:
        assert f"`{series.prometheus_name}`" in readme, series.prometheus_name


def test_scrape_configs_parse_and_point_at_the_metrics_ports():
    import yaml

    scrape = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    targets = {job["job_name"]: job["static_configs"][0]["targets"] for job in scrape["scrape_configs"]}
    assert targets == {"shopreel-ray": ["127.0.0.1:8080"], "shopreel-ingress": ["127.0.0.1:8000"]}
    monitor = yaml.safe_load((ROOT / "deploy" / "prometheus" / "podmonitor.yaml").read_text())
    assert (monitor["apiVersion"], monitor["kind"]) == ("monitoring.coreos.com/v1", "PodMonitor")
    endpoints = {ep["port"]: ep.get("path", "/metrics") for ep in monitor["spec"]["podMetricsEndpoints"]}
    assert endpoints == {"metrics": "/metrics", "serve": "/metrics"}
    # The port names the RayService's head declares (KubeRay adds `metrics` to workers itself).
    manifest = yaml.safe_load((ROOT / "deploy" / "kuberay" / "rayservice.yaml").read_text())
    head = manifest["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    ports = {port["name"]: port["containerPort"] for port in head["ports"]}
    assert ports["metrics"] == 8080 and ports["serve"] == 8000


# --- alert rules and dashboard ---------------------------------------------------------------------

ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "shopreel.json"
# Ray Serve's own series that the rules and the dashboard use.
RAY_SERVE_SERIES = {"ray_serve_deployment_replica_healthy", "ray_serve_deployment_replica_starts_total"}
# Counters Ray cannot show before their first increment: absent from a healthy cluster's scrape.
EVENT_ONLY = {
    "ray_shopreel_ingress_refused_total",
    "ray_shopreel_ingress_errors_total",
    "ray_shopreel_compositor_render_retries_total",
    "ray_shopreel_compositor_generator_restarts_total",
    "ray_shopreel_renderer_history_rebuilds_total",
}


def _monitoring_queries() -> dict[str, str]:
    """Every PromQL expression of the alert rules and the dashboard, by where it is."""
    import yaml

    queries = {}
    for group in yaml.safe_load(ALERTS.read_text())["groups"]:
        for rule in group["rules"]:
            queries[f"rule {rule.get('alert') or rule.get('record')}"] = rule["expr"]
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        for target in panel["targets"]:
            queries[f"panel {panel['title']!r} {target['refId']}"] = target["expr"]
    return queries


def _metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\bray_[a-z0-9_]+", expr))


def test_every_series_a_rule_or_panel_names_is_one_the_cluster_exports():
    ours = {series.prometheus_name for series in sm.ALL_SERIES}
    known = RAY_SERVE_SERIES | {
        name + suffix
        for series in sm.ALL_SERIES
        if series.kind == "histogram"
        for name in [series.prometheus_name]
        for suffix in ("_bucket", "_count", "_sum")
    }
    for where, expr in _monitoring_queries().items():
        unknown = _metric_names(expr) - ours - known
        assert not unknown, f"{where} names {sorted(unknown)}, which nothing exports"


def _promtool() -> str:
    import shutil

    path = shutil.which("promtool")
    if path is None:
        pytest.skip(
            "promtool not installed (Debian package prometheus; scripts/setup.sh installs it as root)"
        )
    return path


def test_rules_config_and_dashboard_queries_pass_promtool(tmp_path):
    import subprocess

    import yaml

    promtool = _promtool()
    for args in (["check", "rules", str(ALERTS)], ["check", "config", str(ALERTS.parent / "prometheus.yml")]):
        done = subprocess.run([promtool, *args], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr
    # promtool parses PromQL only in rule files: each panel query becomes a recording rule there.
    panels = [
        {"record": f"shopreel:panel_{index}", "expr": expr}
        for index, expr in enumerate(
            expr for where, expr in _monitoring_queries().items() if where.startswith("panel")
        )
    ]
    rules = tmp_path / "panels.yml"
    rules.write_text(yaml.safe_dump({"groups": [{"name": "panels", "rules": panels}]}))
    done = subprocess.run(
        [promtool, "check", "rules", str(rules)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0 and f"{len(panels)} rules found" in done.stdout, done.stdout + done.stderr


# --- recording rules -----------------------------------------------------------------------------


def test_stage_metrics_tags_the_deployment_skips_zero_increments_and_tracks_gauges(recorder):
    metrics = sm.stage_metrics("compositor")  # outside a replica: the default name
    assert metrics.enabled and metrics.tags == {"deployment": "compositor"}
    metrics.inc(sm.RENDER_RETRIES, 0)  # Ray refuses zero: nothing recorded
    metrics.inc(sm.RENDER_RETRIES, 2)
    metrics.add(sm.VIDEOS_IN_FLIGHT, 1)
    metrics.add(sm.VIDEOS_IN_FLIGHT, 1)
    metrics.add(sm.VIDEOS_IN_FLIGHT, -1)
    metrics.observe(sm.COMPOSE_SECONDS, 0.5)
    assert recorder.values(sm.RENDER_RETRIES) == [2.0]
    assert recorder.values(sm.VIDEOS_IN_FLIGHT) == [1.0, 2.0, 1.0]
    assert metrics.level(sm.VIDEOS_IN_FLIGHT) == 1.0
    metrics.refresh()  # what the background thread does: the current level again
    assert recorder.values(sm.VIDEOS_IN_FLIGHT)[-1] == 1.0
    assert {tags["deployment"] for _, _, tags in recorder.records} == {"compositor"}
    with pytest.raises(TypeError, match="is a gauge, not a counter"):
        metrics.inc(sm.VIDEOS_IN_FLIGHT)
    with pytest.raises(TypeError, match="is a counter, not a gauge"):
        metrics.set(sm.RENDER_RETRIES, 1)


def test_outside_ray_recording_does_nothing(monkeypatch):
    import ray

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    metrics = sm.stage_metrics("renderer")
    assert not metrics.enabled
    metrics.inc(sm.CHUNKS_DECODED)
    metrics.add(sm.CAUSAL_CACHES, 1)
    assert metrics.level(sm.CAUSAL_CACHES) == 1.0


def test_a_failing_ray_metric_never_fails_the_caller(monkeypatch, caplog):
    recorder = sm.RayRecorder()

    def broken(series: sm.Series) -> Any:
        raise RuntimeError("no metrics agent")

    monkeypatch.setattr(recorder, "_metric", broken)
    recorder.record(sm.CHUNKS_DECODED, 1.0, {"deployment": "renderer"})
    recorder.record(sm.CHUNKS_DECODED, 1.0, {"deployment": "renderer"})
    assert [r.message for r in caplog.records].count(
        "recording shopreel_renderer_chunks_decoded failed; not reported again"
    ) == 1


def test_a_joined_cluster_takes_no_metrics_export_port():
    from shopreel.serve.config import ServeConfig
    from shopreel.serve.runner import start

    with pytest.raises(ValueError, match="embedded cluster only"):
        start(ServeConfig(), address="auto", metrics_export_port=8080)  # refused before Ray is touched


def test_labelled_series_take_exactly_their_labels_and_keep_a_level_per_value(recorder):
    metrics = sm.stage_metrics("ingress")
    metrics.inc(sm.INGRESS_REFUSED, reason="queue_full")
    metrics.add(sm.INGRESS_IN_FLIGHT, 1, kind="stream")
    metrics.add(sm.INGRESS_IN_FLIGHT, 1, kind="job")
    metrics.add(sm.INGRESS_IN_FLIGHT, -1, kind="stream")
    assert (
        metrics.level(sm.INGRESS_IN_FLIGHT, kind="job"),
        metrics.level(sm.INGRESS_IN_FLIGHT, kind="stream"),
    ) == (
        1.0,
        0.0,
    )
    assert [tags for name, _, tags in recorder.records if name == sm.INGRESS_REFUSED.name] == [
        {"deployment": "ingress", "reason": "queue_full"}
    ]
    with pytest.raises(TypeError, match="takes labels"):
        metrics.inc(sm.INGRESS_REFUSED)  # a labelled series needs its label
    with pytest.raises(TypeError, match="takes labels"):
        metrics.inc(sm.SHOTS_DENOISED, kind="job")  # and an unlabelled one takes none


def test_the_ingress_records_each_event_in_its_registry_and_cluster_wide(recorder):
    from shopreel.serve.metrics import ServingMetrics

    metrics = ServingMetrics()
    metrics.refused("overloaded")
    metrics.production_started("stream")
    metrics.observe_video({"understand_s": 0.1, "total_s": 2.0, "first_fragment_s": 0.5}, frames=17)
    metrics.production_ended("stream", "completed")
    metrics.production_started("job")
    metrics.production_ended("job", "failed", error_code="internal_error")
    text = metrics.render().decode()
    assert 'shopreel_errors_total{type="overloaded"} 1.0' in text
    assert 'shopreel_errors_total{type="internal_error"} 1.0' in text
    assert 'shopreel_videos_total{outcome="completed"} 1.0' in text
    assert "shopreel_frames_rendered_total 17.0" in text
    assert recorder.values(sm.INGRESS_FRAMES) == [17.0]
    assert recorder.values(sm.INGRESS_VIDEO_SECONDS) == [0.1, 2.0]
    outcomes = [tags["outcome"] for name, _, tags in recorder.records if name == sm.INGRESS_VIDEOS.name]
    assert outcomes == ["completed", "failed"]
    assert metrics.cluster.level(sm.INGRESS_IN_FLIGHT, kind="stream") == 0.0


# --- what the stage classes record (in-process stages, fake handles) ------------------------------


def test_stages_record_work_retries_and_rebuilds(recorder):
    """One video through lost replicas: the counts match what the compositor's timings report."""
    from test_recovery import STORYBOARD, FakeGenerator, FakeRenderer, _config, _produce

    from shopreel.serve.deployments import GeneratorDeployment

    generator = FakeGenerator(GeneratorDeployment.func_or_class(_config()), [3, None])
    renderer = FakeRenderer(_config(), {(1, 1), (2, 0)})  # each loss: a fresh replica without caches
    produced = _produce(generator, renderer)

    assert produced.timings.render_retries == 2 and produced.timings.generate_restarts == 1
    assert recorder.values(sm.RENDER_RETRIES, "compositor") == [2.0]
    assert recorder.values(sm.GENERATOR_RESTARTS, "compositor") == [1.0]
    assert recorder.values(sm.VIDEOS_IN_FLIGHT, "compositor") == [0.0, 1.0, 0.0]
    assert len(recorder.values(sm.FIRST_FRAGMENT_SECONDS)) == 1
    assert recorder.values(sm.COMPOSE_SECONDS) == [produced.compose.encode_s]
    # Every chunk decoded and delivered once (3 shots x 2 chunks); shot 1's lost chunk 1 went to a
    # replica without the shot's cache, which rebuilt it from the resent latents. Shots overlap, so a
    # loss during shot 1 may also have taken shot 2's cache (one fake replica serves both): one rebuild
    # is counted for each call that arrived with a shot's history and was answered.
    assert recorder.values(sm.CHUNKS_DECODED, "renderer") == [1.0] * 6
    assert len(recorder.values(sm.DECODE_SECONDS, "renderer")) == 6
    rebuilt = [call for call in renderer.calls if call[2] is not None and call[3] == "FrameChunk"]
    assert (1, 1) in [call[:2] for call in rebuilt]
    assert recorder.values(sm.HISTORY_REBUILDS, "renderer") == [1.0] * len(rebuilt)
    assert recorder.values(sm.CAUSAL_CACHES, "renderer")[-1] == 0.0  # the last chunk freed its cache
    # The resumed stream denoised shot 1 again: 3 shots + 1 (the generator may run ahead of a dying
    # stream, hence at least).
    shots = recorder.values(sm.SHOTS_DENOISED, "generator")
    assert len(shots) >= len(STORYBOARD.shots) + 1
    assert len(recorder.values(sm.DENOISE_SECONDS, "generator")) == len(shots)
    assert recorder.values(sm.GENERATE_ACTIVE, "generator")[0] == 0.0
    assert recorder.values(sm.GENERATE_ACTIVE, "generator")[-1] == 0.0


def test_renderer_counts_a_rebuild_but_not_a_refused_chunk(recorder):
    from test_recovery import _config

    from shopreel.pipelines.types import LatentChunk
    from shopreel.serve.deployments import RendererDeployment
    from shopreel.serve.stage_clients import NeedHistory

    replica = RendererDeployment.func_or_class(_config())  # tiny VAE, torch backend, no warm-up
    z_dim = replica.renderer.backend.vae.config.z_dim
    latents = np.random.default_rng(0).standard_normal((1, z_dim, 4, 8, 8)).astype(np.float32)
    second = LatentChunk("r", 0, 1, 2, 4, latents[:, :, 2:], is_last=True, is_last_shot=True)

    async def scenario() -> tuple[Any, Any]:
        return await replica.render(second), await replica.render(second, latents[:, :, :2])

    refused, rebuilt = asyncio.run(scenario())
    assert isinstance(refused, NeedHistory) and not isinstance(rebuilt, NeedHistory)
    assert recorder.values(sm.HISTORY_REBUILDS) == [1.0]
    assert recorder.values(sm.CHUNKS_DECODED) == [1.0]  # the delivered chunk, not the history pass


# --- integration: the embedded server scraped like Prometheus -------------------------------------


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))  # all bound at once: distinct ports
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _samples(text: str) -> dict[tuple[str, str], float]:
    """Sample name and deployment -> value summed over replicas (what `sum by (deployment)` gives)."""
    from prometheus_client.parser import text_string_to_metric_families

    totals: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("ray_shopreel_") and "le" not in sample.labels:
                key = (sample.name, sample.labels.get("deployment", ""))
                totals[key] = totals.get(key, 0.0) + sample.value
    return totals


BRIEF = {
    "title": "Thermo Mug",
    "category": "drinkware",
    "selling_points": ["Keeps coffee hot for 6 hours"],
    "duration_s": 2,
    "size": "64x64",
    "fps": 8,
}

# Series that one finished video must have moved (count > 0), and gauges that must merely exist.
MOVED = {
    ("ray_shopreel_generator_denoise_seconds_count", "generator"),
    ("ray_shopreel_generator_shots_denoised_total", "generator"),
    ("ray_shopreel_renderer_decode_seconds_count", "renderer"),
    ("ray_shopreel_renderer_chunks_decoded_total", "renderer"),
    ("ray_shopreel_compositor_time_to_first_fragment_seconds_count", "compositor"),
    ("ray_shopreel_compositor_compose_seconds_count", "compositor"),
    ("ray_shopreel_ingress_videos_total", "ingress"),
    ("ray_shopreel_ingress_video_seconds_count", "ingress"),
    ("ray_shopreel_ingress_time_to_first_fragment_seconds_count", "ingress"),
    ("ray_shopreel_ingress_frames_total", "ingress"),
}
PRESENT = {
    ("ray_shopreel_generator_active_calls", "generator"),
    ("ray_shopreel_renderer_causal_caches", "renderer"),
    ("ray_shopreel_compositor_videos_in_flight", "compositor"),
    ("ray_shopreel_jobs_queued", "ingress"),
    ("ray_shopreel_jobs_in_progress", "ingress"),
    ("ray_shopreel_streams_admitted", "ingress"),
    ("ray_shopreel_ingress_in_flight", "ingress"),
}


@pytest.mark.serve
@pytest.mark.slow
def test_every_stage_replica_exports_through_rays_metrics_port(tmp_path):
    import httpx

    from shopreel.serve.runner import load_config, start

    config = load_config(
        None,
        **{
            "jobs.data_dir": str(tmp_path / "serve-data"),
            "jobs.concurrency": 1,
            "pipeline.generate.num_inference_steps": 2,
            # Autoscaled (never past 1 here), so the controller exports the policy's series too.
            "generator.autoscaling": {"min_replicas": 1, "max_replicas": 2, "upscale_delay_s": 600},
        },
    )
    port, metrics_port = _free_ports(2)
    running = start(config, port=port, metrics_export_port=metrics_port, ready_timeout_s=300)
    try:
        with httpx.Client(base_url=running.url, timeout=300) as http:
            with http.stream("POST", "/v1/product-videos", json={"brief": BRIEF, "stream": True}) as response:
                body = response.read()
                assert response.status_code == 200, body[:500]
                assert response.headers["content-type"] == "video/mp4"
                video_id = response.headers["x-shopreel-video-id"]
            assert http.get(f"/v1/videos/{video_id}").json()["status"] == "completed"
            # The ingress's own registry is unchanged and still answers on the Serve port.
            assert "shopreel_frames_rendered_total" in http.get("/metrics").text

            # Ray's agent refreshes what it serves every few seconds.
            samples: dict[tuple[str, str], float] = {}
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
                samples = _samples(text)
                scraped = set(re.findall(r"^([a-z_:][a-z0-9_:]*)[{ ]", text, flags=re.MULTILINE))
                monitored = set().union(*map(_metric_names, _monitoring_queries().values())) - EVENT_ONLY
                ready = all(samples.get(key, 0) > 0 for key in MOVED) and samples.keys() >= PRESENT
                if ready and monitored <= scraped:
                    break
                time.sleep(2)
        missing = sorted(key for key in MOVED if samples.get(key, 0) <= 0)
        assert not missing, f"not exported (or zero): {missing}"
        assert samples.keys() >= PRESENT, sorted(PRESENT - samples.keys())
        # What the alert rules and the dashboard query is in a live scrape (event-only counters aside).
        assert monitored <= scraped, sorted(monitored - scraped)
        # Exactly one video went through the compositor (warm-up bypasses it); each shot once.
        assert samples[("ray_shopreel_compositor_compose_seconds_count", "compositor")] == 1
        shots = samples[("ray_shopreel_generator_shots_denoised_total", "generator")]
        assert samples[("ray_shopreel_generator_denoise_seconds_count", "generator")] == shots
        assert samples[("ray_shopreel_renderer_chunks_decoded_total", "renderer")] >= shots
    finally:
        running.stop()


def test_the_generator_counts_shot_cache_hits_and_misses(recorder):
    """Two requests for the same shots: the first misses and denoises, the second hits in memory."""
    import asyncio

    from storyboards import make_storyboard
    from test_recovery import _config

    from shopreel.pipelines.config import GenerateConfig, ModelConfig, PipelineConfig, ShotCacheConfig
    from shopreel.serve.deployments import GeneratorDeployment

    pipeline = PipelineConfig(
        model=ModelConfig(preset="tiny", device="cpu"),
        generate=GenerateConfig(shot_cache=ShotCacheConfig(enabled=True)),
    )
    replica = GeneratorDeployment.func_or_class(_config().model_copy(update={"pipeline": pipeline}))
    storyboard = make_storyboard(shot_frames=(9, 9))

    async def one_request(request_id: str) -> None:
        async for _ in replica.generate(storyboard, request_id, 2):
            pass

    asyncio.run(one_request("a"))
    asyncio.run(one_request("b"))
    assert sum(recorder.values(sm.SHOT_CACHE_MISSES, "generator")) == 2
    assert sum(recorder.values(sm.SHOT_CACHE_HITS, "generator")) == 2  # tier memory
    assert sum(recorder.values(sm.SHOTS_DENOISED, "generator")) == 2  # only the first request's
    assert recorder.values(sm.SHOT_CACHE_BYTES, "generator")[-2] > 0  # memory tier held them
