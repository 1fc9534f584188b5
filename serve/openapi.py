"""The OpenAPI description of the HTTP API: every route's parameters, request body and answers.

The routes read their bodies themselves (size and JSON-depth limits before parsing, multipart with
one image file), so FastAPI cannot infer bodies from their signatures. This module states them from
the same pydantic models the routes validate with, plus the OpenAI error body every error answers
with, the media types of the binary answers (MP4, JPEG, fMP4 streams, Prometheus text) and the
bearer-key security of ``/v1`` and ``/admin``. ``/openapi.json`` serves it, and CI fuzzes the live app
against it with schemathesis (``tests/test_serve.py``): a route it does not describe fails the build.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from shopreel.pipelines.types import MAX_IMAGE_BYTES

from .config import SalesEvent, TenantQuotas
from .protocol import (
    MAX_JSON_BODY_BYTES,
    ProductVideoRequest,
    ProductVideoVariantsRequest,
    VideoCreateRequest,
)
from .store import MAX_LIST_LIMIT, VIDEO_ID_PATTERN

REF = "#/components/schemas/{model}"
Schema = dict[str, Any]


def _ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


ERROR: Schema = {
    "type": "object",
    "description": "OpenAI's error body",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}
VIDEO: Schema = {
    "type": "object",
    "description": "OpenAI's Video object (retrieve adds a 'shopreel' object with frames, timings, attempts)",
    "required": ["id", "object", "created_at", "status", "model", "progress", "seconds", "size"],
    "properties": {
        "id": {"type": "string", "pattern": f"^{VIDEO_ID_PATTERN}$"},
        "object": {"const": "video"},
        "created_at": {"type": "integer"},
        "status": {"enum": ["queued", "in_progress", "completed", "failed"]},
        "model": {"type": "string"},
        "progress": {"type": "integer", "minimum": 0, "maximum": 100},
        "seconds": {"type": "string"},
        "size": {"type": "string", "pattern": r"^\d+x\d+$"},
        "completed_at": {"type": ["integer", "null"]},
        "expires_at": {"type": ["integer", "null"]},
        "error": {
            "anyOf": [
                {"type": "null"},
                {
                    "type": "object",
                    "required": ["code", "message"],
                    "properties": {"code": {"type": "string"}, "message": {"type": "string"}},
                },
            ]
        },
        "remixed_from_video_id": {"type": "null"},
        "prompt": {"type": ["string", "null"]},
        "shopreel": {"type": "object"},
    },
}
VIDEO_LIST: Schema = {
    "type": "object",
    "required": ["object", "data", "first_id", "last_id", "has_more"],
    "properties": {
        "object": {"const": "list"},
        "data": {"type": "array", "items": _ref("Video")},
        "first_id": {"type": ["string", "null"]},
        "last_id": {"type": ["string", "null"]},
        "has_more": {"type": "boolean"},
    },
}
VIDEO_DELETED: Schema = {
    "type": "object",
    "required": ["id", "object", "deleted"],
    "properties": {
        "id": {"type": "string"},
        "object": {"const": "video.deleted"},
        "deleted": {"const": True},
    },
}
API_KEY: Schema = {
    "type": "object",
    "required": ["id", "tenant", "role", "created_at"],
    "properties": {
        "id": {"type": "string"},
        "tenant": {"type": "string"},
        "role": {"enum": ["user", "admin"]},
        "label": {"type": ["string", "null"]},
        "created_at": {"type": "integer"},
        "revoked_at": {"type": ["integer", "null"]},
        "key": {"type": "string", "description": "only in the answer that created it"},
    },
}
NEW_KEY: Schema = {
    "type": "object",
    "additionalProperties": False,
    "required": ["tenant"],
    "properties": {
        "tenant": {"type": "string", "pattern": "^[a-z0-9][a-z0-9._-]{0,63}$"},
        "role": {"enum": ["user", "admin"], "default": "user"},
        "label": {"type": ["string", "null"], "maxLength": 200},
    },
}
OBJECT: Schema = {"type": "object"}
STATUS: Schema = {"type": "object", "required": ["status"], "properties": {"status": {"type": "string"}}}
BINARY: Schema = {"type": "string", "format": "binary"}
RETRY_AFTER = {
    "Retry-After": {"description": "seconds until a retry may be admitted", "schema": {"type": "string"}}
}
ERRORS = {
    400: "bad input (the message names the field; `param` is its path)",
    401: "no valid API key (while authentication is on)",
    403: "the key may not do this (the admin API without an admin key)",
    404: "no such video, key, event or model (another tenant's video id too)",
    409: "the video exists but has no such file yet, or the change conflicts with the server's config",
    413: f"the body is larger than {MAX_JSON_BODY_BYTES} bytes (JSON) or the image than {MAX_IMAGE_BYTES}",
    429: "the job queue or a tenant's quota is full (Retry-After says when to come back)",
    500: "a bug: the body names only an id under which the server log has the traceback",
    503: "the stream slots are full, or a stage is at capacity (Retry-After)",
}


def _json(schema: Schema) -> Schema:
    return {"application/json": {"schema": schema}}


def _answer(description: str, content: Schema | None = None, headers: Schema | None = None) -> Schema:
    answer: Schema = {"description": description}
    if content is not None:
        answer["content"] = content
    if headers:
        answer["headers"] = headers
    return answer


def _errors(*statuses: int) -> dict[str, Schema]:
    return {
        str(status): _answer(
            ERRORS[status], _json(_ref("Error")), RETRY_AFTER if status in (429, 503) else None
        )
        for status in statuses
    }


def _query(name: str, schema: Schema, description: str) -> Schema:
    return {"name": name, "in": "query", "required": False, "schema": schema, "description": description}


def _path(name: str, schema: Schema) -> Schema:
    return {"name": name, "in": "path", "required": True, "schema": schema}


def _model(model: type[BaseModel], components: dict[str, Schema]) -> Schema:
    """A model's JSON schema, its nested models moved into ``components``."""
    schema = model.model_json_schema(ref_template=REF)
    components.update(schema.pop("$defs", {}))
    return schema


