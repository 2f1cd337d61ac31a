"""``GET /openapi.json``: an OpenAPI 3.1 description of every API route, written by hand.

One table (:data:`OPERATIONS`) holds each operation's path, method, scope, summary and the
shape of its input; the document is built from it, and a test checks that every route of the
app is in the table and every entry of the table is a route.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

__all__ = ["OPERATIONS", "openapi_document", "openapi_routes"]

_Q = "query"
_P = "path"

#: (method, path, scope or None, summary, parameters [(name, where, required, type)], body)
OPERATIONS: list[tuple[str, str, str | None, str, list[tuple[str, str, bool, str]], str]] = [
    ("get", "/h/hash", "check", "HMA: hash the image at a URL", [("url", _Q, True, "string")], ""),
    ("post", "/h/hash", "check", "HMA: hash one uploaded file (field 'photo')", [], "photo"),
    (
        "get",
        "/m/raw_lookup",
        "check",
        "HMA: content ids whose signal is close to this one",
        [
            ("signal_type", _Q, True, "string"),
            ("signal", _Q, True, "string"),
            ("include_distance", _Q, False, "boolean"),
            ("banks", _Q, False, "string"),
        ],
        "",
    ),
    (
        "get",
        "/m/lookup",
        "check",
        "HMA: matches by bank for a signal, or for the image at a URL",
        [
            ("signal_type", _Q, False, "string"),
            ("signal", _Q, False, "string"),
            ("url", _Q, False, "string"),
            ("banks", _Q, False, "string"),
        ],
        "",
    ),
    ("post", "/m/lookup", "check", "HMA: matches by bank for an uploaded file", [], "photo"),
    ("post", "/m/compare", "check", "HMA: compare pairs of hashes", [], "json"),
    ("get", "/m/index/status", "check", "HMA: index size per signal type", [], ""),
    ("get", "/c/banks", "curate", "HMA: list banks", [], ""),
    ("post", "/c/banks", "curate", "HMA: create a bank", [], "json"),
    ("get", "/c/bank/{name}", "curate", "HMA: one bank", [("name", _P, True, "string")], ""),
    (
        "put",
        "/c/bank/{name}",
        "curate",
        "HMA: enable or disable a bank",
        [("name", _P, True, "string")],
        "json",
    ),
    (
        "delete",
        "/c/bank/{name}",
        "curate",
        "HMA: remove a bank",
        [("name", _P, True, "string")],
        "",
    ),
    (
        "post",
        "/c/bank/{name}/signal",
        "curate",
        "HMA: add hashes as one content",
        [("name", _P, True, "string")],
        "json",
    ),
    (
        "post",
        "/c/bank/{name}/content",
        "curate",
        "HMA: hash an image (url or upload 'photo') into a bank",
        [("name", _P, True, "string"), ("url", _Q, False, "string")],
        "photo",
    ),
    (
        "get",
        "/c/bank/{name}/content/{content_id}",
        "curate",
        "HMA: one content",
        [
            ("name", _P, True, "string"),
            ("content_id", _P, True, "integer"),
            ("include_signals", _Q, False, "boolean"),
        ],
        "",
    ),
    (
        "put",
        "/c/bank/{name}/content/{content_id}",
        "curate",
        "HMA: disable content until a time",
        [("name", _P, True, "string"), ("content_id", _P, True, "integer")],
        "json",
    ),
    (
        "delete",
        "/c/bank/{name}/content/{content_id}",
        "curate",
        "HMA: remove content",
        [("name", _P, True, "string"), ("content_id", _P, True, "integer")],
        "",
    ),
    ("get", "/status", None, "HMA: I-AM-ALIVE (503 while the index loads)", [], ""),
    ("get", "/status/live", None, "HMA: I-AM-ALIVE while the process runs", [], ""),
    (
        "post",
        "/api/v1/hash",
        "check",
        "Bridge: hash an uploaded image (field 'image')",
        [],
        "image",
    ),
    (
        "post",
        "/api/v1/match",
        "check",
        "Bridge: match an uploaded image or a PDQ hash against the banks",
        [],
        "image",
    ),
    ("get", "/health", None, "Bridge: health", [], ""),
    ("get", "/api/v1/health", None, "Bridge: health", [], ""),
    (
        "post",
        "/api/v1/check",
        "check",
        "Hash, match, decide and optionally act in one call",
        [],
        "check",
    ),
    ("get", "/openapi.json", None, "This document", [], ""),
]

_BODIES: dict[str, dict[str, Any]] = {
    "photo": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "properties": {"photo": {"type": "string", "format": "binary"}},
                "required": ["photo"],
            }
        }
    },
    "image": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "properties": {
                    "image": {"type": "string", "format": "binary"},
                    "threshold": {"type": "integer", "minimum": 0, "maximum": 256},
                    "author_did": {"type": "string"},
                    "photo_id": {"type": "string"},
                    "metadata": {"type": "string", "description": "JSON"},
                },
            }
        },
        "application/json": {
            "schema": {
                "type": "object",
                "properties": {"hash": {"type": "string"}, "image_data": {"type": "string"}},
            }
        },
    },
    "check": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "properties": {
                    "image": {"type": "string", "format": "binary"},
                    "url": {"type": "string"},
                    "did": {"type": "string"},
                    "cid": {"type": "string"},
                    "act": {"type": "boolean"},
                    "uri": {"type": "string"},
                    "post_cid": {"type": "string"},
                },
            }
        },
        "application/json": {"schema": {"type": "object"}},
        "image/*": {"schema": {"type": "string", "format": "binary"}},
    },
    "json": {"application/json": {"schema": {"type": "object"}}},
}

_ERROR = {"description": 'error: {"message"} (HMA paths) or {"success": false, "error"} (/api/)'}


def openapi_document() -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    for method, path, scope, summary, params, body in OPERATIONS:
        op: dict[str, Any] = {
            "summary": summary,
            "parameters": [
                {"name": n, "in": where, "required": req, "schema": {"type": kind}}
                for n, where, req, kind in params
            ],
            "responses": {
                "200": {"description": "success"},
                "400": _ERROR,
            },
        }
        if scope is not None:
            op["security"] = [{"apiKey": [scope]}, {"bearer": [scope]}]
            op["description"] = f"Needs an API key with the '{scope}' scope."
            op["responses"].update({"401": _ERROR, "403": _ERROR, "429": _ERROR, "503": _ERROR})
        if body:
            op["requestBody"] = {"content": _BODIES[body]}
        paths.setdefault(path, {})[method] = op
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "phash-trio hash and match API",
            "version": "1",
            "description": "HMA 2.0 routes (/h, /m, /c, /status), the ATproto-HMA bridge's"
            " (/api/v1/hash, /api/v1/match, /health) and /api/v1/check.",
        },
        "components": {
            "securitySchemes": {
                "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
                "bearer": {"type": "http", "scheme": "bearer"},
            }
        },
        "paths": paths,
    }


def openapi_routes() -> list[Route]:
    document = openapi_document()

    async def openapi(_request: Request) -> Response:
        return JSONResponse(document)

    return [Route("/openapi.json", openapi, methods=["GET"])]
