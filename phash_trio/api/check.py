"""``POST /api/v1/check``: hash, match and (optionally) act in one call (HMA users' #1703).

The image comes as the request body (``Content-Type: image/*``), a multipart file (``image``
or ``photo``), base64 ``image_data`` in JSON, a ``url`` (fetched through the SSRF guard), or a
blob reference ``did`` + ``cid`` (fetched like the firehose path does: CDN, then the PDS, with
its guard and breakers). The answer has every hash, every match (a rule's own hashes or a
bank's entry, with content id and distance) and the decision the rules give.

With ``act=true`` and the post's ``uri`` + ``post_cid``, the decision's Ozone events are filed by
the firehose path's own :class:`~phash_trio.pipeline.actions.Actions`: the same Redis claims and the
same ``externalId``\\ s, so the post is not acted on again when it reaches the firehose (and a
post the firehose already handled is not acted on twice here). The blob CID in the event is the
given ``cid``, or the CID the bytes have on the network (CIDv1, raw, sha2-256).
"""

from __future__ import annotations

import base64
import hashlib
import re
import time
from typing import Any

from loguru import logger
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from phash_trio.api.auth import ApiError, require_scope
from phash_trio.api.bridge import IMAGE_FIELDS, hashes_json
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
from phash_trio.net.atproto.blobs import (
    BlobError,
    BlobNotFound,
    BlobTooLarge,
    BlobUnavailable,
    InvalidCid,
    InvalidDid,
)
from phash_trio.net.atproto.syntax import is_valid_cid, is_valid_did
from phash_trio.net.ozone.client import OzoneError, OzoneUnavailable
from phash_trio.pipeline.actions import planned_actions
from phash_trio.pipeline.jobs import POST_COLLECTION, BlobRef, ImageJob
from phash_trio.rules.index import Match
from phash_trio.state.store import StoreError

__all__ = ["blob_cid", "check_routes"]

_URI = re.compile(
    rf"at://(?P<did>[^/]+)/{re.escape(POST_COLLECTION)}/(?P<rkey>[A-Za-z0-9._~:-]{{1,512}})"
)
_TRUE = ("1", "true", "yes", "on")


def blob_cid(data: bytes) -> str:
    """The CID the network gives these bytes: CIDv1, raw codec, sha2-256, base32 ``b...``."""
    raw = b"\x01\x55\x12\x20" + hashlib.sha256(data).digest()
    return "b" + base64.b32encode(raw).decode("ascii").lower().rstrip("=")


def _ctx(request: Request) -> ApiContext:
    ctx: ApiContext = request.app.state.api
    return ctx


async def _params(ctx: ApiContext, request: Request) -> tuple[bytes | None, dict[str, Any]]:
    """The image bytes given inline (if any) and the parameters (query < body fields)."""
    params: dict[str, Any] = dict(request.query_params)
    kind = request.headers.get("content-type", "").lower()
    if kind.startswith("image/") or kind.startswith("application/octet-stream"):
        body = await request.body()
        return body, params
    if is_multipart(request):
        form = await read_form(request)
        params.update({k: v for k, v in form.items() if isinstance(v, str)})
        upload = first_file(form, IMAGE_FIELDS)
        return (await read_upload(upload, ctx.gate.max_bytes) if upload else None), params
    data = await read_json(request)
    if data is None:
        return None, params
    if not isinstance(data, dict):
        raise BadInput("the JSON body must be an object")
    params.update(data)
    encoded = params.get("image_data")
    if isinstance(encoded, str):
        try:
            return base64.b64decode(encoded, validate=True), params
        except ValueError:
            raise BadInput("image_data is not base64") from None
    return None, params


def _str(params: dict[str, Any], name: str) -> str | None:
    value = params.get(name)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise BadInput(f"{name} must be a string")
    return value


async def _fetch_blob(ctx: ApiContext, did: str, cid: str) -> bytes:
    if not is_valid_did(did):
        raise BadInput("did is not a valid did:plc or did:web")
    if not is_valid_cid(cid):
        raise BadInput("cid is not a valid CID")
    if ctx.blobs is None:
        raise ApiError("blob fetching is not configured on this server", status=501)
    try:
        return await ctx.blobs.fetch(did, cid)
    except BlobNotFound:
        raise ApiError("blob not found", status=404) from None
    except (InvalidDid, InvalidCid, BlobTooLarge) as exc:
        raise BadInput(f"blob refused: {type(exc).__name__}") from None
    except BlobUnavailable:
        raise ApiError("blob source unavailable; retry later", status=503) from None
    except BlobError as exc:
        raise BadInput(f"blob could not be fetched: {type(exc).__name__}") from None


def _match_json(match: Match, source: str) -> dict[str, Any]:
    return {
        "source": source,
        "rule": match.rule_index,
        "label": match.rule.label,
        "signal_type": match.signal_type,
        "distance": match.distance,
        "hash": match.matched_hex,
        "bank": match.bank,
        "content_id": match.content_id,
    }