def _video_create(components: dict[str, Schema]) -> Schema:
    """``POST /v1/videos``: JSON as the SDK sends it, and multipart with the image as a file."""
    as_json = _model(VideoCreateRequest, components)
    fields = as_json["properties"]
    # On the wire: seconds as OpenAI's string ("4") or a number; size as "WxH" or {width, height};
    # the image as OpenAI's {"image_url": "data:image/...;base64,..."} object.
    fields["seconds"] = {"anyOf": [{"type": "number"}, {"type": "string"}, {"type": "null"}]}
    fields["size"] = {
        "anyOf": [{"type": "string", "pattern": r"^\d+x\d+$"}, _ref("VideoSize"), {"type": "null"}]
    }
    fields["input_reference"] = {
        "anyOf": [
            {"type": "object", "required": ["image_url"], "properties": {"image_url": {"type": "string"}}},
            {"type": "null"},
        ]
    }
    as_form: Schema = {
        "type": "object",
        "required": ["prompt"],
        "properties": {
            **{name: {"type": "string"} for name in fields if name != "input_reference"},
            "input_reference": {**BINARY, "description": "a product image file (PNG/JPEG/WebP)"},
        },
    }
    components["VideoCreateRequest"] = as_json
    return {
        "required": True,
        "content": {
            "application/json": {"schema": _ref("VideoCreateRequest")},
            "multipart/form-data": {"schema": as_form},
        },
    }


def _body(schema: Schema) -> Schema:
    return {"required": True, "content": _json(schema)}


