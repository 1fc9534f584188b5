"""Catalog pre-generation: every product of a JSONL catalog -> ``DIR/<id>.mp4``, resumable.

Three engines run the same per-product work (``pipelines/catalog.py``) under the same manifest rules:

- ``ray``: Ray Data, streaming. The catalog is scanned once on the driver for ids and byte offsets
  (never the briefs themselves); products already finished are filtered out before the dataset is
  made; ``map_batches`` runs :class:`ProductWorker` actors (``concurrency`` of them, each holding one
  ``ProductVideoPipeline``), one product per block so results stream back as each video is done. The
  actors write the files into ``DIR`` (on a multi-node cluster ``DIR`` must be shared storage); the
  driver alone appends to the manifest.
- ``local``: the same work in this process, one product after another (no Ray).
- ``cluster``: each product is a job on a running cluster (``POST /v1/product-videos`` with
  ``"priority": "bulk"``, which the cluster produces after normal jobs and refuses first), honouring
  ``429``/``503`` ``Retry-After``; the job id is recorded (``submitted``) before polling, so a resumed run
  polls that job instead of submitting the product again.

Failed products are recorded with their reason and skipped by later runs unless ``retry_failed``.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..pipelines.catalog import (
    LOCK_NAME,
    CatalogEntry,
    CatalogError,
    Manifest,
    ProductOverrides,
    describe_exception,
    failure,
    load_product,
    produce_product,
    publish,
    remove_stale_temps,
    scan_catalog,
    temp_path,
    thumbnail_path,
    video_path,
)
from ..pipelines.config import PipelineConfig

Engine = Literal["ray", "local", "cluster"]
RecordCallback = Callable[[dict[str, Any]], None]


class BatchConfig(BaseModel):
    """How a catalog is run (``shopreel batch``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    engine: Engine = Field(
        default="ray",
        description="ray: Ray Data actors here; local: in this process; cluster: a server's jobs",
    )
    concurrency: int = Field(
        default=1, ge=1, le=1024, description="Ray Data actors (one pipeline each), or cluster jobs in flight"
    )
    num_cpus: float = Field(
        default=1.0, gt=0, le=256, description="CPUs each actor asks Ray for (torch uses that many threads)"
    )
    num_gpus: float = Field(default=0.0, ge=0, le=16, description="GPUs each actor asks Ray for")
    ray_address: str | None = Field(
        default=None, description="Ray cluster to join (e.g. auto); None: start a private one here"
    )
    pipeline: PipelineConfig = Field(default_factory=PipelineConfig, description="the stages (ray, local)")
    overrides: ProductOverrides = Field(default_factory=ProductOverrides, description="set on every brief")
    audio: Literal["bed", "none"] = Field(default="bed", description="generated music bed, or silence")
    thumbnails: bool = Field(default=True, description="also write DIR/<id>.jpg")
    retry_failed: bool = Field(default=False, description="make products an earlier run recorded as failed")
    url: str | None = Field(default=None, description="the cluster's base URL (engine cluster)")
    api_key: str | None = Field(
        default=None, repr=False, description="the cluster's API key, if it wants one"
    )
    poll_s: float = Field(default=1.0, gt=0, le=60, description="seconds between polls of a job's status")
    max_retry_after_s: float = Field(
        default=60.0, gt=0, le=3600, description="longest wait a 429/503 Retry-After is honoured with"
    )
    http_timeout_s: float = Field(default=60.0, gt=0, le=3600, description="timeout of one HTTP request")


@dataclass
class BatchPlan:
    """What a run will do, known before any product is made."""

    total: int = 0
    todo: list[CatalogEntry] = field(default_factory=list)
    skipped_done: int = 0
    skipped_failed: list[dict[str, Any]] = field(default_factory=list)  # earlier failures, not retried


@dataclass
class BatchSummary:
    out_dir: Path
    total: int
    skipped_done: int
    done: int = 0
    failures: list[dict[str, Any]] = field(default_factory=list)  # this run's and earlier ones not retried
    seconds: float = 0.0

    @property
    def seconds_per_video(self) -> float | None:
        return self.seconds / self.done if self.done else None


@contextmanager
def _exclusive(out_dir: Path) -> Iterator[None]:
    """One run per output directory at a time (released by the kernel if the process is killed)."""
    with (out_dir / LOCK_NAME).open("a") as lock:
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CatalogError(f"another batch run is writing to {out_dir}") from None
        yield


def plan_batch(catalog: Path, manifest: Manifest, out_dir: Path, retry_failed: bool) -> BatchPlan:
    plan = BatchPlan()
    for entry in scan_catalog(catalog):
        plan.total += 1
        if manifest.is_done(entry.id, out_dir):
            plan.skipped_done += 1
        elif manifest.state(entry.id) == "failed" and not retry_failed:
            plan.skipped_failed.append(manifest.records[entry.id])
        else:
            plan.todo.append(entry)
    return plan


def run_batch(
    catalog: Path,
    out_dir: Path,
    config: BatchConfig,
    *,
    on_plan: Callable[[BatchPlan], None] | None = None,
    on_record: RecordCallback | None = None,
    pipeline: Any = None,
    http_transport: Any = None,
) -> BatchSummary:
    """Make every unfinished product of ``catalog``; raises CatalogError before any work if it can't.

    ``pipeline``: a ``ProductVideoPipeline`` the local engine uses instead of building one;
    ``http_transport``: an ``httpx`` transport for the cluster engine (tests).
    """
    started = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    with _exclusive(out_dir), Manifest(out_dir) as manifest:
        remove_stale_temps(out_dir)
        plan = plan_batch(catalog, manifest, out_dir, config.retry_failed)
        if on_plan is not None:
            on_plan(plan)
        summary = BatchSummary(out_dir, plan.total, plan.skipped_done, failures=list(plan.skipped_failed))

        def record(result: dict[str, Any]) -> None:
            manifest.append(result)
            if result["status"] == "done":
                summary.done += 1
            elif result["status"] == "failed":
                summary.failures.append(manifest.records[result["id"]])
            if result["status"] != "submitted" and on_record is not None:
                on_record(result)

        # Lines that are not even a product (bad JSON, bad id) never reach an engine.
        todo = []
        for entry in plan.todo:
            if entry.error is not None:
                record(failure(entry.id, entry.error, line=entry.line_no))
            else:
                todo.append(entry)
        if todo:
            if config.engine == "local":
                _run_local(catalog, out_dir, todo, config, record, pipeline)
            elif config.engine == "ray":
                _run_ray(catalog, out_dir, todo, config, record)
            else:
                _run_cluster(catalog, out_dir, todo, config, manifest, record, http_transport)
    summary.seconds = time.perf_counter() - started
    return summary


# --- in process -------------------------------------------------------------------------------------


def _run_local(
    catalog: Path,
    out_dir: Path,
    todo: list[CatalogEntry],
    config: BatchConfig,
    record: RecordCallback,
    pipeline: Any = None,
) -> None:
    if pipeline is None:
        from ..pipelines.pipeline import ProductVideoPipeline

        pipeline = ProductVideoPipeline(config.pipeline)
    for entry in todo:
        record(
            produce_product(
                pipeline,
                catalog,
                entry,
                out_dir,
                overrides=config.overrides,
                audio=config.audio,
                thumbnails=config.thumbnails,
            )
        )


# --- Ray Data ---------------------------------------------------------------------------------------


class ProductWorker:
    """A Ray Data actor: one ``ProductVideoPipeline``, built once, makes one product per row."""

    def __init__(self, catalog: str, out_dir: str, config_json: str) -> None:
        from ..pipelines.pipeline import ProductVideoPipeline

        self.catalog, self.out_dir = Path(catalog), Path(out_dir)
        self.config = BatchConfig.model_validate_json(config_json)
        self.pipeline = ProductVideoPipeline(self.config.pipeline)

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[str]]:
        records = []
        for index in range(len(batch["id"])):
            entry = CatalogEntry(
                id=str(batch["id"][index]),
                line_no=int(batch["line_no"][index]),
                offset=int(batch["offset"][index]),
                length=int(batch["length"][index]),
            )
            result = produce_product(
                self.pipeline,
                self.catalog,
                entry,
                self.out_dir,
                overrides=self.config.overrides,
                audio=self.config.audio,
                thumbnails=self.config.thumbnails,
            )
            records.append(json.dumps(result, ensure_ascii=False))
        return {"record": records}


