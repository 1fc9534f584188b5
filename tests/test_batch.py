"""Catalog pre-generation (`shopreel batch`): videos per product, failures with reasons, resume.

The Ray Data run happens in a subprocess (the `shopreel batch` command, killed with SIGKILL and run
again); the cluster run uses an embedded Ray Serve app that is shut down (with its Ray) at the end.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from media import probe
from net import free_port
from typer.testing import CliRunner

from shopreel.cli import app
from shopreel.pipelines.catalog import CatalogError, ProductOverrides, scan_catalog
from shopreel.pipelines.config import GenerateConfig, PipelineConfig, RenderConfig
from shopreel.pipelines.pipeline import ProductVideoPipeline
from shopreel.pipelines.types import ProductBrief
from shopreel.serve.batch import BatchConfig, run_batch

runner = CliRunner()
FAST = ProductOverrides(size="64x64", fps=8, duration_s=2)


def _product(index: int) -> dict:
    return {
        "title": f"Trail bottle {index}",
        "category": "water bottle",
        "selling_points": ["Keeps drinks cold 24 h", "Leak-proof lid"],
        "price": "129.00",
        "seed": index,
    }


def _write_catalog(path: Path, lines: list) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def _manifest(out: Path) -> list[dict]:
    records = []
    for line in (out / "manifest.jsonl").read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):  # a line cut short by the kill
            records.append(json.loads(line))
    return records


def _catalog_with_one_invalid(tmp_path: Path) -> Path:
    return _write_catalog(
        tmp_path / "catalog.jsonl",
        [
            {"id": "bottle-a", "brief": _product(1)},
            {**_product(2), "sku": "bottle-b"},  # a plain brief line with a sku
            {"brief": _product(3), "campaign": {"name": "11.11"}},  # no id: a hash of the line
            {"id": "broken", "brief": {"title": "", "price": -1}},
        ],
    )


def test_catalog_ids_forms_and_duplicates(tmp_path):
    catalog = _write_catalog(
        tmp_path / "c.jsonl",
        [
            {"id": "a-1", "brief": _product(1)},
            {**_product(2), "sku": 42},
            _product(3),
            "",
            "{not json",
            {"id": "no/slash", "brief": _product(4)},
        ],
    )
    entries = list(scan_catalog(catalog))
    assert [e.id for e in entries[:2]] == ["a-1", "42"]
    assert entries[2].id.startswith("p-") and entries[2].error is None
    assert entries[2].id == next(iter(scan_catalog(_write_catalog(tmp_path / "d.jsonl", [_product(3)])))).id
    assert "not valid JSON" in entries[3].error and entries[3].line_no == 5
    assert "not usable as a file name" in entries[4].error
    duplicate = _write_catalog(tmp_path / "dup.jsonl", [{"id": "x", "brief": _product(1)}] * 2)
    with pytest.raises(CatalogError, match="line 2 has the same id 'x' as line 1"):
        list(scan_catalog(duplicate))


def test_batch_makes_videos_records_failures_and_skips_finished_products(tmp_path, tiny_model):
    catalog, out = _catalog_with_one_invalid(tmp_path), tmp_path / "out"
    # The torch renderer: no ONNX export (auto's first run for a size) in the fast suite.
    stages = PipelineConfig(
        generate=GenerateConfig(num_inference_steps=2), render=RenderConfig(backend="torch")
    )
    pipeline = ProductVideoPipeline(stages, model=tiny_model)
    config = BatchConfig(engine="local", overrides=FAST, audio="none")
    seen: list[dict] = []

    summary = run_batch(catalog, out, config, pipeline=pipeline, on_record=seen.append)

    assert (summary.total, summary.done, summary.skipped_done) == (4, 3, 0)
    assert [f["id"] for f in summary.failures] == ["broken"]
    reason = summary.failures[0]["error"]
    assert "brief.title: String should have at least 1 character" in reason and "brief.price" in reason
    done = {r["id"]: r for r in _manifest(out) if r["status"] == "done"}
    assert len(done) == 3 and {"bottle-a", "bottle-b"} <= set(done)
    for product_id, record in done.items():
        brief = ProductBrief.model_validate(FAST.apply(_product(1)))
        expected_frames = pipeline.plan(brief).total_frames  # same duration/fps/planner for every product
        video = probe(out / f"{product_id}.mp4")
        assert video.frames == record["frames"] == expected_frames
        assert (video.width, video.height) == (64, 64)
        assert (out / f"{product_id}.jpg").read_bytes()[:3] == b"\xff\xd8\xff"
    assert len(seen) == 4
    assert not list(out.glob(".*.tmp*"))
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("*.mp4")}

    # Run again: nothing is made again, the failure is still reported (and not retried).
    again = run_batch(catalog, out, config, pipeline=pipeline)
    assert (again.done, again.skipped_done, [f["id"] for f in again.failures]) == (0, 3, ["broken"])
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.mp4")} == stamps
    assert len(_manifest(out)) == 4

    # --retry-failed tries the failed product again (still invalid), and only that one.
    retried = run_batch(catalog, out, config.model_copy(update={"retry_failed": True}), pipeline=pipeline)
    assert (retried.done, retried.skipped_done, len(retried.failures)) == (0, 3, 1)
    assert [r["id"] for r in _manifest(out)][4:] == ["broken"]


def test_batch_command_usage_errors_exit_2(tmp_path):
    catalog = _write_catalog(tmp_path / "c.jsonl", [_product(1)])
    cases = [
        (["batch", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "o")], "does not exist"),
        (["batch", str(catalog), "--out", str(tmp_path / "o"), "--engine", "spark"], "--engine spark"),
        (["batch", str(catalog), "--out", str(tmp_path / "o"), "--concurrency", "0"], "concurrency"),
        (
            ["batch", str(catalog), "--out", str(tmp_path / "o"), "--url", "http://x", "--engine", "ray"],
            "--url",
        ),
    ]
    for args, message in cases:
        result = runner.invoke(app, args)
        assert result.exit_code == 2, result.output
        # The console wraps long paths: compare with the line breaks taken out.
        output = " ".join(result.output.split())
        assert "error:" in output and message in output
    duplicate = _write_catalog(tmp_path / "dup.jsonl", [{"id": "x", "brief": _product(1)}] * 2)
    result = runner.invoke(app, ["batch", str(duplicate), "--out", str(tmp_path / "o"), "--engine", "local"])
    assert result.exit_code == 2 and "same id 'x'" in " ".join(result.output.split())


@pytest.mark.slow
def test_batch_command_summary_and_exit_status(tmp_path):
    catalog, out = _catalog_with_one_invalid(tmp_path), tmp_path / "out"
    args = ["batch", str(catalog), "--out", str(out), "--engine", "local", "--size", "64x64", "--steps", "2"]
    args += ["--duration", "2", "--fps", "8", "--audio", "none", "--quiet"]
    result = runner.invoke(app, args)
    assert result.exit_code == 1, result.output  # one product failed
    assert "made now" in result.output and "broken" in result.output
    assert "brief.title" in result.output
    ok = _write_catalog(tmp_path / "ok.jsonl", [{"id": "bottle-a", "brief": _product(1)}])
    assert runner.invoke(app, [*args[:1], str(ok), *args[2:]]).exit_code == 0  # finished: skipped, exit 0


# --- Ray Data, killed and resumed ------------------------------------------------------------------


def _session_members(session_id: int) -> list[int]:
    """Live processes of a session (Ray's workers leave the process group, not the session)."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        state, _ppid, _pgrp, session = stat[stat.rindex(")") + 2 :].split()[:4]
        if int(session) == session_id and state not in ("Z", "X"):
            members.append(int(entry))
    return members


def _kill_session(session_id: int) -> list[int]:
    """SIGKILL the whole session; returns what was still alive 15 s after the process group died."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(session_id, signal.SIGKILL)
    deadline = time.monotonic() + 15
    while _session_members(session_id) and time.monotonic() < deadline:
        time.sleep(0.2)
    stragglers = _session_members(session_id)
    for pid in stragglers:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return stragglers


def _batch_command(catalog: Path, out: Path) -> list[str]:
    return [
        sys.executable, "-m", "shopreel.cli", "batch", str(catalog), "--out", str(out),
        "--concurrency", "1", "--size", "128x128", "--steps", "6", "--duration", "4", "--fps", "8",
        "--audio", "none", "--quiet",
    ]  # fmt: skip


@pytest.mark.slow
def test_ray_data_batch_resumes_after_kill_without_redoing_products(tmp_path):
    ids = [f"prod-{index}" for index in range(6)]
    catalog = _write_catalog(
        tmp_path / "six.jsonl", [{"id": i, "brief": _product(n)} for n, i in enumerate(ids)]
    )
    out = tmp_path / "out"
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    with (tmp_path / "first.log").open("w") as log:
        proc = subprocess.Popen(
            _batch_command(catalog, out),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=env,
        )
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if (out / "manifest.jsonl").exists() and any(r["status"] == "done" for r in _manifest(out)):
                break
            assert proc.poll() is None, (tmp_path / "first.log").read_text()
            time.sleep(0.05)
        else:
            pytest.fail("no product finished in 300 s:\n" + (tmp_path / "first.log").read_text())
    finally:
        stragglers = _kill_session(proc.pid)
        proc.wait(timeout=30)
    assert _session_members(proc.pid) == [], "Ray processes of the killed run are still alive"
    finished_before = {r["id"] for r in _manifest(out) if r["status"] == "done"}
    assert 1 <= len(finished_before) < len(ids), "the kill came too late to interrupt the run"
    before = {i: (out / f"{i}.mp4").stat() for i in finished_before}

    done = subprocess.run(_batch_command(catalog, out), capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr

    records = _manifest(out)
    finished = [r["id"] for r in records if r["status"] == "done"]
    assert sorted(finished) == sorted(ids), records  # every product exactly once
    assert not [r for r in records if r["status"] == "failed"]
    for product_id in finished_before:  # not made again: same file, untouched
        now = (out / f"{product_id}.mp4").stat()
        assert (now.st_ino, now.st_mtime_ns) == (before[product_id].st_ino, before[product_id].st_mtime_ns)
    for record in records:
        assert probe(out / f"{record['id']}.mp4").frames == record["frames"] > 0
    assert not list(out.glob(".*.tmp*")), "tmp files of the killed run are left"
    print(f"killed after {len(finished_before)} of {len(ids)} products; Ray processes left 15 s after the "
          f"kill of the process group: {len(stragglers)}; second run:\n{done.stderr[-1200:]}")  # fmt: skip


# --- through a running cluster, as bulk jobs -------------------------------------------------------


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    from shopreel.serve.auth import new_key
    from shopreel.serve.runner import load_config, start
    from shopreel.serve.store_url import open_job_store

    data_dir = tmp_path_factory.mktemp("batch-serve-data")
    config = load_config(
        None,
        **{
            "jobs.data_dir": str(data_dir),
            "auth.enabled": True,
            "jobs.concurrency": 1,
            "pipeline.generate.num_inference_steps": 2,
        },
    )
    created = new_key("merchant", "user")
    with open_job_store(config.jobs.store_url()) as jobs:
        jobs.create_key(created.record, created.secret_sha256)
    running = start(config, port=free_port(), ready_timeout_s=300)
    try:
        yield running, created.secret
    finally:
        running.stop()  # serve.shutdown() and ray.shutdown(): later modules start their own Ray


@pytest.mark.slow
@pytest.mark.serve
def test_cluster_batch_submits_bulk_jobs_downloads_and_resumes_by_job_id(cluster, tmp_path):
    from shopreel.serve.store_url import open_job_store

    server, key = cluster
    catalog = _write_catalog(
        tmp_path / "c.jsonl",
        [
            {"id": "a", "brief": _product(1)},
            {"id": "b", "brief": _product(2)},
            {"id": "bad", "brief": {"title": ""}},
        ],
    )
    out = tmp_path / "out"
    config = BatchConfig(
        engine="cluster", url=server.url, api_key=key, concurrency=2, poll_s=0.2, overrides=FAST, audio="none"
    )
    summary = run_batch(catalog, out, config)
    assert (summary.done, [f["id"] for f in summary.failures]) == (2, ["bad"])
    assert "brief.title" in summary.failures[0]["error"]
    records = {r["id"]: r for r in _manifest(out)}
    submitted = [r for r in _manifest(out) if r["status"] == "submitted"]
    assert sorted(r["id"] for r in submitted) == ["a", "b"]  # the job id is kept before polling
    with open_job_store(server.config.jobs.store_url()) as jobs:
        for product_id in ("a", "b"):
            job = jobs.get(records[product_id]["job_id"])
            assert job is not None and job.priority == "bulk" and job.status == "completed"
            video = probe(out / f"{product_id}.mp4")
            assert video.frames == records[product_id]["frames"] > 0 and (video.width, video.height) == (
                64,
                64,
            )
            assert (out / f"{product_id}.jpg").read_bytes()[:3] == b"\xff\xd8\xff"

        # A run killed after submitting "a" (manifest: submitted, job id) polls that job on resume.
        resumed_out = tmp_path / "resumed"
        resumed_out.mkdir()
        line = {"id": "a", "status": "submitted", "job_id": records["a"]["job_id"], "line": 1}
        (resumed_out / "manifest.jsonl").write_text(json.dumps(line) + "\n")
        jobs_before = len(jobs.list(limit=100, tenant="merchant")[0])
        only_a = _write_catalog(tmp_path / "a.jsonl", [{"id": "a", "brief": _product(1)}])
        resumed = run_batch(only_a, resumed_out, config)
        assert (resumed.done, resumed.failures) == (1, [])
        assert len(jobs.list(limit=100, tenant="merchant")[0]) == jobs_before  # nothing submitted again
        assert _manifest(resumed_out)[-1]["job_id"] == records["a"]["job_id"]
        assert (resumed_out / "a.mp4").read_bytes() == (out / "a.mp4").read_bytes()

    again = run_batch(catalog, out, config)  # finished products are skipped
    assert (again.done, again.skipped_done) == (0, 2)


def test_cluster_client_honours_retry_after_and_records_job_failures(tmp_path):
    """Against a stub server: a 429 is retried after its Retry-After; a failed job is a failure."""
    import httpx

    calls: list[tuple[str, str]] = []
    polls: dict[str, int] = {}
    refusals = iter([True])  # the first submission is refused: busy

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append((request.method, request.url.path))
        if request.method == "POST":
            body = json.loads(request.content)
            assert body["priority"] == "bulk" and body["stream"] is False
            assert request.headers["authorization"] == "Bearer sk-test"
            if next(refusals, False):
                return httpx.Response(
                    429, headers={"Retry-After": "0.2"}, json={"error": {"message": "busy"}}
                )
            return httpx.Response(200, json={"id": f"video_{body['brief']['seed']}", "status": "queued"})
        video_id = request.url.path.split("/")[3]
        if request.url.path.endswith("/content"):
            return httpx.Response(200, content=b"MP4" if request.url.params["variant"] == "video" else b"JPG")
        polls[video_id] = polls.get(video_id, 0) + 1
        if polls[video_id] < 2:
            return httpx.Response(200, json={"id": video_id, "status": "in_progress"})
        if video_id == "video_2":
            error = {"code": "internal_error", "message": "renderer lost"}
            return httpx.Response(200, json={"id": video_id, "status": "failed", "error": error})
        return httpx.Response(
            200, json={"id": video_id, "status": "completed", "seconds": 2, "size": "64x64"}
        )

    catalog = _write_catalog(
        tmp_path / "c.jsonl", [{"id": "ok", "brief": _product(1)}, {"id": "no", "brief": _product(2)}]
    )
    config = BatchConfig(engine="cluster", url="http://stub", api_key="sk-test", poll_s=0.05, overrides=FAST)
    started = time.monotonic()
    summary = run_batch(catalog, tmp_path / "out", config, http_transport=httpx.MockTransport(handler))
    assert time.monotonic() - started >= 0.2  # waited as told
    assert calls.count(("POST", "/v1/product-videos")) == 3  # 1 refused + 2 accepted
    assert summary.done == 1 and (tmp_path / "out" / "ok.mp4").read_bytes() == b"MP4"
    assert [f["id"] for f in summary.failures] == ["no"]
    assert "renderer lost" in summary.failures[0]["error"] and summary.failures[0]["job_id"] == "video_2"
