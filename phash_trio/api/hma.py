"""HMA 2.0's routes and shapes (OpenMediaMatch's hashing, matching and curation blueprints).

An HMA client pointed at us works unchanged. Kept on purpose, because clients parse them:

* ``distance`` is a *string* in ``/m/lookup`` and ``/m/raw_lookup`` (HMA's ``pretty_str()``),
  a number inside ``/m/compare``'s ``[match, {"distance": n}]``;
* ``/h/hash`` answers ``{"pdq": ""}`` for an image below PDQ quality 50;
* ``POST /h/hash`` takes exactly one file whose *field name* is the content type (``photo``);
* errors are ``{"message": "..."}``; ``GET /status`` is the text ``I-AM-ALIVE``.

Where we differ (README, "HMA compatibility"): only the ``photo`` content type; signal types
``pdq`` plus our ``phash`` (mean hash), ``md5`` and ``sha256``; ``enabled_ratio`` is 0 or 1 (a
bank is on or off, no coin flip); ``raw_lookup`` skips disabled banks; ``built_to`` in
``/m/index/status`` is the banks' change number, not a timestamp; a low-quality image looks up
as no PDQ matches instead of a 400. Scopes: ``/h`` and ``/m`` need ``check``, ``/c`` needs
``curate``; ``/status`` needs none.
"""

from __future__ import annotations

import time
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from phash_trio.api.auth import ApiError, require_scope
from phash_trio.api.content import content_id_json
from phash_trio.api.context import ApiContext
from phash_trio.api.inputs import (
    BadInput,
    closing,
    form_files,
    is_multipart,
    read_form,
    read_json,
    read_upload,
)
from phash_trio.image.signals import BlobSignals
from phash_trio.rules.banks import (
    SIGNAL_TYPES,
    BankEntry,
    BankError,
    check_bank_name,
    normalize_signal,
)

__all__ = ["hma_routes"]

#: HMA's content type for images, also the multipart field name its clients use.
PHOTO = "photo"
_FIVE_YEARS = 5 * 365 * 24 * 3600


class NotFound(ApiError):
    status = 404


def _ctx(request: Request) -> ApiContext:
    ctx: ApiContext = request.app.state.api
    return ctx


def _bool(raw: str | None, default: bool = False) -> bool:
    """HMA's ``str_to_bool``: true/1/yes (any case) are true."""
    if raw is None:
        return default
    return raw.strip().lower() in ("1", "true", "yes", "t", "y")


def _banks_param(raw: str | None) -> frozenset[str] | None:
    if not raw:
        return None
    return frozenset(b.strip() for b in raw.split(",") if b.strip())


def _require(request: Request, name: str) -> str:
    value = request.query_params.get(name)
    if value is None or value == "":
        raise BadInput(f"{name} is required")
    return value


def _signal(kind: str, value: str) -> tuple[str, str]:
    if kind.strip().lower() not in SIGNAL_TYPES and kind not in ("pdq_hash", "photo_pdq"):
        raise BadInput(f"No such SignalType '{kind}'")
    try:
        return normalize_signal(kind, value)
    except BankError as exc:
        raise BadInput(f"invalid signal: {exc}") from None


def hma_hashes(ctx: ApiContext, signals: BlobSignals) -> dict[str, str]:
    """``/h/hash``'s answer: the PDQ hash, ``""`` below the quality cut."""
    pdq = signals.pdq
    if pdq is None or pdq.quality < ctx.pdq_quality_min:
        return {"pdq": ""}
    return {"pdq": pdq.hex}


async def _hash_url(ctx: ApiContext, request: Request, url: str) -> BlobSignals:
    data, content_type = await ctx.urls.fetch(url)
    hint = request.query_params.get("content_type", "")
    if hint and hint != PHOTO:
        raise BadInput(f"no such content_type: '{hint}'")
    if not hint and not content_type.lower().startswith("image"):
        raise BadInput(
            f"unsupported url ContentType: '{content_type[:60]}', if you know the expected"
            " type, provide it with the content_type query param"
        )
    return await ctx.gate.signals(data)


