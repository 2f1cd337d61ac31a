"""parse_event: which Jetstream frames become image jobs, which are skipped, which are malformed."""

from __future__ import annotations

import json
from typing import Any

import pytest

from phash_trio.firehose.events import (
    EXCERPT_CHARS,
    MalformedFrame,
    is_valid_cid,
    is_valid_did,
    parse_event,
)
from phash_trio.pipeline.jobs import BlobRef
from phash_trio.testing.jetstream_replay import (
    fake_cid,
    fake_did,
    identity_event,
    make_blob,
    make_event,
    make_legacy_blob,
    make_post,
)

DID = fake_did("alice")
T = 1_725_000_000_000_000
CID_A = fake_cid("a")
CID_B = fake_cid("b")
CID_C = fake_cid("c")
CIDV0 = "QmYwAPJzv5CZsnA625s3Xf2nemtYgPpHdWEz79ojWnPbdG"


def frame(event: dict[str, Any]) -> str:
    return json.dumps(event)


def images(*blobs: dict[str, Any]) -> dict[str, Any]:
    return {"$type": "app.bsky.embed.images", "images": [{"alt": "", "image": b} for b in blobs]}


def gallery(*items: dict[str, Any]) -> dict[str, Any]:
    return {"$type": "app.bsky.embed.gallery", "items": list(items)}


def gallery_image(blob: dict[str, Any], *, typed: bool = True) -> dict[str, Any]:
    item: dict[str, Any] = {"image": blob, "alt": "", "aspectRatio": {"width": 4, "height": 3}}
    if typed:
        item["$type"] = "app.bsky.embed.gallery#image"
    return item


def quote(media: dict[str, Any] | None = None) -> dict[str, Any]:
    record = {"uri": f"at://{DID}/app.bsky.feed.post/3kq", "cid": fake_cid("q", codec=0x71)}
    if media is None:
        return {"$type": "app.bsky.embed.record", "record": record}
    return {
        "$type": "app.bsky.embed.recordWithMedia",
        "record": {"record": record},
        "media": media,
    }


def post(embed: dict[str, Any] | None, **kw: Any) -> str:
    return frame(make_post(kw.pop("did", DID), kw.pop("rkey", "3kabc"), T, embed=embed, **kw))


def test_images_embed_becomes_a_job() -> None:
    """An images embed yields a job with the post's identity and every blob in order."""
    event = make_post(DID, "3kxyz", T, embed=images(make_blob(CID_A), make_blob(CID_B)))
    parsed = parse_event(frame(event))
    assert parsed.skip_reason is None and parsed.bad_blobs == 0 and parsed.time_us == T
    job = parsed.job
    assert job is not None
    assert (job.did, job.rkey, job.cid, job.time_us) == (DID, "3kxyz", event["commit"]["cid"], T)
    assert job.blobs == (BlobRef(CID_A, "image/jpeg", 1000), BlobRef(CID_B, "image/jpeg", 1000))
    assert job.uri == f"at://{DID}/app.bsky.feed.post/3kxyz"


def test_gallery_embed_typed_and_untyped_items() -> None:
    """Gallery items of type #image, or untyped with an image blob, are images; others are not."""
    other = {"$type": "app.bsky.embed.gallery#video", "video": make_blob(CID_C)}
    embed = gallery(
        gallery_image(make_blob(CID_A)), other, gallery_image(make_blob(CID_B), typed=False)
    )
    parsed = parse_event(post(embed))
    assert parsed.job is not None
    assert [b.cid for b in parsed.job.blobs] == [CID_A, CID_B]


@pytest.mark.parametrize(
    "media",
    [images(make_blob(CID_A)), gallery(gallery_image(make_blob(CID_A)))],
    ids=["images", "gallery"],
)
def test_record_with_media_images(media: dict[str, Any]) -> None:
    """A quote post whose media is images or a gallery yields a job."""
    parsed = parse_event(post(quote(media)))
    assert parsed.job is not None
    assert parsed.job.blobs == (BlobRef(CID_A, "image/jpeg", 1000),)


def test_legacy_blob_shape() -> None:
    """The legacy ``{cid, mimeType}`` blob is read like the current one, without a size."""
    parsed = parse_event(post(images(make_legacy_blob(CID_A, mime_type="image/png"))))
    assert parsed.job is not None
    assert parsed.job.blobs == (BlobRef(CID_A, "image/png", None),)


def test_cidv0_blob_is_accepted() -> None:
    """A CIDv0 (Qm...) blob reference is valid."""
    parsed = parse_event(post(images(make_blob(CIDV0))))
    assert parsed.job is not None and parsed.job.blobs[0].cid == CIDV0


