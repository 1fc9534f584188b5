"""Shared fixtures: the tiny preset is built once per test session (about a second on CPU)."""

from __future__ import annotations

import os

import pytest

# Tests never reach a model hub: everything is built from configs or saved to tmp dirs.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Exported ONNX graphs go to a per-run folder, never to the user's ~/.cache (also for Ray replicas,
# which inherit the environment).
if "SHOPREEL_CACHE_DIR" not in os.environ:
    import tempfile

    os.environ["SHOPREEL_CACHE_DIR"] = tempfile.mkdtemp(prefix="shopreel-test-cache-")


@pytest.fixture(scope="session")
def tiny_model():
    from shopreel.pipelines.config import ModelConfig
    from shopreel.pipelines.presets import load_model

    return load_model(ModelConfig(preset="tiny", device="cpu"))


@pytest.fixture(scope="session")
def postgres():
    """A real PostgreSQL server for the whole test session (tests/postgres.py); skips where none can run."""
    from postgres import postgres_server, unavailable_reason

    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    with postgres_server() as server:
        yield server


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request, tmp_path):
    """Each job-store test runs on both backends: a SQLite file, and a fresh database on a real server."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'jobs.sqlite3'}"
    return request.getfixturevalue("postgres").new_database()


@pytest.fixture
def jobs(store_url):
    """A job store on each backend (``store_url``)."""
    from shopreel.serve.store_url import open_job_store

    with open_job_store(store_url) as store:
        yield store


@pytest.fixture
def http(server):
    """An HTTP client for the module's own ``server`` fixture (a running embedded cluster)."""
    import httpx

    with httpx.Client(base_url=server.url, timeout=300) as client:
        yield client