async def _hash_form(ctx: ApiContext, request: Request) -> BlobSignals:
    if not is_multipart(request):
        raise BadInput("Missing multipart/form-data file upload")
    form = await read_form(request)
    files = form_files(form)
    if not files:
        raise BadInput("Missing multipart/form-data file upload")
    if len(files) > 1:
        raise BadInput("Only one file allowed per request")
    name, upload = files[0]
    if name != PHOTO:
        raise BadInput(f"no such content_type: '{name[:40]}'")
    return await ctx.gate.signals(await read_upload(upload, ctx.gate.max_bytes))


# -- /h ---------------------------------------------------------------------------------------


async def hash_get(request: Request) -> Response:
    require_scope(request, "check")
    ctx = _ctx(request)
    url = request.query_params.get("url")
    if not url:
        raise BadInput("url is required")
    return JSONResponse(hma_hashes(ctx, await _hash_url(ctx, request, url)))


async def hash_post(request: Request) -> Response:
    require_scope(request, "check")
    ctx = _ctx(request)
    return JSONResponse(hma_hashes(ctx, await _hash_form(ctx, request)))


# -- /m ---------------------------------------------------------------------------------------


async def _lookup(
    ctx: ApiContext, kind: str, value: str, banks: frozenset[str] | None
) -> dict[str, list[dict[str, Any]]]:
    """``{"BANK": [{"bank_content_id": 1, "distance": "0"}]}`` for one signal."""
    result: dict[str, list[dict[str, Any]]] = {}
    hits = await ctx.content_ids(ctx.search(kind, value, banks=banks))
    for hit, content_id, _meta in hits:
        if content_id is None:  # removed since the index saw it
            continue
        result.setdefault(hit.bank, []).append(
            {"bank_content_id": content_id_json(content_id), "distance": str(hit.distance)}
        )
    return result


async def _lookup_signals(
    ctx: ApiContext, signals: BlobSignals, banks: frozenset[str] | None
) -> dict[str, dict[str, list[dict[str, Any]]]]:
    pdq = hma_hashes(ctx, signals)["pdq"]
    return {"pdq": await _lookup(ctx, "pdq", pdq, banks) if pdq else {}}


async def raw_lookup(request: Request) -> Response:
    require_scope(request, "check")
    ctx = _ctx(request)
    kind, value = _signal(_require(request, "signal_type"), _require(request, "signal"))
    banks = _banks_param(request.query_params.get("banks"))
    hits = await ctx.content_ids(ctx.search(kind, value, banks=banks))
    with_distance = _bool(request.query_params.get("include_distance"))
    matches: list[Any] = []
    for hit, content_id, _meta in hits:
        if content_id is None:
            continue
        cid = content_id_json(content_id)
        matches.append(
            {"bank_content_id": cid, "distance": str(hit.distance)} if with_distance else cid
        )
    return JSONResponse({"matches": matches})


async def lookup_get(request: Request) -> Response:
    require_scope(request, "check")
    ctx = _ctx(request)
    banks = _banks_param(request.query_params.get("banks"))
    url = request.query_params.get("url")
    if url:
        by_type = await _lookup_signals(ctx, await _hash_url(ctx, request, url), banks)
        selected = request.query_params.get("signal_type")
        if selected is not None:
            return JSONResponse(by_type.get(selected, {}))
        return JSONResponse(by_type)
    signal = request.query_params.get("signal")
    signal_type = request.query_params.get("signal_type")
    if not signal or not signal_type:
        raise BadInput("Either url or both signal and signal_type are required")
    kind, value = _signal(signal_type, signal)
    return JSONResponse(await _lookup(ctx, kind, value, banks))


async def lookup_post(request: Request) -> Response:
    require_scope(request, "check")
    ctx = _ctx(request)
    banks = _banks_param(request.query_params.get("banks"))
    return JSONResponse(await _lookup_signals(ctx, await _hash_form(ctx, request), banks))


