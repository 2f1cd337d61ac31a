"""The ATproto-HMA bridge's routes (``/api/v1/hash``, ``/api/v1/match``, ``/health``).

PerchPics and other bridge clients send the image as multipart field ``image`` with
``Authorization: Bearer`` or ``X-API-Key``; PerchPics then posts ``/api/v1/hash``'s JSON answer
to ``/api/v1/match``, so match also takes JSON with ``hash`` (or ``pdq``). Answers are
``{"success": true, ...}``; errors ``{"success": false, "error": "..."}``.

Better than the bridge, on purpose: a match carries the entry's real ``content_id``, the matched
``hash`` and a numeric ``distance`` (PDQ bits, 0-256), where the bridge sends null, "" and a
string. ``threshold`` (form or JSON) is a PDQ distance in bits, default PDQ_HAMMING_THRESHOLD.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from phash_trio.api.auth import require_scope
from phash_trio.api.context import ApiContext
from phash_trio.api.inputs import (
    BadInput,
    closing,
    first_file,
    is_multipart,
    read_form,
    read_json,
    read_upload,
)
from phash_trio.image.signals import BlobSignals
from phash_trio.rules.banks import BankError, normalize_signal

__all__ = ["bridge_routes"]

#: Field names clients use for the image (the bridge's, then HMA's and generic ones).
IMAGE_FIELDS = ("image", "photo", "file")


def _ctx(request: Request) -> ApiContext:
    ctx: ApiContext = request.app.state.api
    return ctx


def hashes_json(ctx: ApiContext, signals: BlobSignals) -> dict[str, Any]:
    """Every hash of one image, as /api/v1/hash and /api/v1/check report them."""
    pdq = signals.pdq
    return {
        "pdq": pdq.hex if pdq is not None else None,
        "pdq_quality": pdq.quality if pdq is not None else None,
        "phash": f"{signals.mean:016x}",
        "md5": signals.md5,
        "sha256": signals.sha256,
    }


async def _image_from(ctx: ApiContext, request: Request) -> tuple[bytes | None, dict[str, Any]]:
    """The uploaded image (multipart, or base64 ``image_data`` in JSON) and the other fields."""
    if is_multipart(request):
        form = await read_form(request)
        upload = first_file(form, IMAGE_FIELDS)
        fields = {k: v for k, v in form.items() if isinstance(v, str)}
        if upload is None:
            return None, fields
        return await read_upload(upload, ctx.gate.max_bytes), fields
    data = await read_json(request)
    if data is None:
        return None, {}
    if not isinstance(data, dict):
        raise BadInput("the JSON body must be an object")
    encoded = data.get("image_data")
    if isinstance(encoded, str):
        if len(encoded) > ctx.gate.max_bytes * 4 // 3 + 8:
            raise BadInput(f"image_data is over {ctx.gate.max_bytes} bytes")
        try:
            return base64.b64decode(encoded, validate=True), data
        except (binascii.Error, ValueError):
            raise BadInput("image_data is not base64") from None
    return None, data


def _threshold(ctx: ApiContext, raw: object) -> int:
    if raw is None or raw == "":
        return ctx.pdq_threshold
    try:
        value = int(str(raw))
    except ValueError:
        raise BadInput("threshold must be a whole number of PDQ bits (0-256)") from None
    if not 0 <= value <= 256:
        raise BadInput("threshold must be a whole number of PDQ bits (0-256)")
    return value


async def hash_image(request: Request) -> Response:
    require_scope(request, "check")
    ctx = _ctx(request)
    data, _fields = await _image_from(ctx, request)
    if data is None:
        raise BadInput("No image provided (multipart field 'image')")
    signals = await ctx.gate.signals(data)
    hashes = hashes_json(ctx, signals)
    usable = signals.pdq is not None and signals.pdq.quality >= ctx.pdq_quality_min
    return JSONResponse(
        {
            "success": True,
            "hash": signals.pdq.hex if signals.pdq is not None and usable else "",
            "signal_type": "pdq",
            "quality": hashes["pdq_quality"],
            "hashes": hashes,
            "matches": [],
        }
    )


async def match_image(request: Request) -> Response:
    require_scope(request, "check")
    ctx = _ctx(request)
    data, fields = await _image_from(ctx, request)
    threshold = _threshold(ctx, fields.get("threshold"))
    quality: int | None = None
    if data is not None:
        signals = await ctx.gate.signals(data)
        pdq = signals.pdq.hex if signals.pdq is not None else ""
        quality = signals.pdq.quality if signals.pdq is not None else None
        if quality is not None and quality < ctx.pdq_quality_min:
            pdq = ""  # too little structure to match on (HMA's cut)
    else:
        given = fields.get("hash", fields.get("pdq"))
        if not isinstance(given, str) or not given:
            raise BadInput("No image provided (multipart field 'image', or JSON 'hash')")
        try:
            _, pdq = normalize_signal("pdq", given)
        except BankError as exc:
            raise BadInput(f"hash is not a PDQ hash: {exc}") from None
    matches: list[dict[str, Any]] = []
    if pdq:
        hits = await ctx.content_ids(ctx.search("pdq", pdq, threshold))
        for hit, content_id, metadata in hits:
            if content_id is None:
                continue
            matches.append(
                {
                    "bank": hit.bank,
                    "content_id": content_id,
                    "distance": hit.distance,
                    "hash": hit.value,
                    "signal_type": hit.signal_type,
                    "metadata": metadata,
                }
            )
    body: dict[str, Any] = {
        "success": True,
        "hash": pdq,
        "quality": quality,
        "threshold": threshold,
        "matches": matches,
        "match": bool(matches),
    }
    for key in ("author_did", "photo_id"):
        if isinstance(fields.get(key), str):
            body[key] = fields[key]
    if "metadata" in fields:
        raw = fields["metadata"]
        try:
            body["metadata"] = json.loads(raw) if isinstance(raw, str) else raw
        except ValueError:
            raise BadInput("metadata is not JSON") from None
    return JSONResponse(body)


async def health(request: Request) -> Response:
    ctx = _ctx(request)
    if not ctx.ready:
        return JSONResponse({"status": "starting", "index": "loading"}, status_code=503)
    index = ctx.index()
    return JSONResponse({"status": "healthy", "index": {"seq": index.seq, **index.size}})


def bridge_routes() -> list[Route]:
    return [
        Route("/api/v1/hash", closing(hash_image), methods=["POST"]),
        Route("/api/v1/match", closing(match_image), methods=["POST"]),
        Route("/health", closing(health), methods=["GET"]),
        Route("/api/v1/health", closing(health), methods=["GET"]),
    ]