def _operations(components: dict[str, Schema]) -> dict[tuple[str, str], Schema]:
    """(method, path) -> the parts of the operation this module states."""
    create = _video_create(components)
    components["ProductVideoRequest"] = _model(ProductVideoRequest, components)
    components["ProductVideoVariantsRequest"] = _model(ProductVideoVariantsRequest, components)
    components["SalesEvent"] = _model(SalesEvent, components)
    components["TenantQuotas"] = _model(TenantQuotas, components)
    video_id = _path("video_id", {"type": "string"})
    name = _path("name", {"type": "string"})
    video = _json(_ref("Video"))
    return {
        ("get", "/healthz"): {"responses": {"200": _answer("alive", _json(STATUS))}},
        ("get", "/readyz"): {
            "responses": {
                "200": _answer("every stage loaded and warmed up", _json(STATUS)),
                "503": _answer("still starting", _json(STATUS), RETRY_AFTER),
            }
        },
        ("get", "/metrics"): {
            "responses": {
                "200": _answer("Prometheus text format", {"text/plain": {"schema": {"type": "string"}}})
            }
        },
        ("get", "/v1/models"): {
            "responses": {"200": _answer("the served model", _json(OBJECT)), **_errors(401)}
        },
        ("post", "/v1/videos"): {
            "requestBody": create,
            "responses": {
                "200": _answer("accepted as a job", video),
                **_errors(400, 401, 404, 413, 429, 503),
            },
        },
        ("get", "/v1/videos"): {
            "parameters": [
                _query(
                    "after",
                    {"type": "string", "pattern": f"^{VIDEO_ID_PATTERN}$"},
                    "last id of the previous page",
                ),
                _query("limit", {"type": "integer", "minimum": 1, "maximum": MAX_LIST_LIMIT}, "page size"),
                _query("order", {"enum": ["asc", "desc"]}, "by creation time"),
            ],
            "responses": {
                "200": _answer("one page of the caller's videos", _json(_ref("VideoList"))),
                **_errors(400, 401),
            },
        },
        ("get", "/v1/videos/{video_id}"): {
            "parameters": [video_id],
            "responses": {"200": _answer("the video's state", video), **_errors(401, 404)},
        },
        ("delete", "/v1/videos/{video_id}"): {
            "parameters": [video_id],
            "responses": {
                "200": _answer("deleted (a running production is stopped)", _json(_ref("VideoDeleted"))),
                **_errors(401, 404),
            },
        },
        ("get", "/v1/videos/{video_id}/content"): {
            "parameters": [video_id, _query("variant", {"enum": ["video", "thumbnail"]}, "which file")],
            "responses": {
                "200": _answer(
                    "the MP4, or the JPEG thumbnail",
                    {"video/mp4": {"schema": BINARY}, "image/jpeg": {"schema": BINARY}},
                ),
                **_errors(400, 401, 404, 409),
            },
        },
        ("post", "/v1/videos/sync"): {
            "requestBody": create,
            "responses": {
                "200": _answer("the finished MP4", {"video/mp4": {"schema": BINARY}}),
                **_errors(400, 401, 404, 413, 429, 500, 503),
            },
        },
        ("post", "/v1/product-videos"): {
            "requestBody": _body(_ref("ProductVideoRequest")),
            "responses": {
                "200": _answer(
                    "stream: true: fragmented MP4 while it is made; stream: false: the job",
                    {"video/mp4": {"schema": BINARY}, **video},
                ),
                **_errors(400, 401, 404, 413, 429, 500, 503),
            },
        },
        ("post", "/v1/product-videos/variants"): {
            "requestBody": _body(_ref("ProductVideoVariantsRequest")),
            "responses": {
                "200": _answer(
                    "a job per profile, in order; each Video has 'shopreel': its variant index, the "
                    "indices of its shots shared with other variants, and the video it waits for",
                    _json(
                        {
                            "type": "object",
                            "required": ["object", "data"],
                            "properties": {
                                "object": {"const": "list"},
                                "data": {"type": "array", "items": _ref("Video")},
                            },
                        }
                    ),
                ),
                **_errors(400, 401, 404, 413, 429, 500, 503),
            },
        },
        ("get", "/admin/events"): {
            "responses": {"200": _answer("the sales events", _json(OBJECT)), **_errors(401, 403)}
        },
        ("post", "/admin/events"): {
            "requestBody": _body(_ref("SalesEvent")),
            "responses": {
                "200": _answer("added or replaced", _json(OBJECT)),
                **_errors(400, 401, 403, 409, 413),
            },
        },
        ("delete", "/admin/events/{name}"): {
            "parameters": [name],
            "responses": {"200": _answer("deleted", _json(OBJECT)), **_errors(401, 403, 404, 409)},
        },
        ("get", "/admin/keys"): {
            "parameters": [_query("tenant", {"type": "string"}, "only this tenant's keys")],
            "responses": {
                "200": _answer(
                    "keys, never their secrets",
                    _json(
                        {"type": "object", "properties": {"data": {"type": "array", "items": _ref("ApiKey")}}}
                    ),
                ),
                **_errors(401, 403),
            },
        },
        ("post", "/admin/keys"): {
            "requestBody": _body(_ref("NewKeyRequest")),
            "responses": {
                "200": _answer("the key, shown this once", _json(_ref("ApiKey"))),
                **_errors(400, 401, 403, 413),
            },
        },
        ("delete", "/admin/keys/{key_id}"): {
            "parameters": [_path("key_id", {"type": "string"})],
            "responses": {"200": _answer("revoked", _json(OBJECT)), **_errors(401, 403, 404)},
        },
        ("get", "/admin/tenants"): {
            "responses": {"200": _answer("tenants with their own quotas", _json(OBJECT)), **_errors(401, 403)}
        },
        ("put", "/admin/tenants/{name}"): {
            "parameters": [name],
            "requestBody": _body(_ref("TenantQuotas")),
            "responses": {"200": _answer("set", _json(OBJECT)), **_errors(400, 401, 403, 413)},
        },
        ("delete", "/admin/tenants/{name}"): {
            "parameters": [name],
            "responses": {"200": _answer("back to the default quotas", _json(OBJECT)), **_errors(401, 403)},
        },
    }