async def compare(request: Request) -> Response:
    require_scope(request, "check")
    data = await read_json(request)
    if not isinstance(data, dict):
        raise BadInput("Request input was not a dict")
    ctx = _ctx(request)
    results: dict[str, Any] = {}
    for kind, pair in data.items():
        if not isinstance(pair, list):
            raise BadInput(f"Comparison hashes for {str(kind)[:40]} was not a list")
        if len(pair) != 2:
            raise BadInput("Comparison hash list length must be exactly 2")
        if not all(isinstance(h, str) for h in pair):
            raise BadInput(f"Invalid {str(kind)[:40]} hash: not a string")
        left_kind, left = _signal(kind, pair[0])
        _, right = _signal(kind, pair[1])
        if left_kind in ("md5", "sha256"):
            distance = 0 if left == right else 1
        else:
            distance = (int(left, 16) ^ int(right, 16)).bit_count()
        results[kind] = [distance <= ctx.threshold(left_kind), {"distance": distance}]
    return JSONResponse(results)


async def index_status(request: Request) -> Response:
    require_scope(request, "check")
    ctx = _ctx(request)
    kinds = list(SIGNAL_TYPES)
    only = request.query_params.get("signal_type")
    if only is not None:
        if only not in SIGNAL_TYPES:
            raise BadInput(f"No such signal type '{only[:40]}'")
        kinds = [only]
    index = ctx.banks.index if ctx.banks is not None else None
    status: dict[str, Any] = {}
    for kind in kinds:
        if index is None:
            status[kind] = {"present": False, "built_to": -1, "size": 0}
        else:
            status[kind] = {"present": True, "built_to": index.seq, "size": index.size[kind]}
    return JSONResponse(status)


# -- /c ---------------------------------------------------------------------------------------


def _bank_json(name: str, enabled: bool) -> dict[str, Any]:
    return {"name": name, "matching_enabled_ratio": 1.0 if enabled else 0.0}


def _ratio(data: dict[str, Any], default: bool | None) -> bool | None:
    """HMA's ``enabled_ratio`` (0 or 1 here) or ``enabled``; ``default`` if neither."""
    if data.get("enabled_ratio") is not None:
        try:
            ratio = float(data["enabled_ratio"])
        except (TypeError, ValueError):
            raise BadInput("enabled_ratio must be a number") from None
        if ratio not in (0.0, 1.0):
            raise BadInput("enabled_ratio must be 0 or 1 (banks are on or off here)")
        return ratio == 1.0
    if data.get("enabled") is not None:
        value = data["enabled"]
        return _bool(value) if isinstance(value, str) else bool(value)
    return default


async def _json_object(request: Request) -> dict[str, Any]:
    data = await read_json(request)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise BadInput("this endpoint expects a json object payload")
    return data


async def _existing_bank(ctx: ApiContext, name: str) -> bool:
    """The bank's flag, or 404."""
    flags = await ctx.redis(ctx.store.bank_names)
    if name not in flags:
        raise NotFound(f"bank '{name[:100]}' not found")
    return flags[name]


def _bank_name(raw: object) -> str:
    try:
        return check_bank_name(str(raw))
    except BankError as exc:
        raise BadInput(str(exc)) from None


async def banks_index(request: Request) -> Response:
    require_scope(request, "curate")
    ctx = _ctx(request)
    flags = await ctx.redis(ctx.store.bank_names)
    return JSONResponse([_bank_json(name, flags[name]) for name in sorted(flags)])


async def bank_create(request: Request) -> Response:
    require_scope(request, "curate")
    ctx = _ctx(request)
    data = await _json_object(request)
    if "name" not in data:
        raise BadInput("name is required")
    name = _bank_name(data["name"])
    enabled = _ratio(data, True)
    flags = await ctx.redis(ctx.store.bank_names)
    if name in flags:
        raise ApiError("Bank already exists", status=403)
    await ctx.redis(lambda: ctx.store.set_bank(name, enabled=bool(enabled)))
    return JSONResponse(_bank_json(name, bool(enabled)), status_code=201)


async def bank_show(request: Request) -> Response:
    require_scope(request, "curate")
    ctx = _ctx(request)
    name = request.path_params["name"]
    return JSONResponse(_bank_json(name, await _existing_bank(ctx, name)))