def test_duplicate_blob_cids_are_merged() -> None:
    """The same blob twice in one post is hashed once, first occurrence kept in place."""
    parsed = parse_event(post(images(make_blob(CID_A), make_blob(CID_B), make_blob(CID_A))))
    assert parsed.job is not None
    assert [b.cid for b in parsed.job.blobs] == [CID_A, CID_B]


def test_bad_blob_cids_are_counted_and_the_rest_kept() -> None:
    """Blobs without a valid CID are dropped and counted; the valid ones still make a job."""
    bad = [
        make_blob("bafkrei-not-base32!"),
        make_blob(CID_A.upper()),
        {"$type": "blob", "ref": {}, "mimeType": "image/jpeg"},
        "not a blob",
    ]
    embed = images(make_blob(CID_A), *bad)
    embed["images"].append("not an image entry")
    parsed = parse_event(post(embed))
    assert parsed.job is not None
    assert [b.cid for b in parsed.job.blobs] == [CID_A]
    assert parsed.bad_blobs == 5


def test_all_blobs_bad_is_malformed_with_time() -> None:
    """A post whose every image blob is invalid is malformed, and its time_us is kept."""
    with pytest.raises(MalformedFrame) as info:
        parse_event(post(images(make_blob("Qm123"), make_legacy_blob("zzz"))))
    assert info.value.time_us == T
    assert "2 image blobs" in info.value.reason


