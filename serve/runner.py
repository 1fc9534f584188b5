"""Start the serving cluster: embedded single-node Ray, or join an existing cluster by address."""

from __future__ import annotations

import json
import logging
import os
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import ServeConfig

logger = logging.getLogger("shopreel.serve")
APP_NAME = "shopreel"

# Ray Serve's low-overhead request path (the replica and router settings of Ray's own "throughput
# optimized" mode): replicas run user code and handle routers on their main event loop instead of
# hopping to extra threads, and replicas call each other over gRPC. A video crosses stage boundaries
# dozens of times (latent chunks, frames, fragments), so each hop's cost sits on the path to the first
# frame (benchmarks/serving.py measures both paths side by side). Ray's full switch also buffers and
# silences replica logs and serves HTTP from the ingress replicas directly; those stay at Serve's
# defaults here. Every Ray process must see these: they are set here before an embedded cluster
# starts, and in the KubeRay pods' environment (deploy/). Set any of them in the environment to
# override (e.g. RAY_SERVE_USE_GRPC_BY_DEFAULT=0 for Ray's actor calls between replicas).
SERVE_FAST_PATH_ENV = {
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
    "RAY_SERVE_USE_GRPC_BY_DEFAULT": "1",
}
# glibc gives each thread that allocates its own malloc arena, and a replica's threads (Ray's, the
# event loop's executors, torch's) leave each arena fragmented: resident memory crept up for minutes
# under a steady load (ingress +7.7 % in a 10-minute soak, benchmarks/soak.py) and stayed flat with two
# arenas (every replica < 1.2 %, same throughput and latency). Set like the fast path: here for an
# embedded cluster, in the pods' environment on KubeRay.
PROCESS_ENV = {"MALLOC_ARENA_MAX": "2"}
SERVE_DEFAULT_ENV = {  # Ray 2.60's own values, for comparison runs
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "1",
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "1",
    "RAY_SERVE_USE_GRPC_BY_DEFAULT": "0",
}


@dataclass(frozen=True)
class RunningServer:
    url: str
    embedded: bool  # we started Ray ourselves, so we stop it too
    config: ServeConfig

    def restart_app(self, ready_timeout_s: float = 600.0) -> None:
        """Tear the application down and deploy it again (Ray stays up): what a crash or upgrade does."""
        from ray import serve

        from .app import build_app

        serve.delete(APP_NAME)
        serve.run(build_app(self.config), name=APP_NAME, route_prefix="/", blocking=False)
        wait_ready(self.url, ready_timeout_s)

    def stop(self) -> None:
        import ray
        from ray import serve

        serve.shutdown()
        if self.embedded:
            ray.shutdown()


def load_config(path: Path | None, **overrides: Any) -> ServeConfig:
    """A ServeConfig from a YAML/JSON file (its top level, or its Serve ``applications[0].args``)."""
    data: dict[str, Any] = {}
    if path is not None:
        text = path.read_text()
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            data = json.loads(text)
        if "applications" in data:  # a Serve config file: take our app's args
            data = data["applications"][0].get("args") or {}
    for dotted, value in overrides.items():
        if value is None:
            continue
        target = data
        *parents, leaf = dotted.split(".")
        for key in parents:
            target = target.setdefault(key, {})
        target[leaf] = value
    return ServeConfig.model_validate(data)


def start(
    config: ServeConfig,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    address: str | None = None,
    ready_timeout_s: float = 600.0,
    proxy_location: str | None = None,
    metrics_export_port: int | None = None,
) -> RunningServer:
    """Deploy the app and wait until ``/readyz`` answers 200. ``address=None`` starts Ray here.

    ``proxy_location``: where Serve runs HTTP proxies (``EveryNode``, Ray's default, or ``HeadOnly``,
    e.g. for several simulated nodes that share one host's ports).
    ``metrics_export_port``: where the embedded node's metrics agent serves every replica's series to
    Prometheus (``None``: a port Ray picks). A joined cluster's nodes chose theirs at ``ray start``.
    """
    if metrics_export_port is not None and address is not None:
        raise ValueError(
            "metrics_export_port applies to the embedded cluster only; a joined cluster's nodes set "
            "theirs with `ray start --metrics-export-port`"
        )
    import ray
    from ray import serve

    from .app import build_app

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    embedded = address is None
    if embedded:
        for name, value in {**SERVE_FAST_PATH_ENV, **PROCESS_ENV}.items():  # every Ray process inherits
            os.environ.setdefault(name, value)
        # address="local": always a new cluster here, never one some other process left running.
        ray.init(
            address="local",
            include_dashboard=False,
            configure_logging=False,
            log_to_driver=False,
            _metrics_export_port=metrics_export_port,
        )
    else:
        ray.init(address=address)
    serve.start(proxy_location=proxy_location, http_options={"host": host, "port": port})
    serve.run(build_app(config), name=APP_NAME, route_prefix="/", blocking=False)
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
    wait_ready(url, ready_timeout_s)
    if not config.auth.enabled:
        from .auth import AUTH_OFF_WARNING

        logger.warning(AUTH_OFF_WARNING)
    return RunningServer(url=url, embedded=embedded, config=config)


def wait_ready(url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} was not ready after {timeout_s:.0f} s")
        time.sleep(0.5)