async def bank_update(request: Request) -> Response:
    require_scope(request, "curate")
    ctx = _ctx(request)
    name = request.path_params["name"]
    current = await _existing_bank(ctx, name)
    data = await _json_object(request)
    if data.get("name") not in (None, name):
        raise BadInput("renaming a bank is not supported")
    enabled = _ratio(data, current)
    if enabled != current:
        await ctx.redis(lambda: ctx.store.set_bank(name, enabled=bool(enabled)))
    return JSONResponse(_bank_json(name, bool(enabled)))


async def bank_delete(request: Request) -> Response:
    require_scope(request, "curate")
    ctx = _ctx(request)
    name = request.path_params["name"]
    if check_bank_name_ok(name):
        await ctx.redis(ctx.store.remove_bank, name)
        await ctx.redis(ctx.content.drop_bank, name)
    return JSONResponse({"message": "Done"})


def check_bank_name_ok(name: str) -> bool:
    try:
        check_bank_name(name)
    except BankError:
        return False
    return True


def _entries_from(signals: dict[str, str], metadata: dict[str, Any]) -> list[BankEntry]:
    if not signals:
        raise BadInput("No signals given")
    entries = []
    for kind, value in signals.items():
        if not isinstance(value, str):
            raise BadInput(f"Invalid {str(kind)[:40]} signal: not a string")
        if kind.strip().lower() not in SIGNAL_TYPES:
            raise BadInput(f"No such signal type {str(kind)[:40]}")
        try:
            entries.append(BankEntry.make(kind, value, "0", metadata=metadata))
        except BankError as exc:
            raise BadInput(f"Invalid {kind} signal: {exc}") from None
    return entries


async def _add(ctx: ApiContext, bank: str, entries: list[BankEntry]) -> Response:
    number = await ctx.redis(ctx.content.add, bank, entries)
    return JSONResponse(
        {"id": number, "signals": {e.signal_type: e.value for e in entries}}, status_code=201
    )


async def bank_add_signal(request: Request) -> Response:
    require_scope(request, "curate")
    ctx = _ctx(request)
    name = request.path_params["name"]
    await _existing_bank(ctx, name)
    data = await _json_object(request)
    metadata = data.pop("metadata", None) or {}
    if not isinstance(metadata, dict):
        raise BadInput("metadata should be a json object")
    return await _add(ctx, name, _entries_from(data, metadata))


def _metadata(raw: object) -> dict[str, Any]:
    if raw is None or raw == "":
        return {}
    if isinstance(raw, str):
        import json

        try:
            raw = json.loads(raw)
        except ValueError:
            raise BadInput("metadata should be a json object") from None
    if not isinstance(raw, dict):
        raise BadInput("metadata should be a json object")
    unexpected = set(raw) - {"content_id", "content_uri", "json"}
    if unexpected:
        raise BadInput(f"metadata contains unexpected keys: {', '.join(sorted(unexpected))}")
    return raw


async def bank_add_content(request: Request) -> Response:
    require_scope(request, "curate")
    ctx = _ctx(request)
    name = request.path_params["name"]
    await _existing_bank(ctx, name)
    url = request.query_params.get("url")
    metadata: dict[str, Any] = {}
    if url:
        if request.headers.get("content-type", "").startswith("application/json"):
            metadata = _metadata((await _json_object(request)).get("metadata"))
        signals = await _hash_url(ctx, request, url)
    elif is_multipart(request):
        form = await read_form(request)
        metadata = _metadata(form.get("metadata"))
        signals = await _hash_form(ctx, request)
    else:
        raise BadInput("Neither `url` nor multipart file upload was received")
    found = hma_hashes(ctx, signals)
    if signals.md5 is not None:
        found["md5"] = signals.md5
    if signals.sha256 is not None:
        found["sha256"] = signals.sha256
    found = {k: v for k, v in found.items() if v}
    return await _add(ctx, name, _entries_from(found, metadata))


def _content_number(request: Request) -> int:
    number: int = request.path_params["content_id"]
    return number