@pytest.mark.parametrize(
    ("event", "reason"),
    [
        (make_event(DID, T, operation="delete"), "delete"),
        (make_event(DID, T, operation="update"), "update"),
        (identity_event(DID, T), "identity"),
        (identity_event(DID, T, kind="account"), "account"),
        (make_event(DID, T, collection="app.bsky.feed.like"), "other_collection"),
        (make_post(DID, "3k", T), "no_embed"),
        (make_post(DID, "3k", T, embed={"$type": "app.bsky.embed.video"}), "video"),
        (make_post(DID, "3k", T, embed={"$type": "app.bsky.embed.external"}), "external"),
        (make_post(DID, "3k", T, embed=quote()), "record_only"),
        (make_post(DID, "3k", T, embed=images()), "no_images"),
        (make_post(DID, "3k", T, embed=gallery()), "no_images"),
        (make_post(DID, "3k", T, embed=quote({"$type": "app.bsky.embed.video"})), "video"),
        (make_post(DID, "3k", T, embed=quote({"$type": "app.bsky.embed.external"})), "external"),
        (make_post(DID, "3k", T, embed={"$type": "app.bsky.embed.future"}), "other_embed"),
        ({"did": DID, "time_us": T, "kind": "sync"}, "other_kind"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_skipped_kinds(event: dict[str, Any], reason: str) -> None:
    """Events that carry no image post are skipped with their reason and their time_us."""
    parsed = parse_event(frame(event))
    assert (parsed.job, parsed.skip_reason, parsed.time_us) == (None, reason, T)


def test_identity_distinguishes_events_at_the_same_time() -> None:
    """Two events with one time_us differ in identity (used to drop replays)."""
    a = parse_event(frame(make_post(DID, "3ka", T)))
    b = parse_event(frame(make_post(DID, "3kb", T)))
    assert a.identity != b.identity
    assert a.identity == parse_event(frame(make_post(DID, "3ka", T))).identity


@pytest.mark.parametrize(
    "did",
    [
        "did:plc:abc",
        "did:plc:" + "A" * 24,
        "did:plc:" + "a" * 25,
        "did:plc:" + "a" * 23 + "1",
        "did:key:z6Mkabc",
        "did:web:",
        "did:web:example.com/path",
        "did:web:example.com:user:alice",
        "did:web:-bad.example",
        "",
    ],
)
def test_bad_did_on_an_image_post_is_malformed(did: str) -> None:
    """An image post whose DID is not did:plc or did:web:host is malformed."""
    with pytest.raises(MalformedFrame, match="did") as info:
        parse_event(post(images(make_blob(CID_A)), did=did))
    assert info.value.time_us == T


def test_valid_dids() -> None:
    """did:plc with 24 base32 characters and did:web hosts (with an encoded port) are valid."""
    assert is_valid_did(DID)
    assert is_valid_did("did:web:example.com")
    assert is_valid_did("did:web:localhost%3A8080")
    assert parse_event(post(images(make_blob(CID_A)), did="did:web:pds.example.org")).job


def test_cid_syntax() -> None:
    """CIDv1 lower base32 and CIDv0 base58 pass; other strings do not."""
    assert is_valid_cid(CID_A) and is_valid_cid(CIDV0)
    for bad in [CID_A.upper(), "b" + "1" * 58, CIDV0[:-1], CIDV0 + "0", "", None, 7]:
        assert not is_valid_cid(bad), bad


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        ("{not json", "invalid JSON"),
        ("", "invalid JSON"),
        ("[1, 2]", "not a JSON object"),
        (b"\xff\xfe garbage", "not UTF-8"),
        ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
        ('{"kind": "commit"}', "time_us"),
        ('{"time_us": "1725000000000000", "kind": "identity"}', "time_us"),
        ('{"time_us": true, "kind": "identity"}', "time_us"),
        ('{"time_us": 1.5e15, "kind": "identity"}', "time_us"),
        ('{"time_us": -5, "kind": "identity"}', "out of range"),
        ('{"time_us": ' + "9" * 5000 + "}", "invalid JSON"),
    ],
    ids=[
        "bad-json",
        "empty",
        "array",
        "not-utf8",
        "deep-nesting",
        "no-time",
        "string-time",
        "bool-time",
        "float-time",
        "negative-time",
        "huge-int",
    ],
)
def test_malformed_without_time(data: str | bytes, reason: str) -> None:
    """Frames that are not JSON objects with an integer time_us are malformed, with no time."""
    with pytest.raises(MalformedFrame, match=reason) as info:
        parse_event(data)
    assert info.value.time_us is None
    assert len(info.value.excerpt) <= EXCERPT_CHARS


@pytest.mark.parametrize("missing", ["rkey", "cid", "record", "operation", "collection"])
def test_commit_create_missing_field(missing: str) -> None:
    """A post create lacking a required commit field is malformed but keeps its time_us."""
    event = make_post(DID, "3kabc", T, embed=images(make_blob(CID_A)))
    del event["commit"][missing]
    with pytest.raises(MalformedFrame, match=missing) as info:
        parse_event(frame(event))
    assert info.value.time_us == T


@pytest.mark.parametrize(
    ("path", "value", "match"),
    [
        (("commit", "rkey"), "../etc", "rkey"),
        (("commit", "cid"), "not-a-cid", "commit.cid"),
        (("commit",), "a string", "commit is missing"),
        (("commit", "record", "embed"), ["x"], "embed is not an object"),
        (("commit", "record", "embed"), {"images": []}, r"no \$type"),
        (("commit", "record", "embed"), {"$type": "app.bsky.embed.images"}, "images list"),
        (("commit", "record", "embed"), {"$type": "app.bsky.embed.recordWithMedia"}, "media"),
        (("kind",), None, "kind"),
    ],
)
def test_malformed_commit_fields(path: tuple[str, ...], value: Any, match: str) -> None:
    """Ill-typed fields of a post create are malformed with a reason naming the field."""
    event = make_post(DID, "3kabc", T, embed=images(make_blob(CID_A)))
    target = event
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    with pytest.raises(MalformedFrame, match=match) as info:
        parse_event(frame(event))
    assert info.value.time_us == T


def test_huge_garbage_frame_has_a_short_excerpt() -> None:
    """A 9 MB garbage frame is malformed and its excerpt stays at 200 characters."""
    data = "x" * (9 * 1024 * 1024)
    with pytest.raises(MalformedFrame) as info:
        parse_event(data)
    assert info.value.excerpt == "x" * EXCERPT_CHARS
    assert "\n" not in str(info.value) and len(str(info.value)) < 300


def test_huge_valid_frame_is_parsed() -> None:
    """A 3 MB post (long fields) still parses into a job, from bytes as well as str."""
    event = make_post(DID, "3kabc", T, embed=images(make_blob(CID_A)), text="y" * 3_000_000)
    data = frame(event)
    assert len(data) > 3_000_000
    job = parse_event(data).job
    assert job is not None and job.blobs[0].cid == CID_A
    assert parse_event(data.encode()).job == job


def test_blob_size_and_mime_are_sanitised() -> None:
    """A non-integer or negative size and a non-string mimeType become None."""
    blob1 = {"$type": "blob", "ref": {"$link": CID_A}, "mimeType": 5, "size": -1}
    blob2 = {"$type": "blob", "ref": {"$link": CID_B}, "mimeType": "image/png", "size": True}
    parsed = parse_event(post(images(blob1, blob2)))
    assert parsed.job is not None
    assert parsed.job.blobs == (BlobRef(CID_A, None, None), BlobRef(CID_B, "image/png", None))
