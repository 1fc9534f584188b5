"""Catalog pre-generation without Ray: catalog lines, product ids, the manifest, one product's video.

A catalog is a JSONL file, one product a line: either a brief (the JSON ``shopreel generate`` takes)
or ``{"id": ..., "brief": {...}, "profile": {...}, "campaign": {...}}``. A product's id is the line's
``id``, else its ``sku`` (a plain brief line may carry ``id``/``sku`` next to the brief fields: they
are taken out as the id), else ``p-`` and 16 hex digits of the SHA-256 of the line's canonical JSON.
Its video is ``DIR/<id>.mp4`` (and ``DIR/<id>.jpg``).

Resuming rests on two rules:

1. A file becomes visible under its final name only when complete (written to a ``.<id>.*.tmp``
   name, fsync'd, then ``os.replace``); a tmp file is never mistaken for a finished one.
2. ``DIR/manifest.jsonl`` gets one line per finished (``done``) or ``failed`` product (and, for a
   cluster run, per ``submitted`` job), appended and fsync'd only after the files are in place. The
   last line per id is that product's state. A product with no ``done`` line is made (again).

``serve/batch.py`` runs :func:`produce_product` in Ray Data actors (or in this process) and talks to a
cluster; this module never imports Ray.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .types import Campaign, ProductBrief, ShopperProfile, describe_validation_error

MANIFEST_NAME = "manifest.jsonl"
LOCK_NAME = ".batch.lock"
ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
WRAPPER_KEYS = frozenset({"id", "sku", "brief", "profile", "campaign"})
ProductState = Literal["done", "failed", "submitted"]


class CatalogError(ValueError):
    """The catalog as a whole cannot be run (unreadable, duplicate ids): nothing was started."""


class ProductOverrides(BaseModel):
    """Values applied to every brief of a catalog (like ``shopreel generate``'s flags); None: the brief's."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    size: str | None = Field(default=None, description="WIDTHxHEIGHT for every video")
    fps: int | None = Field(default=None, description="frames per second for every video")
    duration_s: float | None = Field(default=None, description="target seconds for every video")
    seed: int | None = Field(default=None, description="seed for every video")

    def apply(self, brief: dict[str, Any]) -> dict[str, Any]:
        values = {"size": self.size, "fps": self.fps, "duration_s": self.duration_s, "seed": self.seed}
        return {**brief, **{key: value for key, value in values.items() if value is not None}}


@dataclass(frozen=True)
class CatalogEntry:
    """Where one product's line is in the catalog (its text is read again where it is produced)."""

    id: str
    line_no: int
    offset: int
    length: int
    error: str | None = None  # the line itself is unusable (not JSON, bad id): recorded as failed


@dataclass(frozen=True)
class ProductInput:
    """A catalog line validated: what the pipeline (or a cluster) gets."""

    id: str
    brief: ProductBrief
    profile: ShopperProfile | None
    campaign: Campaign | None
    raw: dict[str, Any]  # the request body's brief/profile/campaign as JSON (images inlined)


# --- reading the catalog ----------------------------------------------------------------------------


def canonical_id(data: Any) -> str:
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return "p-" + hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _split_line(data: Any) -> tuple[str | None, dict[str, Any]]:
    """(explicit id or None, {"brief": ..., "profile": ..., "campaign": ...}) of a parsed line."""
    if not isinstance(data, dict):
        raise ValueError("a catalog line must be a JSON object (a brief, or {'id', 'brief', ...})")
    explicit = data.get("id", data.get("sku"))
    if "brief" in data:
        unknown = sorted(set(data) - WRAPPER_KEYS)
        if unknown:
            raise ValueError(
                f"unknown key(s) {', '.join(unknown)} next to 'brief' (allowed: id, sku, profile, campaign)"
            )
        parts = {key: data[key] for key in ("brief", "profile", "campaign") if data.get(key) is not None}
    else:
        parts = {"brief": {key: value for key, value in data.items() if key not in ("id", "sku")}}
    if explicit is not None:
        if not isinstance(explicit, (str, int)) or isinstance(explicit, bool):
            raise ValueError(f"id {explicit!r} must be a string or an integer")
        explicit = str(explicit)
        if not ID_PATTERN.fullmatch(explicit):
            raise ValueError(
                f"id {explicit!r} is not usable as a file name (1..128 of A-Z a-z 0-9 . _ -, starting "
                "with a letter or digit)"
            )
    return explicit, parts


def scan_catalog(path: Path) -> Iterator[CatalogEntry]:
    """Every non-blank line's id and byte range, lazily. Raises CatalogError for a duplicate id."""
    seen: dict[str, int] = {}
    offset = 0
    try:
        file = path.open("rb")
    except OSError as exc:
        raise CatalogError(f"cannot read catalog {path}: {exc.strerror or exc}") from exc
    with file:
        for line_no, raw in enumerate(file, start=1):
            start, offset = offset, offset + len(raw)
            text = raw.strip()
            if not text:
                continue
            error = None
            try:
                data = json.loads(text)
                explicit, _ = _split_line(data)
                product_id = explicit or canonical_id(data)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                product_id = "line-" + hashlib.sha256(text).hexdigest()[:16]
                error = f"line {line_no} is not valid JSON: {exc}"
            except ValueError as exc:
                product_id = "line-" + hashlib.sha256(text).hexdigest()[:16]
                error = f"line {line_no}: {exc}"
            if product_id in seen:
                raise CatalogError(
                    f"{path}: line {line_no} has the same id {product_id!r} as line {seen[product_id]} "
                    "(give each product its own 'id')"
                )
            seen[product_id] = line_no
            yield CatalogEntry(product_id, line_no, start, len(raw), error)


def read_line(path: Path, entry: CatalogEntry) -> bytes:
    with path.open("rb") as file:
        file.seek(entry.offset)
        return file.read(entry.length)


def inline_image_paths(brief: Any, base: Path) -> Any:
    """Briefs on disk may name images by path ({"path": "shoe.jpg"}, relative to ``base``); the API
    and the brief model take only data. Raises ValueError naming the image that cannot be read."""
    if not isinstance(brief, dict) or not isinstance(brief.get("images"), list):
        return brief
    images = []
    for position, image in enumerate(brief["images"]):
        if isinstance(image, dict) and set(image) == {"path"}:
            image_path = (base / str(image["path"])).expanduser()
            try:
                image = {"data": base64.b64encode(image_path.read_bytes()).decode("ascii")}
            except OSError as exc:
                raise ValueError(
                    f"images[{position}]: cannot read {image_path}: {exc.strerror or exc}"
                ) from exc
        images.append(image)
    return {**brief, "images": images}


def load_product(
    catalog: Path, entry: CatalogEntry, overrides: ProductOverrides | None = None
) -> ProductInput:
    """Parse and validate one catalog line. Raises ValueError with the pydantic message(s) per field."""
    if entry.error is not None:
        raise ValueError(entry.error)
    _, parts = _split_line(json.loads(read_line(catalog, entry)))
    try:
        parts["brief"] = inline_image_paths(parts["brief"], catalog.parent)
    except ValueError as exc:
        raise ValueError(f"brief.{exc}") from None
    if overrides is not None and isinstance(parts["brief"], dict):
        parts["brief"] = overrides.apply(parts["brief"])
    models: dict[str, Any] = {}
    for key, model in (("brief", ProductBrief), ("profile", ShopperProfile), ("campaign", Campaign)):
        if key not in parts:
            models[key] = None
            continue
        try:
            models[key] = model.model_validate(parts[key])
        except ValidationError as exc:
            raise ValueError("invalid " + "; ".join(describe_validation_error(exc, prefix=key))) from None
    return ProductInput(entry.id, models["brief"], models["profile"], models["campaign"], parts)


# --- files and the manifest ------------------------------------------------------------------------


def video_path(out_dir: Path, product_id: str) -> Path:
    return out_dir / f"{product_id}.mp4"


def thumbnail_path(out_dir: Path, product_id: str) -> Path:
    return out_dir / f"{product_id}.jpg"


def temp_path(final: Path) -> Path:
    """A per-process tmp name in the same directory (so os.replace is atomic); keeps the suffix."""
    return final.with_name(f".{final.stem}.{os.getpid()}.tmp{final.suffix}")


def publish(temp: Path, final: Path) -> None:
    """fsync a finished tmp file and move it to its final name atomically."""
    with temp.open("rb") as file:
        os.fsync(file.fileno())
    os.chmod(temp, 0o644)  # the stages write private tmp files; a published video is readable
    os.replace(temp, final)


def remove_stale_temps(out_dir: Path) -> int:
    """Tmp files left by an interrupted run (only ours: ``.<name>.<pid>.tmp.<ext>``)."""
    removed = 0
    for stale in out_dir.glob(".*.tmp.*"):
        stale.unlink(missing_ok=True)
        removed += 1
    return removed


class Manifest:
    """``DIR/manifest.jsonl``: one JSON object a line, appended and fsync'd; the last line per id wins."""

    def __init__(self, out_dir: Path) -> None:
        self.path = out_dir / MANIFEST_NAME
        self.records: dict[str, dict[str, Any]] = {}
        if self.path.exists():
            with self.path.open("rb") as file:
                for raw in file:
                    try:
                        record = json.loads(raw)
                    except (json.JSONDecodeError, UnicodeDecodeError):
                        continue  # a line cut short by a kill: that product was not recorded
                    if isinstance(record, dict) and isinstance(record.get("id"), str):
                        self.records[record["id"]] = record
        self._file = self.path.open("ab")
        if self._file.tell() > 0:
            with self.path.open("rb") as file:
                file.seek(-1, os.SEEK_END)
                if file.read(1) != b"\n":  # finish a cut-short line so the next record stands alone
                    self._file.write(b"\n")

    def state(self, product_id: str) -> ProductState | None:
        record = self.records.get(product_id)
        return None if record is None else record.get("status")

    def is_done(self, product_id: str, out_dir: Path) -> bool:
        """Finished: recorded done and its video is still there (a deleted video is made again)."""
        return self.state(product_id) == "done" and video_path(out_dir, product_id).exists()

    def append(self, record: dict[str, Any]) -> None:
        record = {**record, "at": round(time.time(), 3)}
        self._file.write(json.dumps(record, ensure_ascii=False).encode("utf-8") + b"\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        self.records[record["id"]] = record

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> Manifest:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def failure(product_id: str, reason: str, **extra: Any) -> dict[str, Any]:
    return {"id": product_id, "status": "failed", "error": reason, **extra}


def describe_exception(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


# --- one product ------------------------------------------------------------------------------------


def produce_product(
    pipeline: Any,
    catalog: Path,
    entry: CatalogEntry,
    out_dir: Path,
    *,
    overrides: ProductOverrides | None = None,
    audio: Literal["bed", "none"] = "bed",
    thumbnails: bool = True,
) -> dict[str, Any]:
    """One catalog line -> ``DIR/<id>.mp4`` (+ ``.jpg``), atomically; returns the manifest record.

    ``pipeline`` is a ``ProductVideoPipeline``. Never raises for a product's own problem: an invalid
    line or brief is ``failed`` with the validation message, a stage error with its type and message.
    """
    started = time.perf_counter()
    try:
        product = load_product(catalog, entry, overrides)
    except ValueError as exc:
        return failure(entry.id, str(exc), line=entry.line_no)
    final_mp4, final_jpg = video_path(out_dir, entry.id), thumbnail_path(out_dir, entry.id)
    temp_mp4, temp_jpg = temp_path(final_mp4), temp_path(final_jpg)
    try:
        result = pipeline.run(
            product.brief,
            product.profile,
            product.campaign,
            output_path=temp_mp4,
            thumbnail_path=temp_jpg if thumbnails else None,
            audio=audio,
            request_id=entry.id,
        )
        if thumbnails:
            publish(temp_jpg, final_jpg)
        publish(temp_mp4, final_mp4)  # last: the MP4 under its final name means the files are complete
    except Exception as exc:  # noqa: BLE001 - a product's failure is recorded, the catalog goes on
        temp_mp4.unlink(missing_ok=True)
        temp_jpg.unlink(missing_ok=True)
        return failure(entry.id, describe_exception(exc), line=entry.line_no)
    quality = result.quality
    return {
        "id": entry.id,
        "status": "done",
        "line": entry.line_no,
        "video": final_mp4.name,
        "thumbnail": final_jpg.name if thumbnails else None,
        "frames": result.compose.num_frames,
        "duration_s": round(result.compose.duration_s, 3),
        "size": f"{result.compose.width}x{result.compose.height}",
        "quality_flags": None if quality is None else list(quality.flags),
        "elapsed_s": round(time.perf_counter() - started, 3),
    }
