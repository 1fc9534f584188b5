"""One cluster, several nodes: a real Ray cluster of simulated nodes, two ingress replicas, PostgreSQL.

``ray.cluster_utils.Cluster`` starts a head node and a worker node (separate raylets and worker
processes on this host). Generator and renderer replicas need the ``gpu_node`` resource that only the
worker node has, so every latent chunk crosses nodes through Ray's object store. Both ingress
replicas share one job queue and admission authority in a throwaway PostgreSQL server. Then the
worker node is removed mid-job (its processes die): a new one joins, and every accepted job still
completes, by lease retry.
"""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from net import free_port

pytestmark = [pytest.mark.serve, pytest.mark.slow]

BRIEF = {
    "title": "Insulated steel bottle",
    "category": "drinkware",
    "selling_points": ["Keeps drinks cold for 24 hours", "Leak-proof lid"],
    "price": 129,
    "duration_s": 2,
    "size": "64x64",
    "fps": 8,
}
MAX_STREAMS = 2
GPU_NODE = {"gpu_node": 1.0}



@pytest.fixture(scope="module")
def cluster(postgres):
    import ray
    from ray.cluster_utils import Cluster

    from shopreel.serve.runner import load_config, start

    nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    nodes.add_node(num_cpus=2, resources=GPU_NODE)
    nodes.wait_for_nodes()
    config = load_config(
        None,
        **{
            "jobs.store": postgres.new_database(),
            "jobs.max_streams": MAX_STREAMS,
            "jobs.max_pending": 8,
            "jobs.max_running": 2,
            "jobs.concurrency": 1,
            "jobs.lease_s": 3,
            "ingress.num_replicas": 2,
            "generator.resources": {"gpu_node": 0.1},
            "renderer.resources": {"gpu_node": 0.1},
            "pipeline.generate.num_inference_steps": 2,
        },
    )
    server = start(
        config, port=free_port(), address=nodes.address, ready_timeout_s=300, proxy_location="HeadOnly"
    )
    try:
        yield nodes, server
    finally:
        server.stop()
        ray.shutdown()
        nodes.shutdown()


def _replica_nodes(deployment: str) -> set[str]:
    from ray.util.state import list_actors

    actors = list_actors(filters=[("state", "=", "ALIVE")], limit=1000)
    return {a.node_id for a in actors if a.class_name.endswith(f":{deployment}")}


async def _stream_burst(url: str, count: int) -> list[dict]:
    async def one(client: httpx.AsyncClient, index: int) -> dict:
        started = time.perf_counter()
        body = {"brief": {**BRIEF, "seed": index}, "stream": True}
        async with client.stream("POST", "/v1/product-videos", json=body) as response:
            data = await response.aread()
            return {
                "status": response.status_code,
                "interval": (started, time.perf_counter()),
                "bytes": len(data),
                "retry_after": response.headers.get("retry-after"),
                "id": response.headers.get("x-shopreel-video-id"),
            }

    async with httpx.AsyncClient(base_url=url, timeout=300) as client:
        return await asyncio.gather(*(one(client, index) for index in range(count)))


def test_stages_are_placed_by_resources_and_chunks_cross_nodes(cluster):
    import ray

    nodes, server = cluster
    worker_node = {n["NodeID"] for n in ray.nodes() if n["Alive"] and "gpu_node" in n["Resources"]}
    assert _replica_nodes("generator") == _replica_nodes("renderer") == worker_node
    with httpx.Client(base_url=server.url, timeout=300) as client:
        response = client.post("/v1/product-videos", json={"brief": BRIEF, "stream": True})
        assert response.status_code == 200 and len(response.content) > 1000


def test_a_burst_on_two_ingress_replicas_never_exceeds_the_stream_slots(cluster):
    _, server = cluster
    results = asyncio.run(_stream_burst(server.url, 10))
    admitted = [r for r in results if r["status"] == 200]
    refused = [r for r in results if r["status"] != 200]
    assert admitted and refused
    assert {r["status"] for r in refused} == {503} and all(r["retry_after"] for r in refused)
    # Most streams in flight at once, by the client's clock (an upper bound on the server's).
    events = sorted(
        [(a, 1) for a, _ in (r["interval"] for r in admitted)]
        + [(b, -1) for _, b in (r["interval"] for r in admitted)]
    )
    peak = current = 0
    for _, step in events:
        current += step
        peak = max(peak, current)
    assert peak <= MAX_STREAMS
    with httpx.Client(base_url=server.url, timeout=60) as client:
        for r in admitted:
            assert client.get(f"/v1/videos/{r['id']}").json()["status"] == "completed"


def test_accepted_jobs_finish_after_the_worker_node_is_lost(cluster):
    nodes, server = cluster
    with httpx.Client(base_url=server.url, timeout=120) as client:
        body = {"prompt": "A linen shirt. Breathable weave.", "seconds": 4, "size": "64x64", "fps": 8}
        created = [client.post("/v1/videos", json=body) for _ in range(3)]
        assert all(response.status_code == 200 for response in created), [r.text for r in created]
        ids = [response.json()["id"] for response in created]
        deadline = time.monotonic() + 120
        while (first := client.get(f"/v1/videos/{ids[0]}")).json().get("status") == "queued":
            assert time.monotonic() < deadline, "the first job never started"
            time.sleep(0.05)
        assert first.status_code == 200, first.text
        (lost,) = list(nodes.worker_nodes)
        nodes.remove_node(lost, allow_graceful=False)  # generator and renderer replicas die with it
        nodes.add_node(num_cpus=2, resources=GPU_NODE)
        deadline = time.monotonic() + 240
        while True:
            records = [client.get(f"/v1/videos/{video_id}").json() for video_id in ids]
            statuses = [record["status"] for record in records]
            if all(status == "completed" for status in statuses):
                break
            assert "failed" not in statuses, records
            assert time.monotonic() < deadline, statuses
            time.sleep(0.5)
        for video_id in ids:
            assert client.get(f"/v1/videos/{video_id}/content").status_code == 200
        # The cluster serves new requests too.
        response = client.post("/v1/product-videos", json={"brief": BRIEF, "stream": True})
        assert response.status_code == 200