async def _matches(ctx: ApiContext, signals: BlobSignals, did: str) -> list[dict[str, Any]]:
    """Every rule match (own hashes or a bank the rule names) and every bank hit."""
    found: list[dict[str, Any]] = []
    if ctx.matcher is not None:
        rules = ctx.matcher.rules.rules
        for cand in sorted(ctx.matcher.candidates(signals, did), key=lambda c: c.order):
            found.append(
                {
                    "source": "bank" if cand.bank else "rule",
                    "rule": cand.rule_index,
                    "label": rules[cand.rule_index].label,
                    "signal_type": cand.signal_type,
                    "distance": cand.distance,
                    "hash": cand.value,
                    "bank": cand.bank,
                    "content_id": None,
                }
            )
    hits = []
    pdq = signals.pdq
    if pdq is not None and pdq.quality >= ctx.pdq_quality_min:
        hits += ctx.search("pdq", pdq.hex)
    hits += ctx.search("phash", f"{signals.mean:016x}")
    for kind in ("md5", "sha256"):
        value = getattr(signals, kind)
        if value is not None:
            hits += ctx.search(kind, value)
    content = await ctx.content_ids(hits)
    ids = {(h.bank, h.signal_type, h.value): cid for h, cid, _ in content}
    for entry in found:
        if entry["bank"] is not None:
            entry["content_id"] = ids.get((entry["bank"], entry["signal_type"], entry["hash"]))
    routed = {(e["bank"], e["signal_type"], e["hash"]) for e in found if e["bank"]}
    for hit, content_id, _meta in content:
        if content_id is None or (hit.bank, hit.signal_type, hit.value) in routed:
            continue
        found.append(
            {
                "source": "bank",
                "rule": None,
                "label": None,
                "signal_type": hit.signal_type,
                "distance": hit.distance,
                "hash": hit.value,
                "bank": hit.bank,
                "content_id": content_id,
            }
        )
    return found


async def _act(
    ctx: ApiContext, params: dict[str, Any], match: Match, did: str, cid: str
) -> dict[str, Any]:
    uri = _str(params, "uri")
    post_cid = _str(params, "post_cid")
    if uri is None or post_cid is None:
        raise BadInput("act=true needs the post's uri and post_cid")
    parsed = _URI.fullmatch(uri)
    if parsed is None or not is_valid_did(parsed["did"]):
        raise BadInput(f"uri is not an at:// URI of an {POST_COLLECTION} record")
    if not is_valid_cid(post_cid):
        raise BadInput("post_cid is not a valid CID")
    if did and did != parsed["did"]:
        raise BadInput("did and uri name different accounts")
    if ctx.actions is None:
        raise ApiError("acting is not configured on this server", status=501)
    # An upload check happens now, seconds before the post reaches the firehose: the wall
    # clock stands in for its Jetstream time_us (account externalIds hold its 7-day period).
    job = ImageJob(
        did=parsed["did"],
        rkey=parsed["rkey"],
        cid=post_cid,
        time_us=time.time_ns() // 1000,
        blobs=(BlobRef(cid),),
    )
    try:
        await ctx.actions.apply(job, job.blobs[0], match)
    except OzoneUnavailable:
        raise ApiError("Ozone is unavailable; retry later", status=503) from None
    except OzoneError as exc:
        logger.error("ozone refused an event for {} (API check): {}", uri, exc)
        raise ApiError(f"Ozone refused the event: {type(exc).__name__}", status=502) from None
    except StoreError:
        raise ApiError("Redis is unavailable; retry later", status=503) from None
    return {"uri": uri, "actions": [kind.value for kind in planned_actions(match)]}


async def check(request: Request) -> Response:
    require_scope(request, "check")
    ctx = _ctx(request)
    data, params = await _params(ctx, request)
    did = _str(params, "did") or ""
    uri = _str(params, "uri")
    parsed = _URI.fullmatch(uri) if uri else None
    if not did and parsed is not None:
        did = parsed["did"]  # rules that ignore an author apply to the post's author
    cid = _str(params, "cid")
    url = _str(params, "url")
    act = str(params.get("act", "")).lower() in _TRUE or params.get("act") is True
    if data is None and url is not None:
        data, _kind = await ctx.urls.fetch(url)
    elif data is None and cid is not None:
        data = await _fetch_blob(ctx, did, cid)
    if data is None:
        raise BadInput("give an image (body, multipart 'image', image_data), a url, or did + cid")
    signals = await ctx.gate.signals(data)
    matches = await _matches(ctx, signals, did)
    decision: dict[str, Any] | None = None
    match = await ctx.matcher.match(signals, did) if ctx.matcher is not None else None
    if match is not None:
        decision = _match_json(match, "bank" if match.bank else "rule")
        decision["actions"] = [kind.value for kind in planned_actions(match)]
    acted: dict[str, Any] | None = None
    if act and match is not None:
        acted = await _act(ctx, params, match, did, cid or blob_cid(data))
    return JSONResponse(
        {
            "hashes": hashes_json(ctx, signals),
            "cid": cid or blob_cid(data),
            "matches": matches,
            "decision": decision,
            "acted": acted,
        }
    )


def check_routes() -> list[Route]:
    return [Route("/api/v1/check", closing(check), methods=["POST"])]