async def _content_json(
    ctx: ApiContext, bank: str, number: int, enabled_bank: bool, signals: bool
) -> dict[str, Any]:
    entries = await ctx.redis(ctx.content.entries, bank, number)
    if not entries:
        raise NotFound(f"content '{number}' not found")
    disabled = [e for e in entries if not e.enabled]
    until = max((int(e.metadata.get("disable_until_ts", 1)) for e in disabled), default=0)
    first = entries[0].metadata
    body: dict[str, Any] = {
        "id": number,
        "disable_until_ts": until,
        "collab_metadata": {},
        "original_media_uri": first.get("content_uri"),
        "bank": _bank_json(bank, enabled_bank),
    }
    if signals:
        body["signals"] = {e.signal_type: e.value for e in entries}
    return body


async def content_get(request: Request) -> Response:
    require_scope(request, "curate")
    ctx = _ctx(request)
    name = request.path_params["name"]
    enabled = await _existing_bank(ctx, name)
    signals = _bool(request.query_params.get("include_signals"))
    number = _content_number(request)
    return JSONResponse(await _content_json(ctx, name, number, enabled, signals))


async def content_update(request: Request) -> Response:
    require_scope(request, "curate")
    ctx = _ctx(request)
    name = request.path_params["name"]
    enabled = await _existing_bank(ctx, name)
    number = _content_number(request)
    data = await _json_object(request)
    if "disable_until_ts" in data:
        try:
            until = int(data["disable_until_ts"])
        except (TypeError, ValueError):
            raise BadInput("disable_until_ts must be an integer") from None
        if until < 0:
            raise BadInput("disable_until_ts must be a non-negative integer")
        if until > int(time.time()) + _FIVE_YEARS:
            raise BadInput("disable_until_ts must be less than 5 years in the future")
        # Wall clock on purpose: HMA's field is a Unix time chosen by the client.
        on = until <= int(time.time())
        changed = await ctx.redis(ctx.content.set_enabled, name, number, on, until)
        if not changed:
            raise NotFound(f"content '{number}' not found")
    return JSONResponse(await _content_json(ctx, name, number, enabled, False))


async def content_delete(request: Request) -> Response:
    require_scope(request, "curate")
    ctx = _ctx(request)
    name = request.path_params["name"]
    await _existing_bank(ctx, name)
    count = await ctx.redis(ctx.content.delete, name, _content_number(request))
    return JSONResponse({"deleted": count})


# -- /status ----------------------------------------------------------------------------------


async def status(request: Request) -> Response:
    if not _ctx(request).ready:
        return PlainTextResponse("INDEX-NOT-LOADED", status_code=503)
    return PlainTextResponse("I-AM-ALIVE")


async def status_live(_request: Request) -> Response:
    return PlainTextResponse("I-AM-ALIVE")


def hma_routes() -> list[Route]:
    """Every HMA 2.0 route we serve."""
    bank = "/c/bank/{name}"
    return [
        Route("/h/hash", closing(hash_get), methods=["GET"]),
        Route("/h/hash", closing(hash_post), methods=["POST"]),
        Route("/m/raw_lookup", closing(raw_lookup), methods=["GET"]),
        Route("/m/lookup", closing(lookup_get), methods=["GET"]),
        Route("/m/lookup", closing(lookup_post), methods=["POST"]),
        Route("/m/compare", closing(compare), methods=["POST"]),
        Route("/m/index/status", closing(index_status), methods=["GET"]),
        Route("/c/banks", closing(banks_index), methods=["GET"]),
        Route("/c/banks", closing(bank_create), methods=["POST"]),
        Route(bank, closing(bank_show), methods=["GET"]),
        Route(bank, closing(bank_update), methods=["PUT"]),
        Route(bank, closing(bank_delete), methods=["DELETE"]),
        Route(bank + "/signal", closing(bank_add_signal), methods=["POST"]),
        Route(bank + "/content", closing(bank_add_content), methods=["POST"]),
        Route(bank + "/content/{content_id:int}", closing(content_get), methods=["GET"]),
        Route(bank + "/content/{content_id:int}", closing(content_update), methods=["PUT"]),
        Route(bank + "/content/{content_id:int}", closing(content_delete), methods=["DELETE"]),
        Route("/status", closing(status), methods=["GET"]),
        Route("/status/live", closing(status_live), methods=["GET"]),
    ]