def _run_ray(
    catalog: Path, out_dir: Path, todo: list[CatalogEntry], config: BatchConfig, record: RecordCallback
) -> None:
    import ray

    started_here = not ray.is_initialized()
    if started_here:
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        if config.ray_address is None:
            # address="local": a private cluster for this run, stopped at its end.
            ray.init(address="local", include_dashboard=False, configure_logging=False, log_to_driver=False)
        else:
            ray.init(address=config.ray_address, log_to_driver=False)
    try:
        context = ray.data.DataContext.get_current()
        logging.getLogger("ray.data").setLevel(logging.WARNING)  # no per-dataset banners between our lines
        context.enable_progress_bars = False  # the CLI draws its own
        context.execution_options.preserve_order = False  # a record as soon as any video is done
        rows = [{"id": e.id, "line_no": e.line_no, "offset": e.offset, "length": e.length} for e in todo]
        # One product per block: each finished video streams back alone (not with its block's others).
        dataset = ray.data.from_items(rows, override_num_blocks=len(rows)).map_batches(
            ProductWorker,
            fn_constructor_kwargs={
                "catalog": str(catalog.resolve()),
                "out_dir": str(out_dir.resolve()),
                "config_json": config.model_dump_json(exclude={"api_key"}),
            },
            batch_size=1,
            batch_format="numpy",
            # One product queued per actor: an idle actor is never left waiting behind a busy one.
            compute=ray.data.ActorPoolStrategy(size=config.concurrency, max_tasks_in_flight_per_actor=1),
            num_cpus=config.num_cpus,
            num_gpus=config.num_gpus or None,
        )
        for row in dataset.iter_rows():
            record(json.loads(row["record"]))
    finally:
        if started_here:
            ray.shutdown()