def describe(app: FastAPI) -> Schema:
    """FastAPI's schema of ``app`` with every operation stated here; raises if a route is not."""
    generated = get_openapi(
        title=app.title, version=app.version, description=app.description, routes=app.routes
    )
    components: dict[str, Schema] = {
        "Error": ERROR,
        "Video": VIDEO,
        "VideoList": VIDEO_LIST,
        "VideoDeleted": VIDEO_DELETED,
        "ApiKey": API_KEY,
        "NewKeyRequest": NEW_KEY,
    }
    stated = _operations(components)
    described: dict[str, dict[str, Schema]] = {}
    for path, operations in generated["paths"].items():
        for method, operation in operations.items():
            parts = stated.pop((method, path), None)
            if parts is None:
                raise RuntimeError(f"{method.upper()} {path} is not described in serve/openapi.py")
            operation = {
                key: value for key, value in operation.items() if key not in ("parameters", "requestBody")
            }
            operation.update(parts)
            if path.startswith(("/v1/", "/admin/")):
                operation["security"] = [{"bearer": []}]
            described.setdefault(path, {})[method] = operation
    if stated:
        raise RuntimeError(f"serve/openapi.py describes routes the app does not have: {sorted(stated)}")
    generated["paths"] = described
    generated["components"] = {
        "schemas": components,
        "securitySchemes": {
            "bearer": {"type": "http", "scheme": "bearer", "description": "an API key (sr-...)"}
        },
    }
    return generated


def install(app: FastAPI) -> None:
    """Serve ``describe(app)`` as the app's OpenAPI schema (built on first request, then kept)."""
    state: dict[str, Schema] = {}

    def openapi() -> Schema:
        if "schema" not in state:
            state["schema"] = describe(app)
        return state["schema"]

    app.openapi = openapi  # type: ignore[method-assign]