# --- through a cluster ------------------------------------------------------------------------------


class _Refused(Exception):
    """The cluster answered a final error for this product (not a busy signal)."""


def _error_message(response: Any) -> str:
    try:
        return str(response.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return response.text[:500]


def _retry_after(response: Any, default_s: float, cap_s: float) -> float:
    try:
        return min(max(float(response.headers.get("retry-after", default_s)), 0.05), cap_s)
    except ValueError:
        return min(default_s, cap_s)


def _run_cluster(
    catalog: Path,
    out_dir: Path,
    todo: list[CatalogEntry],
    config: BatchConfig,
    manifest: Manifest,
    record: RecordCallback,
    transport: Any = None,
) -> None:
    import httpx

    if not config.url:
        raise CatalogError("engine 'cluster' needs the cluster's url")
    lock = threading.Lock()
    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
    steps = config.pipeline.generate.num_inference_steps

    def locked_record(result: dict[str, Any]) -> None:
        with lock:
            record(result)

    def submit(client: httpx.Client, entry: CatalogEntry) -> str:
        product = load_product(catalog, entry, config.overrides)  # ValueError: the product is invalid
        body = {**product.raw, "stream": False, "priority": "bulk", "audio": config.audio}
        if steps is not None:
            body["num_inference_steps"] = steps
        while True:
            response = client.post("/v1/product-videos", json=body)
            if response.status_code in (429, 503):  # busy (bulk is refused first): wait as told
                time.sleep(_retry_after(response, config.poll_s, config.max_retry_after_s))
                continue
            if response.status_code != 200:
                raise _Refused(f"HTTP {response.status_code}: {_error_message(response)}")
            job_id = str(response.json()["id"])
            locked_record({"id": entry.id, "status": "submitted", "job_id": job_id, "line": entry.line_no})
            return job_id

    def download(client: httpx.Client, job_id: str, variant: str, final: Path) -> None:
        temp = temp_path(final)
        with client.stream("GET", f"/v1/videos/{job_id}/content", params={"variant": variant}) as response:
            if response.status_code != 200:
                response.read()
                raise _Refused(f"{variant} download: HTTP {response.status_code}: {_error_message(response)}")
            with temp.open("wb") as file:
                for chunk in response.iter_bytes():
                    file.write(chunk)
        publish(temp, final)

    def one(client: httpx.Client, entry: CatalogEntry) -> None:
        previous = manifest.records.get(entry.id) or {}
        job_id = (
            previous.get("job_id")
            if previous.get("status") == "submitted" or previous.get("resume_job")
            else None
        )
        try:
            if job_id is None:
                job_id = submit(client, entry)
            while True:
                response = client.get(f"/v1/videos/{job_id}")
                if response.status_code == 404:  # the job expired or was deleted: make it anew
                    job_id = submit(client, entry)
                    continue
                if response.status_code in (429, 503):
                    time.sleep(_retry_after(response, config.poll_s, config.max_retry_after_s))
                    continue
                if response.status_code != 200:
                    raise _Refused(
                        f"status of job {job_id}: HTTP {response.status_code}: {_error_message(response)}"
                    )
                video = response.json()
                if video["status"] == "failed":
                    error = video.get("error") or {}
                    raise _Refused(f"job {job_id} failed: {error.get('code')}: {error.get('message')}")
                if video["status"] == "completed":
                    break
                time.sleep(config.poll_s)
            if config.thumbnails:
                download(client, job_id, "thumbnail", thumbnail_path(out_dir, entry.id))
            download(client, job_id, "video", video_path(out_dir, entry.id))
            extra = video.get("shopreel") or {}
            locked_record(
                {
                    "id": entry.id,
                    "status": "done",
                    "line": entry.line_no,
                    "job_id": job_id,
                    "video": video_path(out_dir, entry.id).name,
                    "thumbnail": thumbnail_path(out_dir, entry.id).name if config.thumbnails else None,
                    "frames": extra.get("num_frames"),
                    "duration_s": video.get("seconds"),
                    "size": video.get("size"),
                }
            )
        except ValueError as exc:  # the brief is invalid: the same message as in process
            locked_record(failure(entry.id, str(exc), line=entry.line_no))
        except _Refused as exc:
            locked_record(failure(entry.id, str(exc), line=entry.line_no, job_id=job_id))
        except httpx.HTTPError as exc:  # the cluster went away: --retry-failed polls this job again
            locked_record(
                failure(
                    entry.id,
                    describe_exception(exc),
                    line=entry.line_no,
                    job_id=job_id,
                    resume_job=job_id is not None,
                )
            )

    timeout = httpx.Timeout(config.http_timeout_s)
    limits = httpx.Limits(max_connections=config.concurrency + 2)
    with (
        httpx.Client(
            base_url=config.url, headers=headers, timeout=timeout, limits=limits, transport=transport
        ) as client,
        ThreadPoolExecutor(max_workers=config.concurrency, thread_name_prefix="batch") as pool,
    ):
        for future in [pool.submit(one, client, entry) for entry in todo]:
            future.result()
